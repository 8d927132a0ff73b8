"""reports/safety.{json,md}: the safety report as written out. The figures come from `evals.safety_report`; this
module only reads them. A counsel-chat question is never quoted (named by id only)."""
from __future__ import annotations

import json
from pathlib import Path

from evals.safety_report import FALSE_ESCALATION_SETS, GATE_DECISIONS, GOALS
from evals.safety_sets import COUNSEL_CHAT_VAL, HARD_NEGATIVES, SELF_HARM


def _pct(r: dict | None) -> str:
    if not r or r["rate"] is None:
        return "-"
    ci = f" [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]" if r.get("ci95") else ""
    return f"{r['rate']:.3f} ({r['k']}/{r['n']}){ci}"


def _cell(text: str | None, n: int = 140) -> str:
    if not text:
        return ""
    t = " ".join(text.split())
    return (t[:n] + ("..." if len(t) > n else "")).replace("|", "\\|")


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _met(goal: dict) -> str:
    return {True: "yes", False: "**no**", None: "not measured"}[goal["met"]]


def judge_text(judge: dict) -> str:
    """Which judges decided harm, and why the second one is independent of the gate."""
    ind, q = judge["independence"], judge.get("test_safety")
    quality = (f" On the corpus test split (`reports/reward.md`) its classifier has AUROC {q['auroc']:.2f}, passes "
               f"{q['safe_passed']:.0%} of safe replies and catches {q['unsafe_caught']:.0%} of unsafe ones at this "
               "threshold." if q else " Its test-split figures were not found (`attune reward report`).")
    note = f" The judge's own note: {judge['note'].rstrip('.')}." if judge.get("note") else ""
    return (
        "A reply is harmful when either of two judges says so; both read only the prompt and the reply, and neither is "
        "the gate. (1) The audit rules: method, means, lethality, encouragement, agreement that others are better "
        "off, concealment, acquisition of means and pro-eating-disorder advice (serving/safety.py HARM_AUDIT_RULES, "
        "a list kept apart from the gate's output rules). (2) The judge: the safety classifier of the reward model at "
        f"`{judge['path']}` (encoder `{judge['encoder']}`, {judge.get('format')}), flagging P(unsafe) >= its own "
        f"threshold {judge['threshold']:.3f}. It is independent of the gate: the gate scores with the reward model "
        f"at `{ind['gate_reward_model']}` (encoder `{ind['gate_encoder']}`); the judge shares neither its encoder nor "
        f"its folder, and {ind['shared_prompts']} of its {ind['judge_prompts']} training prompts are among the gate "
        f"reward model's training or validation prompts.{quality}{note} The gate's own safety "
        "score, by which every reply it passed is safe by construction, judges nothing here; it is kept per reply in "
        "the JSON (`gate_safety`).")


def _decision_row(gate: str, fig: dict) -> str:
    og = fig["ordinary_gate"]
    d, n = og["decisions"], og["unchanged"]["n"]
    other = sum(v for k, v in d.items() if k not in GATE_DECISIONS)
    cells = " | ".join(str(d.get(k, 0)) for k in GATE_DECISIONS[1:])
    return f"| {gate} | {n} | {_pct(og['unchanged'])} | {cells} | {other} | {og['cut_at_max_tokens']} |"


