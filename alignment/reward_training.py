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
from dataclasses import asdict, dataclass
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
    """The replies of one message and its preference pairs as (objective, chosen, rejected) rows."""

    message: str
    replies: list[str]
    pairs: list[tuple[int, int, int]]


def _message_batches(examples: Sequence[SeedExample]) -> list[_MessageBatch]:
    """`seed_pairs(examples)` grouped by message, as indices into that message's replies."""
    by_id = {ex.id: ex for ex in examples}
    rows: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for p in seed_pairs(examples):
        texts = [r.text for r in by_id[p.source_id].replies]
        rows[p.source_id].append((OBJECTIVES.index(p.objective), texts.index(p.chosen),
                                  texts.index(p.rejected)))
    return [_MessageBatch(ex.message, [r.text for r in ex.replies], rows[ex.id])
            for ex in examples if rows[ex.id]]


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


def _train_objectives(rm: RewardModel, batches, val_batches, args: TrainArgs, seed: int,
                      bar) -> tuple[list[dict], int | None]:
    """Bradley-Terry on every pair; returns the epoch history and the epoch kept."""
    cached = not rm.config.lora_rank
    params = [{"params": rm.heads.objectives.parameters(), "lr": args.lr}]
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
    history, best, best_acc, best_epoch = [], None, -1.0, None
    for epoch in range(1, args.epochs + 1):
        rng.shuffle(order)
        rm.heads.objectives.train()
        rm.encoder.train(not cached)
        losses = []
        for i in range(0, len(order), args.messages_per_step):
            idx = order[i:i + args.messages_per_step]
            step = [batches[j] for j in idx]
            feats = torch.cat([cache[j] for j in idx]) if cached else encode(step)
            margins, _ = _pair_margins(rm.heads.objectives(feats), step)
            loss = -nn.functional.logsigmoid(torch.stack(margins)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        rm.heads.objectives.eval()
        rm.encoder.eval()
        record = {"epoch": epoch, "loss": round(float(np.mean(losses)), 4)}
        if val_batches and args.select_on_val:
            with torch.no_grad():
                feats = val_cache if cached else torch.cat(
                    [encode(val_batches[i:i + 8]) for i in range(0, len(val_batches), 8)])
                hits = _pair_accuracy(rm.heads.objectives(feats).cpu().numpy(), val_batches)
            record["val_acc"] = round(float(np.mean([np.mean(h) for h in hits.values() if h])), 4)
            if record["val_acc"] > best_acc:
                best_acc, best_epoch = record["val_acc"], epoch
                best = (_snapshot(rm.heads), None if cached else _snapshot(rm.encoder))
        history.append(record)
        bar.update()
        bar.set_postfix({k: v for k, v in record.items() if k != "epoch"})
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
                       device: str | None = None, progress: bool = True) -> RewardModel:
    """Objective heads: Bradley-Terry on `seed_pairs(train)`, epoch kept by val accuracy, scores
    calibrated to the rating scale on val. Crisis head: BCE on train messages plus the extra
    negatives; threshold calibrated on val. Deterministic given `seed` (on one device)."""
    config = config or RewardConfig()
    if encoder:
        config.encoder = encoder
    args = args or TrainArgs(epochs=epochs)
    t0 = time.perf_counter()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    rm = RewardModel(config, device=device)
    batches, val_batches = _message_batches(train), _message_batches(val)
    if not batches:
        raise ValueError("no preference pairs in the training examples (all ratings tied?)")
    extra = list(extra_crisis_negatives)
    with tqdm(total=args.epochs, desc="reward heads", disable=not progress, leave=False) as bar:
        history, best_epoch = _train_objectives(rm, batches, val_batches, args, seed, bar)
    _train_crisis(rm, [ex.message for ex in train] + extra,
                  [ex.is_crisis for ex in train] + [False] * len(extra),
                  [ex.message for ex in (val or train)], args)

    cal_batches = val_batches or batches
    rm.config.calibration = [[1.0, 0.0]] * len(OBJECTIVES)
    raw = rm.score(*_flat(cal_batches))
    by_text = {(ex.message, r.text): r for ex in (val if val_batches else train) for r in ex.replies}
    ratings = np.array([[by_text[pr].ratings[o] for o in OBJECTIVES]
                        for pr in zip(*_flat(cal_batches))], dtype=float)
    rm.config.calibration = _fit_calibration(raw, ratings)
    if val:
        rm.crisis_threshold = calibrate_threshold(
            rm.crisis_prob([ex.message for ex in val]), np.array([ex.is_crisis for ex in val]),
            args.target_recall)
    rm.meta.update({
        "seed": seed, "train_ids": sorted(ex.id for ex in train),
        "val_ids": sorted(ex.id for ex in val), "extra_crisis_negatives": len(extra),
        "train_args": asdict(args), "history": history, "best_epoch": best_epoch,
        "train_seconds": round(time.perf_counter() - t0, 1), "device": str(rm.device),
        "score_scale": "each objective affinely calibrated to the 1-5 rating scale "
                       + ("on val" if val_batches else "on train"),
    })
    return rm


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


