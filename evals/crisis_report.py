"""The crisis detector's report: recall and false escalation of the fine-tuned detector, of the rules, and of
both together (as serving decides), on our val and test splits, the hard negatives of the test split and the
counsel-chat val questions (never trained or calibrated on), per category; the second-pass agreement.
Writes reports/crisis.{json,md}. Nothing from ../shared/eval is read here (the live safety report does that)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from alignment.crisis import CrisisClassifier
from alignment.crisis_training import (CRISIS_DIR, build_sets, counsel_chat_val, evaluate, second_pass_agreement)
from serving.safety import CrisisRules


def build(counsel_chat: str | Path, detector_dir: Path, crisis_dir: Path = CRISIS_DIR) -> dict:
    started = time.perf_counter()
    model = CrisisClassifier.load(detector_dir)
    sets = build_sets(counsel_chat, crisis_dir)
    rules = CrisisRules()
    hard = [ex for ex in sets["test"] if not ex.risk and ex.source.startswith("authored-")]
    evals = {"val": sets["val"], "test": sets["test"], "hard negatives (test)": hard,
             "counsel-chat val": counsel_chat_val(counsel_chat)}
    out = {"measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "detector": str(detector_dir),
           "config": {k: model.config.__dict__[k] for k in ("encoder", "lora_rank", "max_length", "window_turns",
                                                           "threshold", "near_threshold")},
           "training": {k: model.meta.get(k) for k in ("trained", "seconds", "steps", "train", "calibration")},
           "sets": {name: evaluate(model, exs, rules) for name, exs in evals.items()}}
    try:
        out["agreement"] = second_pass_agreement(crisis_dir)
    except FileNotFoundError:
        out["agreement"] = None
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def _rate(m: dict, key: str) -> str:
    v = m.get(key)
    n = m["n_risk"] if key == "recall" else m["n_none"]
    return "-" if v is None else f"{v:.3f} (n={n})"


def _margin(calibration: dict) -> str:
    m = calibration.get("margin_logits")
    return f", {m} logits below the message it was calibrated on" if m else ""


def render(r: dict) -> str:
    c, t = r["config"], r["training"]
    lines = ["# Crisis detector report", "",
             f"Measured {r['measured']} by `attune crisis report` in {r['seconds']} s. Detector: {r['detector']} "
             f"({c['encoder']}, LoRA r{c['lora_rank']}, reads the last {c['window_turns']} patient turns), "
             f"threshold {c['threshold']:.4f} calibrated on val for recall >= "
             f"{t['calibration']['target_recall'] if t.get('calibration') else '?'}"
             f"{_margin(t.get('calibration') or {})}; near the line from "
             f"{c['near_threshold']:.4f}. Trained in {t.get('seconds')} s ({t.get('steps')} steps).", "",
             "Serving flags a window when the detector reaches its threshold or a crisis rule fires "
             "(rules are the second layer).", "",
             "| set | detector recall | detector false escalation | detector + rules recall | "
             "detector + rules false escalation | AUROC |", "|---|---|---|---|---|---|"]
    for name, s in r["sets"].items():
        m, b = s["model"], s.get("model_or_rules", s["model"])
        lines.append(f"| {name} | {_rate(m, 'recall')} | {_rate(m, 'false_escalation')} | {_rate(b, 'recall')} | "
                     f"{_rate(b, 'false_escalation')} | {m.get('auroc', '-')} |")
    lines += ["", "## Per category (detector + rules, test split)", "", "| category | n | flagged |", "|---|---|---|"]
    for cat, v in r["sets"]["test"]["per_category"].items():
        lines.append(f"| {cat} | {v['n']} | {v['flagged']} |")
    for name in ("val", "test", "hard negatives (test)", "counsel-chat val"):
        s = r["sets"][name]
        if s["missed"] or s["false_alarms"]:
            lines += ["", f"{name}: missed {s['missed'] or 'none'}; false alarms {s['false_alarms'] or 'none'}"]
    a = r.get("agreement")
    if a:
        lines += ["", "## Labels", "",
                  f"The authored messages (alignment/corpus/crisis, guideline c1) were labelled a second time, blind "
                  f"(shuffled, no ids or categories), by two other raters: agreement {a['agreement']:.3f}, Cohen's "
                  f"kappa {a['kappa']:.3f} on {a['n']} messages ({a['pass1_risk']} vs {a['pass2_risk']} risk). "
                  "The messages were written to their label, so this measures whether the guideline's boundary is "
                  "readable, not how hard messages from real patients are."]
    return "\n".join(lines) + "\n"


def write(report: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    j, m = out_dir / "crisis.json", out_dir / "crisis.md"
    j.write_text(json.dumps(report, indent=1) + "\n")
    m.write_text(render(report))
    return [j, m]
