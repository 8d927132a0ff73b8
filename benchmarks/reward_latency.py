"""Milliseconds to score one reply, as the online gate does (one (message, reply) pair per call, one torch thread as
the RewardScorer deployment runs): p50 and p90 over the corpus test replies, for the shipped reward model as trained
(LoRA beside the encoder) and as the scorer serves it (LoRA merged into the encoder, serving.scorer.Scorer.load), the
two timed in turn on each reply, and with --judge, the judge. Prints a table; not a test.

    python benchmarks/reward_latency.py [--n 100] [--threads 1] [--judge]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def main() -> None:
    from alignment.corpus_data import load_prompts, load_samples, resolve_texts
    from alignment.reward import RewardModel
    from attune.paths import DEFAULT_COUNSEL_CHAT, JUDGE_DIR, REWARD_DIR

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100, help="replies to time (default %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the scorer deployment uses 1)")
    ap.add_argument("--judge", action="store_true", help="time the judge too")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    prompts = [p for p in load_prompts() if p.split == "test"]
    texts = resolve_texts(prompts, DEFAULT_COUNSEL_CHAT)
    samples = load_samples()
    items = [(texts[p.id], r.text) for p in prompts if p.id in samples for r in samples[p.id]][:a.n]
    print(f"{len(items)} test replies, one per call, {a.threads} torch thread(s)")
    print("| model | p50 ms | p90 ms | mean tokens |")
    print("|---|---|---|---|")
    models = {"reward model": RewardModel.load(REWARD_DIR, device="cpu"),
              "reward model, LoRA merged (as served)":
                  RewardModel.load(REWARD_DIR, device="cpu").merge_for_inference()}
    if a.judge:
        models["judge"] = RewardModel.load(JUDGE_DIR, device="cpu")
    times: dict[str, list[float]] = {name: [] for name in models}
    for rm in models.values():
        rm.score_all([items[0][0]], [items[0][1]])  # warm-up
    for message, reply in items:  # the models in turn on each reply, so that the machine's drift weighs on all
        for name, rm in models.items():
            t = time.perf_counter()
            rm.score_all([message], [reply])
            times[name].append((time.perf_counter() - t) * 1000)
    for name, rm in models.items():
        tokens = np.mean([len(rm.tokenizer(m, r, truncation="longest_first", max_length=rm.config.max_length)
                                 ["input_ids"]) for m, r in items])
        t = times[name]
        print(f"| {name} | {statistics.median(t):.1f} | {np.percentile(t, 90):.1f} | {tokens:.0f} |")


if __name__ == "__main__":
    main()
