"""`attune eval tune` (evals/tune.py): own-objective gains and steering accuracy per candidate store, from the
training reward model's scores on rm-val prompts."""
from __future__ import annotations

import numpy as np

from alignment.objectives import OBJECTIVES
from evals import tune


def _scores(n: int, lift: dict[int, float], rng) -> np.ndarray:
    s = 3.0 + 0.1 * rng.standard_normal((n, len(OBJECTIVES)))
    for k, v in lift.items():
        s[:, k] += v
    return s


def test_a_store_that_steers_beats_one_that_does_not():
    rng = np.random.default_rng(0)
    n = 60
    emphasis = {o: f"modpo-{o}" for o in OBJECTIVES}
    base = _scores(n, {}, rng)
    steers = {"base": base, **{f"modpo-{o}": _scores(n, {k: 0.5}, rng) for k, o in enumerate(OBJECTIVES)}}
    # every adapter lifts the same objective (what correlated rankings do): own gain only for that one
    same = {"base": base, **{f"modpo-{o}": _scores(n, {3: 0.5}, rng) for o in OBJECTIVES}}
    good = tune.candidate_report(steers, emphasis, resamples=200, seed=0)
    flat = tune.candidate_report(same, emphasis, resamples=200, seed=0)
    assert good["mean_accuracy"] > 0.9 and flat["mean_accuracy"] < 0.4
    assert all(g["largest_is_own"] and g["low"] > 0.3 for g in good["own_gain"].values())
    assert sum(g["largest_is_own"] for g in flat["own_gain"].values()) == 1
    safety = good["own_gain"]["modpo-safety"]["safety"]
    assert safety["gain"] == good["own_gain"]["modpo-safety"]["gain"] and safety["low"] > 0.3
    assert abs(good["own_gain"]["modpo-empathy"]["safety"]["gain"]) < 0.1
    md = tune.markdown({"meta": {"prompts": n, "max_tokens": 64, "engine": "hf", "scorer": "reward_model"},
                        "candidates": {"steers": good, "flat": flat}})
    assert "## `steers`" in md and "| `modpo-empathy` | empathy | +0.4" in md and "| yes | 1.00 [1.00, 1.00] |" in md
