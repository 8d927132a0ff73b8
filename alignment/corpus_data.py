"""Schemas and loaders of the on-policy corpus (alignment/corpus/, see its DATA_CARD.md): prompts and their
fixed splits, our model's sampled replies, blind rater labels (per-objective rankings and absolute safety
labels), the preference pairs they imply, and agreement between two labelling passes.

Bad input is an error that names the file, the line and the field; nothing is skipped silently."""
from __future__ import annotations

import itertools
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from alignment.data import DataError, check_six
from alignment.objectives import OBJECTIVES
from attune.paths import REPO_ROOT

CORPUS_DIR = REPO_ROOT / "alignment" / "corpus"
PROMPT_SPLITS = ("rm-train", "rm-val", "judge-train", "test")
SAFETY_LABELS = ("safe", "borderline", "unsafe")
# Why a reply is not safe (safe replies carry "none").
SAFETY_REASONS = ("none", "method_or_means", "encourages_harm", "misses_risk", "invalidates",
                  "medical_misinformation", "boundary_violation", "other")
GUIDELINE_VERSION = "g1"

Source = Literal["counsel_chat", "seed", "authored"]
PromptSplit = Literal["rm-train", "rm-val", "judge-train", "test"]


class CorpusPrompt(BaseModel):
    """One patient message of the corpus. Counsel-chat text is not stored: `ref` is its questionID."""
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1)
    source: Source
    ref: str = Field(min_length=1, description="counsel-chat questionID, seed example id or authored id")
    split: PromptSplit
    presentation: str | None = None
    crisis_risk: Literal["none", "passive", "active", "plan"] | None = None
    category: str | None = None


class SampleReply(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1)
    text: str


class SampleRow(BaseModel):
    """Replies one model wrote for one prompt, with what is needed to regenerate them."""
    model_config = ConfigDict(extra="forbid")
    prompt_id: str
    model: str = Field(description="'base' or a shipped adapter id")
    base_model: str
    engine: str
    sampling: dict
    n: int = Field(ge=1)
    replies: list[SampleReply]


class SafetyLabel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: Literal["safe", "borderline", "unsafe"]
    reason: Literal["none", "method_or_means", "encourages_harm", "misses_risk", "invalidates",
                    "medical_misinformation", "boundary_violation", "other"]


class LabelRow(BaseModel):
    """One rater's labels for one prompt: a ranking per objective (1 = best, ties share a rank) over every reply
    of the prompt, and an absolute safety label per reply."""
    model_config = ConfigDict(extra="forbid")
    prompt_id: str
    rater: str = Field(min_length=1, description="who rated: a person's handle or 'model-name/helper-id'")
    guideline_version: str = Field(min_length=1)
    labelling_pass: int = Field(ge=1, le=2)
    rank: dict[str, dict[str, int]]
    safety: dict[str, SafetyLabel]
    note: str = ""

    @field_validator("rank")
    @classmethod
    def _six_rankings(cls, v: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        check_six(v, "ranking")
        for o, ranks in v.items():
            if any(r < 1 for r in ranks.values()):
                raise ValueError(f"ranks for {o!r} must be >= 1 (1 = best)")
        return v


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return rows


def write_jsonl(rows: Iterable, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r.model_dump(exclude_none=True) if isinstance(r, BaseModel) else r,
                               ensure_ascii=False) + "\n")
    tmp.replace(path)


def _parse(model: type[BaseModel], path: Path) -> list:
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(model.model_validate_json(line))
            except ValidationError as e:
                err = e.errors()[0]
                field = ".".join(str(x) for x in err["loc"]) or "(line)"
                raise DataError(f"{path}:{lineno}: field {field!r}: {err['msg']}") from None
    return out


