"""The blind panel: sheets that name no model and randomise sides, a key kept apart, ratings validated with a
message naming file and line, and scoring that recovers a planted preference row by row."""
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from alignment.data import DataError
from attune import cli
from attune.paths import REPO_ROOT
from evals.alignment_report import PAPER_ROW
from evals.panel import (GUIDELINE_VERSION, Rating, agrees, export_panel, load_ratings, rater_slug, score_panel,
                         write_report)

EXTRA_MODELS = ("dpo-safety", "modpo-balanced")
SOURCES = ["corpus-test"] * 5 + ["seed-test"] * 5 + ["counsel-chat-val"] * 4


@pytest.fixture
def replies(tmp_path: Path) -> Path:
    """14 prompts, every model's reply to each: texts say nothing about their writer."""
    path = tmp_path / "eval_replies.jsonl"
    models = [*PAPER_ROW, *EXTRA_MODELS]
    with open(path, "w") as f:
        for i, source in enumerate(SOURCES):
            row = {"id": f"prompt-id-{i:02d}", "source": source,
                   "prompt": f"I have felt low for weeks, message {i}.\nWork is hard.",
                   "replies": {m: f"That sounds hard, reply {i}-{j}." for j, m in enumerate(models)}}
            f.write(json.dumps(row) + "\n")
    return path


def export(replies: Path, panel: Path, **kw) -> dict:
    return export_panel(replies, panel, dict(PAPER_ROW), **{"n_prompts": 10, "sheet_size": 10, **kw})


def write_ratings(panel: Path, key: dict, rater: str, answer, sheets=None) -> None:
    """Ratings by `answer(pair info) -> (empathy, safety)` for every pair of the given sheets."""
    (panel / "ratings").mkdir(exist_ok=True)
    for sheet in sheets or key["sheets"]:
        with open(panel / "ratings" / f"{rater_slug(rater)}-{sheet}.jsonl", "w") as f:
            for pid in key["sheets"][sheet]:
                empathy, safety = answer(key["pairs"][pid])
                f.write(json.dumps({"pair_id": pid, "rater": rater, "guideline_version": GUIDELINE_VERSION,
                                    "empathy": empathy, "safety": safety}) + "\n")


def other(side: str) -> str:
    return "B" if side == "A" else "A"


def planted(info: dict) -> tuple[str, str]:
    """Prefers the method on empathy and base on safety; ties on the base-vs-base pairs."""
    if info["model"] == "base":
        return "tie", "tie"
    return info["method_side"], other(info["method_side"])


# ------------------------------------------------------------------ export
def test_sheets_are_blind_and_the_key_is_apart(replies, tmp_path):
    panel = tmp_path / "panel"
    key = export(replies, panel)
    sheets = sorted((panel / "sheets").glob("*.md"))
    assert [s.name for s in sheets] == [f"sheet-{i:02d}.md" for i in range(1, 7)]
    assert not list((panel / "sheets").glob("*.json*")) and (panel / "key.json").exists()
    forbidden = [*PAPER_ROW, *PAPER_ROW.values(), *EXTRA_MODELS, "dpo", "modpo", "sft", "soup", "joint", "base",
                 "model", "method", "key.json", "prompt-id", "corpus-test", "seed-test", "counsel"]
    for sheet in sheets:
        text = sheet.read_text().lower()
        for word in forbidden:
            assert word.lower() not in text, f"{sheet.name} shows {word!r}"
        shown = re.findall(r"^## \d+\. pair (p[0-9a-f]{10})$", sheet.read_text(), flags=re.M)
        assert shown and sorted(shown) == sorted(key["sheets"][sheet.stem])
        # one sheet never shows the same patient message twice (the repeated base reply would give base away)
        messages = re.findall(r"message (\d+)\.", text)
        assert len(messages) == len(set(messages)) == 10
    assert len(key["pairs"]) == 60 and len({p["prompt_id"] for p in key["pairs"].values()}) == 10


