"""Routing: nearest adapter by L1 after the safety floor, routable recipes only, ties by id."""
from __future__ import annotations

import pytest

from adapters.manifest import AdapterManifest
from adapters.matching import NoRoutableAdapter, nearest_adapter
from alignment.objectives import Preference
from lora_helpers import entry

LORA = {"r": 8, "alpha": 16, "target_modules": ["q_proj"]}


def adapter(adapter_id, recipe="modpo", **weights):
    return AdapterManifest(**entry(adapter_id, recipe, weights=weights, lora=LORA,
                                   parents=[{"id": "p", "weight": 1.0}] if recipe == "merge" else []))


def w(**kw):
    return {o: kw.get(o, 0.0) for o in ("empathy", "safety", "active_listening", "self_motivated_change",
                                         "trust_rapport", "patient_autonomy")}


def test_picks_nearest():
    warm = adapter("warm", **w(empathy=0.8, safety=0.2))
    change = adapter("change", **w(self_motivated_change=0.8, safety=0.2))
    best, d = nearest_adapter(Preference(w(empathy=0.7, safety=0.2, trust_rapport=0.1)), [change, warm], 0.2)
    assert best.id == "warm" and d == pytest.approx(0.2)


def test_safety_floor_applied_before_matching():
    no_safety = adapter("no-safety", **w(empathy=1.0))
    floored = adapter("floored", **w(empathy=0.7, safety=0.3))
    pref = Preference(w(empathy=1.0))
    best, d = nearest_adapter(pref, [no_safety, floored], 0.3)
    assert best.id == "floored" and d == pytest.approx(0.0)
    assert nearest_adapter(pref, [no_safety, floored], 0.0)[0].id == "no-safety"


def test_only_routable_recipes_by_default():
    sft = adapter("sft", "sft", **w(empathy=1.0))
    soup = adapter("soup", "soup", **w(safety=1.0))
    pref = Preference(w(empathy=1.0))
    assert nearest_adapter(pref, [sft, soup], 0.0)[0].id == "soup"
    assert nearest_adapter(pref, [sft, soup], 0.0, recipes=None)[0].id == "sft"
    with pytest.raises(NoRoutableAdapter, match="recipes present: \\['sft'\\]"):
        nearest_adapter(pref, [sft], 0.0)


def test_ties_broken_by_id_regardless_of_order():
    a = adapter("b-adapter", **w(empathy=0.5, safety=0.5))
    b = adapter("a-adapter", "merge", **w(trust_rapport=0.5, safety=0.5))
    pref = Preference(w(safety=1.0))
    assert nearest_adapter(pref, [a, b], 0.2)[0].id == "a-adapter"
    assert nearest_adapter(pref, [b, a], 0.2)[0].id == "a-adapter"
