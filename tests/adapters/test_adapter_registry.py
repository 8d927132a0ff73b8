"""AdapterStore: add/get/remove round trip, refusal of tampered, duplicate and non-PEFT folders."""
from __future__ import annotations

import json
import threading

import pytest

from adapters.integrity import IntegrityError
from adapters.manifest import ManifestError, load_manifest
from adapters.registry import AdapterStore, UnknownAdapter
from lora_helpers import entry


def fake_lora(folder, r=8, alpha=16, targets=("v_proj", "q_proj")):
    folder.mkdir(parents=True)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(targets)}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 64 + folder.name.encode())
    return folder


@pytest.fixture
def store(tmp_path):
    return AdapterStore(tmp_path / "store")


def test_round_trip(store, tmp_path):
    src = fake_lora(tmp_path / "src")
    added = store.add(src, entry("warm-v1", eval={"empathy": 0.7}))
    assert added.lora.r == 8 and added.lora.target_modules == ["q_proj", "v_proj"]
    assert set(added.files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert store.get("warm-v1") == store.root / "warm-v1"
    assert (store.root / "warm-v1" / "adapter_model.safetensors").read_bytes().endswith(b"src")
    assert [a.id for a in store.list()] == ["warm-v1"]
    assert load_manifest(store.manifest_path).adapters[0].eval == {"empathy": 0.7}
    assert store.verify_all() == {}
    store.remove("warm-v1")
    assert store.list() == [] and not (store.root / "warm-v1").exists()
    assert src.exists()


def test_tampered_adapter_refused(store, tmp_path):
    store.add(fake_lora(tmp_path / "src"), entry("a1"))
    store.add(fake_lora(tmp_path / "src2"), entry("a2"))
    with open(store.root / "a1" / "adapter_model.safetensors", "r+b") as f:
        f.write(b"\1")
    with pytest.raises(IntegrityError, match="changed: adapter_model.safetensors"):
        store.get("a1")
    (store.root / "a2" / "extra.bin").write_bytes(b"")
    failures = store.verify_all()
    assert sorted(failures) == ["a1", "a2"] and failures["a2"].extra == ["extra.bin"]


def test_unknown_id_lists_known(store, tmp_path):
    store.add(fake_lora(tmp_path / "src"), entry("a1"))
    with pytest.raises(UnknownAdapter) as exc:
        store.get("nope")
    assert isinstance(exc.value, KeyError) and exc.value.known == ["a1"] and "['a1']" in str(exc.value)
    with pytest.raises(UnknownAdapter):
        store.remove("nope")


def test_duplicate_id_refused(store, tmp_path):
    store.add(fake_lora(tmp_path / "src"), entry("a1"))
    with pytest.raises(ValueError, match="already in the store"):
        store.add(fake_lora(tmp_path / "other"), entry("a1"))
    assert len(store.list()) == 1


def test_non_peft_and_inconsistent_folders_refused(store, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        store.add(bare, entry("a1"))
    src = fake_lora(tmp_path / "src")
    with pytest.raises(ManifestError, match="disagrees"):
        store.add(src, entry("a1", lora={"r": 4, "alpha": 16, "target_modules": ["q_proj"]}))
    with pytest.raises(ManifestError, match="weights"):
        store.add(src, entry("a1", weights={"empathy": 2.0}))
    with pytest.raises(ValueError, match="leave `files` out"):
        store.add(src, entry("a1", files={"x": "0" * 64}))
    assert store.list() == [] and not (store.root / "a1").exists()


def test_copy_false_registers_in_place_only(store, tmp_path):
    with pytest.raises(ValueError, match="copy=True"):
        store.add(fake_lora(tmp_path / "src"), entry("a1"), copy=False)
    fake_lora(store.root / "a2")
    store.add(store.root / "a2", entry("a2"), copy=False)
    assert store.get("a2") == store.root / "a2"


def test_concurrent_adds_all_kept(store, tmp_path):
    folders = [fake_lora(tmp_path / f"s{i}") for i in range(6)]
    threads = [threading.Thread(target=store.add, args=(f, entry(f"a{i}"))) for i, f in enumerate(folders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.ids() == [f"a{i}" for i in range(6)]


def test_default_root_is_store_dir():
    from attune.paths import STORE_DIR

    assert AdapterStore().root == STORE_DIR


def test_scorer_folders_are_checked_against_the_manifest(store):
    folder = store.root / "reward"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "heads.safetensors").write_bytes(b"x" * 10)
    with pytest.raises(IntegrityError, match="no sha256 allowlist"):
        store.scorer("reward")
    files = store.register_scorer("reward")
    assert set(files) == {"config.json", "heads.safetensors"} and store.scorer("reward") == folder
    assert load_manifest(store.manifest_path).scorers["reward"] == files
    (folder / "heads.safetensors").write_bytes(b"y" * 10)
    with pytest.raises(IntegrityError, match="changed: heads.safetensors"):
        store.scorer("reward")
    assert set(store.verify_all()) == {"reward"}
    with pytest.raises(ValueError, match="not a scorer folder"):
        store.register_scorer("sft")


def test_snapshot_is_shared_until_the_manifest_changes_and_manifest_stays_a_copy(store, tmp_path):
    store.add(fake_lora(tmp_path / "a"), entry("warm-v1"))
    first = store.snapshot()
    assert store.snapshot() is first, "read again, not copied, while the file is unchanged"
    assert store.manifest() is not first and store.manifest() == first
    store.add(fake_lora(tmp_path / "b"), entry("warm-v2"))
    assert [a.id for a in store.snapshot().adapters] == ["warm-v1", "warm-v2"]