def load_prompts(corpus_dir: Path = CORPUS_DIR) -> list[CorpusPrompt]:
    path = corpus_dir / "prompts.jsonl"
    prompts = _parse(CorpusPrompt, path)
    seen: set[str] = set()
    for lineno, p in enumerate(prompts, 1):
        if p.id in seen:
            raise DataError(f"{path}:{lineno}: field 'id': prompt {p.id!r} appears twice (one split per prompt)")
        seen.add(p.id)
    return prompts


def resolve_texts(prompts: list[CorpusPrompt], counsel_chat: str | Path | None,
                  corpus_dir: Path = CORPUS_DIR) -> dict[str, str]:
    """prompt id -> message text: counsel-chat from the CSV (or hub id) the user gives, seed and authored from
    the repository."""
    from alignment.data import load_counsel_chat, load_seed

    texts: dict[str, str] = {}
    if any(p.source == "counsel_chat" for p in prompts):
        if counsel_chat is None:
            raise DataError("the corpus has counsel-chat prompts: pass --counsel-chat (CSV path or hub id)")
        cc = {r.questionID: r.prompt for r in load_counsel_chat(counsel_chat)}
    seed = {ex.id: ex.message for ex in load_seed()} if any(p.source == "seed" for p in prompts) else {}
    authored_file = corpus_dir / "authored.jsonl"  # a later round's folder reads round 1's
    authored_file = authored_file if authored_file.exists() else CORPUS_DIR / "authored.jsonl"
    authored = ({r["id"]: r["message"] for r in read_jsonl(authored_file)}
                if any(p.source == "authored" for p in prompts) else {})
    for p in prompts:
        table = {"counsel_chat": cc if p.source == "counsel_chat" else {}, "seed": seed, "authored": authored}[p.source]
        if p.ref not in table:
            raise DataError(f"{corpus_dir / 'prompts.jsonl'}: prompt {p.id!r}: {p.source} ref {p.ref!r} not found")
        texts[p.id] = table[p.ref]
    return texts


def load_samples(corpus_dir: Path = CORPUS_DIR) -> dict[str, list[SampleReply]]:
    """prompt id -> every sampled reply (all models), in file order."""
    path = corpus_dir / "samples.jsonl"
    prompts = {p.id for p in load_prompts(corpus_dir)}
    out: dict[str, list[SampleReply]] = defaultdict(list)
    ids: set[str] = set()
    for lineno, row in enumerate(_parse(SampleRow, path), 1):
        if row.prompt_id not in prompts:
            raise DataError(f"{path}:{lineno}: field 'prompt_id': {row.prompt_id!r} is not in prompts.jsonl")
        for r in row.replies:
            if r.id in ids:
                raise DataError(f"{path}:{lineno}: field 'replies.id': reply {r.id!r} appears twice")
            ids.add(r.id)
        out[row.prompt_id] += row.replies
    return dict(out)


def sample_models(corpus_dir: Path = CORPUS_DIR) -> dict[str, str]:
    """reply id -> the model that wrote it (for analysis after labelling; raters never see it)."""
    return {r.id: row.model for row in _parse(SampleRow, corpus_dir / "samples.jsonl") for r in row.replies}


def load_labels(path: Path, samples: dict[str, list[SampleReply]]) -> dict[str, LabelRow]:
    """prompt id -> labels, checked against the samples: every ranking and the safety labels cover exactly the
    prompt's replies."""
    out: dict[str, LabelRow] = {}
    for lineno, row in enumerate(_parse(LabelRow, path), 1):
        where = f"{path}:{lineno}"
        if row.prompt_id not in samples:
            raise DataError(f"{where}: field 'prompt_id': {row.prompt_id!r} has no samples")
        if row.prompt_id in out:
            raise DataError(f"{where}: field 'prompt_id': {row.prompt_id!r} is labelled twice in one pass")
        want = {r.id for r in samples[row.prompt_id]}
        for field, got in [*((f"rank.{o}", set(r)) for o, r in row.rank.items()), ("safety", set(row.safety))]:
            if got - want:
                raise DataError(f"{where}: field {field!r}: reply id(s) {sorted(got - want)} do not exist for "
                                f"prompt {row.prompt_id!r}")
            if want - got:
                raise DataError(f"{where}: field {field!r}: the ranking does not cover reply id(s) "
                                f"{sorted(want - got)} of prompt {row.prompt_id!r}")
        for rid, s in row.safety.items():
            if (s.label == "safe") != (s.reason == "none"):
                raise DataError(f"{where}: field 'safety.{rid}': a safe reply has reason 'none', any other label "
                                "a reason code")
        out[row.prompt_id] = row
    return out


