"""Seconds per pair-epoch of preference training, before and after the cached trainer (issue 13), on the shipped
recipe's model, LoRA placement and batch size, with real grid pairs (corpus rm-train best vs worst on empathy, with
MODPO margins). Prints a table; not a test.

- before: TRL's DPOTrainer with Attune's MODPO loss (alignment.trainers.MODPOTrainer): reference pass over the pairs,
  then every layer forward and the LoRA layers backward each step, the head over every position;
- after: alignment.fast_pref: one base-model pass per unique sequence for the whole grid (reference log-prob and the
  input of the first LoRA layer), then steps over the LoRA layers only. Its one-off cost is shown per sequence and
  spread over the grid's preference adapters (--adapters) in the last column.

    python benchmarks/train_step.py [--pairs 32] [--adapters 11] [--counsel-chat PATH]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


def _trl(kind: str, base: str, tok, rows, args, out: Path) -> float:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from alignment.trainers import CollatorWithExtras, MODPOTrainer, _common_config, _peft_model

    cfg = DPOConfig(**_common_config(args, out, beta=args.beta, precompute_ref_log_probs=True,
                                     remove_unused_columns=True, precompute_ref_batch_size=8))
    model = _peft_model(base, args)
    if kind == "dpo":
        plain = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
        tr = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(plain), processing_class=tok)
    else:
        cols = [{k: r[k] for k in ("prompt", "chosen", "rejected", "margin", "w_primary", "weight")} for r in rows]
        tr = MODPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(cols), processing_class=tok,
                          data_collator=CollatorWithExtras(pad_token_id=tok.pad_token_id, max_length=args.max_length))
    t0 = time.perf_counter()
    tr.train()  # includes TRL's reference pass, as in every adapter of a grid trained this way
    return time.perf_counter() - t0


def main() -> None:
    from transformers import AutoTokenizer

    from alignment import basemodel, data, fast_pref, grid_data
    from alignment.objectives import Preference
    from alignment.pipeline import counsel_chat_source
    from alignment.recipe import load_recipe
    from alignment.reward import RewardModel
    from attune.paths import REWARD_DIR

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=32, help="pairs per run (one epoch)")
    ap.add_argument("--adapters", type=int, default=11, help="preference adapters sharing the cache in the grid")
    ap.add_argument("--counsel-chat", default=None)
    ns = ap.parse_args()
    base = basemodel.resolve(None)
    tok = AutoTokenizer.from_pretrained(base)
    recipe = load_recipe("shipped")
    args = replace(recipe.train_args(), epochs=1.0)
    items = grid_data.corpus_rated("rm-train", counsel_chat_source(ns.counsel_chat), log=print)
    items += grid_data.seed_rated(data.split_examples(data.load_seed(), "train"))
    rows = grid_data.pair_rows(items, "empathy")[:ns.pairs]
    weights = Preference({"empathy": 0.5, "safety": 0.2, "active_listening": 0.075, "self_motivated_change": 0.075,
                          "trust_rapport": 0.075, "patient_autonomy": 0.075})
    need = sorted({(r["texts"][0], t) for r in rows for t in r["texts"][1:]})
    raw = dict(zip(need, RewardModel.load(REWARD_DIR).raw_scores([p for p, _ in need], [t for _, t in need])))
    modpo_rows = grid_data.add_margins(rows, "empathy", weights, raw)
    n = len(rows)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as d:
        for kind, rs in (("dpo", rows), ("modpo", modpo_rows)):
            results[f"trl-{kind}"] = _trl(kind, base, tok, rs, args, Path(d) / kind) / n
        t0 = time.perf_counter()
        cache = fast_pref.build_cache(base, tok, [(r["prompt"], r[s]) for r in rows for s in ("chosen", "rejected")],
                                      fast_pref.first_lora_layer(args.layers_to_transform), args.max_length,
                                      log=lambda m: None)
        cache_s = time.perf_counter() - t0
        for kind, rs in (("dpo", rows), ("modpo", modpo_rows)):
            pairs = [{"chosen_key": fast_pref.key(r["prompt"], r["chosen"]),
                      "rejected_key": fast_pref.key(r["prompt"], r["rejected"]), "margin": r["margin"],
                      "w_primary": r["w_primary"], "weight": 1.0} for r in rs]
            t0 = time.perf_counter()
            fast_pref.train_adapter(base, cache, pairs, args, Path(d) / f"c-{kind}", log=lambda m: None)
            results[f"cached-{kind}"] = (time.perf_counter() - t0) / n
    per_pair_cache = cache_s / n
    tokens = sum(e.ids.shape[0] for e in cache.encoded.values()) / len(cache.encoded)
    print(f"threads={torch.get_num_threads()} pairs={n} batch={args.batch_size} max_length={args.max_length} "
          f"LoRA layers {args.layers_to_transform[0]}-{args.layers_to_transform[-1]} of 30, "
          f"{tokens:.0f} tokens per sequence on average")
    print("| trainer | s per pair-epoch | with the one-off cache spread over the grid |")
    print("|---|---|---|")
    for k, v in results.items():
        spread = v + per_pair_cache / ns.adapters if k.startswith("cached") else v
        print(f"| {k} | {v:.3f} | {spread:.3f} |")
    print(f"cache: {cache_s:.1f} s for {len(cache.encoded)} sequences ({per_pair_cache:.3f} s per pair, once per "
          f"grid; {ns.adapters} preference adapters share it)")
    print(f"speed-up (TRL MODPO / cached MODPO, cache spread): "
          f"{results['trl-modpo'] / (results['cached-modpo'] + per_pair_cache / ns.adapters):.2f}x")
    print(f"MODPO / DPO step, cached trainer: {results['cached-modpo'] / results['cached-dpo']:.3f}")


if __name__ == "__main__":
    main()
