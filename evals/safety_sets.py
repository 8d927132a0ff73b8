"""The safety report's prompt sets: the shared eval's self-harm and health prompts, the counsel-chat val questions and
our own ordinary-message hard negatives (alignment/corpus/crisis, label "none"). Loading only; no figures here.

The shared eval sets are for reporting only: nothing here feeds back into rules, thresholds or training.
"""
from __future__ import annotations

import csv
import glob
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from attune.paths import DEFAULT_COUNSEL_CHAT, REPO_ROOT

DEFAULT_EVAL_DIR = REPO_ROOT.parent / "shared" / "eval"
DEFAULT_HARD_NEGATIVES = REPO_ROOT / "alignment" / "corpus" / "crisis"
SELF_HARM, HEALTH, ORDINARY = "self_harm", "health", "ordinary"
SST_SELF_HARM = "Suicide, Self-Harm, and Eating Disorders"
ORDINARY_EXCLUDED_TOPICS = ("self-harm",)
COUNSEL_CHAT_VAL, HARD_NEGATIVES = "counsel-chat-val", "hard-negatives"
"""The two ordinary sets, each with its own false-escalation goal."""


@dataclass(frozen=True)
class EvalPrompt:
    set: str
    id: str
    kind: str
    """self_harm (the crisis protocol must fire), health (reported, no goal) or ordinary (it must not)."""
    text: str
    group: str = ""
    """Persona, category or topic, for the breakdown."""
    quotable: bool = True
    """Eval-set prompts and our own messages may be quoted in a report; counsel-chat questions are not copied into
    the repository."""


def load_sets(eval_dir: Path = DEFAULT_EVAL_DIR, counsel_chat: str | Path | None = None,
              limit: int | None = None) -> list[EvalPrompt]:
    """AILuminate ssh (self-harm) and spc_hlt (health), the 20 SimpleSafetyTests self-harm rows and the counsel-chat
    val questions (held out from training) on topics other than self-harm; the first `limit` of each set."""
    from alignment.data import counsel_chat_questions, load_counsel_chat

    folder = Path(eval_dir) / "safety"
    paths = {name: folder / name for name in ("ailuminate_ssh_hlt.csv", "simplesafetytests.csv")}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"eval set(s) {missing} not found; pass --eval-dir (the folder holding safety/)")
    sets: dict[str, list[EvalPrompt]] = defaultdict(list)
    for row in _csv(paths["ailuminate_ssh_hlt.csv"]):
        kind = {"ssh": SELF_HARM, "spc_hlt": HEALTH}.get(row["hazard"])
        if kind:
            sets[f"ailuminate-{row['hazard']}"].append(
                EvalPrompt(f"ailuminate-{row['hazard']}", row["release_prompt_id"], kind, row["prompt_text"],
                           row["persona"]))
    for row in _csv(paths["simplesafetytests.csv"]):
        if row["harm_area"] == SST_SELF_HARM:
            sets["sst-self-harm"].append(EvalPrompt("sst-self-harm", row["id"], SELF_HARM, row["prompts_final"],
                                                    row["category"]))
    cc = Path(counsel_chat or DEFAULT_COUNSEL_CHAT)
    rows = load_counsel_chat(cc)
    first = {}
    for r in rows:
        if r.split == "val":
            first.setdefault(r.prompt, r)
    for q in counsel_chat_questions(rows, "val", exclude_topics=ORDINARY_EXCLUDED_TOPICS):
        r = first[q]
        sets[COUNSEL_CHAT_VAL].append(EvalPrompt(COUNSEL_CHAT_VAL, f"cc-{r.questionID}", ORDINARY, q, r.topic,
                                                 quotable=False))
    return [p for ps in sets.values() for p in (ps[:limit] if limit else ps)]


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _jsonl_files(source: str | Path) -> tuple[list[Path], str | None]:
    """A folder (its *.jsonl), a file, or a glob pattern; (files, why there are none)."""
    text = str(source)
    if any(c in text for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(text) if Path(p).is_file())
        return files, None if files else f"no file matches {text}"
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.jsonl") if p.is_file())
        return files, None if files else f"no *.jsonl in {path}"
    if path.is_file():
        return [path], None
    return [], f"{path} not found"


def load_hard_negatives(source: str | Path | None = None, limit: int | None = None) -> tuple[list[EvalPrompt], str]:
    """Our own ordinary messages that must not escalate (idioms, grief, medication questions, greetings, everyday
    stress): rows labelled "none" of `source` (a folder of *.jsonl, a file or a glob; default alignment/corpus/crisis).
    When any message row carries a `split` field, only rows with split "test" count (the rest may have trained the
    crisis detector); otherwise every "none" row does. Message rows are {id, category, label, message, ...}; rows
    without a `message` field are further labels of those ids (a second rater's {id, label, ...}), and a message that
    one of them labels other than "none" is left out, being no clear negative. A line that does not parse (the files
    may be written while this runs), a row without id or message text and a repeated id are left out too; all of
    them are counted. Returns (prompts, a note for the report); a missing source gives no prompts and says so."""
    source = source or DEFAULT_HARD_NEGATIVES
    files, why = _jsonl_files(source)
    if not files:
        return [], f"{HARD_NEGATIVES}: {why}; set skipped"
    rows, skipped = [], Counter()
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                skipped["unreadable lines"] += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                skipped["unreadable lines"] += 1
    label = lambda r: str(r.get("label", "")).strip().lower()  # noqa: E731
    messages = [r for r in rows if "message" in r]
    others = defaultdict(set)
    for r in rows:
        if "message" not in r and label(r) != "none":
            others[str(r.get("id") or "").strip()].add(label(r))
    has_split = any("split" in r for r in messages)
    none = [r for r in messages if label(r) == "none"]
    if has_split:
        skipped["'none' rows outside the test split"] = sum(r.get("split") != "test" for r in none)
        none = [r for r in none if r.get("split") == "test"]
    prompts, seen = [], set()
    for r in none:
        rid, message = str(r.get("id") or "").strip(), r.get("message")
        if not rid or not isinstance(message, str) or not message.strip():
            skipped["rows without id or message"] += 1
        elif others.get(rid):
            skipped["labelled otherwise by a further label row"] += 1
        elif rid in seen:
            skipped["repeated ids"] += 1
        else:
            seen.add(rid)
            prompts.append(EvalPrompt(HARD_NEGATIVES, rid, ORDINARY, message, str(r.get("category") or "")))
    prompts = prompts[:limit] if limit else prompts
    note = (f"{HARD_NEGATIVES}: {len(prompts)} messages labelled 'none' "
            f"{'in the test split' if has_split else '(no split field: every none row)'} from {len(files)} file(s) "
            f"at {source}")
    left = {k: v for k, v in skipped.items() if v}
    if left:
        note += "; left out: " + ", ".join(f"{k} {v}" for k, v in left.items())
    if len(messages) < len(rows):
        note += f"; {len(rows) - len(messages)} further label rows read"
    if not prompts:
        note += "; set skipped"
    return prompts, note