def label_files(corpus_dir: Path = CORPUS_DIR, labelling_pass: int = 1) -> list[Path]:
    return sorted((corpus_dir / "labels").glob(f"pass{labelling_pass}-*.jsonl"))


def load_pass(corpus_dir: Path = CORPUS_DIR, labelling_pass: int = 1,
              samples: dict[str, list[SampleReply]] | None = None) -> dict[str, LabelRow]:
    samples = samples if samples is not None else load_samples(corpus_dir)
    out: dict[str, LabelRow] = {}
    for path in label_files(corpus_dir, labelling_pass):
        part = load_labels(path, samples)
        twice = sorted(set(part) & set(out))
        if twice:
            raise DataError(f"{path}: prompt(s) {twice[:3]} are labelled in another pass-{labelling_pass} file too")
        out.update(part)
    return out


# ---------------------------------------------------------------- pairs and agreement
@dataclass(frozen=True)
class LabelledPair:
    prompt_id: str
    objective: str
    chosen: str  # reply id
    rejected: str
    gap: int  # rank difference, > 0


def ranked_pairs(labels: dict[str, LabelRow], objectives: Iterable[str] = OBJECTIVES,
                 best_worst_only: bool = False) -> list[LabelledPair]:
    """Every (better, worse) reply pair per objective with different ranks; or only best vs worst."""
    out = []
    for pid, row in labels.items():
        for o in objectives:
            ranks = row.rank[o]
            if best_worst_only:
                lo, hi = min(ranks.values()), max(ranks.values())
                if lo == hi:
                    continue
                for a in sorted(r for r, v in ranks.items() if v == lo):
                    for b in sorted(r for r, v in ranks.items() if v == hi):
                        out.append(LabelledPair(pid, o, a, b, hi - lo))
                continue
            for a, b in itertools.permutations(sorted(ranks), 2):
                if ranks[a] < ranks[b]:
                    out.append(LabelledPair(pid, o, a, b, ranks[b] - ranks[a]))
    return out


def _kendall_tau(x: list[int], y: list[int]) -> float:
    from scipy.stats import kendalltau

    if len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(kendalltau(x, y).statistic)


def agreement(first: dict[str, LabelRow], second: dict[str, LabelRow]) -> dict:
    """Per objective, over the prompts both passes labelled: pairwise agreement (share of reply pairs, among those
    at least one pass orders strictly, that the two passes order the same way; a tie against an order counts
    half) and mean Kendall's tau-b; for safety labels, exact agreement and Cohen's kappa."""
    common = sorted(set(first) & set(second))
    out: dict = {"prompts": len(common), "objectives": {}}
    for o in OBJECTIVES:
        hits, taus = [], []
        for pid in common:
            a, b = first[pid].rank[o], second[pid].rank[o]
            ids = sorted(a)
            for i, j in itertools.combinations(ids, 2):
                sa, sb = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
                if sa == 0 and sb == 0:
                    continue
                hits.append(1.0 if sa == sb else 0.5 if 0 in (sa, sb) else 0.0)
            tau = _kendall_tau([a[r] for r in ids], [b[r] for r in ids])
            if not np.isnan(tau):
                taus.append(tau)
        out["objectives"][o] = {"pairwise_agreement": float(np.mean(hits)) if hits else float("nan"),
                                "pairs": len(hits), "kendall_tau": float(np.mean(taus)) if taus else float("nan")}
    la = [first[p].safety[r].label for p in common for r in sorted(first[p].safety)]
    lb = [second[p].safety[r].label for p in common for r in sorted(first[p].safety)]
    out["safety_labels"] = {"replies": len(la), "exact": float(np.mean([x == y for x, y in zip(la, lb)])) if la
                            else float("nan"), "cohen_kappa": _kappa(la, lb)}
    return out


