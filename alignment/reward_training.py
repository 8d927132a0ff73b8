"""Reward model training and evaluation: Bradley-Terry on the objective heads, BCE on the crisis
head, calibration to the rating scale and of the crisis threshold, held-out metrics, and the
training of the shipped reward model and judge (`python -m alignment.reward_training`)."""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from alignment.data import SeedExample, seed_pairs
from alignment.objectives import OBJECTIVES
from alignment.reward import CRISIS_SCALE, DEFAULT_ENCODER, RewardConfig, RewardModel


@dataclass
class TrainArgs:
    """How a reward model is trained: Bradley-Terry for the objectives, BCE for crisis."""

    epochs: int = 30
    """Passes over the training messages for the objective heads."""
    messages_per_step: int = 4
    """Messages per objective step; all reply pairs of a message share a step."""
    lr: float = 3e-3
    """Learning rate of the objective heads."""
    lora_lr: float = 5e-4
    weight_decay: float = 1e-2
    select_on_val: bool = True
    """Keep the objective epoch with the best mean val pairwise accuracy (val is for tuning)."""
    crisis_steps: int = 300
    """Full-batch steps of the crisis head (its features are computed once)."""
    crisis_lr: float = 1e-2
    target_recall: float = 1.0
    """Crisis threshold: the highest one reaching this recall on val, then centred in the gap."""
    safety_weight: float = 1.0
    """Weight of the safety classifier's BCE beside the Bradley-Terry loss (0 = no safety classifier training)."""
    safety_recall: float = 0.95
    """Safety threshold: the highest unsafe_prob threshold that catches this share of unsafe val replies."""
    max_steps: int = 0
    """Stop after this many optimiser steps in all (0 = no limit; tests use a few)."""
    bf16: bool = False
    """Train under bfloat16 autocast (CPU or GPU); the saved model scores in its config's precision."""

    def __post_init__(self):
        if min(self.epochs, self.messages_per_step) < 1 or self.crisis_steps < 0:
            raise ValueError("epochs and messages_per_step must be >= 1, crisis_steps >= 0")
        if not 0.0 < self.target_recall <= 1.0:
            raise ValueError(f"target_recall={self.target_recall} must be in (0, 1]")


# ---------------------------------------------------------------- training
def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected) over pairs."""
    return -nn.functional.logsigmoid(chosen - rejected).mean()


@dataclass
class _MessageBatch:
    """The replies of one message, its preference pairs as (objective, chosen, rejected) rows, and per reply a
    safety target (1 unsafe, 0.5 borderline, 0 safe; None = unlabelled)."""

    message: str
    replies: list[str]
    pairs: list[tuple[int, int, int]]
    safety: list[float | None] = field(default_factory=list)
    prompt_id: str = ""

    def __post_init__(self):
        self.safety = self.safety or [None] * len(self.replies)


def _message_batches(examples: Sequence[SeedExample]) -> list[_MessageBatch]:
    """`seed_pairs(examples)` grouped by message, as indices into that message's replies."""
    by_id = {ex.id: ex for ex in examples}
    rows: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for p in seed_pairs(examples):
        texts = [r.text for r in by_id[p.source_id].replies]
        rows[p.source_id].append((OBJECTIVES.index(p.objective), texts.index(p.chosen),
                                  texts.index(p.rejected)))
    return [_MessageBatch(ex.message, [r.text for r in ex.replies], rows[ex.id],
                          [SEED_SAFETY_TARGET[r.ratings["safety"]] for r in ex.replies], ex.id)
            for ex in examples if rows[ex.id]]


# A seed reply's 1-5 safety rating as a safety-classifier target: 1-2 unsafe, 3 borderline, 4-5 safe.
SEED_SAFETY_TARGET = {1: 1.0, 2: 1.0, 3: 0.5, 4: 0.0, 5: 0.0}
LABEL_TARGET = {"unsafe": 1.0, "borderline": 0.5, "safe": 0.0}


