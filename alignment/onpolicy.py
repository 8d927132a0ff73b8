"""On-policy preference data: sample k replies per training prompt from the base model, score
them once with the reward model, and turn the scores into per-objective pairs whose MODPO margins
r_-k(x, y_w) - r_-k(x, y_l) are precomputed here, before any training."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alignment import prompts as P
from alignment.data import SeedExample
from alignment.generate import GenerationSettings
from alignment.objectives import OBJECTIVES, Preference


@dataclass
class Scored:
    prompt: str
    replies: list[str]
    scores: np.ndarray  # [k, 6] reward-model scores, order OBJECTIVES


def sample(prompts: list[str], generator, k: int, settings: GenerationSettings) -> list[dict]:
    """k sampled replies per prompt: [{prompt, replies}]."""
    samples = generator.generate([P.chat(p) for p in prompts], n=k, settings=settings)
    return [{"prompt": p, "replies": list(s)} for p, s in zip(prompts, samples)]


def score(samples: list[dict], reward_model) -> list[Scored]:
    flat_p = [d["prompt"] for d in samples for _ in d["replies"]]
    flat_r = [r for d in samples for r in d["replies"]]
    scores = np.asarray(reward_model.score(flat_p, flat_r))
    out, i = [], 0
    for d in samples:
        n = len(d["replies"])
        out.append(Scored(d["prompt"], d["replies"], scores[i:i + n]))
        i += n
    return out


def seed_scored(examples: list[SeedExample], reward_model) -> list[Scored]:
    """The seed set's human-written replies, scored by the reward model (for margins)."""
    flat_p = [ex.message for ex in examples for _ in ex.replies]
    flat_r = [r.text for ex in examples for r in ex.replies]
    scores = np.asarray(reward_model.score(flat_p, flat_r))
    out, i = [], 0
    for ex in examples:
        n = len(ex.replies)
        out.append(Scored(ex.message, flat_r[i:i + n], scores[i:i + n]))
        i += n
    return out


def save(samples: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for d in samples:
            f.write(json.dumps(d) + "\n")
    tmp.replace(path)


def load(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _row(prompt: str, chosen: str, rejected: str, margin=0.0, w_primary=1.0, weight=1.0) -> dict:
    return {"prompt": P.chat(prompt), "chosen": P.assistant(chosen), "rejected": P.assistant(rejected),
            "margin": float(margin), "w_primary": float(w_primary), "weight": float(weight)}


def best_worst(s: Scored, k: int, ratings: np.ndarray | None = None) -> tuple[int, int, float]:
    """Indices of the best and worst reply on objective k (by human ratings when given)."""
    col = (ratings if ratings is not None else s.scores)[:, k]
    hi, lo = int(np.argmax(col)), int(np.argmin(col))
    return hi, lo, float(col[hi] - col[lo])


def preference_rows(scored: list[Scored], primary: str, weights: Preference | None, *,
                    min_gap: float, modpo: bool, seed_ratings: list[np.ndarray | None] | None = None,
                    pair_weight: float = 1.0) -> tuple[list[dict], int]:
    """Best-vs-worst pairs on `primary`; with `modpo`, the margin w_-k . (r_-k(y_w) - r_-k(y_l)).
    Returns (rows, number of prompts dropped because the gap was below min_gap)."""
    k = OBJECTIVES.index(primary)
    w = np.asarray(weights.as_vector()) if weights is not None else np.eye(len(OBJECTIVES))[k]
    w_k, w_rest = float(w[k]), w.copy()
    w_rest[k] = 0.0
    rows, dropped = [], 0
    for i, s in enumerate(scored):
        ratings = seed_ratings[i] if seed_ratings is not None else None
        hi, lo, gap = best_worst(s, k, ratings)
        if gap < (1.0 if ratings is not None else min_gap) or hi == lo:
            dropped += 1
            continue
        margin = float(w_rest @ (s.scores[hi] - s.scores[lo])) if modpo else 0.0
        rows.append(_row(s.prompt, s.replies[hi], s.replies[lo], margin,
                         w_k if modpo else 1.0, pair_weight))
    return rows, dropped
