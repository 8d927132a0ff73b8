"""Faster multi-LoRA on vLLM's CPU backend: a vLLM general plugin (entry point `vllm.general_plugins`).

Why: vLLM's CPU punica ops (vllm/lora/ops/torch_ops) gather a full copy of the adapter weights for every token
(`weights[indices]`) and run a batched einsum, for every LoRA-capable module of every layer, whether or not
the adapter touches it. Attune's adapters touch q/v of the top 10 of 30 layers, so most of that work multiplies
zeros. `python benchmarks/lora_cpu.py` profiled it: index + bmm + copy + repeat_interleave took ~70% of decode
time with eight adapters mixed.

What this does instead, in `PunicaWrapperCPU.add_lora_linear` only (the path every linear LoRA layer takes):
- once per forward step, the batch's tokens are cut into runs of consecutive tokens that share an adapter slot;
- each run is two small matmuls on a contiguous slice (no per-token weight copies);
- a slot whose A or B weights are all zero for that module (the adapter does not target it) is skipped; which
  slots are live is cached per weight tensor and its version counter, so loading or evicting an adapter (an
  in-place write) invalidates it;
- slot -1 (a request without an adapter) gets no LoRA. (The stock CPU ops index `weights[-1]`, the last slot.)
Anything else (embeddings, logits, unexpected shapes) keeps vLLM's own code.

`ATTUNE_VLLM_LORA_KERNELS=vllm` turns the plugin off, for comparison.
"""
from __future__ import annotations

import logging
import os

KERNELS_ENV = "ATTUNE_VLLM_LORA_KERNELS"
log = logging.getLogger("attune.vllm_lora")
_MAX_CACHE = 4096


def enabled() -> bool:
    return os.environ.get(KERNELS_ENV, "grouped").lower() != "vllm"


def token_runs(indices: list[int]) -> list[tuple[int, int, int]]:
    """[(start, end, slot)] for each run of equal consecutive slots, skipping slot < 0 (no adapter)."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(indices) + 1):
        if i == len(indices) or indices[i] != indices[start]:
            if indices[start] >= 0:
                runs.append((start, i, indices[start]))
            start = i
    return runs


class LiveSlots:
    """Which adapter slots of a stacked LoRA weight ([slots, 1, rows, cols]) hold any non-zero value."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int, tuple[int, ...]], list[bool]] = {}

    def __call__(self, w) -> list[bool]:
        key = (w.data_ptr(), w._version, tuple(w.shape))
        live = self._cache.get(key)
        if live is None:
            if len(self._cache) >= _MAX_CACHE:
                self._cache.clear()
            live = self._cache[key] = w.reshape(w.shape[0], -1).ne(0).any(dim=1).tolist()
        return live


def add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale: float, output_slices, runs, live: LiveSlots) -> bool:
    """y[:, slice] += scale * x @ A[slot].T @ B[slot].T per run and output slice, in place. Returns False (and
    writes nothing) when the shapes are not the ones this handles, so the caller falls back to vLLM's code."""
    y2, x2 = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
    total = runs[-1][1] if runs else 0
    if total > x2.shape[0] or x2.shape[0] != y2.shape[0] or sum(output_slices) > y2.shape[1]:
        return False
    offset = 0
    for a, b, size in zip(lora_a_stacked, lora_b_stacked, output_slices):
        if a.dim() != 4 or b.dim() != 4 or b.shape[-2] < size:
            return False
        live_a, live_b = live(a), live(b)
        for start, end, slot in runs:
            if slot < len(live_a) and live_a[slot] and live_b[slot]:
                h = (x2[start:end].float() @ a[slot, 0].float().T) * scale
                y2[start:end, offset:offset + size] += h.to(y2.dtype) @ b[slot, 0, :size].to(y2.dtype).T
        offset += size
    return True


def register() -> None:
    """vLLM calls this in every process it starts (idempotent)."""
    if not enabled():
        return
    try:
        from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    except ImportError:  # a vLLM without the CPU backend: nothing to do
        return
    if getattr(PunicaWrapperCPU, "_attune_grouped", False):
        return
    stock_linear, stock_update = PunicaWrapperCPU.add_lora_linear, PunicaWrapperCPU.update_metadata
    live = LiveSlots()

    def update_metadata(self, *args, **kwargs):
        stock_update(self, *args, **kwargs)
        self._attune_runs = token_runs(self.token_lora_indices.tolist())

    def fast_add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None,
                             **kwargs):
        runs = getattr(self, "_attune_runs", None)
        if runs is not None and add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, runs,
                                                live):
            return
        stock_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs)

    PunicaWrapperCPU.update_metadata = update_metadata
    PunicaWrapperCPU.add_lora_linear = fast_add_lora_linear
    PunicaWrapperCPU._attune_grouped = True
    log.info("Attune grouped LoRA kernels on (set %s=vllm for vLLM's own)", KERNELS_ENV)
