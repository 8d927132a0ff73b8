"""Helpers for the adapter tests: random LoRA folders and manifest entries (imported by name: keep it unique)."""
from __future__ import annotations

import json
from pathlib import Path

from alignment.objectives import OBJECTIVES

BALANCED = {o: 1 / 6 for o in OBJECTIVES}


def make_lora(base: Path, out: Path, seed: int, **lora_kwargs) -> Path:
    """Save a LoRA with random A and B (non-zero delta) on the model at `base`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kwargs))
    peft_model.save_pretrained(out)
    return out


def entry(adapter_id: str, recipe: str = "modpo", weights: dict | None = None, **extra) -> dict:
    """A manifest entry without `files` or `lora` (the store fills both)."""
    return {"id": adapter_id, "recipe": recipe, "weights": weights or dict(BALANCED),
            "base_model": "tiny-llama", "data_hash": "sha256:test", **extra}


def read_config(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def make_store(root: Path, ids=("warm", "calm")):
    """A store of folders with the two files of a PEFT LoRA (the bytes need not be real weights), one per id."""
    from adapters.registry import AdapterStore

    store = AdapterStore(root)
    for adapter_id in ids:
        folder = root.parent / f"src-{adapter_id}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}))
        (folder / "adapter_model.safetensors").write_bytes(adapter_id.encode() * 16)
        store.add(folder, {"id": adapter_id, "recipe": "modpo", "weights": {o: 1 / 6 for o in OBJECTIVES},
                           "base_model": "test", "data_hash": "sha256:test"})
    return store
