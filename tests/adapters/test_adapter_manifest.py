"""Manifest schema: each invalid field is refused with a message naming it; saving is stable."""
from __future__ import annotations

import json

import pytest

from adapters.manifest import (AdapterManifest, ManifestError, StoreManifest, dumps, load_manifest,
                               parse_manifest, save_manifest)
from lora_helpers import BALANCED, entry

DIGEST = "0" * 64


def full(adapter_id="a1", **over):
    e = entry(adapter_id, lora={"r": 8, "alpha": 16, "target_modules": ["q_proj"]},
              files={"adapter_config.json": DIGEST, "adapter_model.safetensors": DIGEST})
    e.update(over)
    return e


def error_of(data) -> str:
    with pytest.raises(ManifestError) as exc:
        parse_manifest(data, "test manifest")
    return str(exc.value)


def test_valid_entry_round_trips(tmp_path):
    m = StoreManifest(adapters=[AdapterManifest(**full("b2")), AdapterManifest(**full("a1"))])
    save_manifest(m, tmp_path / "manifest.json")
    text = (tmp_path / "manifest.json").read_text()
    assert load_manifest(tmp_path / "manifest.json") == StoreManifest.model_validate(json.loads(text))
    assert [a["id"] for a in json.loads(text)["adapters"]] == ["a1", "b2"]
    assert text == dumps(load_manifest(tmp_path / "manifest.json"))
    assert sorted(json.loads(text)) == list(json.loads(text))


def test_negative_weight_names_field_and_objective():
    msg = error_of({"adapters": [full(weights={**BALANCED, "empathy": -0.1, "safety": 1 / 6 + 0.1})]})
    assert "adapters.0.weights" in msg and "'empathy'" in msg and ">= 0" in msg


def test_weights_not_summing_to_one():
    msg = error_of({"adapters": [full(weights={o: 0.5 for o in BALANCED})]})
    assert "adapters.0.weights" in msg and "sum to 3.0000" in msg


def test_unknown_and_missing_objectives():
    msg = error_of({"adapters": [full(weights={**BALANCED, "humour": 0.0})]})
    assert "unknown objective" in msg and "humour" in msg
    partial = {"empathy": 0.5, "safety": 0.5}
    assert "missing objective" in error_of({"adapters": [full(weights=partial)]})
    assert "primary_objective" in error_of({"adapters": [full(primary_objective="humour")]})


def test_duplicate_ids_refused():
    msg = error_of({"adapters": [full("same"), full("same"), full("other")]})
    assert "duplicate adapter id" in msg and "'same'" in msg and "other" not in msg


@pytest.mark.parametrize("field,value,needle", [
    ("id", "Bad Id", "not a slug"),
    ("id", "../escape", "not a slug"),
    ("recipe", "rlhf", "recipe"),
    ("created", "yesterday", "ISO 8601"),
    ("files", {"../x": DIGEST}, "relative"),
    ("files", {"x": "abc"}, "sha256"),
    ("surprise", 1, "surprise"),
])
def test_field_errors(field, value, needle):
    msg = error_of({"adapters": [full(**{field: value})]})
    assert f"adapters.0.{field}" in msg and needle in msg


def test_merge_needs_weighted_parents():
    assert "adapters.0.parents" in error_of({"adapters": [full(recipe="merge")]})
    msg = error_of({"adapters": [full(recipe="merge", parents=["x", "y"])]})
    assert "adapters.0.parents" in msg and "weight for each parent" in msg


def test_merge_parents_accept_ids_and_weights():
    m = AdapterManifest(**full(recipe="merge", parents=[{"id": "x", "weight": 0.3}, {"id": "y", "weight": 0.7}]))
    assert [(p.id, p.weight) for p in m.parents] == [("x", 0.3), ("y", 0.7)]
    assert AdapterManifest(**full(parents=["x"])).parents[0].id == "x"


def test_profiles_validated_and_completed():
    m = StoreManifest(profiles={"calm": {"empathy": 0.8, "safety": 0.2}})
    assert m.profiles["calm"]["patient_autonomy"] == 0.0 and m.profile("calm")["empathy"] == 0.8
    assert "profile 'bad'" in error_of({"profiles": {"bad": {"empathy": 0.9}}})
    assert {"warm", "change", "autonomy", "balanced"} <= set(StoreManifest().profiles)
    with pytest.raises(KeyError, match="known profiles"):
        m.profile("nope")


def test_bad_json_says_where(tmp_path):
    (tmp_path / "manifest.json").write_text('{"version": 1,,}')
    with pytest.raises(ManifestError, match="line 1"):
        load_manifest(tmp_path / "manifest.json")
