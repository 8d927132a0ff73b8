"""`attune adapters add | remove | list` on temporary stores: a shipped adapter copied out with its manifest entry is
added only while its bytes match that entry; unknown folders need --id/--recipe/--weights; the reward model, the
judge and unknown ids cannot be removed. Refusals exit 2 and leave the target store as it was."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from adapters.manifest import StoreManifest, load_manifest, save_manifest
from adapters.registry import AdapterStore
from attune import cli
from attune.paths import STORE_DIR

SHIPPED = "sft"


def export(tmp_path: Path, adapter_id: str = SHIPPED) -> Path:
    """The shipped adapter copied into a one-adapter store of its own (folder + manifest with its entry)."""
    src = tmp_path / "export"
    shutil.copytree(STORE_DIR / adapter_id, src / adapter_id)
    save_manifest(StoreManifest(adapters=[AdapterStore(STORE_DIR).entry(adapter_id)]), src / "manifest.json")
    return src / adapter_id


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def store(tmp_path) -> Path:
    return tmp_path / "store"


def test_add_keeps_the_carried_entry_and_list_shows_it(tmp_path, store, capsys):
    folder = export(tmp_path)
    code, out, err = run(capsys, "adapters", "add", str(folder), "--store", str(store))
    assert code == 0, err
    assert "verified against" in out
    shipped, added = AdapterStore(STORE_DIR).entry(SHIPPED), AdapterStore(store).entry(SHIPPED)
    assert added == shipped, "the entry (files, weights, created, eval) travels unchanged"
    assert AdapterStore(store).verify_all() == {}
    code, out, _ = run(capsys, "adapters", "list", "--store", str(store))
    assert code == 0 and out.split()[:2] == [SHIPPED, shipped.recipe]


def test_a_tampered_byte_is_refused_and_nothing_is_registered(tmp_path, store, capsys):
    folder = export(tmp_path)
    weights = folder / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    code, out, err = run(capsys, "adapters", "add", str(folder), "--store", str(store))
    assert code == 2 and out == ""
    assert "refused" in err and "sha256" in err and "changed: adapter_model.safetensors" in err
    assert AdapterStore(store).list() == [] and not (store / SHIPPED).exists()


def test_an_extra_file_is_refused_too(tmp_path, store, capsys):
    folder = export(tmp_path)
    (folder / "notes.txt").write_text("not in the allowlist")
    code, _, err = run(capsys, "adapters", "add", str(folder), "--store", str(store))
    assert code == 2 and "extra: notes.txt" in err


def test_an_unknown_folder_needs_id_recipe_and_weights(tmp_path, store, capsys):
    loose = tmp_path / "loose" / "mine"
    shutil.copytree(STORE_DIR / SHIPPED, loose)
    code, _, err = run(capsys, "adapters", "add", str(loose), "--store", str(store))
    assert code == 2 and "carries no manifest entry" in err and "--id --recipe --weights" in err
    assert not store.exists() or AdapterStore(store).list() == []

    code, out, err = run(capsys, "adapters", "add", str(loose), "--store", str(store), "--id", "mine-warm",
                         "--recipe", "dpo", "--weights", "empathy=0.8", "safety=0.2")
    assert code == 0, err
    entry = AdapterStore(store).entry("mine-warm")
    assert entry.weights["empathy"] == 0.8 and entry.weights["patient_autonomy"] == 0.0
    assert entry.files == AdapterStore(STORE_DIR).entry(SHIPPED).files, "hashed on entry"
    assert entry.base_model == "smollm2-135m-instruct"
    assert entry.lora == AdapterStore(STORE_DIR).entry(SHIPPED).lora, "read from adapter_config.json"

    code, _, err = run(capsys, "adapters", "add", str(loose), "--store", str(store), "--id", "mine-json",
                       "--recipe", "dpo", "--weights", json.dumps({"safety": 1.0}))
    assert code == 0, err
    assert AdapterStore(store).entry("mine-json").weights["safety"] == 1.0


@pytest.mark.parametrize("flags, message", [
    (["--weights", "empathy=0.5", "kindness=0.5"], "kindness"),
    (["--weights", "empathy=0.5"], "sum"),
    (["--weights", "empathy"], "objective=weight"),
    (["--weights", "{not json"], "not valid JSON"),
    (["--recipe", "magic"], "recipe"),
    (["--id", "Bad Id"], "slug"),
    (["--id", "reward"], "reward model folder"),
])
def test_invalid_manifest_fields_are_refused_with_the_field_named(tmp_path, store, capsys, flags, message):
    folder = export(tmp_path)
    code, _, err = run(capsys, "adapters", "add", str(folder), "--store", str(store), *flags)
    assert code == 2 and message in err, err
    assert not store.exists() or AdapterStore(store).list() == []


def test_adding_the_same_id_twice_is_refused(tmp_path, store, capsys):
    folder = export(tmp_path)
    assert run(capsys, "adapters", "add", str(folder), "--store", str(store))[0] == 0
    code, _, err = run(capsys, "adapters", "add", str(folder), "--store", str(store))
    assert code == 2 and "already in the store" in err


def test_remove_drops_entry_and_folder_but_refuses_unknown_and_model_folders(tmp_path, store, capsys):
    folder = export(tmp_path)
    assert run(capsys, "adapters", "add", str(folder), "--store", str(store))[0] == 0
    (store / "reward").mkdir()
    for adapter_id, message in (("reward", "cannot be removed"), ("judge", "cannot be removed"),
                                ("nope", "unknown adapter 'nope'")):
        code, _, err = run(capsys, "adapters", "remove", adapter_id, "--store", str(store))
        assert code == 2 and message in err, err
    assert (store / "reward").is_dir() and AdapterStore(store).ids() == [SHIPPED]
    code, out, err = run(capsys, "adapters", "remove", SHIPPED, "--store", str(store))
    assert code == 0, err
    assert load_manifest(store / "manifest.json").adapters == [] and not (store / SHIPPED).exists()
    assert (STORE_DIR / SHIPPED).is_dir(), "the source store is untouched"


def test_missing_arguments_are_usage_errors(capsys):
    assert run(capsys, "adapters", "add")[0] == 2
    assert run(capsys, "adapters", "remove")[0] == 2
