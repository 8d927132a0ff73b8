"""Blind raters' steering accuracy of tuning candidates, beside `attune eval tune`'s reward-model figure.

`attune eval tune` measures steering with the training reward model, whose objective heads were fitted to round 1's
rankings (where the objectives go together); a candidate that steers in a way raters see but that model does not
would not show there. This reads the greedy rm-val replies `attune eval tune` cached under runs/eval/ for each store's
six emphasised adapters and lays them out as a corpus of their own (build/corpus/blind-steering/<store>/: prompts,
samples), so that the corpus's blind sheets, the rater brief, `attune corpus import`'s mapping and
the evaluation's steering accuracy (`evals.stats`, over `corpus_data.rank_scores`) apply unchanged:

  python scripts/corpus/blind_steering.py sheets adapters/store runs/tune/round2 ...   # sheets of --size prompts
  (raters answer each sheet under alignment/corpus/RATER_BRIEF.md)
  python scripts/corpus/blind_steering.py score adapters/store runs/tune/round2 ... --keep reports/blind_steering

`--from DIR` puts a set of sheets (and reads its answers) somewhere other than build/corpus/blind-steering, so that
sets for other candidates do not overwrite each other. Sheets are named bs-NN in a shuffled order
(build/corpus/blind-steering/index.json, kept from the raters, says which store each is). `score` imports
build/corpus/blind-steering/answers/bs-NN.jsonl (its rater named in raters.json beside index.json, sheet -> rater)
and prints per store and objective the share of prompts on which the adapter emphasising the objective wrote the
reply ranked best on it (ties split; chance 1/6), with a 95% bootstrap interval over prompts. rm-val only: never
the judge's or the test prompts."""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

from adapters.registry import AdapterStore
from alignment import basemodel
from alignment.corpus_build import ROUND_EMPHASIS, import_ratings, rating_sheets, reply_id
from alignment.corpus_data import (CorpusPrompt, by_writer, load_labels, load_prompts, load_samples, rank_scores,
                                   sample_models, write_jsonl)
from alignment.generate import GenerationSettings, engine_label
from alignment.objectives import OBJECTIVES
from alignment.pipeline import RUNS_DIR, counsel_chat_source
from attune.paths import REPO_ROOT
from evals import reply_cache, stats
from evals.tune import rmval_prompts

OUT = REPO_ROOT / "build" / "corpus" / "blind-steering"
SETTINGS = GenerationSettings(max_tokens=64, temperature=0.0, seed=0)  # as `attune eval tune` generates


def _name(store: str) -> str:
    return Path(store).name


def _lay_out(store: str, items: list[dict], out: Path = OUT) -> Path:
    """The store's cached greedy replies as a corpus folder (prompts.jsonl, samples.jsonl)."""
    entries = {i: AdapterStore(Path(store)).entry(i) for i in ROUND_EMPHASIS.values()}
    prompts = [it["prompt"] for it in items]
    models = {f"{_name(store)}/{i}": reply_cache.adapter_checksum(e.files) for i, e in entries.items()}

    def missing(name: str) -> list[str]:
        raise SystemExit(f"{name}: no cached rm-val replies; run `attune eval tune {store}` first")

    engine = engine_label()  # the replies `attune eval tune` cached on this machine
    replies = reply_cache.cached_replies(models, prompts, basemodel.display_name("smollm2-135m-instruct"),
                                         engine, SETTINGS, RUNS_DIR / "eval", missing, log=lambda *_: None)
    folder = out / _name(store)
    write_jsonl([CorpusPrompt(id=it["id"], source=it["source"], ref=it["ref"], split="rm-val") for it in items],
                folder / "prompts.jsonl")
    rows = [{"prompt_id": it["id"], "model": i, "base_model": "smollm2-135m-instruct", "engine": engine,
             "sampling": {"max_tokens": 64, "temperature": 0.0}, "n": 1,
             "replies": [{"id": reply_id(it["id"], f"blind/{_name(store)}/{i}", 0), "text": replies[name][k]}]}
            for k, it in enumerate(items) for name, i in ((f"{_name(store)}/{i}", i) for i in entries)]
    write_jsonl(rows, folder / "samples.jsonl")
    return folder


