"""The shipped store: every adapter of the shipped recipe is present, every file matches the
sha256 in manifest.json, each folder is a plain PEFT LoRA, and the whole store stays small."""
import json

import pytest

from adapters.registry import AdapterStore
from alignment.recipe import load_recipe
from attune.paths import STORE_DIR

pytestmark = pytest.mark.skipif(not (STORE_DIR / "manifest.json").exists(),
                                reason="no shipped adapters yet (run `attune train`)")


def test_every_shipped_adapter_verifies_against_its_checksums():
    store = AdapterStore(STORE_DIR)
    assert store.verify_all() == {}
    assert set(store.manifest().scorers) == {"reward", "judge", "crisis"}, "the scorers are checksummed too"
    recipe = load_recipe("shipped")
    assert {a.id for a in recipe.adapters} <= set(store.ids())


def test_shipped_adapters_are_plain_peft_folders_with_full_manifest_entries():
    store = AdapterStore(STORE_DIR)
    for entry in store.list():
        folder = store.get(entry.id)
        cfg = json.loads((folder / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] <= 32
        assert (folder / "adapter_model.safetensors").exists()
        assert entry.base_model and entry.data_hash and entry.files
        assert abs(sum(entry.weights.values()) - 1) < 1e-3
        if entry.recipe == "modpo":
            assert entry.weights["safety"] >= load_recipe("shipped").safety_floor - 1e-9


def test_store_is_small():
    total = sum(p.stat().st_size for p in STORE_DIR.rglob("*") if p.is_file())
    assert total < 40e6, f"adapters/store is {total / 1e6:.1f} MB; keep shipped artefacts well under 40 MB"
