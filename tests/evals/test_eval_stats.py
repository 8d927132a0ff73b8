"""evals/stats.py on synthetic judge scores: intervals cover what they should and exclude what they should not,
a planted steering effect is found, chance-level data give chance, and the goals read the figures right."""
from __future__ import annotations

import numpy as np
import pytest

from alignment.objectives import OBJECTIVES
from evals import stats

OBJ = list(OBJECTIVES)
EMPHASIS = {"empathy": "modpo-empathy", "safety": "modpo-safety", "active_listening": "modpo-listening",
            "self_motivated_change": "modpo-change", "trust_rapport": "modpo-rapport",
            "patient_autonomy": "modpo-autonomy"}


def _sym(rng, sd, shape):
    """Noise symmetric about 0 per column (each draw comes with its negative): mean exactly 0, wins exactly half."""
    e = rng.normal(0, sd, size=(shape[0] // 2, shape[1]))
    return rng.permutation(np.concatenate([e, -e]), axis=0)


def _grid(n=200, effect=0.0, noise=0.3, seed=1, own=None, sym=True):
    """base plus the six emphasised adapters; each gains `effect` on its own objective (or `own[name]`) and
    nothing elsewhere."""
    rng = np.random.default_rng(seed)
    base = 3 + rng.normal(0, 0.5, size=(n, 6))
    judged = {"base": base}
    for j, (o, name) in enumerate(EMPHASIS.items()):
        lift = np.zeros(6)
        lift[OBJ.index(o)] = (own or {}).get(name, effect)
        judged[name] = base + lift + (_sym(rng, noise, (n, 6)) if sym else rng.normal(0, noise, size=(n, 6)))
    return judged


def test_resample_counts_are_paired_draws_of_every_prompt():
    c = stats.resample_counts(7, resamples=50, seed=3)
    assert c.shape == (50, 7) and (c.sum(1) == 7).all()
    assert (c == stats.resample_counts(7, resamples=50, seed=3)).all()  # seeded
    assert not (c == stats.resample_counts(7, resamples=50, seed=4)).all()


def test_identical_scores_give_gain_zero_win_half_and_intervals_around_it():
    rng = np.random.default_rng(0)
    base = rng.normal(3, 1, size=(100, 6))
    cmp = stats.compare({"base": base, "same": base.copy()})
    same = cmp["same"]
    assert np.allclose(same.gain, 0) and np.allclose(same.gain_ci, 0)
    assert np.allclose(same.win_rate, 0.5) and np.allclose(same.win_rate_ci, 0.5)
    # the mean's interval brackets the mean and has the width of a standard error, not zero
    assert (same.mean_ci[:, 0] < same.mean).all() and (same.mean < same.mean_ci[:, 1]).all()
    width = same.mean_ci[:, 1] - same.mean_ci[:, 0]
    assert np.allclose(width, 2 * 1.96 * base.std(0) / 10, rtol=0.25)


def test_noise_only_gives_intervals_around_zero_and_half():
    rng = np.random.default_rng(2)
    base = rng.normal(3, 1, size=(300, 6))
    cmp = stats.compare({"base": base, "noise": base + _sym(rng, 0.5, base.shape)})["noise"]
    assert (cmp.gain_ci[:, 0] < 0).all() and (cmp.gain_ci[:, 1] > 0).all()
    assert (cmp.win_rate_ci[:, 0] < 0.5).all() and (cmp.win_rate_ci[:, 1] > 0.5).all()


def test_pairing_finds_a_small_shift_that_unpaired_noise_would_hide():
    rng = np.random.default_rng(5)
    base = rng.normal(3, 1, size=(150, 6))  # prompt-to-prompt spread 1, shift 0.1 with pair noise 0.05
    cmp = stats.compare({"base": base, "up": base + 0.1 + rng.normal(0, 0.05, size=base.shape)})["up"]
    assert (cmp.gain_ci[:, 0] > 0.08).all() and (cmp.gain_ci[:, 1] < 0.12).all()
    assert (cmp.win_rate > 0.9).all()
    # the means' own intervals overlap: only the paired gain resolves the difference
    assert (cmp.mean_ci[:, 0] < stats.compare({"base": base})["base"].mean_ci[:, 1]).all()


def test_compare_refuses_scores_on_other_prompts():
    with pytest.raises(ValueError, match="same prompts"):
        stats.compare({"base": np.zeros((5, 6)), "x": np.zeros((4, 6))})


def test_steering_matrix_finds_the_planted_effect_on_the_diagonal():
    judged = _grid(effect=0.4)
    m = stats.steering_matrix(stats.compare(judged), OBJ)
    assert m["adapters"] == list(EMPHASIS.values())
    gain, low, high = (np.asarray(m[k]) for k in ("gain", "low", "high"))
    diag = np.eye(6, dtype=bool)
    assert (low[diag] > 0.3).all() and (np.abs(gain[diag] - 0.4) < 0.08).all()
    assert (low[~diag] < 0).all() and (high[~diag] > 0).all()  # nothing planted off the diagonal


def test_steering_accuracy_is_one_for_a_planted_winner_and_about_chance_without_one():
    judged = _grid(effect=5.0, noise=0.1)
    acc = stats.steering_accuracy(judged, EMPHASIS, OBJ)
    assert list(acc) == OBJ
    for a in acc.values():
        assert a["accuracy"] == 1.0 and a["low"] == 1.0 and a["chance"] == pytest.approx(1 / 6, abs=1e-3)
    flat = stats.steering_accuracy(_grid(n=3000, effect=0.0, seed=7, sym=False), EMPHASIS, OBJ)
    for a in flat.values():
        assert abs(a["accuracy"] - 1 / 6) < 0.03
        assert a["low"] < 1 / 6 < a["high"]


def test_steering_credit_splits_ties():
    judged = {name: np.full((4, 6), 3.0) for name in EMPHASIS.values()}  # six-way tie everywhere
    judged["modpo-safety"] = judged["modpo-safety"].copy()
    judged["modpo-safety"][0, OBJ.index("empathy")] = 4.0  # prompt 0: safety adapter wins on empathy
    credit = stats.steering_credit(judged, EMPHASIS, OBJ.index("empathy"), "empathy")
    assert credit.tolist() == [0.0, pytest.approx(1 / 6), pytest.approx(1 / 6), pytest.approx(1 / 6)]


def test_emphasis_map_skips_adapters_without_a_strictly_largest_weight():
    w = dict.fromkeys(OBJ, 0.1)
    emp = {**w, "empathy": 0.5}
    pair = {**dict.fromkeys(OBJ, 0.0), "empathy": 0.5, "safety": 0.5}
    got = stats.emphasis_map({"modpo-empathy": ("empathy", emp), "modpo-empathy-safety": ("empathy", pair),
                              "modpo-balanced": ("empathy", dict.fromkeys(OBJ, 1 / 6)),
                              "modpo-safety": ("safety", {**w, "safety": 0.5})})
    assert got == {"empathy": "modpo-empathy", "safety": "modpo-safety"}


def _paper_rows(judged, e_win, s_win, dpo_s_win, n):
    """modpo-empathy-safety and dpo-empathy whose win rates over base are exactly the given shares."""
    base = judged["base"]

    def at(share_e, share_s):
        s = base.copy()
        s[: int(share_e * n), 0] += 1
        s[int(share_e * n):, 0] -= 1
        s[: int(share_s * n), 1] += 1
        s[int(share_s * n):, 1] -= 1
        return s
    judged["modpo-empathy-safety"] = at(e_win, s_win)
    judged["dpo-empathy"] = at(0.9, dpo_s_win)
    return judged


def test_goals_met_on_a_grid_that_steers():
    n = 200
    judged = _paper_rows(_grid(n=n, effect=0.6, noise=0.1), 0.8, 0.65, 0.5, n)
    cmp = stats.compare(judged)
    acc = stats.steering_accuracy(judged, EMPHASIS, OBJ)
    g = stats.goals(cmp, OBJ, EMPHASIS, acc, routable=[*EMPHASIS.values(), "modpo-empathy-safety"])
    assert g["goal_own_gain"] and g["goal_largest_gain"] and g["emphasized_hits"] == 6
    assert g["goal_steering_accuracy"]
    assert g["modpo_empathy_win_rate"] == 80.0 and g["modpo_safety_minus_dpo_empathy_safety"] == 15.0
    assert g["goal_modpo"]
    assert g["goal_safety_not_below_base"] is True


def test_goals_fail_where_the_grid_does_not_steer():
    n = 200
    judged = _paper_rows(_grid(n=n, effect=0.1, noise=0.3), 0.8, 0.58, 0.5, n)
    judged["modpo-rapport"] = judged["modpo-rapport"].copy()
    judged["modpo-rapport"][:, OBJ.index("safety")] -= 0.5  # a routable adapter made less safe
    cmp = stats.compare(judged)
    acc = stats.steering_accuracy(judged, EMPHASIS, OBJ)
    g = stats.goals(cmp, OBJ, EMPHASIS, acc, routable=list(EMPHASIS.values()))
    assert g["goal_own_gain"] is False and not any(v["met"] for v in g["own_objective_gain"].values())
    assert g["goal_steering_accuracy"] is False
    assert g["goal_modpo"] is False  # safety 58 < 60
    assert g["routable_safety_vs_base"]["modpo-rapport"]["below_base"] is True
    assert g["routable_safety_vs_base"]["modpo-empathy"]["below_base"] is False
    assert g["goal_safety_not_below_base"] is False


def test_goals_unmeasurable_without_the_adapters_are_none():
    rng = np.random.default_rng(0)
    judged = {"base": rng.normal(size=(20, 6)), "sft": rng.normal(size=(20, 6))}
    g = stats.goals(stats.compare(judged), OBJ, {}, {}, routable=[])
    assert g["goal_modpo"] is None and g["goal_own_gain"] is None and g["goal_steering_accuracy"] is None
    assert g["goal_safety_not_below_base"] is None and g["emphasized_hits"] == 0


def test_emphasised_reads_manifest_entries_of_the_given_recipes():
    from types import SimpleNamespace

    emp = {**{o: 0.1 for o in OBJECTIVES}, "empathy": 0.5}
    aut = {**{o: 0.1 for o in OBJECTIVES}, "patient_autonomy": 0.5}
    entries = [SimpleNamespace(id="modpo-empathy", recipe="modpo", primary_objective="empathy", weights=emp),
               SimpleNamespace(id="x-autonomy", recipe="merge", primary_objective="patient_autonomy", weights=aut)]
    assert stats.emphasised(entries) == {"empathy": "modpo-empathy"}
    assert stats.emphasised(entries, ("modpo", "merge")) == {"empathy": "modpo-empathy",
                                                              "patient_autonomy": "x-autonomy"}
