"""The shipped crisis detector in float32 and under bfloat16 autocast on this machine: recall and false escalation at
its stored threshold on our val and test splits, the largest logit difference between the two, and milliseconds per
message as serving checks one (its three windows in one call, one torch thread). On a CPU without bf16 instructions
torch emulates bf16 and float32 is both faster and what `alignment.basemodel.autocast_bf16` picks; the threshold's
margin (0.15 logits below the val message it was calibrated on) is what lets either numerics keep its recall.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/crisis_dtype.py [--timed 40]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return np.log(p / (1 - p))


def main() -> None:
    from alignment.basemodel import autocast_bf16
    from alignment.crisis import CrisisClassifier
    from alignment.crisis_training import build_sets
    from attune.paths import DEFAULT_COUNSEL_CHAT, STORE_DIR

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--timed", type=int, default=40, help="test messages to time per dtype (default %(default)s)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    model = CrisisClassifier.load(STORE_DIR / "crisis")
    threshold = model.config.threshold
    print(f"bf16 autocast picked on this machine: {autocast_bf16('cpu')}; threshold {threshold:.5f}")
    sets = build_sets(str(DEFAULT_COUNSEL_CHAT))
    print("| split | numerics | n | seconds | recall | false escalation |\n|---|---|---|---|---|---|")
    diffs = {}
    for split in ("val", "test"):
        texts = [e.text for e in sets[split]]
        risk = np.array([e.risk for e in sets[split]])
        probs = {}
        for bf16 in (False, True):
            model.bf16_autocast = bf16
            started = time.perf_counter()
            probs[bf16] = p = model.prob(texts)
            print(f"| {split} | {'bf16 autocast' if bf16 else 'float32'} | {len(texts)} | "
                  f"{time.perf_counter() - started:.1f} | {np.mean(p[risk] >= threshold):.4f} | "
                  f"{np.mean(p[~risk] >= threshold):.4f} |")
        diffs[split] = np.abs(_logit(probs[True]) - _logit(probs[False]))
    for split, d in diffs.items():
        print(f"{split}: |logit bf16 - logit float32| max {d.max():.3f}, p99 {np.quantile(d, 0.99):.3f}")
    messages = [e.text for e in sets["test"][:a.timed]]
    for bf16 in (False, True):
        model.bf16_autocast = bf16
        ms = []
        for m in messages:  # three windows as serving.safety builds them: the turn, the previous turn, both joined
            started = time.perf_counter()
            model.prob([m, "I had a long day.", "I had a long day.\n" + m])
            ms.append(1000 * (time.perf_counter() - started))
        print(f"{'bf16 autocast' if bf16 else 'float32'}: {np.median(ms):.0f} ms p50, {np.quantile(ms, 0.9):.0f} ms "
              f"p90 per message ({len(ms)} messages)")


if __name__ == "__main__":
    main()
