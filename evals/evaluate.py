"""`attune eval`: generate replies from the base model and every adapter of a recipe on held-out prompts (seed
test split + counsel-chat val questions + the corpus test split), score them with the judge reward model
(trained on a different split and seed than the training reward model), and write reports/alignment.json,
reports/alignment.md, reports/eval_replies.jsonl, reports/pareto.png and reports/steering.png. Replies are
cached per model under runs/eval/ (evals/reply_cache.py); the statistics are evals/stats.py."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from alignment import basemodel, data
from alignment import prompts as P
from alignment.generate import GenerationSettings, engine_label, generate_each
from alignment.objectives import OBJECTIVES
from alignment.recipe import load_recipe
from attune.paths import JUDGE_DIR, REPORTS_DIR, REWARD_DIR, STORE_DIR
from evals import plots, reply_cache, stats
from evals.alignment_report import PAPER, markdown, paper_table


def _key(text: str) -> str:
    return " ".join(text.split())


def heldout_prompts(counsel_chat: str | None, limit: int | None = None, meta: dict | None = None,
                    exclude: set[str] = frozenset()) -> list[dict]:
    """Seed test, counsel-chat val, then the corpus test split, de-duplicated by text (first kept), without the
    messages in `exclude` (what a recipe trains on). Counsel-chat texts, for val and for the corpus, come from the
    CSV `counsel_chat_rows` reads; without it they are left out."""
    from alignment.corpus_data import load_prompts, resolve_texts
    from alignment.pipeline import counsel_chat_rows

    cc_rows = counsel_chat_rows(counsel_chat)
    out = [{"source": "seed-test", "id": ex.id, "prompt": ex.message}
           for ex in data.split_examples(data.load_seed(), "test")]
    for i, q in enumerate(data.counsel_chat_questions(cc_rows, "val")):
        out.append({"source": "counsel-chat-val", "id": f"cc-val-{i}", "prompt": q})
    test = [p for p in load_prompts() if p.split == "test"]
    cc_text = {r.questionID: r.prompt for r in cc_rows}
    texts = resolve_texts([p for p in test if p.source != "counsel_chat"], None)
    for p in test:
        if p.source == "counsel_chat" and p.ref in cc_text:
            texts[p.id] = cc_text[p.ref]
    for p in test:
        if p.id in texts:
            out.append({"source": "corpus-test", "id": p.id, "prompt": texts[p.id]})
    seen_text, seen_id, items = set(), set(), []
    trained = {_key(t) for t in exclude}
    for it in out:
        if _key(it["prompt"]) in seen_text or _key(it["prompt"]) in trained:
            continue
        if it["id"] in seen_id:
            it = {**it, "id": f"{it['source']}-{it['id']}"}
        seen_text.add(_key(it["prompt"]))
        seen_id.add(it["id"])
        items.append(it)
    if meta is not None:
        meta["duplicates_dropped"] = sum(_key(it["prompt"]) not in trained for it in out) - len(items)
        meta["trained_on_dropped"] = sum(_key(it["prompt"]) in trained for it in out)
        meta["corpus_test_skipped_no_counsel_chat"] = sum(p.source == "counsel_chat" and p.id not in texts
                                                          for p in test)
    return items[:limit] if limit else items


def training_messages(recipe, counsel_chat: str | None) -> set[str]:
    """Patient messages some adapter of `recipe` trains on outside the corpus's rm-train split: the seed train
    split (SFT's best replies, seed-rated pairs) and the counsel-chat questions whose answers SFT imitates. The
    corpus test split shares some of them; they are not held out for those adapters, so they leave the eval."""
    from alignment.pipeline import counsel_chat_rows, sft_rows

    train = data.split_examples(data.load_seed(), "train")
    rows = sft_rows(recipe, train, counsel_chat_rows(counsel_chat))
    return {ex.message for ex in train} | {r["prompt"][-1]["content"] for r in rows}


def win_rates(scores: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Per objective, share of prompts where the adapter's reply beats base's (ties count half)."""
    return stats.wins(scores, base).mean(axis=0)


def summarize(comparisons: dict[str, stats.Comparison]) -> dict[str, dict]:
    def per(v):
        return dict(zip(OBJECTIVES, np.round(v, 4).tolist()))

    return {name: {"mean_score": per(c.mean), "mean_score_ci": per(c.mean_ci),
                   "win_rate_vs_base": per(c.win_rate), "win_rate_ci": per(c.win_rate_ci),
                   "gain_over_base": per(c.gain), "gain_ci": per(c.gain_ci)} for name, c in comparisons.items()}


def write_replies(path: Path, items: list[dict], replies: dict[str, list[str]]) -> None:
    """One JSON line per prompt: {"id", "source", "prompt", "replies": {model: text}} (the blind panel reads it)."""
    with open(path, "w", encoding="utf-8") as f:
        for i, it in enumerate(items):
            f.write(json.dumps({"id": it["id"], "source": it["source"], "prompt": it["prompt"],
                                "replies": {n: replies[n][i] for n in replies}}, ensure_ascii=False) + "\n")


def run_eval(recipe_name: str = "shipped", out: Path | None = None, counsel_chat: str | None = None,
             limit: int | None = None, store_dir: Path | None = None, max_tokens: int = 64,
             prefer_vllm: bool = True, cache_dir: Path | None = None, resamples: int = stats.RESAMPLES,
             seed: int = 0) -> dict:
    from adapters.matching import ROUTABLE_RECIPES
    from adapters.registry import AdapterStore
    from alignment import pipeline
    from alignment.reward import RewardModel
    from alignment.reward_training import judge_agreement

    def log(m: str) -> None:
        print(f"[attune eval] {m}", flush=True)

    recipe = load_recipe(recipe_name)
    out = Path(out or REPORTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    store = AdapterStore(store_dir or STORE_DIR)
    ids = [a.id for a in recipe.adapters if a.id in store.ids()]
    missing = [a.id for a in recipe.adapters if a.id not in ids]
    if missing:
        print(f"[attune eval] not in the store (train them first): {missing}")
    meta: dict = {}
    items = heldout_prompts(counsel_chat, limit, meta, exclude=training_messages(recipe, counsel_chat))
    convs = [P.chat(it["prompt"]) for it in items]
    prompts = [it["prompt"] for it in items]
    settings = GenerationSettings(max_tokens=max_tokens, temperature=0.0, seed=0)
    entries = {i: store.entry(i) for i in ids}
    base_model = basemodel.resolve(recipe.base_model)
    engine = engine_label(prefer_vllm)

    def generate(name: str) -> list[str]:
        adapter = None if name == "base" else store.get(name)  # checks the files against the manifest
        return generate_each(base_model, {name: adapter}, convs, settings, prefer_vllm, log=log)[name]

    t0 = time.perf_counter()
    replies = reply_cache.cached_replies(
        {"base": "base", **{i: reply_cache.adapter_checksum(e.files) for i, e in entries.items()}}, prompts,
        basemodel.display_name(recipe.base_model), engine, settings,
        Path(cache_dir) if cache_dir else pipeline.RUNS_DIR / "eval", generate, log)
    gen_seconds = time.perf_counter() - t0
    write_replies(out / "eval_replies.jsonl", items, replies)
    judge = RewardModel.load(JUDGE_DIR)
    judged = {name: np.asarray(judge.score(prompts, rs)) for name, rs in replies.items()}
    comparisons = stats.compare(judged, resamples=resamples, seed=seed)
    summary = summarize(comparisons)
    emphasis = stats.emphasised(entries.values())
    accuracy = stats.steering_accuracy(judged, emphasis, list(OBJECTIVES), resamples, seed)
    matrix = stats.steering_matrix(comparisons, list(OBJECTIVES))
    routable = [i for i, e in entries.items() if e.recipe in ROUTABLE_RECIPES]
    goal = stats.goals(comparisons, list(OBJECTIVES), emphasis, accuracy, routable, paper_soup=PAPER["DPO Soup"])
    seed_test = data.split_examples(data.load_seed(), "test")
    meta = {"n_prompts": len(items), "judge": str(JUDGE_DIR.relative_to(STORE_DIR.parent.parent)),
            "sources": ", ".join(f"{n} {s}" for s, n in _counts(items).items()), **meta,
            "judge_agreement": round(judge_agreement(RewardModel.load(REWARD_DIR), judge, seed_test), 3),
            "max_tokens": max_tokens, "engine": engine, "generation_seconds": round(gen_seconds, 1),
            "resamples": resamples, "bootstrap_seed": seed, "missing": missing, "emphasis": emphasis}
    report = {"meta": meta, "summary": summary, "paper_table": paper_table(summary), "steering_matrix": matrix,
              "steering_accuracy": accuracy, "goals": goal,
              "samples": [{**it, "replies": {n: replies[n][i] for n in replies}} for i, it in enumerate(items[:10])]}
    (out / "alignment.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "alignment.md").write_text(markdown(report))
    plots.pareto_plot({n: {"x": s["win_rate_vs_base"]["empathy"] * 100, "y": s["win_rate_vs_base"]["safety"] * 100,
                           "x_ci": [v * 100 for v in s["win_rate_ci"]["empathy"]],
                           "y_ci": [v * 100 for v in s["win_rate_ci"]["safety"]]} for n, s in summary.items()},
                      PAPER, out / "pareto.png")
    plots.steering_heatmap(matrix, out / "steering.png", emphasis)
    for name in ids:
        s = summary[name]
        store.update_eval(name, {"judge": {"mean_score": s["mean_score"], "win_rate_vs_base": s["win_rate_vs_base"]},
                                 "judge_base": summary["base"]["mean_score"]})
    print((out / "alignment.md").read_text())
    return report


def _counts(items: list[dict]) -> dict[str, int]:
    c: dict[str, int] = {}
    for it in items:
        c[it["source"]] = c.get(it["source"], 0) + 1
    return c
