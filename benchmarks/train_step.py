"""Seconds per optimizer step: TRL's stock DPOTrainer (sigmoid) vs Attune's MODPOTrainer on the
same pairs, model and LoRA settings (the shipped recipe's). Prints a table; not a test.

    python benchmarks/train_step.py [--steps 6] [--repeats 2]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _trainer(kind: str, base: str, tok, rows, args, out: Path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from alignment.trainers import CollatorWithExtras, MODPOTrainer, _common_config, _peft_model

    cfg = DPOConfig(**_common_config(args, out, beta=args.beta, precompute_ref_log_probs=True,
                                     remove_unused_columns=True, precompute_ref_batch_size=8))
    model = _peft_model(base, args)
    if kind == "dpo":
        plain = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
        return DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(plain), processing_class=tok)
    return MODPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                        data_collator=CollatorWithExtras(pad_token_id=tok.pad_token_id, max_length=args.max_length))


def main() -> None:
    from transformers import AutoTokenizer

    from alignment import basemodel, data
    from alignment import prompts as P
    from alignment.recipe import load_recipe

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ns = ap.parse_args()
    base = basemodel.resolve(None)
    tok = AutoTokenizer.from_pretrained(base)
    args = load_recipe("shipped").train_args(max_steps=ns.steps)
    train = data.split_examples(data.load_seed(), "train")
    rows = [{"prompt": P.chat(e.message), "chosen": P.assistant(e.replies[0].text),
             "rejected": P.assistant(e.replies[1].text), "margin": 0.3, "w_primary": 0.5, "weight": 1.0}
            for e in train[: ns.steps * args.batch_size]]
    times: dict[str, list[float]] = {"dpo": [], "modpo": []}
    for _ in range(ns.repeats):
        for kind in ("dpo", "modpo"):  # interleaved so load drifts hit both
            with tempfile.TemporaryDirectory() as d:
                tr = _trainer(kind, base, tok, rows, args, Path(d))
                t0 = time.perf_counter()
                tr.train()
                times[kind].append((time.perf_counter() - t0) / ns.steps)
    print(f"threads={torch.get_num_threads()} steps={ns.steps} batch={args.batch_size} repeats={ns.repeats}")
    print("| trainer | s/step (median) | all runs |")
    print("|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {statistics.median(v):.2f} | {', '.join(f'{x:.2f}' for x in v)} |")
    print(f"MODPO / DPO = {statistics.median(times['modpo']) / statistics.median(times['dpo']):.3f}")


if __name__ == "__main__":
    main()
