"""The crisis detector: window texts, threshold calibration, the data's splits and labels, a few training steps
with a save/load round trip, and (when shipped) the detector's figures on our own val split."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from alignment.crisis_training import (CRISIS_DIR, CrisisExample, CrisisTrainArgs, calibrate, fix_splits,
                                       load_authored_crisis, recalibrate, second_pass_agreement, train_detector,
                                       windows)
from serving.safety import window_texts


def test_window_texts_keep_the_last_turns_alone_and_joined():
    assert window_texts([], 3) == []
    assert window_texts(["a"], 3) == ["a"]
    assert window_texts(["a", "b", " ", "c", "d"], 3) == ["b", "c", "d", "b\nc\nd"]
    assert window_texts(["a", "b"], 1) == ["b"]


def test_calibrate_picks_the_highest_threshold_with_the_target_recall():
    probs = np.array([0.9, 0.8, 0.3, 0.7, 0.2, 0.1])
    labels = np.array([True, True, True, True, False, False])
    assert calibrate(probs, labels, 1.0) == 0.3
    assert calibrate(probs, labels, 0.75) == 0.7  # one of four may be missed
    with pytest.raises(ValueError, match="no risk"):
        calibrate(probs, np.zeros(6, dtype=bool), 0.99)


def test_a_margin_keeps_the_recall_when_the_probabilities_move_a_little():
    """The threshold sits `margin` logits below the risk message it was calibrated on, so a shift of the detector's
    numbers smaller than that (another CPU, bf16) loses no risk message; a larger one can."""
    probs = np.array([0.9, 0.8, 0.3, 0.7, 0.2, 0.1])
    labels = np.array([True, True, True, True, False, False])
    t = calibrate(probs, labels, 1.0, margin=0.15)
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    assert t < 0.3 and logit(0.3) - logit(t) == pytest.approx(0.15)
    shifted = 1 / (1 + np.exp(-(logit(probs) - 0.1)))  # every logit 0.1 lower
    assert (shifted[labels] >= t).all() and not (shifted[labels] >= calibrate(probs, labels, 1.0)).all()
    assert calibrate(probs, labels, 1.0, margin=0.0) == 0.3
    with pytest.raises(ValueError, match="margin"):
        calibrate(probs, labels, 1.0, margin=-1)


def test_fix_splits_is_stratified_and_keeps_given_splits(tmp_path):
    rows = [{"id": f"x-{i}", "category": "a" if i < 20 else "b", "label": "risk", "message": f"m{i}"}
            for i in range(40)]
    rows[0]["split"] = "test"
    path = tmp_path / "authored-x.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert fix_splits(path) == 39
    got = [json.loads(line) for line in path.read_text().splitlines()]
    assert got[0]["split"] == "test"
    for cat in ("a", "b"):
        splits = [r["split"] for r in got if r["category"] == cat]
        assert 12 <= splits.count("train") <= 15 and splits.count("val") >= 2 and splits.count("test") >= 2
    assert fix_splits(path) == 0  # idempotent


def test_shipped_crisis_data_covers_the_taxonomy_with_splits_and_a_second_pass():
    ex = load_authored_crisis()
    cats = {e.category for e in ex if e.risk}
    for needed in ("si_passive", "si_active", "si_plan_means", "si_preparatory", "nssi", "ed_restriction",
                   "ed_purging", "ed_concealment", "overdose_misuse", "dangerous_challenge", "third_person",
                   "means_question", "indirect", "slang_misspelling"):
        assert needed in cats
    negs = {e.category for e in ex if not e.risk}
    assert {"idiom", "grief", "medication_neutral", "fiction_venting", "greeting", "everyday"} <= negs
    for split in ("train", "val", "test"):
        part = [e for e in ex if e.split == split]
        assert any(e.risk for e in part) and any(not e.risk for e in part)
    assert len({e.id for e in ex}) == len(ex)
    a = second_pass_agreement()
    assert a["n"] == len(ex) and a["kappa"] >= 0.8


def test_windows_mix_risk_and_ordinary_turns():
    ex = [CrisisExample(f"r{i}", f"risk {i}", True, "t", "c", "train") for i in range(3)]
    ex += [CrisisExample(f"n{i}", f"none {i}", False, "t", "c", "train") for i in range(3)]
    w = windows(ex, 9)
    assert len(w) == 9 and all("\n" in e.text for e in w)
    assert sum(e.risk for e in w) == 6  # ordinary then risk, risk then ordinary: risk; two ordinary: none


def test_a_few_training_steps_run_calibrate_and_round_trip(tmp_path):
    from alignment.crisis import CrisisClassifier

    train = [CrisisExample(f"r{i}", t, True, "t", "c", "train") for i, t in enumerate(
        ["I want to kill myself", "I have been cutting again", "I saved up my pills"])]
    train += [CrisisExample(f"n{i}", t, False, "t", "c", "train") for i, t in enumerate(
        ["My exam is tomorrow", "Hello there", "My dog died last week"])]
    val = [CrisisExample("v1", "I don't want to be alive", True, "t", "c", "val"),
           CrisisExample("v2", "Work was busy", False, "t", "c", "val")]
    model, meta = train_detector({"train": train, "val": val}, args=CrisisTrainArgs(max_steps=2, batch_size=4),
                                 log=lambda m: None)
    assert meta["steps"] == 2 and 0.0 <= model.config.near_threshold <= model.config.threshold <= 1.0
    assert meta["calibration"]["recall"] == 1.0
    model.save(tmp_path / "crisis")
    again = CrisisClassifier.load(tmp_path / "crisis")
    texts = ["I want to kill myself", "Hello there\nI saved up my pills"]
    assert np.allclose(model.prob(texts), again.prob(texts), atol=1e-5)
    assert again.config.threshold == model.config.threshold

    # recalibrated without training: thresholds and meta change, the weights' files do not
    weights = {f: (tmp_path / "crisis" / f).read_bytes() for f in ("head.safetensors", "lora.safetensors")}
    calibration = recalibrate(again, val, CrisisTrainArgs(threshold_margin=1.0))
    again.save_config(tmp_path / "crisis")
    third = CrisisClassifier.load(tmp_path / "crisis")
    assert third.config.threshold == again.config.threshold < model.config.threshold
    assert calibration["margin_logits"] == 1.0 and "recalibrated" in third.meta["calibration"]
    assert third.meta["steps"] == 2 and third.meta["args"]["threshold_margin"] == 1.0
    assert {f: (tmp_path / "crisis" / f).read_bytes() for f in weights} == weights


SHIPPED = Path(__file__).resolve().parents[2] / "adapters" / "store" / "crisis"


@pytest.mark.skipif(not (SHIPPED / "config.json").exists(), reason="no shipped crisis detector")
def test_shipped_detector_with_rules_meets_recall_on_our_val_split():
    """What serving does (detector at its threshold, or a crisis rule) on our val split: recall >= 0.99."""
    from alignment.crisis import CrisisClassifier
    from serving.safety import CrisisRules

    model = CrisisClassifier.load(SHIPPED)
    val = [e for e in load_authored_crisis(CRISIS_DIR) if e.split == "val"]
    probs = model.prob([e.text for e in val])
    rules = CrisisRules()
    flagged = [p >= model.config.threshold or bool(rules.match(e.text)) for e, p in zip(val, probs)]
    risk = [f for f, e in zip(flagged, val) if e.risk]
    assert sum(risk) / len(risk) >= 0.99


@pytest.mark.skipif(not (SHIPPED / "config.json").exists(), reason="no shipped crisis detector")
def test_shipped_detector_moves_less_than_its_margin_between_float32_and_bf16():
    """The detector runs under bf16 autocast where the CPU has bf16 and in float32 elsewhere
    (alignment.basemodel.autocast_bf16); its threshold sits 0.15 logits below the val message it was calibrated on,
    so the two numerics must differ by less than that."""
    from alignment.crisis import CrisisClassifier

    model = CrisisClassifier.load(SHIPPED)
    val = [e.text for e in load_authored_crisis(CRISIS_DIR) if e.split == "val"][:32]
    logits = {}
    for bf16 in (False, True):
        model.bf16_autocast = bf16
        with torch.inference_mode():
            logits[bf16] = model.logits(val).numpy()
    margin = model.meta["calibration"]["margin_logits"]
    assert 0 < np.abs(logits[True] - logits[False]).max() < margin
