"""scripts/pair_overlap.py: how often a pair chosen for one objective is also preferred on the others."""
from alignment.grid_data import Rated, best_worst, contrastive
from alignment.objectives import OBJECTIVES
from scripts.pair_overlap import agreement, has_discordant


def rated(ranks: dict[str, dict[str, int]]) -> Rated:
    return Rated("a message", {r: f"reply {r}" for r in "abc"}, ranks, "corpus-labels")


def test_a_pair_better_on_everything_agrees_everywhere_and_offers_no_discordant_pair():
    item = rated({o: {"a": 1, "b": 2, "c": 3} for o in OBJECTIVES})
    n, share = agreement([item], "empathy", best_worst)
    assert n == 1 and all(v == 1.0 for v in share.values())
    assert not has_discordant(item, "empathy")


def test_ties_count_half_and_reversed_objectives_count_zero():
    ranks = {o: {"a": 1, "b": 2, "c": 3} for o in OBJECTIVES}
    ranks["safety"] = {"a": 3, "b": 2, "c": 1}  # safety prefers c over a: the empathy pair (a, c) disagrees there
    ranks["trust_rapport"] = {"a": 1, "b": 1, "c": 1}  # one rank for all: a tie
    item = rated(ranks)
    _, share = agreement([item], "empathy", best_worst)
    assert share["safety"] == 0.0 and share["trust_rapport"] == 0.5 and share["active_listening"] == 1.0


def test_a_discordant_pair_is_found_and_contrastive_selection_takes_it():
    ranks = {o: {"a": 3, "b": 2, "c": 1} for o in OBJECTIVES}
    ranks["empathy"] = {"a": 1, "b": 2, "c": 3}  # empathy alone prefers a; every other objective prefers c
    item = rated(ranks)
    assert has_discordant(item, "empathy") and not has_discordant(item, "safety")
    n, share = agreement([item], "empathy", contrastive)
    assert n == 1 and share["empathy"] == 1.0 and share["safety"] == 0.0


def test_no_pair_when_every_reply_shares_a_rank():
    item = rated({o: {"a": 1, "b": 1, "c": 1} for o in OBJECTIVES})
    assert agreement([item], "empathy", best_worst)[0] == 0