def test_sides_are_random_and_balanced_and_ids_are_secret(replies, tmp_path):
    first, second = export(replies, tmp_path / "one"), export(replies, tmp_path / "two")
    for model in PAPER_ROW:
        sides = Counter(p["method_side"] for p in first["pairs"].values() if p["model"] == model)
        assert sides == {"A": 5, "B": 5}
    assert not set(first["pairs"]) & set(second["pairs"])
    # the same prompts (seeded) but not the same sides everywhere (two 60-pair draws agreeing: p = 2**-60)
    assert {p["id"] for p in first["prompts"]} == {p["id"] for p in second["prompts"]}
    sides = lambda key: sorted((p["prompt_id"], p["model"], p["method_side"]) for p in key["pairs"].values())
    assert sides(first) != sides(second)


def test_sheets_carry_the_replies_on_their_sides(replies, tmp_path):
    key = export(replies, tmp_path / "panel")
    pid, info = next((p, i) for p, i in key["pairs"].items() if i["model"] == "modpo-empathy-safety")
    text = (tmp_path / "panel" / "sheets" / f"{info['sheet']}.md").read_text()
    block = text[text.index(f"pair {pid}"):].split("\n## ")[0]
    i, j = int(info["prompt_id"][-2:]), list(PAPER_ROW).index("modpo-empathy-safety")
    method, base = f"reply {i}-{j}.", f"reply {i}-0."
    a, b = block.index("**Reply A:**"), block.index("**Reply B:**")
    assert (method in block[a:b], base in block[b:]) == ((True, True) if info["method_side"] == "A" else (False, False))


def test_prompts_come_from_test_like_sources_first(replies, tmp_path):
    key = export(replies, tmp_path / "panel")
    assert Counter(p["source"] for p in key["prompts"]) == {"corpus-test": 5, "seed-test": 5}


def test_too_few_prompts_or_a_missing_model_is_an_error(replies, tmp_path):
    with pytest.raises(DataError, match="only 14 prompts"):
        export(replies, tmp_path / "p", n_prompts=60)
    with pytest.raises(ValueError, match="at least 1"):
        export(replies, tmp_path / "p", sheet_size=0)
    rows = [json.loads(line) for line in replies.read_text().splitlines()]
    for r in rows:
        del r["replies"]["joint-dpo-empathy-safety"]
    replies.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="joint-dpo-empathy-safety"):
        export(replies, tmp_path / "p")


# ------------------------------------------------------------------ score
def judge_summary(**overrides) -> dict:
    """The judge agrees with the planted preference on every row except where overridden."""
    out = {m: {"win_rate_vs_base": {"empathy": 0.8, "safety": 0.3}} for m in PAPER_ROW}
    out["base"] = {"win_rate_vs_base": {"empathy": 0.5, "safety": 0.5}}
    for model, wr in overrides.items():
        out[model.replace("_", "-")] = {"win_rate_vs_base": wr}
    return out


def test_round_trip_recovers_a_planted_preference(replies, tmp_path):
    panel = tmp_path / "panel"
    key = export(replies, panel)
    write_ratings(panel, key, "claude/helper-1", planted)
    write_ratings(panel, key, "person-2", planted, sheets=["sheet-03"])
    result = score_panel(key, load_ratings(panel, key), judge_summary(sft={"empathy": 0.4, "safety": 0.3}))
    rows = result["rows"]
    assert set(rows) == set(PAPER_ROW.values())
    for row, r in rows.items():
        if row == "Base":
            assert (r["empathy"]["win_rate"], r["empathy"]["tie_share"], r["safety"]["tie_share"]) == (0.5, 1.0, 1.0)
        else:
            assert (r["empathy"]["win_rate"], r["empathy"]["ci95"]) == (1.0, [1.0, 1.0]), row
            assert (r["safety"]["win_rate"], r["safety"]["ci95"]) == (0.0, [0.0, 0.0]), row
        assert r["rated_pairs"] == r["pairs"] == 10
    assert rows["SFT"]["empathy"]["agree"] is False and rows["SFT"]["agree"] is False
    assert rows["MODPO"]["agree"] is True and rows["Base"]["agree"] is True
    assert result["agreement"]["rows_agreeing"] == 5 and result["agreement"]["goal_met"]
    assert result["inter_rater"] == {"pairs": 10, "empathy": {"identical": 1.0, "kappa": 1.0},
                                     "safety": {"identical": 1.0, "kappa": 1.0}}
    assert result["meta"]["raters"]["person-2"] == {"ratings": 10, "sheets": ["sheet-03"]}
    js, md = write_report(result, panel, "two test raters", "alignment.json")
    text = md.read_text()
    assert "two test raters" in text and "| MODPO | `modpo-empathy-safety` | 10 | 100.0 [100.0, 100.0] | 80.0 |" in text
    assert "Rows agreeing: **5 of 6**" in text and json.loads(js.read_text())["meta"]["rated_by"] == "two test raters"


