"""vLLM's offline generation speed in each dtype on this machine: base model, the first N rm-val prompts (greedy,
64 tokens), one engine per dtype started in turn. Where the CPU lacks AVX512-BF16/AMX, vLLM emulates bfloat16 and
float32 is the faster one; `alignment.basemodel.engine_dtype("native")` picks by the CPU's flags.
    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/engine_dtype.py [--prompts 16] [--dtypes float32 bfloat16]
"""
from __future__ import annotations

import argparse
import os
import time


def measure(dtype: str, prompts: int) -> dict:
    from vllm import LLM, SamplingParams

    from alignment import basemodel
    from alignment import prompts as P
    from alignment.pipeline import counsel_chat_source
    from evals.tune import rmval_prompts

    convs = [P.chat(it["prompt"]) for it in rmval_prompts(counsel_chat_source(None))[:prompts]]
    started = time.perf_counter()
    llm = LLM(model=basemodel.resolve(None), dtype=dtype, max_model_len=1024, seed=0, gpu_memory_utilization=0.1)
    ready = time.perf_counter()
    outs = llm.chat(convs, SamplingParams(max_tokens=64, temperature=0.0), use_tqdm=False)
    done = time.perf_counter()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    llm.llm_engine.engine_core.shutdown()
    return {"dtype": dtype, "startup_s": ready - started, "generate_s": done - ready, "tokens": tokens}


def main() -> None:
    from alignment.basemodel import engine_dtype, native_bf16

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    print(f"native bf16: {native_bf16()}; engine_dtype('native') = {engine_dtype()}")
    for dtype in args.dtypes:
        r = measure(dtype, args.prompts)
        print(f"{dtype}: {args.prompts} prompts, {r['tokens']} tokens in {r['generate_s']:.1f} s = "
              f"{r['tokens'] / r['generate_s']:.1f} tok/s (engine start {r['startup_s']:.0f} s)", flush=True)


if __name__ == "__main__":  # vLLM's engine process is spawned: the guard keeps it from re-running main
    main()
