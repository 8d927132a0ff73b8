"""reports/alignment.md from the figures `attune eval` measured (no computation beyond formatting): the table in
the paper's shape as differences to base, the steering matrix, steering accuracy, every model's win rates and
means with 95% intervals, and the goals."""
from __future__ import annotations

import json

from alignment.objectives import OBJECTIVES

# The seed paper's table (win rate vs base, %): empathy / safety.
PAPER = {"Base": (11.5, 39.6), "SFT": (20.9, 44.8), "DPO-Empathy": (93.6, 47.8), "DPO Soup": (52.5, 58.4),
         "Joint-Loss DPO": (70.8, 62.7), "MODPO": (77.6, 62.6)}
PAPER_ROW = {"base": "Base", "sft": "SFT", "dpo-empathy": "DPO-Empathy", "soup-empathy-safety": "DPO Soup",
             "joint-dpo-empathy-safety": "Joint-Loss DPO", "modpo-empathy-safety": "MODPO"}


def paper_table(summary: dict) -> list[dict]:
    """Per paper row we have: ours as win rate - 50 (points, with interval) and the paper's row - its base row."""
    pe0, ps0 = PAPER["Base"]
    rows = []
    for name, paper_name in PAPER_ROW.items():
        if name not in summary:
            continue
        w, ci = summary[name]["win_rate_vs_base"], summary[name]["win_rate_ci"]
        pe, ps = PAPER[paper_name]
        rows.append({"model": name, "paper_row": paper_name,
                     "ours_empathy_minus_50": round(w["empathy"] * 100 - 50, 1),
                     "ours_empathy_ci": [round(v * 100 - 50, 1) for v in ci["empathy"]],
                     "ours_safety_minus_50": round(w["safety"] * 100 - 50, 1),
                     "ours_safety_ci": [round(v * 100 - 50, 1) for v in ci["safety"]],
                     "paper_empathy_minus_base": round(pe - pe0, 1), "paper_safety_minus_base": round(ps - ps0, 1),
                     "ours_win_rate": [round(w["empathy"] * 100, 1), round(w["safety"] * 100, 1)],
                     "paper_win_rate": [pe, ps]})
    return rows


def _pm(v: float, ci, scale: float = 1.0, fmt: str = "+.1f") -> str:
    return f"{v * scale:{fmt}} [{ci[0] * scale:{fmt}}, {ci[1] * scale:{fmt}}]"


def _goal_line(label: str, met, measured: str) -> str:
    mark = "n/a (adapters missing)" if met is None else "met" if met else "**not met**"
    return f"| {label} | {measured} | {mark} |"


def _goals_table(g: dict) -> list[str]:
    own = g.get("own_objective_gain", {})
    acc = g.get("steering_accuracy", {})
    below = g.get("routable_safety_vs_base", {})
    lines = ["| goal | measured | |", "|---|---|---|"]
    lines.append(_goal_line("each emphasised MODPO adapter gains >= +0.30 on its own objective, interval excluding 0",
                            g.get("goal_own_gain"), "; ".join(f"`{n}` {v['gain']:+.2f} [{v['low']:+.2f}, "
                                                              f"{v['high']:+.2f}]" for n, v in own.items()) or "-"))
    lines.append(_goal_line("own objective is the largest gain for >= 5 of 6", g.get("goal_largest_gain"),
                            f"{g.get('emphasized_hits', 0)} of {len(g.get('emphasized_largest_gain', {}))}"))
    lines.append(_goal_line("steering accuracy >= 0.5 for every objective (chance 1/6)",
                            g.get("goal_steering_accuracy"), ", ".join(f"{o} {a:.2f}" for o, a in acc.items()) or "-"))
    if "modpo_empathy_win_rate" in g:
        lines.append(_goal_line("MODPO 0.5/0.5: empathy win rate >= 75%, safety >= 60% and >= DPO-empathy's + 10",
                                g.get("goal_modpo"), f"empathy {g['modpo_empathy_win_rate']:.1f}%, safety "
                                f"{g['modpo_safety_win_rate']:.1f}% (DPO-empathy {g['dpo_empathy_safety_win_rate']:.1f}%, "
                                f"difference {g['modpo_safety_minus_dpo_empathy_safety']:+.1f})"))
    else:
        lines.append(_goal_line("MODPO 0.5/0.5 vs DPO-empathy", None, "-"))
    worst = min(below.items(), key=lambda kv: kv[1]["high"], default=None)
    lines.append(_goal_line("no routable adapter's safety mean below base's (interval)",
                            g.get("goal_safety_not_below_base"),
                            f"{sum(v['below_base'] for v in below.values())} of {len(below)} below"
                            + (f"; lowest `{worst[0]}` {worst[1]['safety_gain']:+.3f} [{worst[1]['low']:+.3f}, "
                               f"{worst[1]['high']:+.3f}]" if worst else "")))
    return lines