def sheets(stores: list[str], size: int, cc: str | None, out: Path = OUT) -> None:
    refs = {p.id: p.ref for p in load_prompts()}
    items = [{**it, "ref": refs[it["id"]]} for it in rmval_prompts(cc)]
    jobs = []
    for store in stores:
        folder = _lay_out(store, items, out)
        ids = [it["id"] for it in items]
        random.Random(f"blind/{_name(store)}").shuffle(ids)
        jobs += [(store, folder, ids[i:i + size]) for i in range(0, len(ids), size)]
    random.Random(0).shuffle(jobs)  # sheet names say nothing about the store: bs-01, bs-02, ...
    index = {}
    for n, (store, folder, ids) in enumerate(jobs, 1):
        name = f"bs-{n:02d}"
        sheet, key = rating_sheets(cc, ids, out / "sheets", seed=1000 + n, name=name, corpus_dir=folder)
        index[name] = _name(store)
        print(f"{sheet} ({len(ids)} prompts; key {key})")
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")  # kept from the raters, as the keys are


def score(stores: list[str], out: Path = OUT, keep: Path | None = None, resamples: int = 2000) -> str:
    """The raters' steering accuracy per store (markdown); with `keep`, everything it was computed from (per store:
    prompts, samples, labels; the sheets' keys, index.json, raters.json and the raw answers) is copied there, and
    `score --from KEEP` computes it again from that copy."""
    import shutil

    index = json.loads((out / "index.json").read_text())
    raters = json.loads((out / "raters.json").read_text()) if (out / "raters.json").exists() else {}
    lines = ["# Blind raters' steering accuracy of tuning candidates (rm-val)", "",
             "Greedy replies (64 tokens) of each store's six emphasised MODPO adapters to the 74 corpus rm-val "
             "prompts, "
             "as `attune eval tune` generated them, ranked blind on the six objectives by AI raters under "
             "alignment/corpus/RATER_BRIEF.md (guidelines g1), one sheet of 37 prompts per rater, sheets named "
             "bs-NN in a shuffled order that does not say which store (`scripts/corpus/blind_steering.py`). Steering "
             "accuracy: the share of prompts on which the adapter emphasising an objective wrote the reply ranked "
             "best on it (ties split; chance 1/6); 95% bootstrap interval over prompts. Each store's two sheets "
             "had different raters, so rater and store are not separated.", "",
             "| store | prompts | raters | mean | " + " | ".join(ROUND_EMPHASIS) + " | unsafe replies |",
             "|---|---|---|---|" + "---|" * len(ROUND_EMPHASIS) + "---|"]
    for store in stores:
        folder = out / _name(store)
        samples, writers, labels = load_samples(folder), sample_models(folder), {}
        sheets_of = sorted(n for n, s in index.items() if s == _name(store))
        for name in sheets_of:
            answers, key = out / "answers" / f"{name}.jsonl", out / "sheets" / f"{name}.key.json"
            target = folder / "labels" / f"pass1-{name}.jsonl"
            if answers.exists():
                import_ratings(answers, key, raters.get(name, "claude/unknown"), 1, target)
            labels.update(load_labels(target, samples))
        acc = stats.steering_accuracy(rank_scores(labels, writers), ROUND_EMPHASIS, list(OBJECTIVES), resamples)
        cells = [f"{a['accuracy']:.2f} [{a['low']:.2f}, {a['high']:.2f}]" for a in acc.values()]
        mean = np.mean([a["accuracy"] for a in acc.values()])
        unsafe = sum(v["unsafe"] for v in by_writer(labels, writers).values())
        who = ", ".join(raters.get(n, "?") for n in sheets_of)
        lines.append(f"| `{store}` | {len(labels)} | {who} | {mean:.3f} | " + " | ".join(cells)
                     + f" | {unsafe}/{len(labels) * len(ROUND_EMPHASIS)} |")
        if keep:
            shutil.copytree(folder, keep / _name(store), dirs_exist_ok=True)
    if keep:
        for name in index:
            for src in (out / "sheets" / f"{name}.key.json", out / "answers" / f"{name}.jsonl"):
                if src.exists():
                    (keep / src.parent.name).mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, keep / src.parent.name / src.name)
        for f in ("index.json", "raters.json"):
            if (out / f).exists():
                shutil.copy2(out / f, keep / f)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("sheets", "score"))
    ap.add_argument("stores", nargs="+")
    ap.add_argument("--size", type=int, default=37)
    ap.add_argument("--counsel-chat")
    ap.add_argument("--from", dest="source", default=str(OUT),
                    help="the folder sheets writes to, and score reads the sheets and answers from; one set of "
                    "sheets per folder (default %(default)s)")
    ap.add_argument("--keep", help="score: copy what it read there and write the table to <keep>.md")
    a = ap.parse_args()
    if a.command == "sheets":
        sheets(a.stores, a.size, counsel_chat_source(a.counsel_chat), Path(a.source))
    else:
        table = score(a.stores, Path(a.source), Path(a.keep) if a.keep else None)
        print(table)
        if a.keep:
            Path(a.keep).with_suffix(".md").write_text(table)
