"""The MODPO trainer on a tiny Llama: extra columns survive TRL, the margin moves the loss by
exactly the formula's amount, and training changes every LoRA weight."""
import math

import pytest
import torch

from alignment.trainers import TrainArgs, train_preference, train_sft

PAIRS = [
    ("I can't sleep before exams.", "That sounds exhausting. What keeps you up?", "Just sleep more."),
    ("My dog died last week.", "I'm so sorry. What was she like?", "Get another dog."),
    ("I argue with my sister a lot.", "That sounds painful. What do the arguments feel like?", "Ignore her."),
    ("Work is piling up.", "That's a lot to carry. What matters most to you here?", "Work harder."),
]


def _rows(margin=0.0, w=1.0):
    return [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}], "margin": margin, "w_primary": w, "weight": 1.0}
            for p, c, r in PAIRS]


def _trainer(tiny_model_dir, rows, tmp_path, **kw):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig

    from alignment.trainers import CollatorWithExtras, MODPOTrainer, _common_config, _peft_model

    args = TrainArgs(batch_size=4, max_steps=1, **kw)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = DPOConfig(**_common_config(args, tmp_path, beta=args.beta, precompute_ref_log_probs=True,
                                     remove_unused_columns=True))
    return MODPOTrainer(model=_peft_model(str(tiny_model_dir), args), args=cfg,
                        train_dataset=Dataset.from_list(rows), processing_class=tok,
                        data_collator=CollatorWithExtras(pad_token_id=tok.pad_token_id, max_length=256))


def _first_batch_loss(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch).item(), trainer.last_extras


def test_margin_column_arrives_and_shifts_loss_exactly(tiny_model_dir, tmp_path):
    # A fresh LoRA has B = 0, so policy == reference and both log-ratios are exactly 0:
    # the loss is -log sigmoid(-margin / w_k).
    m, w = 0.7, 0.5
    loss0, _ = _first_batch_loss(_trainer(tiny_model_dir, _rows(0.0, w), tmp_path / "a"))
    loss_m, extras = _first_batch_loss(_trainer(tiny_model_dir, _rows(m, w), tmp_path / "b"))
    assert torch.allclose(extras["margin"], torch.full((4,), m))
    assert torch.allclose(extras["w_primary"], torch.full((4,), w))
    assert loss0 == pytest.approx(math.log(2), abs=1e-5)
    assert loss_m == pytest.approx(-math.log(1 / (1 + math.exp(m / w))), abs=1e-5)
    assert loss_m - loss0 == pytest.approx(math.log1p(math.exp(m / w)) - math.log(2), abs=1e-5)


def test_preference_training_changes_every_lora_weight(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    stats = train_preference(str(tiny_model_dir), tok, _rows(0.3, 0.5), TrainArgs(batch_size=2, max_steps=3),
                             tmp_path / "adapter")
    assert stats["steps"] == 3
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b, "no LoRA weights saved"
    for name, p in lora_b.items():  # B starts at zero: any change means it trained
        assert p.abs().sum() > 0, f"{name} did not change"


def test_sft_changes_lora_weights(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}]}
            for p, c, _ in PAIRS]
    stats = train_sft(str(tiny_model_dir), tok, rows, TrainArgs(batch_size=2, max_steps=2), tmp_path / "sft")
    assert stats["steps"] == 2
    weights = load_file(tmp_path / "sft" / "adapter_model.safetensors")
    assert all(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k)
