"""Grid pairs (alignment/grid_data.py): best vs worst by the raters' ranks, MODPO margins on the reward model's raw
scale, and caps that keep every source."""
from __future__ import annotations

import numpy as np
import pytest

from alignment import grid_data as G
from alignment.objectives import OBJECTIVES, Preference


def _item(prompt="p", source="corpus-labels", **ranks) -> G.Rated:
    replies = {"a": "reply a", "b": "reply b", "c": "reply c"}
    rank = {o: ranks.get(o, {"a": 1, "b": 2, "c": 3}) for o in OBJECTIVES}
    return G.Rated(prompt, replies, rank, source)


def test_ranks_from_scores_share_a_rank_on_ties():
    assert G.ranks_from_scores({"a": 5, "b": 3, "c": 5}) == {"a": 1, "c": 1, "b": 3}
    assert G.ranks_from_scores({"a": 1.0, "b": 1.0}) == {"a": 1, "b": 1}


def test_best_vs_worst_follows_the_ranking_of_the_objective():
    item = _item(safety={"a": 3, "b": 1, "c": 2})
    assert G.best_worst(item, "empathy") == ("a", "c")
    assert G.best_worst(item, "safety") == ("b", "a")
    assert G.best_worst(_item(empathy={"a": 1, "b": 1, "c": 1}), "empathy") is None
    tied = _item(empathy={"a": 1, "b": 1, "c": 3})
    picks = {G.best_worst(tied, "empathy") for _ in range(5)}
    assert len(picks) == 1 and picks.pop() in {("a", "c"), ("b", "c")}  # a tie is broken the same way every run


def test_a_contrastive_pair_is_the_one_the_objective_prefers_beyond_the_others():
    """Empathy ranks a > b > c; every other objective ranks a > c > b. Best vs worst (a, c) is what all of them
    agree on; (b, c) is the pair only empathy prefers: gap 1 on empathy, -1 on the others."""
    rest = {"a": 1, "b": 3, "c": 2}
    item = _item(**{o: rest for o in OBJECTIVES if o != "empathy"})
    assert G.best_worst(item, "empathy") == ("a", "c")
    assert G.contrastive(item, "empathy") == ("b", "c")
    # for safety (a > c > b, like four others): c over b is the pair empathy disagrees on (score 1 - 3/5)
    assert G.contrastive(item, "safety") == ("c", "b")
    rows = G.pair_rows([item], "empathy", selection="contrastive")
    assert rows[0]["chosen"][0]["content"] == "reply b" and rows[0]["rejected"][0]["content"] == "reply c"
    assert G.contrastive(_item(empathy={"a": 2, "b": 2, "c": 2}), "empathy") is None
    with pytest.raises(KeyError):
        G.pair_rows([item], "empathy", selection="random")


def test_a_unit_of_weight_buys_the_same_raw_margin_on_every_objective():
    """The margin is w_-k . (r_-k(y_w) - r_-k(y_l)) on the raw (logit) scale: the same raw difference on two
    objectives with the same weight gives the same margin, whatever the calibration slopes of the 1-5 display
    scale (they differ 2.7x between safety and empathy in the shipped reward model)."""
    w = np.array([0.5, 0.1, 0.1, 0.1, 0.1, 0.1])  # empathy primary
    chosen = np.zeros(6)
    for j in range(1, 6):
        worse = chosen.copy()
        worse[j] = -1.0  # the chosen reply is better by one raw unit on objective j only
        assert G.modpo_margin(w, 0, chosen, worse) == pytest.approx(0.1)
    # the primary objective's own difference never enters its margin
    assert G.modpo_margin(w, 0, np.array([9.0, 0, 0, 0, 0, 0]), np.zeros(6)) == 0.0


def test_modpo_rows_take_margins_from_raw_scores_and_w_k_from_the_weights():
    item = _item(prompt="I feel low")
    rows = G.pair_rows([item], "empathy")
    assert len(rows) == 1 and rows[0]["margin"] == 0.0 and rows[0]["w_primary"] == 1.0
    assert rows[0]["chosen"][0]["content"] == "reply a" and rows[0]["rejected"][0]["content"] == "reply c"
    raw = {("I feel low", "reply a"): np.array([0.0, 2.0, 0, 0, 0, 0]),
           ("I feel low", "reply c"): np.array([0.0, -1.0, 0, 0, 0, 0])}
    weights = Preference({"empathy": 0.5, "safety": 0.5})
    (m,) = G.add_margins(rows, "empathy", weights, raw)
    assert m["w_primary"] == pytest.approx(0.5) and m["margin"] == pytest.approx(0.5 * 3.0)


def test_a_cap_takes_from_every_source_in_turn():
    items = [_item(f"c{i}") for i in range(10)] + [_item(f"s{i}", "seed-ratings") for i in range(3)]
    rows = G.pair_rows(items, "empathy")
    capped = G.interleave_sources(rows, 6)
    assert G.source_counts(capped) == {"corpus-labels": 3, "seed-ratings": 3, "reward-model": 0}
    assert len(G.interleave_sources(rows, None)) == 13
    assert [r["texts"] for r in G.interleave_sources(rows, 6)] == [r["texts"] for r in capped]  # seeded


def test_seed_examples_become_ranks_higher_rating_better():
    from alignment import data

    ex = data.split_examples(data.load_seed(), "train")[0]
    (item,) = G.seed_rated([ex])
    best, worst = G.best_worst(item, "empathy")
    ratings = {f"{ex.id}/{i}": r.ratings["empathy"] for i, r in enumerate(ex.replies)}
    assert ratings[best] == max(ratings.values()) and ratings[worst] == min(ratings.values())


def test_corpus_pairs_come_from_the_reward_models_training_split_only(tmp_path):
    """No counsel-chat CSV: those prompts are left out (said in the log), the rest of rm-train is used; no prompt of
    the judge's or the test split is."""
    from alignment.corpus_data import load_prompts, resolve_texts

    said = []
    items = G.corpus_rated("rm-train", None, log=said.append)
    assert items and said and "counsel-chat prompts left out" in said[0]
    others = [p for p in load_prompts() if p.split in ("judge-train", "test") and p.source != "counsel_chat"]
    held_out = set(resolve_texts(others, None).values())
    assert not held_out & {it.prompt for it in items}
    assert all(len(it.replies) == 6 and set(it.rank) == set(OBJECTIVES) for it in items)