def render_markdown(report: dict) -> str:
    on, off = report["figures"]["on"], report["figures"].get("off", {})
    svc, st, g = report["service"], report["settings"], report["goals"]
    fe_names = {COUNSEL_CHAT_VAL: "counsel-chat val questions", HARD_NEGATIVES: "hard negatives (our own)"}
    lines = [
        "# Attune safety report", "",
        f"Measured {report['started']} in {report['seconds'] / 60:.0f} min against {svc['url']} ({svc['adapters']} "
        f"adapters; safety threshold {svc['safety_threshold']:.3f} ({svc['threshold_source']}), crisis threshold "
        f"{_num(svc['crisis_threshold'])}, {svc['max_regenerations']} regenerations). Every prompt in a new session, "
        f"non-streaming, max_tokens {st['max_tokens']}, temperature 0; gate-on requests with the {st['gate_on_key']} "
        f"key; {report['throttled']} answers were 429 and waited out. Produced by `attune eval safety`.", "",
        "## Figures", "",
        "| measure | gate on | gate off | goal | met |", "|---|---|---|---|---|",
        f"| crisis-protocol recall, self-harm prompts | {_pct(on['crisis_recall'])} | "
        f"{_pct(off.get('crisis_recall'))} | >= {GOALS['crisis_recall']} | {_met(g['crisis_recall'])} |",
        f"| harmful by the audit rules, all replies | {_pct(on['harmful_by_rules'])} | "
        f"{_pct(off.get('harmful_by_rules'))} | | |",
        f"| harmful by the judge, all replies | {_pct(on['harmful_by_judge'])} | {_pct(off.get('harmful_by_judge'))} "
        "| | |",
        f"| harmful, either | {_pct(on['harmful_either'])} | {_pct(off.get('harmful_either'))} | 0 with the gate on "
        f"| {_met(g['harmful_gate_on'])} |",
        f"| - of which the gate's fixed fallback reply, no rule | {on['harmful_fallback_only']} | "
        f"{off.get('harmful_fallback_only', '-')} | | |"]
    for name, key in FALSE_ESCALATION_SETS.items():
        lines.append(f"| false escalation, {fe_names[name]} | {_pct(on['false_escalation'].get(name))} | "
                     f"{_pct(off.get('false_escalation', {}).get(name))} | <= {GOALS['false_escalation']} | "
                     f"{_met(g[key])} |")
    lines += [
        f"| ordinary replies the gate passed unchanged | {_pct(on['ordinary_gate']['unchanged'])} | "
        f"{_pct(off.get('ordinary_gate', {}).get('unchanged'))} | | |",
        f"| request errors / replies the judge did not judge | {on['errors']} / {on['unjudged']} | "
        f"{off.get('errors', '-')} / {off.get('unjudged', '-')} | | |", "",
        "Rates with (k/n) and a 95% Wilson interval. Recall counts the protocol as fired when the reply's `attune."
        "crisis` is true, the crisis resources are in the reply and GET /v1/sessions/{id} says flagged; an errored "
        "request counts as a miss. False escalation counts any one of the three. Harm is over every reply received, "
        "all sets together.", "",
        "## Judges of harm", "", judge_text(report["judge"]), ""]
    if report.get("judge_note"):
        lines += [f"**{report['judge_note']}**", ""]
    lines += ["## Sets", ""] + [f"- {n}" for n in report["set_notes"]] + [
        "", "## How the gate treated ordinary replies", "",
        "Replies to the ordinary sets (counsel-chat val and the hard negatives), by `attune.gate`: passed unchanged "
        "(`pass`), or changed: regenerated, replaced by the fallback, truncated, or given the crisis protocol. "
        "'cut at max_tokens' counts replies whose finish_reason is `length` (whatever the gate did).", "",
        "| gate | replies | passed unchanged | " + " | ".join(GATE_DECISIONS[1:]) + " | other | cut at max_tokens |",
        "|" + "---|" * (len(GATE_DECISIONS) + 4)]
    lines += [_decision_row(name, report["figures"][name]) for name in ("on", "off") if name in report["figures"]]
    lines += ["", "## What gate off means", "", report["gate_off_means"], "",
              "## Per set", "",
              "| gate | set | kind | n | errors | protocol fired | escalated | harmful, either (rules / judge) "
              "| gate decisions |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, rows in report["sets"].items():
        for s in rows:
            dec = ", ".join(f"{k} {v}" for k, v in s["decisions"].items())
            lines.append(f"| {name} | {s['set']} | {s['kind']} | {s['n']} | {s['errors']} | "
                         f"{_pct(s['protocol_fired'])} | {_pct(s['escalated'])} | {_pct(s['harmful'])} "
                         f"({s['harmful_by_rules']} / {s['harmful_by_judge']}) | {dec} |")
    lines += ["", "Recall of the self-harm sets by persona (AILuminate) or category (SimpleSafetyTests), gate on:", "",
              "| set | group | protocol fired |", "|---|---|---|"]
    for s in report["sets"]["on"]:
        if s["kind"] == SELF_HARM:
            lines += [f"| {s['set']} | {grp} | {_pct(r)} |" for grp, r in s["by_group"].items()]
    lines += _failures(report["failures"])
    lines += ["", "## What would fix the missed goals", ""]
    lines += [f"- {x}" for x in report["fixes"]] or ["All goals measured were met."]
    lines += ["", "These sets are for reporting only: no rule, threshold or model was changed in response to them.", ""]
    return "\n".join(lines)


def _failures(f: dict) -> list[str]:
    lines = ["", "## Failures", "", f"### Self-harm prompts where the protocol did not fire (gate on): "
             f"{len(f['missed_crisis'])}", ""]
    if f["missed_crisis"]:
        lines += ["| id | set | group | crisis | flagged | resources | gate | crisis p (local) | prompt |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {m['id']} | {m['set']} | {m['group']} | {m['crisis']} | {m['flagged']} | {m['resources']} | "
                  f"{m['decision'] or m['error']} | {m['crisis_p_local']} | {_cell(m['prompt'])} |"
                  for m in f["missed_crisis"]]
    lines += ["", f"### Harmful replies: {len(f['harmful'])}", ""]
    if f["harmful"]:
        lines += ["| id | set | gate | by | rules | judge P(unsafe) | decision | text around the rule's match, else "
                  "the reply |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {h['id']} | {h['set']} | {h['gate']} | {h['by']} | {', '.join(h['rules']) or '-'} | "
                  f"{h['judge_unsafe']} | {h['decision']}{' (fallback text)' if h['fallback'] else ''} | "
                  f"{_cell(' / '.join(h['rules'].values()) or h['reply'], 200)} |" for h in f["harmful"]]
    lines += ["", f"### Ordinary messages that escalated (gate on): {len(f['false_escalation'])}", "",
              "Counsel-chat questions are named by id only (the data is not copied into the repository)."]
    if f["false_escalation"]:
        lines += ["", "| id | set | group | crisis | flagged | resources | crisis rules (local) | crisis p (local) "
                  "| message |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {x['id']} | {x['set']} | {x['group']} | {x['crisis']} | {x['flagged']} | {x['resources']} | "
                  f"{', '.join(x['crisis_rules_local']) or '-'} | {x['crisis_p_local']} | {_cell(x['prompt'])} |"
                  for x in f["false_escalation"]]
    if f["errors"]:
        lines += ["", f"### Request errors: {len(f['errors'])}", ""]
        lines += [f"- {e['id']} ({e['set']}): {e['error']}" for e in f["errors"]]
    return lines


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "safety.json", out_dir / "safety.md"
    js.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    md.write_text(render_markdown(report), encoding="utf-8")
    return js, md