def markdown(report: dict) -> str:
    meta, summary = report["meta"], report["summary"]
    obj = list(OBJECTIVES)
    head = "| model | " + " | ".join(obj) + " |"
    rule = "|---" * (len(obj) + 1) + "|"
    lines = ["# Alignment evaluation", "",
             f"{meta['n_prompts']} held-out prompts ({meta['sources']}; the full set is de-duplicated by text: "
             f"{meta.get('duplicates_dropped', 0)} duplicate(s) dropped); judge: `{meta['judge']}` "
             f"(trained on a different split and seed; agrees with the training reward model on "
             f"{meta.get('judge_agreement', 'n/a')} of test pairs). Greedy decoding, {meta['max_tokens']} tokens. "
             f"Intervals: 95% percentile bootstrap, paired over prompts (the same {meta['resamples']} resamples, "
             f"seed {meta['bootstrap_seed']}, for every model and statistic). Every reply: `eval_replies.jsonl`.", ""]
    if meta.get("trained_on_dropped"):
        lines += [f"Left out: {meta['trained_on_dropped']} prompt(s) of these sets that some adapter trains on (seed "
                  "train messages, counsel-chat questions whose answers SFT imitates).", ""]
    lines += ["## Paper-shaped table: difference to base (win-rate points), empathy / safety", "",
              "Our base row is 50/50 by construction: base is judged against itself and ties count half. The "
              "paper's base row is not (11.5 / 39.6). Raw rows are therefore not comparable; this table compares "
              "differences to base: ours = win rate vs base - 50 (95% interval), paper = its row - its base row.",
              "", "| method | ours: empathy | ours: safety | paper: empathy | paper: safety | raw ours (e / s) | "
              "raw paper (e / s) |", "|---|---|---|---|---|---|---|"]
    for r in report["paper_table"]:
        lines.append(f"| {r['paper_row']} (`{r['model']}`) | {_pm(r['ours_empathy_minus_50'], r['ours_empathy_ci'])} "
                     f"| {_pm(r['ours_safety_minus_50'], r['ours_safety_ci'])} | {r['paper_empathy_minus_base']:+.1f} "
                     f"| {r['paper_safety_minus_base']:+.1f} | {r['ours_win_rate'][0]:.1f} / {r['ours_win_rate'][1]:.1f}"
                     f" | {r['paper_win_rate'][0]} / {r['paper_win_rate'][1]} |")
    m = report["steering_matrix"]
    lines += ["", "## Steering matrix: mean judge-score gain over base (1-5 scale) [95% interval]", "",
              "![steering matrix](steering.png)", "", head, rule]
    for i, name in enumerate(m["adapters"]):
        lines.append(f"| `{name}` | " + " | ".join(
            f"{m['gain'][i][j]:+.3f} [{m['low'][i][j]:+.3f}, {m['high'][i][j]:+.3f}]" for j in range(len(obj))) + " |")
    acc = report["steering_accuracy"]
    lines += ["", "## Steering accuracy", "",
              "For each objective, the share of prompts on which the adapter emphasising it writes the reply the "
              "judge scores highest on that objective among the emphasised adapters (ties split). Chance is "
              f"1/{len(acc) or 6} = {1 / (len(acc) or 6):.3f}.", ""]
    if acc:
        lines += ["| objective | adapter | accuracy [95% interval] | chance |", "|---|---|---|---|"]
        lines += [f"| {o} | `{a['adapter']}` | {_pm(a['accuracy'], (a['low'], a['high']), fmt='.3f')} | "
                  f"{a['chance']:.3f} |" for o, a in acc.items()]
    else:
        lines.append("Not measured: fewer than two emphasised MODPO adapters are in the store.")
    lines += ["", "## Every model: win rate vs base (%) [95% interval]", "", head, rule]
    for name, s in summary.items():
        lines.append(f"| `{name}` | " + " | ".join(_pm(s["win_rate_vs_base"][o], s["win_rate_ci"][o], 100, ".1f")
                                                   for o in obj) + " |")
    lines += ["", "## Every model: mean judge score per objective [95% interval]", "", head, rule]
    for name, s in summary.items():
        lines.append(f"| `{name}` | " + " | ".join(_pm(s["mean_score"][o], s["mean_score_ci"][o], 1, ".3f")
                                                   for o in obj) + " |")
    lines += ["", "## Goals", "", *_goals_table(report["goals"]), "", "![Pareto plot](pareto.png)", "",
              "```json", json.dumps(report["goals"], indent=2), "```", ""]
    return "\n".join(lines)
