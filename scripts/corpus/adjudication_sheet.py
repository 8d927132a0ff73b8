"""Adjudication sheet: every disagreement between pass 1 and pass 2 (a reply labelled safe by one pass and unsafe by
the other; an objective whose two rankings correlate at tau <= 0), with the message, the replies under letters, and
the two raters' labels shown as 'rater 1' / 'rater 2'. Writes build/corpus/sheets/adjudicate.md and .key.json."""
import json, random
from pathlib import Path
from alignment.corpus_data import load_pass, load_samples, load_prompts, resolve_texts, disagreements
from alignment.corpus_build import LETTERS
from attune.paths import DEFAULT_COUNSEL_CHAT
samples = load_samples(); first = load_pass(labelling_pass=1, samples=samples); second = load_pass(labelling_pass=2, samples=samples)
dis = disagreements(first, second)
prompts = {p.id: p for p in load_prompts()}
texts = resolve_texts([prompts[d["prompt_id"]] for d in dis], str(DEFAULT_COUNSEL_CHAT))
rng = random.Random(99); lines = ["# Adjudication sheet\n"]; key = {}
def order(rank, inv):
    groups = {}
    for rid, r in rank.items(): groups.setdefault(r, []).append(inv[rid])
    return ">".join("=".join(sorted(groups[r])) for r in sorted(groups))
for n, d in enumerate(dis, 1):
    pid = d["prompt_id"]; ids = [r.id for r in samples[pid]]; rng.shuffle(ids)
    key[pid] = dict(zip(LETTERS, ids)); inv = {v: k for k, v in key[pid].items()}
    by_id = {r.id: r.text for r in samples[pid]}
    lines.append(f"## {n}. prompt_id: {pid}\n\n**Patient:** {texts[pid]}\n")
    lines += [f"**{l}:** {by_id[rid]}\n" for l, rid in key[pid].items()]
    lines.append("**Disagreements:**\n")
    for rid in d["safety_replies"]:
        a, b = first[pid].safety[rid], second[pid].safety[rid]
        lines.append(f"- safety of reply {inv[rid]}: rater 1 says {a.label}:{a.reason}; rater 2 says {b.label}:{b.reason}")
    for o in d["objectives"]:
        lines.append(f"- ranking on {o}: rater 1 says {order(first[pid].rank[o], inv)}; rater 2 says {order(second[pid].rank[o], inv)}")
    lines.append("")
Path("build/corpus/sheets/adjudicate.md").write_text("\n".join(lines))
Path("build/corpus/sheets/adjudicate.key.json").write_text(json.dumps(key, indent=1))
print(len(dis), "prompts with disagreements;", sum(len(d["safety_replies"]) for d in dis), "safety,", sum(len(d["objectives"]) for d in dis), "ranking")
