"""Preference pairs for the grid (issue 13): where raters ranked replies, the pair is the best vs the worst reply of
the objective by their ranking; the reward model only supplies MODPO's margins there, on its raw (logit) scale, and
labels pairs only for extra prompts no one rated, which are marked as such.

Sources, each pair tagged with one:
- `corpus-labels`: the on-policy corpus (alignment/corpus), pass-1 rankings of six replies per prompt, prompts of
  one split (rm-train: what the reward model was fitted on; never the judge's or the test split);
- `corpus-labels-round<N>`: a later corpus round (alignment/corpus/round<N>): the emphasised adapters' own replies
  to rm-train prompts, ranked among themselves; a source of its own, so that a cap takes from it in turn;
- `seed-ratings`: the seed set's train split, replies rated 1-5 per objective;
- `reward-model`: on-policy samples of extra prompts, best vs worst by the reward model's raw score.
"""
from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass

import numpy as np

from alignment import prompts as P
from alignment.objectives import OBJECTIVES, Preference

SOURCES = ("corpus-labels", "seed-ratings", "reward-model")


@dataclass
class Rated:
    """One patient message with replies and, per objective, each reply's rank (1 = best; ties share a rank)."""
    prompt: str
    replies: dict[str, str]  # reply id -> text
    rank: dict[str, dict[str, int]]  # objective -> reply id -> rank
    source: str
    round: int | None = None  # corpus round (corpus-labels sources only)


def ranks_from_scores(scores: dict[str, float]) -> dict[str, int]:
    """Competition ranking, higher score better: {a: 5, b: 3, c: 5} -> {a: 1, c: 1, b: 3}."""
    return {r: 1 + sum(s > v for s in scores.values()) for r, v in scores.items()}


def corpus_rated(split: str, counsel_chat, log=print, rounds: tuple[int, ...] = (1,)) -> list[Rated]:
    """The corpus's labelled prompts of `split` (pass 1 as written, like the reward model's training), one item per
    prompt and round (a later round's replies are ranked among themselves). Counsel-chat prompts are skipped, with a
    line saying so, when no counsel-chat CSV is given (its text is not stored here)."""
    from alignment.corpus_build import round_dir
    from alignment.corpus_data import load_pass, load_prompts, load_samples, resolve_texts
    from alignment.data import DataError

    out = []
    for n in rounds:
        folder = round_dir(n)
        if not (folder / "samples.jsonl").exists():
            raise DataError(f"corpus round {n}: no {folder / 'samples.jsonl'} (sample it with `attune corpus sample "
                            f"--round {n}`, then label it)")
        samples = load_samples(folder)
        labels = load_pass(folder, samples=samples)
        prompts = [p for p in load_prompts(folder) if p.split == split and p.id in labels]
        if counsel_chat is None:
            kept = [p for p in prompts if p.source != "counsel_chat"]
            if len(kept) < len(prompts):
                log(f"corpus pairs, round {n}: no counsel-chat CSV, {len(prompts) - len(kept)} counsel-chat prompts "
                    "left out")
            prompts = kept
        texts = resolve_texts(prompts, counsel_chat, folder)
        for p in prompts:
            row = labels[p.id]
            out.append(Rated(texts[p.id], {r.id: r.text for r in samples[p.id]},
                             {o: dict(row.rank[o]) for o in OBJECTIVES}, corpus_source(n), n))
    return out


def corpus_source(round_no: int) -> str:
    return "corpus-labels" if round_no == 1 else f"corpus-labels-round{round_no}"


def corpus_prompt_texts(counsel_chat) -> set[str]:
    """Every corpus prompt's text, whatever its split (rm-val, judge-train and test included): extra prompts for
    reward-model pairs must be none of them. Counsel-chat prompts need the CSV (left out without one, as the
    extras, which come from it, are then absent too)."""
    from alignment.corpus_data import load_prompts, resolve_texts

    prompts = load_prompts()
    if counsel_chat is None:
        prompts = [p for p in prompts if p.source != "counsel_chat"]
    return set(resolve_texts(prompts, counsel_chat).values())


def seed_rated(examples) -> list[Rated]:
    """Seed examples (alignment.data.SeedExample) with their human 1-5 ratings turned into ranks."""
    out = []
    for ex in examples:
        replies = {f"{ex.id}/{i}": r.text for i, r in enumerate(ex.replies)}
        rank = {o: ranks_from_scores({f"{ex.id}/{i}": r.ratings[o] for i, r in enumerate(ex.replies)})
                for o in OBJECTIVES}
        out.append(Rated(ex.message, replies, rank, "seed-ratings"))
    return out


def scored_rated(prompt: str, replies: list[str], raw: np.ndarray) -> Rated:
    """On-policy samples of an unrated prompt, ranked by the reward model's raw scores ([k, 6])."""
    ids = {f"s{i}": t for i, t in enumerate(replies)}
    rank = {o: ranks_from_scores({f"s{i}": float(raw[i, j]) for i in range(len(replies))})
            for j, o in enumerate(OBJECTIVES)}
    return Rated(prompt, ids, rank, "reward-model")


