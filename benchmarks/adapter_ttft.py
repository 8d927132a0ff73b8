"""Does an adapter cost time to first token in Attune's own serving path? Starts `attune serve` (built-in defaults,
gate off through the operator key, as `attune bench serve --vs-vllm`), and sends, one at a time, each prompt with
no adapter and with one of the listed adapters, in pairs whose order alternates round by round, so that the machine's
drift (minutes long here) falls on both halves of a pair alike. The same prompts and adapters as `--vs-vllm`: the
seed test split's shortest ordinary messages and the first 8 adapters /v1/models lists, each prompt fixed to one
adapter. Prints TTFT p50 of each, the median paired difference (adapter - base) with a 95% bootstrap interval
(prompts resampled), and the per-token time after the first. Not a test: it prints figures.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/adapter_ttft.py [--rounds 4] [--prompts 8] [--json PATH]
    PYTHONPATH=. python benchmarks/adapter_ttft.py --summarise reports/adapter_ttft.json [--json PATH]   # figures from its pairs
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np


def summary(rows: list[dict]) -> dict:
    """The figures from the pairs: TTFT p50 of each side, the median paired difference (adapter - base) with a 95%
    bootstrap interval that resamples prompts (one prompt's rounds are not independent), per-token p50 of each."""
    from evals.reward_report import bootstrap_ci

    by_prompt: dict[str, list[float]] = {}
    for x in rows:  # each prompt has its own adapter
        by_prompt.setdefault(x["adapter"], []).append(1000 * (x["with_adapter"][0] - x["base"][0]))
    diffs = [d for ds in by_prompt.values() for d in ds]
    lo, hi = bootstrap_ci([np.asarray(ds) for ds in by_prompt.values()], stat=np.median, n=2000)

    def p50(side: str, i: int) -> float:
        return round(1000 * statistics.median(x[side][i] for x in rows), 1)

    return {"requests_per_side": len(rows),
            "ttft_p50_ms": {"base": p50("base", 0), "adapter": p50("with_adapter", 0)},
            "ttft_paired_diff_ms": {"median": round(statistics.median(diffs), 1), "ci95": [round(lo, 1), round(hi, 1)],
                                    "resampled": "prompts"},
            "per_token_p50_ms": {"base": p50("base", 1), "adapter": p50("with_adapter", 1)}}


async def run(rounds: int, n_prompts: int, max_tokens: int) -> dict:
    from evals.bench import BenchClient, BenchPlan, seed_prompts
    from evals.bench_vllm import Launched, Target, attune_body, free_port, listed_adapters, screen, server_env
    from serving.app import AppArgs, load_config

    base_model = load_config(AppArgs()).base_model
    work = Path(tempfile.mkdtemp(prefix="attune-adapter-ttft-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = Launched("attune", [sys.executable, "-m", "attune.cli", "serve", "--port", str(port), "--data-dir",
                                 str(work / "data")], server_env(), url, "/healthz", work / "attune.log")
    async with httpx.AsyncClient() as http:
        try:
            ready = await server.wait_ready(http, 900)
            key = (work / "data" / "operator_key").read_text().strip()
            target = Target("attune", url, key, attune_body)
            adapters = await listed_adapters(target, http, 8)
            prompts, _ = await screen(target, seed_prompts(n_prompts * 3), base_model, n_prompts, http)
            client = BenchClient(BenchPlan(url=url, operator_key=key, max_tokens=max_tokens), http)
            pairs = [(p, adapters[i % len(adapters)]) for i, p in enumerate(prompts)]
            for prompt, adapter in pairs:  # untimed: loads every adapter, fills vLLM's prefix cache for both
                for a in (None, adapter):
                    await client.send(attune_body(prompt, a, max_tokens))
            rows = []
            for r in range(rounds):
                for prompt, adapter in pairs:
                    got = {}
                    for a in ((None, adapter) if r % 2 == 0 else (adapter, None)):
                        s = await client.send(attune_body(prompt, a, max_tokens))
                        if not s.ok or s.ttft_s is None:
                            raise RuntimeError(f"request failed: {s.error}")
                        got[a is not None] = (s.ttft_s, (s.e2e_s - s.ttft_s) / max(s.tokens - 1, 1))
                    rows.append({"round": r, "adapter": adapter, "base": got[False], "with_adapter": got[True]})
        finally:
            server.stop()
    return {"ready_s": round(ready, 1), "adapters": adapters, **summary(rows), "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--json", help="also write the figures (and every pair) here")
    p.add_argument("--summarise", metavar="PATH", help="no server: the figures again from a report this wrote")
    a = p.parse_args()
    if a.summarise:
        out = json.loads(Path(a.summarise).read_text())
        out.update(summary(out["rows"]))
    else:
        out = asyncio.run(run(a.rounds, a.prompts, a.max_tokens))
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