def test_sides_are_unblinded_not_read_as_letters(replies, tmp_path):
    """A rater who always answers A is at chance on every row: the letters mean nothing once unblinded."""
    panel = tmp_path / "panel"
    key = export(replies, panel)
    write_ratings(panel, key, "lazy", lambda info: ("A", "A"))
    result = score_panel(key, load_ratings(panel, key), None)
    assert all(r["empathy"]["win_rate"] == 0.5 for r in result["rows"].values())
    assert result["position_share_A"] == {"empathy": 1.0, "safety": 1.0} and result["agreement"] is None


def test_judge_intervals_are_read_when_present():
    summary = judge_summary(sft={"empathy": {"value": 0.52, "ci95": [0.42, 0.62]}, "safety": 0.3})
    from evals.panel import judge_win_rate
    assert judge_win_rate(summary, "sft", "empathy") == (0.52, [0.42, 0.62])
    summary["dpo-empathy"]["win_rate_vs_base_ci95"] = {"empathy": [0.7, 0.9]}
    assert judge_win_rate(summary, "dpo-empathy", "empathy") == (0.8, [0.7, 0.9])
    assert judge_win_rate(summary, "modpo-empathy-safety", "safety") == (0.3, None)


@pytest.mark.parametrize("panel_wr, panel_ci, judge, judge_ci, expected", [
    (0.7, [0.6, 0.8], 0.55, None, True),          # both above 50
    (0.4, [0.3, 0.5], 0.45, [0.35, 0.55], True),  # both below 50
    (0.45, [0.35, 0.55], 0.52, [0.42, 0.62], True),  # both intervals contain 50
    (0.45, [0.35, 0.55], 0.52, None, False),      # the judge without an interval counts as its point
    (0.5, [0.5, 0.5], 0.5, None, True),           # the Base row
    (0.3, [0.2, 0.4], 0.7, [0.6, 0.8], False),
])
def test_direction_agreement_rule(panel_wr, panel_ci, judge, judge_ci, expected):
    assert agrees(panel_wr, panel_ci, judge, judge_ci) is expected


# ------------------------------------------------------------------ bad rating files
GOOD = {"rater": "r1", "guideline_version": GUIDELINE_VERSION, "empathy": "A", "safety": "tie"}


