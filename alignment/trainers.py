"""Trainers: SFT (TRL SFTTrainer) and one preference trainer, a thin TRL DPOTrainer subclass whose
loss is `alignment.losses.modpo_loss`. Extra columns (`margin`, `w_primary`, `weight`) are carried
through TRL's column pruning and collator explicitly: TRL drops columns it does not know.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from alignment.losses import modpo_loss, weighted_mean

EXTRA_COLUMNS = ("margin", "w_primary", "weight")


@dataclass
class TrainArgs:
    """Hyper-parameters shared by every adapter of a recipe."""

    lora_r: int = 8
    """LoRA rank (<= 16 keeps shipped adapters small)."""
    lora_alpha: int = 16
    """LoRA scaling numerator (scaling = alpha / r)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Modules wrapped by LoRA; fewer modules = less per-layer LoRA overhead in vLLM on CPU."""
    layers_to_transform: list[int] | None = None
    """Only these decoder layers get LoRA (None: all). Top layers only = a shorter backward pass
    and fewer LoRA-wrapped modules at serving time."""
    learning_rate: float = 5e-4
    """AdamW learning rate for the LoRA weights."""
    beta: float = 0.1
    """DPO/MODPO KL strength."""
    epochs: float = 1.0
    """Passes over the pairs."""
    batch_size: int = 4
    """Pairs (or SFT examples) per optimizer step."""
    max_length: int = 384
    """Prompt + completion tokens; longer sequences are truncated."""
    max_steps: int = -1
    """Cap on optimizer steps (-1: no cap); for smoke tests."""
    seed: int = 0
    """Seed for LoRA init and data order."""
    trainer: str = "cached"
    """Preference trainer: "cached" (alignment.fast_pref: lower layers and reference run once per sequence for the
    whole grid) or "trl" (TRL's DPOTrainer with the MODPO loss, every layer every step)."""
    rpo_alpha: float = 0.0
    """Weight of the chosen reply's negative log-likelihood per token beside the preference loss (RPO, Pang et al.
    2024, "Iterative Reasoning Preference Optimization"): the adapter also imitates the reply ranked best on its
    objective instead of only moving away from the worst. 0 = the plain (MO)DPO loss; cached trainer only."""

    def __post_init__(self):
        if not 1 <= self.lora_r <= 64:
            raise ValueError(f"lora_r={self.lora_r}: choose 1..64 (shipped adapters use <= 16)")
        if self.learning_rate <= 0 or self.beta <= 0:
            raise ValueError("learning_rate and beta must be > 0")
        if self.batch_size < 1 or self.epochs <= 0:
            raise ValueError("batch_size must be >= 1 and epochs > 0")
        if self.trainer not in ("cached", "trl"):
            raise ValueError(f"trainer={self.trainer!r}: use 'cached' or 'trl'")
        if self.rpo_alpha < 0:
            raise ValueError(f"rpo_alpha={self.rpo_alpha}: must be >= 0")
        if self.rpo_alpha > 0 and self.trainer != "cached":
            raise ValueError("rpo_alpha needs trainer: cached (the TRL trainer runs the plain MODPO loss)")

    def lora_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=0.0,
                          target_modules=list(self.target_modules), task_type="CAUSAL_LM",
                          layers_to_transform=list(self.layers_to_transform) if self.layers_to_transform else None)


class CollatorWithExtras(DataCollatorForPreference):
    """TRL's preference collator, plus the MODPO/joint columns as float tensors."""

    def torch_call(self, examples):
        out = super().torch_call(examples)
        for col in EXTRA_COLUMNS:
            if col in examples[0]:
                out[col] = torch.tensor([float(e[col]) for e in examples])
        return out


