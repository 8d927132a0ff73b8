"""Data schemas and loaders: the seed set (JSONL, see alignment/seed/DATA_CARD.md), its fixed
splits, counsel-chat (CSV path or hub id), and per-objective preference pairs.

Bad input is an error that names the file, the line and the field; nothing is skipped silently.
"""
from __future__ import annotations

import csv
import hashlib
import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from alignment.objectives import OBJECTIVES, RATING_MAX, RATING_MIN
from attune.paths import SEED_DIR

Presentation = Literal[
    "anxiety", "depression", "grief", "relationships", "substance_use", "trauma",
    "work_stress", "loneliness",
]
CrisisRisk = Literal["none", "passive", "active", "plan"]
Split = Literal["train", "val", "test"]
COUNSEL_CHAT_HUB_ID = "nbertagnolli/counsel-chat"


class DataError(ValueError):
    """Malformed data; the message names the file, the line and the field."""


def check_six(keys, what: str) -> None:
    """ValueError unless `keys` names each of the six objectives exactly once (what: 'rating', 'ranking')."""
    unknown = sorted(set(keys) - set(OBJECTIVES))
    if unknown:
        raise ValueError(f"unknown objective(s) {unknown}; expected {list(OBJECTIVES)}")
    missing = [o for o in OBJECTIVES if o not in keys]
    if missing:
        raise ValueError(f"missing {what}(s) for {missing}")


class Reply(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, description="A candidate reply from a supporter.")
    ratings: dict[str, int] = Field(description="1-5 for each of the six objectives.")

    @field_validator("ratings")
    @classmethod
    def _six_ratings(cls, v: dict[str, int]) -> dict[str, int]:
        check_six(v, "rating")
        for o, r in v.items():
            if not RATING_MIN <= r <= RATING_MAX:
                raise ValueError(f"rating for {o!r} is {r}; must be {RATING_MIN}-{RATING_MAX}")
        return v


class SeedExample(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, description="Unique id across the seed set.")
    presentation: Presentation
    crisis_risk: CrisisRisk
    message: str = Field(min_length=1, description="What the patient wrote.")
    replies: list[Reply] = Field(min_length=2)

    @property
    def is_crisis(self) -> bool:
        return self.crisis_risk != "none"


def _field_path(err: dict) -> str:
    return ".".join(str(p) for p in err["loc"]) or "<line>"


