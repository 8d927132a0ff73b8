"""Where LoRA time goes in vLLM on this CPU: one offline engine (the serving engine's LoRA settings), the same
8 prompts generated (a) with no adapter, (b) all with one adapter, (c) with eight adapters mixed, greedy, a
fixed number of tokens. Prints tokens/s and the ratio to (a). Run once per kernel setting and compare:

    python benchmarks/lora_cpu.py                             # Attune's grouped LoRA kernels (the default)
    ATTUNE_VLLM_LORA_KERNELS=vllm python benchmarks/lora_cpu.py   # vLLM's stock CPU kernels
    python benchmarks/lora_cpu.py --profile                   # plus torch profiler top ops for (c)

Not a test: it prints figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--json", help="also write the figures here")
    a = p.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from adapters.matching import ROUTABLE_RECIPES
    from adapters.registry import AdapterStore
    from alignment.basemodel import resolve
    from alignment.prompts import chat
    from attune.paths import STORE_DIR

    store = AdapterStore(STORE_DIR)
    adapters = [m for m in store.list() if m.recipe in ROUTABLE_RECIPES][:8]
    llm = LLM(model=str(resolve("smollm2-135m-instruct")), dtype="bfloat16", enable_lora=True, max_loras=8,
              max_lora_rank=a.max_lora_rank, max_model_len=1024, max_num_seqs=16, seed=0,
              kv_cache_memory_bytes=512 << 20)
    questions = ["I can't sleep and my mind keeps racing about work.", "My partner and I fight every evening.",
                 "Since my father died I feel numb.", "I drink more than I want to on weekends.",
                 "I feel lonely even when I'm with friends.", "My boss criticises everything I do.",
                 "I get panic attacks on the train.", "I keep replaying an old accident in my head."]
    prompts = [chat(questions[i % len(questions)]) for i in range(a.batch)]
    params = SamplingParams(max_tokens=a.tokens, min_tokens=a.tokens, temperature=0.0)
    reqs = {m.id: LoRARequest(m.id, i + 1, str(store.path(m.id))) for i, m in enumerate(adapters)}
    setups = {
        "(a) base": [None] * a.batch,
        "(b) 1 adapter": [reqs[adapters[0].id]] * a.batch,
        "(c) 8 mixed": [reqs[adapters[i % len(adapters)].id] for i in range(a.batch)],
    }
    for loras in setups.values():  # warm-up: loads every adapter, compiles whatever is compiled
        llm.chat(prompts, params, lora_request=loras, use_tqdm=False)
    times: dict[str, list[float]] = {k: [] for k in setups}
    for _ in range(a.repeats):  # interleaved, so a busy machine slows every setup alike
        for name, loras in setups.items():
            t = time.perf_counter()
            llm.chat(prompts, params, lora_request=loras, use_tqdm=False)
            times[name].append(time.perf_counter() - t)
    kernels = os.environ.get("ATTUNE_VLLM_LORA_KERNELS", "grouped")
    base = a.batch * a.tokens / statistics.median(times["(a) base"])
    rows = {}
    print(f"\nkernels={kernels} batch={a.batch} tokens={a.tokens} max_lora_rank={a.max_lora_rank} "
          f"repeats={a.repeats}\n| setup | tok/s | vs (a) |\n|---|---|---|")
    for name, ts in times.items():
        tps = a.batch * a.tokens / statistics.median(ts)
        rows[name] = {"tok_s": round(tps, 1), "vs_base": round(tps / base, 3), "seconds": ts}
        print(f"| {name} | {tps:.1f} | {tps / base:.2f}x |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"kernels": kernels, "batch": a.batch, "tokens": a.tokens, "rows": rows}, f, indent=1)
    if a.profile:
        import torch

        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            llm.chat(prompts, params, lora_request=setups["(c) 8 mixed"], use_tqdm=False)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
