"""`attune eval tune` (evals/tune.py): own-objective gains and steering accuracy per candidate store, from the
training reward model's scores on rm-val prompts."""
from __future__ import annotations

import json
import time

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


def test_prompt_styles_compare_base_under_each_objectives_instruction(tmp_path, monkeypatch):
    """`--prompt-styles`: base writes under each objective's style instruction, each scored as that objective's
    candidate; replies are cached per instruction text, so a changed instruction is generated anew."""
    from alignment import generate, pipeline, styles
    from alignment import prompts as P

    seen: dict[str, set[str]] = {}

    def fake_generate_each(base_model, adapters, conversations, settings, prefer_vllm=True, log=print):
        (name, adapter), = adapters.items()
        assert adapter is None  # base only: no adapter stands in for a style
        seen[name] = {c[0]["content"] for c in conversations}
        return {name: [f"reply {i} of {name}" for i in range(len(conversations))]}

    monkeypatch.setattr(generate, "generate_each", fake_generate_each)
    monkeypatch.setattr(pipeline, "RUNS_DIR", tmp_path / "runs")
    report = tune.tune([], limit=4, out=tmp_path, resamples=50, prefer_vllm=False, prompt_styles=True)
    assert seen.pop("base") == {P.SYSTEM_PROMPT}
    assert seen == {f"{tune.PROMPT_STYLES}/{o}": {styles.system_prompt(o)} for o in OBJECTIVES}
    candidate = report["candidates"][tune.PROMPT_STYLES]
    assert set(candidate["steering_accuracy"]) == set(OBJECTIVES) == {g["objective"] for g in
                                                                      candidate["own_gain"].values()}
    assert f"## `{tune.PROMPT_STYLES}`" in (tmp_path / "tuning.md").read_text()
    assert candidate["measured"] == time.strftime("%Y-%m-%d")
    seen.clear()
    tune.tune([], limit=4, out=tmp_path, resamples=50, prefer_vllm=False, prompt_styles=True)
    assert seen == {}  # all cached
    monkeypatch.setitem(styles.STYLE_INSTRUCTIONS, "safety", "Above all, be safe.")
    tune.tune([], limit=4, out=tmp_path, resamples=50, prefer_vllm=False, prompt_styles=True)
    assert set(seen) == {f"{tune.PROMPT_STYLES}/safety"}


def test_a_report_keeps_earlier_candidates_measured_the_same_way(tmp_path):
    meta = {"prompts": 74, "split": "rm-val", "scorer": "reward", "max_tokens": 64, "engine": "vllm"}
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps({"meta": meta, "candidates": {"old": {"mean_accuracy": 0.3},
                                                              "store": {"mean_accuracy": 0.2}}}))
    merged = tune.merged_report(path, {"meta": meta, "candidates": {"store": {"mean_accuracy": 0.25}}})
    assert merged["candidates"] == {"old": {"mean_accuracy": 0.3}, "store": {"mean_accuracy": 0.25}}
    other = {"meta": {**meta, "max_tokens": 96}, "candidates": {"store": {"mean_accuracy": 0.25}}}
    assert tune.merged_report(path, other) == other  # measured otherwise: nothing mixed in
    assert tune.merged_report(tmp_path / "absent.json", other) == other


def test_a_store_has_one_name_however_it_is_given(monkeypatch, tmp_path):
    from attune.paths import REPO_ROOT, STORE_DIR

    assert tune.candidate_name(STORE_DIR) == tune.candidate_name("adapters/store") == "adapters/store"
    monkeypatch.chdir(REPO_ROOT / "adapters")
    assert tune.candidate_name("store") == "adapters/store"
    assert tune.candidate_name(tmp_path / "s") == str((tmp_path / "s").resolve())