def train_and_save(out_dir: str | Path | None = None, judge_dir: str | Path | None = None, *,
                   encoder: str | None = None, counsel_chat: str | Path | None = None,
                   progress: bool = True) -> dict:
    """Train the shipped reward model (train split, seed 0) and judge (train+val, seed 1, as many
    objective epochs as the reward model kept), save both, and return their test metrics."""
    from alignment.data import load_seed, load_splits, split_examples
    from attune.paths import DEFAULT_COUNSEL_CHAT, JUDGE_DIR, REWARD_DIR

    out_dir, judge_dir = Path(out_dir or REWARD_DIR), Path(judge_dir or JUDGE_DIR)
    examples, splits = load_seed(), load_splits()
    train, val, test = (split_examples(examples, s, splits) for s in ("train", "val", "test"))
    cc = Path(counsel_chat or DEFAULT_COUNSEL_CHAT)
    extra = counsel_chat_crisis_negatives(cc) if cc.exists() else []
    rm = train_reward_model(train, val, encoder=encoder, seed=0, extra_crisis_negatives=extra,
                            progress=progress)
    judge = train_reward_model(
        train + val, val, encoder=encoder, seed=1, extra_crisis_negatives=extra, progress=progress,
        args=TrainArgs(epochs=rm.meta["best_epoch"] or TrainArgs.epochs, select_on_val=False))
    judge.meta["note"] = "val is inside the judge's training set: its calibration is in-sample"
    report = {"reward": evaluate_reward_model(rm, test), "judge": evaluate_reward_model(judge, test),
              "judge_agreement": judge_agreement(rm, judge, test),
              "train_seconds": {"reward": rm.meta["train_seconds"],
                                "judge": judge.meta["train_seconds"]},
              "counsel_chat_negatives": len(extra)}
    for model, path, name in ((rm, out_dir, "reward"), (judge, judge_dir, "judge")):
        model.meta["test_metrics"] = report[name]
        model.meta["judge_agreement_test"] = report["judge_agreement"]
        model.save(path)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train and save the shipped reward model and judge.")
    parser.add_argument("--out", default=None, help="reward model folder (adapters/store/reward)")
    parser.add_argument("--judge", default=None, help="judge folder (adapters/store/judge)")
    parser.add_argument("--encoder", default=None, help=f"hub id or folder (default {DEFAULT_ENCODER})")
    parser.add_argument("--counsel-chat", default=None, help="counsel-chat CSV for crisis negatives")
    a = parser.parse_args(argv)
    print(json.dumps(train_and_save(a.out, a.judge, encoder=a.encoder, counsel_chat=a.counsel_chat),
                     indent=1))


if __name__ == "__main__":
    main()
