"""The `attune eval panel ...` commands: blind A/B sheets of each paper row's method vs base for raters, and the
scoring of their ratings beside the judge (evals/panel.py). Plain functions whose keyword arguments are the flags
(the dispatch table is in attune/cli.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def panel_export(replies: str | None = None, panel_dir: str | None = None, prompts: int = 60, sheet_size: int = 30,
                 seed: int = 0, force: bool = False) -> int:
    """Write blind A/B rating sheets (each paper row's method vs base) and their key from `attune eval`'s replies."""
    from attune.paths import REPORTS_DIR
    from evals.alignment_report import PAPER_ROW
    from evals.panel import PANEL_DIR, export_panel

    out = Path(panel_dir) if panel_dir else PANEL_DIR
    if (out / "key.json").exists() and not force:
        print(f"attune eval panel export: {out / 'key.json'} exists; ratings made on its sheets would no longer "
              "match a new export (pass --force to remake it)", file=sys.stderr)
        return 1
    source = Path(replies) if replies else REPORTS_DIR / "eval_replies.jsonl"
    if not source.exists():
        print(f"attune eval panel export: {source} not found; `attune eval` writes it", file=sys.stderr)
        return 2
    try:
        key = export_panel(source, out, dict(PAPER_ROW), n_prompts=prompts, sheet_size=sheet_size, seed=seed)
    except ValueError as e:
        print(f"attune eval panel export: {e}", file=sys.stderr)
        return 2
    print(f"{len(key['pairs'])} pairs ({len(key['prompts'])} prompts x {len(key['rows'])} rows) on "
          f"{len(key['sheets'])} sheets in {out / 'sheets'}; key: {out / 'key.json'} (never show it to raters)")
    return 0


def panel_score(panel_dir: str | None = None, judge: str | None = None, rated_by: str | None = None,
                check: bool = False) -> int:
    """Unblind the panel's ratings: win rates vs base with bootstrap intervals beside the judge's; panel.{json,md}."""
    from alignment.data import DataError
    from attune.paths import REPORTS_DIR
    from evals.panel import PANEL_DIR, load_ratings, score_panel, write_report

    folder = Path(panel_dir) if panel_dir else PANEL_DIR
    if not (folder / "key.json").exists():
        print(f"attune eval panel score: {folder / 'key.json'} not found; run `attune eval panel export`",
              file=sys.stderr)
        return 2
    key = json.loads((folder / "key.json").read_text())
    try:
        files = load_ratings(folder, key)
    except DataError as e:
        print(f"attune eval panel score: {e}", file=sys.stderr)
        return 2
    if check:
        for f in files:
            print(f"ok: {f.path.name}: {len(f.ratings)} of {len(key['sheets'][f.sheet])} pairs of {f.sheet} rated")
        return 0
    judge_file = Path(judge) if judge else REPORTS_DIR / "alignment.json"
    summary = json.loads(judge_file.read_text())["summary"] if judge_file.exists() else None
    js, md = write_report(score_panel(key, files, summary), folder, rated_by, str(judge_file) if summary else None)
    print(f"wrote {md} and {js}")
    return 0


def commands(arg) -> dict:
    """The `attune eval panel` entries of attune.cli.COMMANDS (`arg` is attune.cli.arg)."""
    where = arg("--panel-dir", help="the panel's folder: sheets/, key.json, ratings/ (default reports/panel)")
    return {
        ("eval", "panel", "export"): (panel_export, [
            arg("--replies", help="replies of every model per held-out prompt (default reports/eval_replies.jsonl, "
                "written by `attune eval`)"), where,
            arg("--prompts", type=int, default=60, help="prompts to pair (default %(default)s), corpus test first, "
                "then seed test, then counsel-chat val"),
            arg("--sheet-size", type=int, default=30, help="pairs per sheet (default %(default)s)"),
            arg("--seed", type=int, default=0, help="seed of the prompt choice; sides and ids are secret random"),
            arg("--force", action="store_true", help="remake an existing export (its ratings no longer match)")]),
        ("eval", "panel", "score"): (panel_score, [
            where, arg("--judge", help="the judge's report (default reports/alignment.json)"),
            arg("--rated-by", help="how the ratings were made, for the report, e.g. 'six Claude helper agents, one "
                "sheet each, given GUIDELINES.md'"),
            arg("--check", action="store_true", help="only validate the rating files and print what each covers "
                "(for raters: shows no results)")]),
    }