class MODPOTrainer(DPOTrainer):
    """DPOTrainer whose loss is MODPO; with margin 0 and w_primary 1 it is sigmoid DPO, and a
    per-pair `weight` column turns it into the joint-loss DPO baseline. Needs
    `precompute_ref_log_probs=True` (the reference is the base model, computed once)."""

    last_extras: dict[str, torch.Tensor] | None = None  # what arrived in the last batch (for tests)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(self._signature_columns) + [
            c for c in EXTRA_COLUMNS if c not in self._signature_columns]

    def _compute_loss(self, model, inputs, return_outputs):
        if not self.precompute_ref_logps:
            raise ValueError("MODPOTrainer needs DPOConfig(precompute_ref_log_probs=True)")
        mode = "train" if self.model.training else "eval"
        n = inputs["input_ids"].shape[0] // 2
        extras = {c: inputs[c] for c in EXTRA_COLUMNS if c in inputs}
        self.last_extras = {k: v.detach().cpu() for k, v in extras.items()}
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        labels=labels, use_cache=False, fused_lm_head=True)
        seq_len = completion_mask.shape[1] - 1
        logps = outputs.log_probs[:, -seq_len:].sum(dim=1)
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)
        chosen_lr = chosen_logps - inputs["ref_chosen_logps"]
        rejected_lr = rejected_logps - inputs["ref_rejected_logps"]
        zeros, ones = torch.zeros_like(chosen_lr), torch.ones_like(chosen_lr)
        per_pair = modpo_loss(chosen_lr, rejected_lr, extras.get("margin", zeros),
                              extras.get("w_primary", ones), self.beta)
        loss = weighted_mean(per_pair, extras.get("weight", ones[:n]))
        with torch.no_grad():
            m = self._metrics[mode]
            m["rewards/accuracies"].append((chosen_lr > rejected_lr).float().mean().item())
            m["rewards/margins"].append((self.beta * (chosen_lr - rejected_lr)).mean().item())
            m["logps/chosen"].append(chosen_logps.mean().item())
            m["logps/rejected"].append(rejected_logps.mean().item())
        return (loss, outputs) if return_outputs else loss


def _peft_model(base_model: str, args: TrainArgs):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    return get_peft_model(model, args.lora_config())


def _common_config(args: TrainArgs, out_dir: Path, **kw) -> dict:
    return dict(output_dir=str(out_dir), learning_rate=args.learning_rate, num_train_epochs=args.epochs,
                per_device_train_batch_size=args.batch_size, max_steps=args.max_steps, seed=args.seed,
                logging_steps=5, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
                bf16=torch.cuda.is_available(), max_length=args.max_length, lr_scheduler_type="constant",
                dataloader_num_workers=0, **kw)


def train_preference(base_model: str, tokenizer, rows: list[dict], args: TrainArgs,
                     out_dir: Path) -> dict:
    """Train one LoRA adapter on preference rows {prompt, chosen, rejected[, margin, w_primary,
    weight]} (prompt/chosen/rejected in conversational form); save it as a PEFT folder."""
    from datasets import Dataset

    cfg = DPOConfig(**_common_config(args, out_dir / "_trainer", beta=args.beta,
                                     precompute_ref_log_probs=True, remove_unused_columns=True,
                                     precompute_ref_batch_size=8))
    trainer = MODPOTrainer(model=_peft_model(base_model, args), args=cfg,
                           train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                           data_collator=CollatorWithExtras(pad_token_id=tokenizer.pad_token_id,
                                                            max_length=args.max_length))
    return _fit_and_save(trainer, out_dir)


def train_sft(base_model: str, tokenizer, rows: list[dict], args: TrainArgs, out_dir: Path) -> dict:
    """Supervised LoRA on {messages: [...]} rows (loss on the assistant turn only)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    cfg = SFTConfig(**_common_config(args, out_dir / "_trainer", assistant_only_loss=False,
                                     completion_only_loss=True))
    trainer = SFTTrainer(model=_peft_model(base_model, args), args=cfg,
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    return _fit_and_save(trainer, out_dir)


def _fit_and_save(trainer, out_dir: Path) -> dict:
    t0 = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t0
    model = trainer.model
    model.save_pretrained(str(out_dir), safe_serialization=True)
    steps = max(1, result.global_step)
    return {"steps": result.global_step, "seconds": round(seconds, 2),
            "seconds_per_step": round(seconds / steps, 3), "train_loss": round(result.training_loss, 4)}
