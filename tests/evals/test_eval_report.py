"""What `attune eval` reports, short of generating: the held-out prompt set, the replies file the blind panel
reads, and the markdown built from synthetic scores."""
from __future__ import annotations

import json

import numpy as np
import pytest

from alignment.objectives import OBJECTIVES
from evals import stats
from evals.alignment_report import markdown, paper_table
from evals.evaluate import heldout_prompts, summarize, write_replies
from tests.conftest import COUNSEL_CHAT


@pytest.mark.skipif(not COUNSEL_CHAT.exists(), reason="needs ../shared/data/counsel_chat/counsel_chat.csv")
def test_heldout_prompts_are_seed_test_counsel_chat_val_and_corpus_test_without_training_prompts():
    from alignment.corpus_data import load_prompts, resolve_texts

    meta: dict = {}
    items = heldout_prompts(str(COUNSEL_CHAT), meta=meta)
    sources = {it["source"] for it in items}
    assert sources == {"seed-test", "counsel-chat-val", "corpus-test"}
    texts = [" ".join(it["prompt"].split()) for it in items]
    assert len(set(texts)) == len(texts) and len({it["id"] for it in items}) == len(items)
    corpus = load_prompts()
    resolved = resolve_texts(corpus, str(COUNSEL_CHAT))
    assert {" ".join(resolved[p.id].split()) for p in corpus if p.split == "test"} <= set(texts)
    trained = {" ".join(resolved[p.id].split()) for p in corpus if p.split != "test"}
    assert trained.isdisjoint(texts)  # nothing the reward model, the judge or tuning saw
    assert heldout_prompts(str(COUNSEL_CHAT), limit=5) == items[:5]
    corpus_text = next(it["prompt"] for it in items if it["source"] == "corpus-test")
    less: dict = {}
    fewer = heldout_prompts(str(COUNSEL_CHAT), meta=less, exclude={"  " + corpus_text})  # whitespace is not news
    assert corpus_text not in [it["prompt"] for it in fewer] and len(fewer) == len(items) - 1
    assert less["trained_on_dropped"] == 1 and less["duplicates_dropped"] == meta["duplicates_dropped"]


def _judged(n=80, seed=0):
    rng = np.random.default_rng(seed)
    base = 3 + rng.normal(0, 0.5, size=(n, 6))
    return {"base": base, "sft": base + 0.2 + rng.normal(0, 0.2, size=(n, 6)),
            "dpo-empathy": base + rng.normal(0, 0.2, size=(n, 6)),
            "modpo-empathy-safety": base + 0.1 + rng.normal(0, 0.2, size=(n, 6))}


def test_markdown_compares_differences_to_base_and_says_why():
    judged = _judged()
    cmp = stats.compare(judged, resamples=500)
    summary = summarize(cmp)
    table = paper_table(summary)
    base_row = table[0]
    assert base_row["paper_row"] == "Base" and base_row["ours_empathy_minus_50"] == 0.0
    assert base_row["ours_empathy_ci"] == [0.0, 0.0] and base_row["paper_empathy_minus_base"] == 0.0
    modpo = next(r for r in table if r["model"] == "modpo-empathy-safety")
    assert modpo["paper_empathy_minus_base"] == pytest.approx(77.6 - 11.5)
    lo, hi = modpo["ours_empathy_ci"]
    assert lo < modpo["ours_empathy_minus_50"] < hi
    report = {"meta": {"n_prompts": 80, "sources": "80 synthetic", "judge": "j", "max_tokens": 8, "resamples": 500,
                       "bootstrap_seed": 0},
              "summary": summary, "paper_table": table, "steering_matrix": stats.steering_matrix(cmp, list(OBJECTIVES)),
              "steering_accuracy": {}, "goals": stats.goals(cmp, list(OBJECTIVES), {}, {}, ["modpo-empathy-safety"])}
    md = markdown(report)
    assert "50/50 by construction" in md and "11.5 / 39.6" in md
    assert "| Base (`base`) | +0.0 [+0.0, +0.0] | +0.0 [+0.0, +0.0] | +0.0 | +0.0 |" in md
    assert "Chance is 1/6" in md and "steering.png" in md and "pareto.png" in md
    assert md.count("| `modpo-empathy-safety` |") == 3  # matrix, win rates, means


def test_replies_file_has_one_line_per_prompt_with_every_model(tmp_path):
    items = [{"id": "a", "source": "seed-test", "prompt": "p1"}, {"id": "b", "source": "corpus-test", "prompt": "p2"}]
    write_replies(tmp_path / "r.jsonl", items, {"base": ["x1", "x2"], "sft": ["y1", "y2"]})
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert rows == [{"id": "a", "source": "seed-test", "prompt": "p1", "replies": {"base": "x1", "sft": "y1"}},
                    {"id": "b", "source": "corpus-test", "prompt": "p2", "replies": {"base": "x2", "sft": "y2"}}]
