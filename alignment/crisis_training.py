"""Training data, training, calibration and evaluation of the crisis detector (alignment.crisis).

Data, per split (train / val / test):
- alignment/corpus/crisis/authored-*.jsonl: messages written to the risk taxonomy and hard negatives of
  GUIDELINES.md (guideline c1), each with a fixed `split`;
- alignment/corpus/authored.jsonl and the seed set: labelled messages, split as their corpus prompt is
  (rm-train and judge-train -> train, rm-val -> val, test -> test);
- counsel-chat train-split questions on topics without risk, as ordinary negatives (train only).
Nothing from ../shared/eval goes in. Counsel-chat val questions are never trained or calibrated on: the report
measures false escalation on them.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from alignment.crisis import CrisisClassifier, CrisisConfig
from alignment.corpus_data import CORPUS_DIR
from serving.safety import TURN_SEPARATOR  # windows joined as serving joins a session's turns

CRISIS_DIR = CORPUS_DIR / "crisis"
SPLITS = ("train", "val", "test")
SPLIT_SHARES = (0.7, 0.15, 0.15)
_CORPUS_SPLIT = {"rm-train": "train", "judge-train": "train", "rm-val": "val", "test": "test"}


@dataclass(frozen=True)
class CrisisExample:
    id: str
    text: str
    risk: bool
    source: str
    category: str
    split: str


def assign_split(rank: int, n: int) -> str:
    """Stratified by category: a row's rank (by id hash) among its category's n rows decides its split."""
    cut1, cut2 = round(SPLIT_SHARES[0] * n), round((SPLIT_SHARES[0] + SPLIT_SHARES[1]) * n)
    return "train" if rank < cut1 else "val" if rank < cut2 else "test"


def _hash(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def fix_splits(path: Path) -> int:
    """Give every row of an authored crisis file a `split` (stratified by category, order by id hash); rows that
    have one keep it. Returns how many rows got one."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    by_cat: dict[str, list[dict]] = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r)
    changed = 0
    for cat, items in by_cat.items():
        ranked = sorted(items, key=lambda r: _hash(r["id"]))
        for rank, r in enumerate(ranked):
            if "split" not in r:
                r["split"] = assign_split(rank, len(ranked))
                changed += 1
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return changed


