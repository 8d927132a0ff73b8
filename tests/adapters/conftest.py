"""Fixtures for the adapter store: a tiny random Llama and small random LoRA folders on it (seconds on CPU)."""
from __future__ import annotations

from pathlib import Path

import pytest

from lora_helpers import make_lora


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama-adapters")
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def lora_a(tiny_llama, tmp_path_factory) -> Path:
    """r=4, alpha=8, rsLoRA, on q/v/o: as the first parent its use_rslora is what PEFT copies into a merge."""
    return make_lora(tiny_llama, tmp_path_factory.mktemp("lora-a"), 1, r=4, lora_alpha=8, use_rslora=True,
                     target_modules=["q_proj", "v_proj", "o_proj"])


@pytest.fixture(scope="session")
def lora_b(tiny_llama, tmp_path_factory) -> Path:
    """r=8, alpha=4 on q/k/v/gate: different rank, scaling rule and module set from lora_a."""
    return make_lora(tiny_llama, tmp_path_factory.mktemp("lora-b"), 2, r=8, lora_alpha=4,
                     target_modules=["q_proj", "k_proj", "v_proj", "gate_proj"])


@pytest.fixture(scope="session")
def signing_keys(tmp_path_factory) -> tuple[Path, Path]:
    """A test Ed25519 pair (private key file mode 0600, public key): stands in for the operator's keys."""
    from adapters.signing import generate_key_pair

    private, public, _ = generate_key_pair(tmp_path_factory.mktemp("signing-keys") / "test-signing.key")
    return private, public