def read_jsonl(path: Path, model: type[BaseModel]) -> list[BaseModel]:
    """Parse every line of `path` as `model`; raise DataError naming file, line and field."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                raise DataError(f"{path}:{lineno}: blank line (every line must be one JSON object)")
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            try:
                out.append(model.model_validate(raw))
            except ValidationError as e:
                first = e.errors()[0]
                raise DataError(
                    f"{path}:{lineno}: field {_field_path(first)}: {first['msg']}"
                ) from None
    return out


def seed_files(seed_dir: Path = SEED_DIR) -> list[Path]:
    files = sorted(Path(seed_dir).glob("part-*.jsonl"))
    if not files:
        raise DataError(f"no part-*.jsonl files in {seed_dir}")
    return files


def load_seed(seed_dir: Path = SEED_DIR) -> list[SeedExample]:
    examples: list[SeedExample] = []
    seen: dict[str, str] = {}
    for path in seed_files(seed_dir):
        for lineno, ex in enumerate(read_jsonl(path, SeedExample), 1):
            if ex.id in seen:
                raise DataError(f"{path}:{lineno}: field id: {ex.id!r} already used in {seen[ex.id]}")
            seen[ex.id] = f"{path.name}:{lineno}"
            examples.append(ex)
    return examples


def data_hash(paths: Iterable[Path]) -> str:
    """sha256 over the bytes of the given files, in order (identifies a training set)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode())
        h.update(Path(p).read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------- splits
SPLITS_FILE = SEED_DIR / "splits.json"


def make_splits(examples: list[SeedExample], seed: int = 0, val: float = 0.15,
                test: float = 0.15) -> dict[str, list[str]]:
    """Stratified by (presentation, crisis or not): each stratum is shuffled and cut."""
    strata: dict[tuple, list[str]] = defaultdict(list)
    for ex in examples:
        strata[(ex.presentation, ex.is_crisis)].append(ex.id)
    rng = random.Random(seed)
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for key in sorted(strata):
        ids = sorted(strata[key])
        rng.shuffle(ids)
        n_test = max(1, round(len(ids) * test)) if len(ids) >= 3 else 0
        n_val = max(1, round(len(ids) * val)) if len(ids) >= 3 else 0
        out["test"] += ids[:n_test]
        out["val"] += ids[n_test:n_test + n_val]
        out["train"] += ids[n_test + n_val:]
    return {k: sorted(v) for k, v in out.items()}


def load_splits(path: Path = SPLITS_FILE) -> dict[str, list[str]]:
    if not Path(path).exists():
        raise DataError(f"{path} is missing: run `attune data split` once before training")
    return json.loads(Path(path).read_text())


def split_examples(examples: list[SeedExample], split: Split,
                   splits: dict[str, list[str]] | None = None) -> list[SeedExample]:
    splits = splits or load_splits()
    ids = set(splits[split])
    return [ex for ex in examples if ex.id in ids]


# ---------------------------------------------------------------- preference pairs
@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    objective: str
    gap: float  # rating (or score) difference chosen - rejected, > 0
    source_id: str = ""


def seed_pairs(examples: Iterable[SeedExample], objectives: Iterable[str] = OBJECTIVES,
               min_gap: int = 1) -> list[PreferencePair]:
    """Every (better, worse) reply pair per objective whose ratings differ by >= min_gap."""
    pairs = []
    for ex in examples:
        for o in objectives:
            for a in ex.replies:
                for b in ex.replies:
                    gap = a.ratings[o] - b.ratings[o]
                    if gap >= min_gap:
                        pairs.append(PreferencePair(ex.message, a.text, b.text, o, float(gap), ex.id))
    return pairs


# ---------------------------------------------------------------- counsel-chat
class CounselChatRow(BaseModel):
    questionID: str
    questionTitle: str = ""
    questionText: str = ""
    topic: str = ""
    answerText: str
    upvotes: int = 0
    split: str = "train"

    @property
    def prompt(self) -> str:
        title, text = self.questionTitle.strip(), self.questionText.strip()
        if text and title and not text.lower().startswith(title.lower()[:20]):
            return f"{title}\n{text}"
        return text or title


def load_counsel_chat(source: str | Path) -> list[CounselChatRow]:
    """Rows from a CSV path, or from the hub id `nbertagnolli/counsel-chat` (needs hub access)."""
    if str(source) == COUNSEL_CHAT_HUB_ID:
        from datasets import load_dataset

        ds = load_dataset(COUNSEL_CHAT_HUB_ID)
        rows = []
        for split_name, part in ds.items():
            for raw in part:
                raw = {k: ("" if v is None else v) for k, v in raw.items()}
                raw.setdefault("split", split_name)
                rows.append(CounselChatRow.model_validate(
                    {**raw, "questionID": str(raw.get("questionID", "")),
                     "upvotes": int(raw.get("upvotes") or 0)}))
        return rows
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: counsel-chat CSV not found; give its path or {COUNSEL_CHAT_HUB_ID!r}")
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, raw in enumerate(csv.DictReader(f), 2):
            try:
                raw = {k: (v or "") for k, v in raw.items() if k}
                raw["upvotes"] = int(raw.get("upvotes") or 0)
                rows.append(CounselChatRow.model_validate(raw))
            except (ValidationError, ValueError) as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
    return rows


def counsel_chat_questions(rows: list[CounselChatRow], split: str,
                           exclude_topics: Iterable[str] = ()) -> list[str]:
    """Unique question prompts of one split, in file order."""
    skip = set(exclude_topics)
    seen, out = set(), []
    for r in rows:
        if r.split == split and r.questionID not in seen and r.topic not in skip and r.prompt:
            seen.add(r.questionID)
            out.append(r.prompt)
    return out


def counsel_chat_sft(rows: list[CounselChatRow], split: str = "train") -> list[tuple[str, str]]:
    """(question, best-upvoted answer) per question of the split: SFT targets."""
    best: dict[str, CounselChatRow] = {}
    for r in rows:
        if r.split != split or not r.prompt or not r.answerText.strip():
            continue
        if r.questionID not in best or r.upvotes > best[r.questionID].upvotes:
            best[r.questionID] = r
    return [(r.prompt, r.answerText.strip()) for r in best.values()]