def corpus_batches(prompt_ids: Iterable[str], labels: dict, samples: dict, texts: dict[str, str]) -> list[_MessageBatch]:
    """On-policy batches: per labelled prompt its sampled replies, every strictly ordered pair of each objective's
    ranking, and the safety labels as targets."""
    from alignment.corpus_data import ranked_pairs

    out = []
    for pid in prompt_ids:
        if pid not in labels:
            continue
        ids = [r.id for r in samples[pid]]
        pairs = [(OBJECTIVES.index(p.objective), ids.index(p.chosen), ids.index(p.rejected))
                 for p in ranked_pairs({pid: labels[pid]})]
        out.append(_MessageBatch(texts[pid], [r.text for r in samples[pid]], pairs,
                                 [LABEL_TARGET[labels[pid].safety[i].label] for i in ids], pid))
    return out


def _flat(batches: Sequence[_MessageBatch]) -> tuple[list[str], list[str]]:
    return [b.message for b in batches for _ in b.replies], [t for b in batches for t in b.replies]


def _pair_margins(scores, batches: Sequence[_MessageBatch]) -> tuple[list, list[int]]:
    """score(chosen) - score(rejected) for every pair, and the pair's objective index."""
    margins, objective, offset = [], [], 0
    for b in batches:
        for k, c, r in b.pairs:
            margins.append(scores[offset + c, k] - scores[offset + r, k])
            objective.append(k)
        offset += len(b.replies)
    return margins, objective


def _pair_accuracy(scores: np.ndarray, batches: Sequence[_MessageBatch]) -> dict[str, list[float]]:
    margins, objective = _pair_margins(scores, batches)
    hits: dict[str, list[float]] = {o: [] for o in OBJECTIVES}
    for m, k in zip(margins, objective):
        hits[OBJECTIVES[k]].append(1.0 if m > 0 else 0.5 if m == 0 else 0.0)
    return hits


def calibrate_threshold(probs: np.ndarray, labels: np.ndarray, target_recall: float = 1.0) -> float:
    """Highest threshold whose recall on (probs, labels) reaches target_recall, lowered to the
    middle (in logit space) of the gap to the next lower score so that unseen positives just
    below the last val positive are still caught."""
    probs, labels = np.asarray(probs, dtype=float), np.asarray(labels, dtype=bool)
    pos = np.sort(probs[labels])
    if len(pos) == 0:
        return 0.5
    t = float(pos[len(pos) - math.ceil(target_recall * len(pos) - 1e-9)])
    below = probs[probs < t]
    lo = float(below.max()) if len(below) else t / 2

    def logit(p: float) -> float:
        p = min(max(p, 1e-6), 1 - 1e-6)
        return math.log(p / (1 - p))

    return 1 / (1 + math.exp(-(logit(t) + logit(lo)) / 2))


def _fit_calibration(raw: np.ndarray, ratings: np.ndarray) -> list[list[float]]:
    """Least-squares (scale, offset) per objective from raw head outputs to ratings; scale > 0
    so that calibration never changes which reply ranks higher."""
    cal = []
    for k in range(len(OBJECTIVES)):
        x, y = raw[:, k], ratings[:, k]
        var = float(np.var(x))
        scale = float(np.cov(x, y, bias=True)[0, 1] / var) if var > 1e-12 else 1.0
        scale = max(scale, 1e-3)
        cal.append([scale, float(np.mean(y) - scale * np.mean(x))])
    return cal


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}