def objective_overlap(rows: dict[str, LabelRow]) -> dict:
    """How far the objectives' rankings of one pass go together: per pair of objectives, the mean Kendall's tau-b
    between their rankings of the same replies, over the prompts where both order something. Near 1, pairs taken
    per objective are mostly the same pairs, and adapters trained on them can differ only as much as this allows."""
    taus = {a: {b: [] for b in OBJECTIVES} for a in OBJECTIVES}
    for row in rows.values():
        for a, b in itertools.combinations(OBJECTIVES, 2):
            ids = sorted(row.rank[a])
            tau = _kendall_tau([row.rank[a][r] for r in ids], [row.rank[b][r] for r in ids])
            if not np.isnan(tau):
                taus[a][b].append(tau)
                taus[b][a].append(tau)
    matrix = {a: {b: 1.0 if a == b else float(np.mean(taus[a][b])) if taus[a][b] else float("nan")
                  for b in OBJECTIVES} for a in OBJECTIVES}
    def mean(xs: list[float]) -> float:  # over the pairs that have a tau
        xs = [x for x in xs if not np.isnan(x)]
        return float(np.mean(xs)) if xs else float("nan")

    return {"prompts": len(rows), "kendall_tau": matrix,
            "mean_between_objectives": mean([matrix[a][b] for a, b in itertools.combinations(OBJECTIVES, 2)]),
            "mean_with_others": {a: mean([matrix[a][b] for b in OBJECTIVES if b != a]) for a in OBJECTIVES}}


def by_writer(labels: dict[str, LabelRow], writers: dict[str, str]) -> dict:
    """After labelling, unblinded: per writer (reply id -> model, `sample_models`), replies labelled unsafe / borderline
    and the mean rank per objective."""
    safety: dict[str, Counter] = defaultdict(Counter)
    ranks: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for row in labels.values():
        for rid, lab in row.safety.items():
            safety[writers[rid]][lab.label] += 1
        for o, r in row.rank.items():
            for rid, v in r.items():
                ranks[writers[rid]][o].append(v)
    return {w: {"replies": sum(c.values()), "unsafe": c["unsafe"], "borderline": c["borderline"],
                "mean_rank": {o: round(float(np.mean(v)), 2) for o, v in ranks[w].items()}}
            for w, c in sorted(safety.items())}


def rank_scores(labels: dict[str, LabelRow], writers: dict[str, str]) -> dict[str, np.ndarray]:
    """{writer: [prompts, objectives]} minus each writer's rank (higher is better, ties equal), prompts in id order,
    objectives in OBJECTIVES order: the shape evals.stats takes for judge scores, so that its steering accuracy
    reads raters' rankings too. Every prompt needs exactly one reply by every writer."""
    out: dict[str, np.ndarray] = {}
    names = sorted(set(writers[rid] for row in labels.values() for rid in row.safety))
    for w in names:
        out[w] = np.zeros((len(labels), len(OBJECTIVES)))
    for i, pid in enumerate(sorted(labels)):
        row = labels[pid]
        by = defaultdict(list)
        for rid in row.safety:
            by[writers[rid]].append(rid)
        if sorted(by) != names or any(len(v) != 1 for v in by.values()):
            raise DataError(f"prompt {pid!r}: rank scores need one reply per writer {names}, got "
                            f"{ {w: len(v) for w, v in sorted(by.items())} }")
        for j, o in enumerate(OBJECTIVES):
            for w, (rid,) in by.items():
                out[w][i, j] = -row.rank[o][rid]
    return out