def _tie_breaker(item: Rated, objective: str) -> random.Random:
    """Breaks a tie between pairs the same way on every run: seeded by the prompt and objective."""
    return random.Random(hashlib.sha256(f"{item.prompt}\0{objective}".encode()).hexdigest())


def best_worst(item: Rated, objective: str) -> tuple[str, str] | None:
    """(best, worst) reply ids on `objective`; a tie among the best or the worst is broken by a hash of the prompt
    and objective (the same on every run); None when every reply shares one rank."""
    ranks = item.rank[objective]
    lo, hi = min(ranks.values()), max(ranks.values())
    if lo == hi:
        return None
    rng = _tie_breaker(item, objective)
    best = sorted(r for r, v in ranks.items() if v == lo)
    worst = sorted(r for r, v in ranks.items() if v == hi)
    return rng.choice(best), rng.choice(worst)


def contrastive(item: Rated, objective: str) -> tuple[str, str] | None:
    """(chosen, rejected) reply ids where `objective` most prefers the chosen reply beyond what the other objectives
    do: the pair maximising gap_k - mean of gap_m over the other objectives, where gap_o is how many ranks the
    rejected reply sits below the chosen one on o (gap_k > 0). Equal scores go to the larger gap_k, then to a hash of
    the prompt and objective (the same on every run); None when every reply shares one rank on `objective`.

    Raters' rankings correlate strongly across objectives on rm-train, so best vs worst on one
    objective is mostly best vs worst on all of them and every adapter learns the same thing; these pairs carry what
    is particular to the objective."""
    ranks = item.rank[objective]
    others = [o for o in item.rank if o != objective]
    ids = sorted(ranks)
    scored = []
    for c in ids:
        for r in ids:
            gap = ranks[r] - ranks[c]
            if gap <= 0:
                continue
            rest = sum(item.rank[o][r] - item.rank[o][c] for o in others) / max(len(others), 1)
            scored.append(((gap - rest, gap), c, r))
    if not scored:
        return None
    top = max(key for key, _, _ in scored)
    return _tie_breaker(item, objective).choice([(c, r) for key, c, r in scored if key == top])


SELECTIONS = {"best_worst": best_worst, "contrastive": contrastive}


def modpo_margin(weights: np.ndarray, k: int, raw_chosen: np.ndarray, raw_rejected: np.ndarray) -> float:
    """w_-k . (r_-k(y_w) - r_-k(y_l)) on the reward model's raw scale: the logit of the Bradley-Terry preference it
    was trained on, so one unit of weight buys the same log-odds on every objective (the calibrated 1-5 scale does
    not: its slopes differ 2.7x between objectives)."""
    rest = np.asarray(weights, dtype=np.float64).copy()
    rest[k] = 0.0
    return float(rest @ (np.asarray(raw_chosen, np.float64) - np.asarray(raw_rejected, np.float64)))


def pair_rows(items: list[Rated], primary: str, *, pair_weight: float = 1.0, selection: str = "best_worst"
              ) -> list[dict]:
    """One row per rated prompt on `primary`, its pair picked by `selection` (a key of SELECTIONS): {prompt, chosen,
    rejected (chat form), margin 0, w_primary 1, weight, source, texts}; `add_margins` turns them into MODPO rows."""
    pick = SELECTIONS[selection]
    rows = []
    for item in items:
        picked = pick(item, primary)
        if picked is None:
            continue
        chosen, rejected = (item.replies[r] for r in picked)
        rows.append({"prompt": P.chat(item.prompt), "chosen": P.assistant(chosen), "rejected": P.assistant(rejected),
                     "margin": 0.0, "w_primary": 1.0, "weight": float(pair_weight), "source": item.source,
                     "texts": (item.prompt, chosen, rejected)})
    return rows


def add_margins(rows: list[dict], primary: str, weights: Preference, raw: dict[tuple[str, str], np.ndarray]
                ) -> list[dict]:
    """MODPO rows: w_k and the margin from `raw` ((prompt, reply text) -> the reward model's raw scores)."""
    k = OBJECTIVES.index(primary)
    w = np.asarray(weights.as_vector())
    out = []
    for r in rows:
        prompt, chosen, rejected = r["texts"]
        # rounded: the reward model's scores move in the last bits with the batch they are computed in, and the
        # rows are what an adapter's recipe hash is made of (an interrupted grid must find its adapters again)
        out.append({**r, "w_primary": float(w[k]), "margin": round(modpo_margin(w, k, raw[prompt, chosen],
                                                                                raw[prompt, rejected]), 4)})
    return out


def interleave_sources(rows: list[dict], cap: int | None, seed: int = 0) -> list[dict]:
    """Rows shuffled (seeded) and, under a cap, taken from each source in turn so that none crowds out the others."""
    rng = random.Random(seed)
    by_source: dict[str, list[dict]] = {}
    for r in rows:
        by_source.setdefault(r["source"], []).append(r)
    for group in by_source.values():
        rng.shuffle(group)
    out, queues = [], [g for _, g in sorted(by_source.items())]
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop())
    return out[:cap] if cap else out


def source_counts(rows: list[dict]) -> dict[str, int]:
    c = Counter(r["source"] for r in rows)
    return {**{s: c.get(s, 0) for s in SOURCES}, **{s: n for s, n in sorted(c.items()) if s not in SOURCES}}