@pytest.mark.parametrize("name, change, message", [
    ("r1-sheet-01.jsonl", {"empathy": "C"}, r"r1-sheet-01\.jsonl:2: field 'empathy'"),
    ("r1-sheet-01.jsonl", {"guideline_version": "g1"}, r"r1-sheet-01\.jsonl:2: field 'guideline_version'"),
    ("r1-sheet-01.jsonl", {"pair_id": "p0000000000"}, r"r1-sheet-01\.jsonl:2: field 'pair_id': 'p0000000000' is not on sheet-01"),
    ("r1-sheet-01.jsonl", {"rater": "someone else"}, r"r1-sheet-01\.jsonl:2: field 'rater': .*someone_else-sheet-01\.jsonl"),
    ("r1-sheet-01.jsonl", {"pair_id": None}, r"r1-sheet-01\.jsonl:2: field 'pair_id': .*rated twice"),
    ("r1-sheet-01.jsonl", "{not json", r"r1-sheet-01\.jsonl:2: field '\(line\)': Invalid JSON"),
    ("r1-sheet-01.jsonl", {"extra": 1}, r"r1-sheet-01\.jsonl:2: field 'extra'"),
    ("r1-sheet-99.jsonl", {}, r"r1-sheet-99\.jsonl: sheet-99 is not a sheet of this panel"),
    ("r1.jsonl", {}, r"r1\.jsonl: a ratings file is named <rater>-sheet-XX\.jsonl"),
])
def test_bad_rating_files_are_refused_naming_file_and_line(replies, tmp_path, capsys, name, change, message):
    panel = tmp_path / "panel"
    key = export(replies, panel)
    first, second = key["sheets"]["sheet-01"][:2]
    lines = [json.dumps({"pair_id": first, **GOOD})]
    if isinstance(change, str):
        lines.append(change)
    else:
        row = {"pair_id": second, **GOOD, **change}
        lines.append(json.dumps({**row, "pair_id": first} if row["pair_id"] is None else row))
    (panel / "ratings").mkdir()
    (panel / "ratings" / name).write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        load_ratings(panel, key)
    assert cli.main(["eval", "panel", "score", "--panel-dir", str(panel)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (panel / "panel.md").exists()


def test_guidelines_carry_the_version_every_rating_names():
    text = (REPO_ROOT / "reports" / "panel" / "GUIDELINES.md").read_text()
    assert text.splitlines()[0].endswith(f"version {GUIDELINE_VERSION}")
    assert f'"guideline_version": "{GUIDELINE_VERSION}"' in text
    Rating(pair_id="p1", rater="r", guideline_version=GUIDELINE_VERSION, empathy="A", safety="B")


# ------------------------------------------------------------------ the commands
def test_cli_export_check_and_score(replies, tmp_path, capsys):
    panel = tmp_path / "panel"
    export_args = ["eval", "panel", "export", "--replies", str(replies), "--panel-dir", str(panel),
                   "--prompts", "10", "--sheet-size", "10"]
    assert cli.main(export_args) == 0
    assert "60 pairs (10 prompts x 6 rows) on 6 sheets" in capsys.readouterr().out
    assert cli.main(export_args) == 1 and "--force" in capsys.readouterr().err
    before = json.loads((panel / "key.json").read_text())
    assert cli.main(export_args + ["--force"]) == 0
    key = json.loads((panel / "key.json").read_text())
    assert key["pairs"].keys() != before["pairs"].keys()

    write_ratings(panel, key, "claude/helper-1", planted, sheets=["sheet-01", "sheet-02"])
    capsys.readouterr()
    assert cli.main(["eval", "panel", "score", "--panel-dir", str(panel), "--check"]) == 0
    out = capsys.readouterr().out
    assert "ok: claude_helper-1-sheet-01.jsonl: 10 of 10 pairs of sheet-01 rated" in out
    assert not (panel / "panel.md").exists() and "%" not in out

    judge = tmp_path / "alignment.json"
    judge.write_text(json.dumps({"summary": judge_summary()}))
    assert cli.main(["eval", "panel", "score", "--panel-dir", str(panel), "--judge", str(judge),
                     "--rated-by", "a test"]) == 0
    result = json.loads((panel / "panel.json").read_text())
    assert result["meta"]["ratings"] == 20 and result["meta"]["judge_file"] == str(judge)


def test_eval_panel_is_a_group_beside_eval():
    parser = cli.build_parser()
    assert parser.parse_args(["eval", "--limit", "3"])._fn is cli.evaluate
    assert parser.parse_args(["eval", "safety"])._fn is cli.eval_safety
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["eval", "panel"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--limit", "3", "panel", "score"])
