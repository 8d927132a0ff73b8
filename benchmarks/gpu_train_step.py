"""GPU check of the training recipe: DPO (TRL stock) vs MODPO (ours) seconds per step on a
randomly initialised 1.7B Llama (SmolLM2-1.7B's shape: no weights can reach the GPU machine),
bf16 autocast, LoRA r8 on q/v, the seed set's pairs. Prints a table; not a test.

    python benchmarks/gpu_train_step.py --tokenizer DIR [--steps 10]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer
    from peft import get_peft_model

    from alignment import prompts as P
    from alignment.trainers import CollatorWithExtras, MODPOTrainer, TrainArgs, _common_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ns = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(ns.tokenizer)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    args = TrainArgs(batch_size=8, max_steps=ns.steps, max_length=320)
    recs = [json.loads(l) for p in sorted(Path("alignment/seed").glob("part-*.jsonl")) for l in open(p)]
    rows = [{"prompt": P.chat(r["message"]), "chosen": P.assistant(r["replies"][0]["text"]),
             "rejected": P.assistant(r["replies"][1]["text"]), "margin": 0.3, "w_primary": 0.5, "weight": 1.0}
            for r in recs[: ns.steps * args.batch_size]]
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    print(f"device={torch.cuda.get_device_name(0)} params={sum(p.numel() for p in base.parameters()) / 1e9:.2f}B",
          flush=True)
    times = {"dpo": [], "modpo": []}
    for _ in range(ns.repeats):
        for kind in ("dpo", "modpo"):
            with tempfile.TemporaryDirectory() as d:
                model = get_peft_model(base, args.lora_config())
                c = DPOConfig(**_common_config(args, Path(d), beta=args.beta, precompute_ref_log_probs=True,
                                               remove_unused_columns=True, precompute_ref_batch_size=16))
                if kind == "dpo":
                    plain = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
                    tr = DPOTrainer(model=model, args=c, train_dataset=Dataset.from_list(plain), processing_class=tok)
                else:
                    tr = MODPOTrainer(model=model, args=c, train_dataset=Dataset.from_list(rows), processing_class=tok,
                                      data_collator=CollatorWithExtras(pad_token_id=tok.pad_token_id, max_length=320))
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                tr.train()
                torch.cuda.synchronize()
                times[kind].append((time.perf_counter() - t0) / ns.steps)
                base = model.unload()
    print(f"steps={ns.steps} batch={args.batch_size} pairs, bf16={torch.cuda.is_available()}")
    for k, v in times.items():
        print(f"{k}: median {statistics.median(v):.3f} s/step, runs {[round(x, 3) for x in v]}")
    print(f"MODPO / DPO = {statistics.median(times['modpo']) / statistics.median(times['dpo']):.3f}")
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