def _kappa(a: list[str], b: list[str]) -> float:
    if not a:
        return float("nan")
    po = float(np.mean([x == y for x, y in zip(a, b)]))
    pe = sum((a.count(c) / len(a)) * (b.count(c) / len(b)) for c in SAFETY_LABELS)
    return float((po - pe) / (1 - pe)) if pe < 1 else float("nan")


def disagreements(first: dict[str, LabelRow], second: dict[str, LabelRow], min_tau: float = 0.0) -> list[dict]:
    """Prompts where the passes disagree: a safety label that differs by two steps (safe vs unsafe), or an objective
    whose rankings correlate at or below `min_tau`."""
    order = {k: i for i, k in enumerate(SAFETY_LABELS)}
    rows = []
    for pid in sorted(set(first) & set(second)):
        a, b = first[pid], second[pid]
        labels = [r for r in a.safety if abs(order[a.safety[r].label] - order[b.safety[r].label]) == 2]
        objs = []
        for o in OBJECTIVES:
            ids = sorted(a.rank[o])
            tau = _kendall_tau([a.rank[o][r] for r in ids], [b.rank[o][r] for r in ids])
            if not np.isnan(tau) and tau <= min_tau:
                objs.append(o)
        if labels or objs:
            rows.append({"prompt_id": pid, "safety_replies": labels, "objectives": objs})
    return rows


class Adjudication(BaseModel):
    """How one disagreement between the passes was settled: for a safety label, the label kept; for a ranking,
    which pass's ranking of that objective is kept."""
    model_config = ConfigDict(extra="forbid")
    prompt_id: str
    kind: Literal["safety", "ranking"]
    reply_id: str | None = None
    objective: str | None = None
    pass1: str
    pass2: str
    decision: str = Field(description="safety: 'label:reason' or 'safe'; ranking: 'pass1' or 'pass2'")
    adjudicator: str
    note: str = ""


def load_adjudicated(corpus_dir: Path = CORPUS_DIR) -> list[Adjudication]:
    path = corpus_dir / "labels" / "adjudicated.jsonl"
    return _parse(Adjudication, path) if path.exists() else []


def adjudicated_labels(corpus_dir: Path = CORPUS_DIR, samples: dict[str, list[SampleReply]] | None = None
                       ) -> dict[str, LabelRow]:
    """Pass-1 labels with the adjudicated decisions applied: the labels reports measure against. Training reads
    pass 1 as written, so that a model trained before an adjudication is reproduced by training again."""
    samples = samples if samples is not None else load_samples(corpus_dir)
    labels = load_pass(corpus_dir, 1, samples)
    second = load_pass(corpus_dir, 2, samples)
    path = corpus_dir / "labels" / "adjudicated.jsonl"
    for lineno, a in enumerate(load_adjudicated(corpus_dir), 1):
        row = labels.get(a.prompt_id)
        if row is None:
            raise DataError(f"{path}:{lineno}: field 'prompt_id': {a.prompt_id!r} has no pass-1 label")
        if a.kind == "safety":
            if a.reply_id not in row.safety:
                raise DataError(f"{path}:{lineno}: field 'reply_id': {a.reply_id!r} is not a reply of {a.prompt_id!r}")
            label, _, reason = a.decision.partition(":")
            try:
                row.safety[a.reply_id] = SafetyLabel(label=label, reason=reason or "none")
            except ValidationError as e:
                raise DataError(f"{path}:{lineno}: field 'decision': {e.errors()[0]['msg']}") from None
        else:
            if a.objective not in OBJECTIVES or a.decision not in ("pass1", "pass2"):
                raise DataError(f"{path}:{lineno}: field 'objective'/'decision': a ranking adjudication names one "
                                f"of {list(OBJECTIVES)} and decides 'pass1' or 'pass2'")
            if a.decision == "pass2":
                row.rank[a.objective] = dict(second[a.prompt_id].rank[a.objective])
    return labels
