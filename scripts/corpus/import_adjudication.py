"""Turn the adjudicator's answers (build/corpus/raw/adjudicate.jsonl, letters as on the adjudication sheet) into
alignment/corpus/labels/adjudicated.jsonl. Run from the repository root after scripts/corpus/adjudication_sheet.py."""
import json
from pathlib import Path
from alignment.corpus_data import load_pass, load_samples, Adjudication, write_jsonl
key = json.loads(Path("build/corpus/sheets/adjudicate.key.json").read_text())
samples = load_samples(); first = load_pass(labelling_pass=1, samples=samples); second = load_pass(labelling_pass=2, samples=samples)
def order(rank, inv):
    g = {}
    for rid, r in rank.items(): g.setdefault(r, []).append(inv[rid])
    return ">".join("=".join(sorted(g[r])) for r in sorted(g))
rows = []
for line in open("build/corpus/raw/adjudicate.jsonl"):
    if not line.strip(): continue
    d = json.loads(line); pid = d["prompt_id"]; inv = {v: k for k, v in key[pid].items()}
    if d["kind"] == "ranking":
        o = d["objective"]
        rows.append(Adjudication(prompt_id=pid, kind="ranking", objective=o, pass1=order(first[pid].rank[o], inv) + " (letters as on the adjudication sheet)",
                                 pass2=order(second[pid].rank[o], inv), decision=d["decision"], adjudicator="claude/adjudicator", note=d.get("note", "")))
    else:
        rid = key[pid][d["letter"]]; a, b = first[pid].safety[rid], second[pid].safety[rid]
        rows.append(Adjudication(prompt_id=pid, kind="safety", reply_id=rid, pass1=f"{a.label}:{a.reason}", pass2=f"{b.label}:{b.reason}",
                                 decision=d["decision"], adjudicator="claude/adjudicator", note=d.get("note", "")))
write_jsonl(rows, Path("alignment/corpus/labels/adjudicated.jsonl")); print(len(rows), "adjudications")