def load_authored_crisis(crisis_dir: Path = CRISIS_DIR) -> list[CrisisExample]:
    out = []
    for path in sorted(crisis_dir.glob("authored-*.jsonl")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            r = json.loads(line)
            if r.get("label") not in ("risk", "none") or r.get("split") not in SPLITS or not r.get("message"):
                raise ValueError(f"{path}:{n}: needs label 'risk'|'none', split in {SPLITS} and a message "
                                 f"(run `attune crisis splits` after adding rows)")
            out.append(CrisisExample(r["id"], r["message"], r["label"] == "risk", path.stem, r["category"],
                                     r["split"]))
    return out


def load_labelled_messages(corpus_dir: Path = CORPUS_DIR) -> list[CrisisExample]:
    """The seed set and the corpus's authored messages, split as their corpus prompt."""
    from alignment.corpus_data import load_prompts
    from alignment.data import load_seed

    split_of = {(p.source, p.ref): _CORPUS_SPLIT[p.split] for p in load_prompts(corpus_dir)}
    out = [CrisisExample(ex.id, ex.message, ex.is_crisis, "seed", ex.presentation, split_of[("seed", ex.id)])
           for ex in load_seed() if ("seed", ex.id) in split_of]
    for line in (corpus_dir / "authored.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if ("authored", r["id"]) in split_of:
            out.append(CrisisExample(r["id"], r["message"], r["crisis_risk"] != "none", "authored", r["category"],
                                     split_of[("authored", r["id"])]))
    return out


def counsel_chat_negatives(counsel_chat: str | Path, limit: int = 400, seed: int = 0) -> list[CrisisExample]:
    from alignment.reward_training import counsel_chat_crisis_negatives

    qs = counsel_chat_crisis_negatives(counsel_chat)
    random.Random(seed).shuffle(qs)
    return [CrisisExample(f"cc-train-{i}", q, False, "counsel_chat", "ordinary", "train")
            for i, q in enumerate(qs[:limit])]


def counsel_chat_val(counsel_chat: str | Path) -> list[CrisisExample]:
    """Counsel-chat val-split questions on topics without risk: the report's ordinary messages (never trained on)."""
    from alignment.data import counsel_chat_questions, load_counsel_chat
    from alignment.reward_training import RISKY_TOPICS

    qs = counsel_chat_questions(load_counsel_chat(counsel_chat), "val", exclude_topics=RISKY_TOPICS)
    return [CrisisExample(f"cc-val-{i}", q, False, "counsel_chat", "ordinary", "report") for i, q in enumerate(qs)]


def build_sets(counsel_chat: str | Path, crisis_dir: Path = CRISIS_DIR, corpus_dir: Path = CORPUS_DIR
               ) -> dict[str, list[CrisisExample]]:
    every = load_authored_crisis(crisis_dir) + load_labelled_messages(corpus_dir)
    sets = {s: [ex for ex in every if ex.split == s] for s in SPLITS}
    sets["train"] += counsel_chat_negatives(counsel_chat)
    return sets


def windows(examples: Sequence[CrisisExample], n: int, seed: int = 0) -> list[CrisisExample]:
    """Multi-turn windows built from single messages, as the detector reads a session: an ordinary turn then a
    risk turn, a risk turn then an ordinary one (risk stated a turn ago), two ordinary turns."""
    rng = random.Random(seed)
    risk = [ex for ex in examples if ex.risk]
    none = [ex for ex in examples if not ex.risk]
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0 and risk:
            a, b = rng.choice(none), rng.choice(risk)
        elif kind == 1 and risk:
            a, b = rng.choice(risk), rng.choice(none)
        else:
            a, b = rng.choice(none), rng.choice(none)
        out.append(CrisisExample(f"win-{a.id}-{b.id}", a.text + TURN_SEPARATOR + b.text, a.risk or b.risk, "window",
                                 "window", a.split))
    return out


@dataclass
class CrisisTrainArgs:
    epochs: int = 6
    batch_size: int = 16
    lr: float = 1e-3
    head_lr: float = 3e-3
    weight_decay: float = 0.01
    target_recall: float = 0.99
    near_extra: float = 0.02
    """Share of val's ordinary messages the near band may add to the safety path."""
    threshold_margin: float = 0.15
    """Logits the threshold sits below the risk message it was calibrated on. The detector's numbers move with the
    CPU (bf16 autocast): on val, bf16 and fp32 logits differ by up to 0.12, and a threshold set exactly at a risk
    message's probability lost that message on another machine."""
    window_share: float = 0.3
    seed: int = 0
    max_steps: int | None = None
    """Stop after this many optimiser steps (tests)."""


def calibrate(probs: np.ndarray, labels: np.ndarray, target_recall: float, margin: float = 0.0) -> float:
    """The highest threshold whose recall on the positives is >= target_recall, lowered by `margin` logits so that
    the recall holds when the probabilities move by less than that."""
    pos = np.sort(probs[labels])
    if len(pos) == 0:
        raise ValueError("no risk messages to calibrate on")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    allowed_misses = int(np.floor((1.0 - target_recall) * len(pos) + 1e-9))
    p = float(np.clip(pos[allowed_misses], 1e-12, 1 - 1e-12))
    return float(1.0 / (1.0 + np.exp(-(np.log(p / (1 - p)) - margin)))) if margin else p


def set_thresholds(model: CrisisClassifier, val: Sequence[CrisisExample], args: CrisisTrainArgs) -> dict:
    """Calibrate the threshold on val for `args.target_recall` (with its margin) and the near band below it; returns
    the calibration figures for the detector's meta."""
    val_probs = model.prob([ex.text for ex in val])
    labels = np.array([ex.risk for ex in val])
    threshold = calibrate(val_probs, labels, args.target_recall, args.threshold_margin)
    # Near the line: the band below the threshold that adds at most `near_extra` of val's ordinary messages to those
    # already escalated (the safety path answers them, not the routed adapter); empty when even that is too many.
    neg = np.sort(val_probs[~labels])[::-1]
    flagged = int((neg >= threshold).sum())
    extra = int(np.floor(args.near_extra * len(neg)))
    near = float(neg[flagged + extra]) + 1e-6 if flagged + extra < len(neg) else 0.0
    model.config.threshold, model.config.near_threshold = threshold, float(min(max(near, 0.0), threshold))
    return {"split": "val", "target_recall": args.target_recall, "margin_logits": args.threshold_margin,
            "threshold": round(threshold, 5), **metrics(val_probs, labels, threshold)}


def train_detector(sets: dict[str, list[CrisisExample]], config: CrisisConfig | None = None,
                   args: CrisisTrainArgs | None = None, log=print) -> tuple[CrisisClassifier, dict]:
    """Fine-tune (BCE, positives weighted to balance), calibrate the threshold on val for `target_recall`."""
    args = args or CrisisTrainArgs()
    torch.manual_seed(args.seed)
    model = CrisisClassifier(config)
    train = list(sets["train"])
    train += windows(train, int(args.window_share * len(train)), args.seed)
    rng = random.Random(args.seed)
    n_pos = sum(ex.risk for ex in train)
    pos_weight = torch.tensor((len(train) - n_pos) / max(n_pos, 1))
    params = [p for p in model.encoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": params, "lr": args.lr},
                             {"params": model.head.parameters(), "lr": args.head_lr}], weight_decay=args.weight_decay)
    total = args.epochs * -(-len(train) // args.batch_size)
    if args.max_steps is not None:
        total = min(total, args.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, total // 10))
                                              * max(0.0, 1 - s / max(total, 1)))
    model.encoder.train()
    model.head.train()
    step, started = 0, time.perf_counter()
    while step < total:
        rng.shuffle(train)
        for i in range(0, len(train), args.batch_size):
            batch = train[i:i + args.batch_size]
            y = torch.tensor([float(ex.risk) for ex in batch])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model.logits([ex.text for ex in batch]), y,
                                                                        pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0:
                log(f"step {step}/{total} loss {loss.item():.4f} {time.perf_counter() - started:.0f}s")
            if step >= total:
                break
    model.encoder.eval()
    model.head.eval()
    seconds = time.perf_counter() - started
    calibration = set_thresholds(model, sets["val"], args)
    meta = {"trained": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(seconds, 1), "steps": step,
            "train": {"n": len(train), "risk": n_pos, "windows": int(args.window_share * len(sets["train"]))},
            "args": vars(args), "calibration": calibration}
    model.meta = meta
    return model, meta


def recalibrate(model: CrisisClassifier, val: Sequence[CrisisExample], args: CrisisTrainArgs) -> dict:
    """Set a trained detector's thresholds again on val (no training): its meta keeps the training figures, with the
    new calibration and when it was made."""
    calibration = set_thresholds(model, val, args)
    model.meta = {**model.meta, "calibration": {**calibration, "recalibrated": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                  "args": {**model.meta.get("args", {}), "target_recall": args.target_recall,
                           "near_extra": args.near_extra, "threshold_margin": args.threshold_margin}}
    return calibration


def metrics(probs: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    flagged = probs >= threshold
    pos, neg = labels.sum(), (~labels).sum()
    out = {"n_risk": int(pos), "n_none": int(neg),
           "recall": round(float((flagged & labels).sum() / pos), 4) if pos else None,
           "false_escalation": round(float((flagged & ~labels).sum() / neg), 4) if neg else None}
    if pos and neg:
        from sklearn.metrics import roc_auc_score

        out["auroc"] = round(float(roc_auc_score(labels, probs)), 4)
    return out


def evaluate(model: CrisisClassifier, examples: Iterable[CrisisExample], rules=None) -> dict:
    """Recall / false escalation of the model alone and (with `rules`, a serving.safety.CrisisRules) model or
    rules, overall and per category; misses and false alarms by id (no text)."""
    examples = list(examples)
    probs = model.prob([ex.text for ex in examples])
    labels = np.array([ex.risk for ex in examples])
    by_rules = np.array([bool(rules.match(ex.text)) for ex in examples]) if rules is not None else None
    out = {"model": metrics(probs, labels, model.config.threshold)}
    if by_rules is not None:
        either = np.where(by_rules, 1.0, probs)
        out["model_or_rules"] = metrics(either, labels, model.config.threshold)
        flagged = either >= model.config.threshold
    else:
        flagged = probs >= model.config.threshold
    cats: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        cats.setdefault(f"{'risk' if ex.risk else 'none'}:{ex.category}", []).append(i)
    out["per_category"] = {c: {"n": len(ix), "flagged": int(flagged[ix].sum())} for c, ix in sorted(cats.items())}
    out["missed"] = [ex.id for i, ex in enumerate(examples) if ex.risk and not flagged[i]]
    out["false_alarms"] = [ex.id for i, ex in enumerate(examples) if not ex.risk and flagged[i]]
    return out


def import_second_pass(sheet_dir: Path, crisis_dir: Path = CRISIS_DIR) -> Path:
    """Unblind a second rating pass (sheet_dir/labels-*.jsonl by item, key.json item -> id) and add it to
    crisis_dir/labels-pass2.jsonl by message id (rows already there are kept; a message rated twice is refused)."""
    key = json.loads((sheet_dir / "key.json").read_text())
    out = crisis_dir / "labels-pass2.jsonl"
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] if out.exists() else []
    for path in sorted(sheet_dir.glob("labels-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            if r["label"] not in ("risk", "none"):
                raise ValueError(f"{path}: label {r['label']!r} is not 'risk' or 'none'")
            rows.append({"id": key[r["item"]], "label": r["label"], "rater": r["rater"], "guideline": r["guideline"]})
    if len({r["id"] for r in rows}) != len(rows):
        raise ValueError(f"{sheet_dir}: a message was rated twice in the second pass")
    out.write_text("".join(json.dumps(r) + "\n" for r in sorted(rows, key=lambda r: r["id"])), encoding="utf-8")
    return out


def second_pass_agreement(crisis_dir: Path = CRISIS_DIR) -> dict:
    """Agreement of the authored labels (pass 1: the author wrote the message to its label) with the blind second
    pass: raw agreement, Cohen's kappa, and the disagreements by category."""
    first = {ex.id: ex for ex in load_authored_crisis(crisis_dir)}
    second = {r["id"]: r["label"] == "risk" for r in map(json.loads, (crisis_dir / "labels-pass2.jsonl")
                                                           .read_text(encoding="utf-8").splitlines())}
    ids = sorted(set(first) & set(second))
    a = np.array([first[i].risk for i in ids])
    b = np.array([second[i] for i in ids])
    po = float((a == b).mean())
    pe = float(a.mean() * b.mean() + (1 - a.mean()) * (1 - b.mean()))
    disagree: dict[str, int] = {}
    for i in ids:
        if first[i].risk != second[i]:
            key = f"{'risk' if first[i].risk else 'none'}:{first[i].category}"
            disagree[key] = disagree.get(key, 0) + 1
    return {"n": len(ids), "agreement": round(po, 4), "kappa": round((po - pe) / (1 - pe), 4),
            "pass1_risk": int(a.sum()), "pass2_risk": int(b.sum()), "disagreements": dict(sorted(disagree.items()))}