def _restore(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(module.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def _safety_loss(rm: RewardModel, feats: torch.Tensor, step: Sequence[_MessageBatch]) -> torch.Tensor | None:
    """BCE of the safety classifier on the labelled replies of `step` (unsafe up-weighted to balance)."""
    targets = [t for b in step for t in b.safety]
    idx = [i for i, t in enumerate(targets) if t is not None]
    if not idx:
        return None
    y = torch.tensor([targets[i] for i in idx], dtype=torch.float32, device=feats.device)
    logits = rm.heads.safety(feats[idx])[:, 0]
    return nn.functional.binary_cross_entropy_with_logits(logits, y, pos_weight=torch.tensor(3.0, device=feats.device))


def _auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties half)."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([pos, neg]))
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _val_record(rm: RewardModel, feats: torch.Tensor, val_batches: Sequence[_MessageBatch], safety: bool) -> dict:
    hits = _pair_accuracy(rm.heads.objectives(feats).cpu().numpy(), val_batches)
    record = {"val_acc": round(float(np.mean([np.mean(h) for h in hits.values() if h])), 4)}
    targets = np.array([-1.0 if t is None else t for b in val_batches for t in b.safety])
    hard = (targets == 0.0) | (targets == 1.0)
    if hard.any() and safety:
        p = torch.sigmoid(rm.heads.safety(feats)[:, 0]).cpu().numpy()
        record["val_safety_auroc"] = round(_auroc(p[hard], targets[hard] == 1.0), 4)
    vals = [record["val_acc"]] + ([record["val_safety_auroc"]] if not np.isnan(record.get("val_safety_auroc", np.nan))
                                  else [])
    record["val_score"] = round(float(np.mean(vals)), 4)
    return record


def _train_objectives(rm: RewardModel, batches, val_batches, args: TrainArgs, seed: int,
                      bar) -> tuple[list[dict], int | None]:
    """Bradley-Terry on every pair plus the safety classifier's BCE; returns the epoch history and the epoch kept
    (best mean of val pairwise accuracy and val safety AUROC)."""
    cached = not rm.config.lora_rank
    heads = [*rm.heads.objectives.parameters(), *(rm.heads.safety.parameters() if args.safety_weight > 0 else [])]
    params = [{"params": heads, "lr": args.lr}]
    if not cached:
        params.append({"params": [p for p in rm.encoder.parameters() if p.requires_grad],
                       "lr": args.lora_lr})
    opt = torch.optim.AdamW(params, weight_decay=args.weight_decay)
    encode = lambda bs: rm._pair_features(*_flat(bs))  # noqa: E731
    cache, val_cache = [], None
    if cached:  # a frozen encoder: encode every pair once
        with torch.no_grad():
            cache = [encode([b]) for b in batches]
            val_cache = encode(val_batches) if val_batches else None
    order, rng = list(range(len(batches))), random.Random(seed)
    history, best, best_score, best_epoch, steps = [], None, -1.0, None, 0
    inference_bf16 = rm.config.bf16
    for epoch in range(1, args.epochs + 1):
        rm.config.bf16 = inference_bf16 or args.bf16
        rng.shuffle(order)
        rm.heads.train()
        rm.encoder.train(not cached)
        losses = []
        for i in range(0, len(order), args.messages_per_step):
            idx = order[i:i + args.messages_per_step]
            step = [batches[j] for j in idx]
            feats = torch.cat([cache[j] for j in idx]) if cached else encode(step)
            margins, _ = _pair_margins(rm.heads.objectives(feats), step)
            terms = [-nn.functional.logsigmoid(torch.stack(margins)).mean()] if margins else []
            safety = _safety_loss(rm, feats, step) if args.safety_weight > 0 else None
            if safety is not None:
                terms.append(args.safety_weight * safety)
            if not terms:
                continue
            loss = sum(terms)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            steps += 1
            if args.max_steps and steps >= args.max_steps:
                break
        rm.heads.eval()
        rm.encoder.eval()
        rm.config.bf16 = inference_bf16
        record = {"epoch": epoch, "loss": round(float(np.mean(losses)), 4) if losses else None}
        if val_batches and args.select_on_val:
            with torch.no_grad():
                feats = val_cache if cached else torch.cat(
                    [encode(val_batches[i:i + 8]) for i in range(0, len(val_batches), 8)])
                record.update(_val_record(rm, feats, val_batches, args.safety_weight > 0))
            if record["val_score"] > best_score:
                best_score, best_epoch = record["val_score"], epoch
                best = (_snapshot(rm.heads), None if cached else _snapshot(rm.encoder))
        history.append(record)
        bar.update()
        bar.set_postfix({k: v for k, v in record.items() if k != "epoch"})
        if args.max_steps and steps >= args.max_steps:
            break
    if best is not None:
        _restore(rm.heads, best[0])
        if best[1] is not None:
            _restore(rm.encoder, best[1])
    return history, best_epoch


def _crisis_features(rm: RewardModel, messages: Sequence[str], batch: int = 32):
    parts = [rm._crisis_features(messages[i:i + batch]) for i in range(0, len(messages), batch)]
    return torch.cat([e for e, _ in parts]), torch.cat([s for _, s in parts])


def _train_crisis(rm: RewardModel, messages: list[str], labels: list[bool], calib: list[str],
                  args: TrainArgs) -> None:
    """BCE on the crisis head (positives up-weighted to balance), full batch on frozen features;
    then the fusion statistics, from the head's and the anchors' scores on `calib` messages."""
    with torch.no_grad():
        emb, _ = _crisis_features(rm, messages)
    y = torch.tensor(labels, dtype=torch.float32, device=rm.device)
    pos_weight = (len(y) - y.sum()) / y.sum().clamp_min(1.0)
    head = rm.heads.crisis.train()
    opt = torch.optim.AdamW(head.parameters(), lr=args.crisis_lr, weight_decay=args.weight_decay)
    for _ in range(args.crisis_steps):
        opt.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(
            head(emb * CRISIS_SCALE)[:, 0], y, pos_weight=pos_weight).backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        emb, sim = _crisis_features(rm, calib)
        logit = head(emb * CRISIS_SCALE)[:, 0]
    std = lambda t: max(float(t.std()), 1e-3) if len(t) > 1 else 1.0  # noqa: E731
    rm.config.crisis_fusion = [float(logit.mean()), std(logit), float(sim.mean()), std(sim)]


def train_reward_model(train: list[SeedExample], val: list[SeedExample], *,
                       encoder: str | None = None, seed: int = 0, epochs: int = 30,
                       extra_crisis_negatives: Iterable[str] = (),
                       config: RewardConfig | None = None, args: TrainArgs | None = None,
                       device: str | None = None, progress: bool = True,
                       corpus_train: Sequence[_MessageBatch] = (), corpus_val: Sequence[_MessageBatch] = (),
                       crisis_messages: Sequence[tuple[str, bool]] = (), crisis_val: Sequence[tuple[str, bool]] = (),
                       train_crisis: bool = True) -> RewardModel:
    """Objective heads and safety classifier: Bradley-Terry on `seed_pairs(train)` plus the on-policy
    `corpus_train` pairs, BCE on safety targets; epoch kept by val (seed val + `corpus_val`) accuracy and safety
    AUROC; scores calibrated to the 1-5 rating scale on seed val; safety threshold for `args.safety_recall` of
    unsafe val replies. Crisis head: BCE on train messages, `crisis_messages` and the extra negatives; threshold
    calibrated on val. Deterministic given `seed` (on one device)."""
    config = config or RewardConfig()
    if encoder:
        config.encoder = encoder
    args = args or TrainArgs(epochs=epochs)
    t0 = time.perf_counter()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    rm = RewardModel(config, device=device)
    seed_val = _message_batches(val)
    batches, val_batches = _message_batches(train) + list(corpus_train), seed_val + list(corpus_val)
    if not batches:
        raise ValueError("no preference pairs in the training examples (all ratings tied?)")
    extra = list(extra_crisis_negatives)
    with tqdm(total=args.epochs, desc="reward heads", disable=not progress, leave=False) as bar:
        history, best_epoch = _train_objectives(rm, batches, val_batches, args, seed, bar)
    if train_crisis:
        _train_crisis(rm, [ex.message for ex in train] + [m for m, _ in crisis_messages] + extra,
                      [ex.is_crisis for ex in train] + [c for _, c in crisis_messages] + [False] * len(extra),
                      [ex.message for ex in (val or train)] + [m for m, _ in crisis_val], args)

    cal_examples = val if seed_val else train
    cal_batches = seed_val or _message_batches(train)
    rm.config.calibration = [[1.0, 0.0]] * len(OBJECTIVES)
    if cal_batches:
        raw = rm.raw_scores(*_flat(cal_batches))
        by_text = {(ex.message, r.text): r for ex in cal_examples for r in ex.replies}
        ratings = np.array([[by_text[pr].ratings[o] for o in OBJECTIVES]
                            for pr in zip(*_flat(cal_batches))], dtype=float)
        rm.config.calibration = _fit_calibration(raw, ratings)
    calib = [(ex.message, ex.is_crisis) for ex in val] + list(crisis_val)
    if calib and train_crisis:
        rm.crisis_threshold = calibrate_threshold(
            rm.crisis_prob([m for m, _ in calib]), np.array([c for _, c in calib]), args.target_recall)
    safety_val = _hard_safety(val_batches)
    if args.safety_weight > 0 and safety_val[1].any():
        probs = rm.unsafe_prob(*_flat_replies(safety_val[0]))
        rm.config.safety_threshold = calibrate_threshold(probs, safety_val[1], args.safety_recall)
    rm.has_safety_classifier = args.safety_weight > 0
    rm.meta.update({
        "seed": seed, "train_ids": sorted(ex.id for ex in train) + sorted(b.prompt_id for b in corpus_train),
        "val_ids": sorted(ex.id for ex in val) + sorted(b.prompt_id for b in corpus_val),
        "extra_crisis_negatives": len(extra), "crisis_messages": len(crisis_messages),
        "train_args": asdict(args), "history": history, "best_epoch": best_epoch,
        "train_seconds": round(time.perf_counter() - t0, 1), "device": str(rm.device),
        "score_scale": "raw: Bradley-Terry logits; score: each objective affinely calibrated to the 1-5 rating "
                       "scale " + ("on seed val" if seed_val else "on seed train"),
    })
    return rm


def _hard_safety(batches: Sequence[_MessageBatch]) -> tuple[list[tuple[str, str]], np.ndarray]:
    """(message, reply) of every reply labelled safe or unsafe (borderline left out), and which are unsafe."""
    items = [((b.message, r), t) for b in batches for r, t in zip(b.replies, b.safety) if t in (0.0, 1.0)]
    return [i for i, _ in items], np.array([t == 1.0 for _, t in items], dtype=bool)


def _flat_replies(items: Sequence[tuple[str, str]]) -> tuple[list[str], list[str]]:
    return [m for m, _ in items], [r for _, r in items]


# ---------------------------------------------------------------- evaluation
def evaluate_reward_model(rm: RewardModel, examples: list[SeedExample]) -> dict:
    """Pairwise accuracy per objective on `seed_pairs(examples)` (tied ratings are not pairs; a
    tied score counts half) and crisis recall / false-positive rate at rm.crisis_threshold."""
    batches = _message_batches(examples)
    hits = (_pair_accuracy(rm.score(*_flat(batches)), batches) if batches
            else {o: [] for o in OBJECTIVES})
    probs = rm.crisis_prob([ex.message for ex in examples])
    labels = np.array([ex.is_crisis for ex in examples], dtype=bool)
    flagged = probs >= rm.crisis_threshold
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    return {
        "pairwise_accuracy": {o: float(np.mean(h)) if h else float("nan") for o, h in hits.items()},
        "n_pairs": {o: len(h) for o, h in hits.items()},
        "crisis": {
            "recall": float((flagged & labels).sum() / n_pos) if n_pos else float("nan"),
            "fpr": float((flagged & ~labels).sum() / n_neg) if n_neg else float("nan"),
            "threshold": rm.crisis_threshold, "n_pos": n_pos, "n_neg": n_neg,
        },
    }


def judge_agreement(rm: RewardModel, judge: RewardModel, examples: list[SeedExample]) -> float:
    """Fraction of the preference pairs of `examples` (all objectives pooled) on which the two
    models prefer the same reply."""
    batches = _message_batches(examples)
    if not batches:
        return float("nan")
    texts = _flat(batches)
    a, _ = _pair_margins(rm.score(*texts), batches)
    b, _ = _pair_margins(judge.score(*texts), batches)
    return float(np.mean(np.sign(a) == np.sign(b)))


# ---------------------------------------------------------------- shipped models
RISKY_TOPICS = ("self-harm", "depression", "trauma")
_RISK_WORDS = re.compile(r"suicid|kill (my|me)|\bdie\b|dying|dead\b|self.?harm|cutting|"
                         r"hurt(ing)? (my|me)|end (my|it)|overdos|wake up", re.I)


def counsel_chat_crisis_negatives(source) -> list[str]:
    """Counsel-chat train-split questions usable as crisis negatives: topics other than
    RISKY_TOPICS, and none that mention death, suicide or self-harm."""
    from alignment.data import counsel_chat_questions, load_counsel_chat

    qs = counsel_chat_questions(load_counsel_chat(source), "train", exclude_topics=RISKY_TOPICS)
    return [q for q in qs if not _RISK_WORDS.search(q)]


# Reward model v2: all-MiniLM-L6-v2 fine-tuned with LoRA on every attention and feed-forward projection; the judge:
# SmolLM2-135M-Instruct (another encoder, pretrained on other data) with a LoRA on q/v, on judge-train prompts only.
REWARD_CONFIG = dict(encoder=DEFAULT_ENCODER, lora_rank=8, lora_alpha=16,
                     lora_targets=("query", "key", "value", "dense"), max_length=256)
REWARD_ARGS = dict(epochs=3, messages_per_step=4, lr=2e-3, lora_lr=1e-3, crisis_steps=300, bf16=True)
JUDGE_CONFIG = dict(encoder="smollm2-135m-instruct", lora_rank=8, lora_alpha=16,
                    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"), lora_layers=tuple(range(22, 30)),
                    max_length=256, crisis_anchors=(), bf16=True)
JUDGE_ARGS = dict(epochs=2, messages_per_step=4, lr=2e-3, lora_lr=1e-3, select_on_val=False, crisis_steps=0)


def corpus_training_sets(counsel_chat: str | Path, corpus_dir: Path | None = None) -> dict:
    """The corpus and seed data per split, by prompt: seed examples whose message is a corpus prompt follow that
    prompt's split (the seed test split is in none); labelled on-policy batches per split; crisis-labelled
    authored messages of rm-train."""
    from alignment.corpus_data import CORPUS_DIR, load_pass, load_prompts, load_samples, resolve_texts
    from alignment.data import load_seed

    corpus_dir = corpus_dir or CORPUS_DIR
    prompts = load_prompts(corpus_dir)
    samples = load_samples(corpus_dir)
    labels = load_pass(corpus_dir, 1, samples)
    texts = resolve_texts([p for p in prompts if p.id in labels], counsel_chat, corpus_dir)
    seed_split = {p.ref: p.split for p in prompts if p.source == "seed"}
    seed = load_seed()
    out = {}
    for split in ("rm-train", "rm-val", "judge-train", "test"):
        ids = [p.id for p in prompts if p.split == split and p.id in labels]
        out[split] = {"seed": [ex for ex in seed if seed_split.get(ex.id) == split],
                      "corpus": corpus_batches(ids, labels, samples, texts)}
    for name, split in (("crisis_messages", "rm-train"), ("crisis_val", "rm-val")):
        out[name] = [(texts[p.id], p.crisis_risk != "none") for p in prompts
                     if p.split == split and p.source == "authored" and p.id in texts]
    out["labelled_prompts"] = len(labels)
    return out


def train_and_save(out_dir: str | Path | None = None, judge_dir: str | Path | None = None, *,
                   encoder: str | None = None, judge_encoder: str | None = None,
                   counsel_chat: str | Path | None = None, progress: bool = True, max_steps: int = 0,
                   corpus_dir: Path | None = None) -> dict:
    """Train and save reward model v2 (rm-train pairs of the corpus and the seed set; rm-val for selection,
    calibration and thresholds) and the judge (judge-train only, another encoder). Returns their metrics on the
    corpus test split."""
    from attune.paths import DEFAULT_COUNSEL_CHAT, JUDGE_DIR, REWARD_DIR

    out_dir, judge_dir = Path(out_dir or REWARD_DIR), Path(judge_dir or JUDGE_DIR)
    cc = counsel_chat or DEFAULT_COUNSEL_CHAT
    if not Path(cc).exists() and str(cc) != "nbertagnolli/counsel-chat":
        raise FileNotFoundError(f"{cc}: the corpus's counsel-chat prompts are read from it; pass --counsel-chat")
    sets = corpus_training_sets(cc, corpus_dir)
    extra = counsel_chat_crisis_negatives(cc) if Path(cc).exists() else []
    rm = train_reward_model(
        sets["rm-train"]["seed"], sets["rm-val"]["seed"], extra_crisis_negatives=extra, progress=progress,
        config=RewardConfig(**{**REWARD_CONFIG, **({"encoder": encoder} if encoder else {})}),
        args=TrainArgs(**REWARD_ARGS, max_steps=max_steps), corpus_train=sets["rm-train"]["corpus"],
        corpus_val=sets["rm-val"]["corpus"], crisis_messages=sets["crisis_messages"], crisis_val=sets["crisis_val"])
    judge = train_reward_model(
        sets["judge-train"]["seed"], [], progress=progress, train_crisis=False,
        config=RewardConfig(**{**JUDGE_CONFIG, **({"encoder": judge_encoder} if judge_encoder else {})}),
        args=TrainArgs(**JUDGE_ARGS, max_steps=max_steps), corpus_train=sets["judge-train"]["corpus"])
    judge.meta["note"] = ("evaluation only: trained on judge-train prompts; its calibration and threshold are "
                          "in-sample, on judge-train")
    _calibrate_in_sample(judge, sets["judge-train"]["corpus"])
    # Backbone choice, on rm-val: the same recipe on the same judge-train data with each offline encoder.
    twin = train_reward_model(
        sets["judge-train"]["seed"], [], progress=progress, train_crisis=False,
        config=RewardConfig(**{**REWARD_CONFIG, **({"encoder": encoder} if encoder else {})}),
        args=TrainArgs(**{**REWARD_ARGS, "epochs": JUDGE_ARGS["epochs"], "select_on_val": False}, max_steps=max_steps),
        corpus_train=sets["judge-train"]["corpus"])
    val = sets["rm-val"]["corpus"]
    rm.meta["backbone_selection"] = {
        "data": "judge-train (both), scored on rm-val on-policy pairs",
        "candidates": {twin.config.encoder: corpus_accuracy(twin, val), judge.config.encoder: corpus_accuracy(judge, val)},
        "chosen_model_on_rm_val": corpus_accuracy(rm, val),
        "rejected": {"all-mpnet-base-v2 (split-zip wheels)": "the parts declare no licence and depend on an "
                     "unrelated package (AAIT); not depended on"}}
    rm.save(out_dir)
    judge.save(judge_dir)
    _register(out_dir, judge_dir)
    test = sets["test"]["corpus"]
    return {"labelled_prompts": sets["labelled_prompts"], "backbone_selection": rm.meta["backbone_selection"],
            "train_seconds": {"reward": rm.meta["train_seconds"], "judge": judge.meta["train_seconds"]},
            "test_pairwise_accuracy": {"reward": corpus_accuracy(rm, test), "judge": corpus_accuracy(judge, test)},
            "saved": [str(out_dir), str(judge_dir)]}


def _register(*folders: Path) -> None:
    """A model saved into a store's reward or judge folder gets its sha256 allowlist in that store's manifest."""
    from adapters.registry import RESERVED_IDS, AdapterStore
    from adapters.manifest import MANIFEST_FILE

    for folder in folders:
        if folder.name in RESERVED_IDS and (folder.parent / MANIFEST_FILE).exists():
            AdapterStore(folder.parent).register_scorer(folder.name)


def _calibrate_in_sample(model: RewardModel, batches: Sequence[_MessageBatch]) -> None:
    items, unsafe = _hard_safety(batches)
    if unsafe.any():
        model.config.safety_threshold = calibrate_threshold(model.unsafe_prob(*_flat_replies(items)), unsafe,
                                                            TrainArgs.safety_recall)


def corpus_accuracy(model: RewardModel, batches: Sequence[_MessageBatch]) -> dict[str, float]:
    """Pairwise accuracy per objective on on-policy batches (a tied score counts half)."""
    if not batches:
        return {}
    hits = _pair_accuracy(model.raw_scores(*_flat(batches)), batches)
    return {o: round(float(np.mean(h)), 4) for o, h in hits.items() if h}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train and save the shipped reward model and judge.")
    parser.add_argument("--out", default=None, help="reward model folder (adapters/store/reward)")
    parser.add_argument("--judge", default=None, help="judge folder (adapters/store/judge)")
    parser.add_argument("--encoder", default=None, help=f"hub id or folder (default {DEFAULT_ENCODER})")
    parser.add_argument("--counsel-chat", default=None, help="counsel-chat CSV (the corpus's prompts, crisis negatives)")
    a = parser.parse_args(argv)
    print(json.dumps(train_and_save(a.out, a.judge, encoder=a.encoder, counsel_chat=a.counsel_chat), indent=1))


if __name__ == "__main__":
    main()


def calibrate_gate(rm: RewardModel, counsel_chat: str | Path, false_rejection: float = 0.05) -> dict:
    """The output gate's threshold on the safety classifier, for a stated false-rejection rate: the lowest
    unsafe_prob threshold that flags at most `false_rejection` of the rm-val replies raters labelled safe. Stored in
    the model's meta["gate"] (serving.scorer reads it); figures on rm-val and, for reporting, the test split."""
    sets = corpus_training_sets(counsel_chat)
    items, unsafe = _hard_safety(sets["rm-val"]["corpus"])
    probs = rm.unsafe_prob(*_flat_replies(items))
    desc = np.sort(probs[~unsafe])[::-1]
    k = int(np.floor(false_rejection * len(desc)))
    threshold = float(desc[0] + 1e-6) if k == 0 else float((desc[k - 1] + desc[k]) / 2) if k < len(desc) else 0.0

    def rates(p: np.ndarray, u: np.ndarray) -> dict:
        flagged = p >= threshold
        return {"n_safe": int((~u).sum()), "n_unsafe": int(u.sum()),
                "false_rejection": round(float(flagged[~u].mean()), 4) if (~u).any() else None,
                "unsafe_caught": round(float(flagged[u].mean()), 4) if u.any() else None}

    test_items, test_unsafe = _hard_safety(sets["test"]["corpus"])
    gate = {"unsafe_prob_threshold": round(threshold, 6), "target_false_rejection": false_rejection,
            "split": "rm-val (on-policy corpus)", "rm-val": rates(probs, unsafe),
            "test": rates(rm.unsafe_prob(*_flat_replies(test_items)), test_unsafe)}
    rm.meta["gate"] = gate
    return gate
