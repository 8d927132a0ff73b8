"""The serving scorer: with a safety classifier (reward model v2) the gate's "safety" score is the classifier's view
on the 1-5 scale and the gate threshold comes from the classifier's rm-val threshold; the shipped reward folder is
refused when its files no longer match the store manifest."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from adapters.integrity import IntegrityError
from alignment.objectives import OBJECTIVES
from serving.scorer import Scorer, classifier_scale


class _Config:
    safety_threshold = 0.25


class V2Like:
    crisis_threshold = 0.5
    has_safety_classifier = True
    config = _Config()

    def score(self, prompts, replies):
        return np.full((len(prompts), len(OBJECTIVES)), 3.0)

    def unsafe_prob(self, prompts, replies):
        return np.array([0.9 if "jump" in r else 0.05 for r in replies])

    def score_and_unsafe(self, prompts, replies):
        return self.score(prompts, replies), self.unsafe_prob(prompts, replies)

    def crisis_prob(self, messages):
        return np.zeros(len(messages))


def test_the_classifier_drives_the_safety_score_and_the_gate_threshold():
    scorer = Scorer(V2Like())
    rows = scorer.score(["I feel low."] * 2, ["That sounds heavy.", "Just jump."])
    assert rows[0]["safety"] == pytest.approx(classifier_scale(0.05)) and rows[1]["safety"] == pytest.approx(1.4)
    assert rows[0]["empathy"] == 3.0 and set(rows[0]) == set(OBJECTIVES)
    threshold, detail = scorer.classifier_threshold()
    assert threshold == pytest.approx(4.0) and detail["method"] == "safety classifier"
    assert rows[0]["safety"] >= threshold > rows[1]["safety"]


def test_a_model_without_classifier_keeps_its_safety_head():
    class V1Like(V2Like):
        has_safety_classifier = False

    scorer = Scorer(V1Like())
    assert scorer.classifier_threshold() is None
    assert scorer.score(["x"], ["Just jump."])[0]["safety"] == 3.0


def test_the_shipped_reward_folder_must_match_the_manifest(tmp_path, monkeypatch):
    from attune import paths

    store = tmp_path / "store"
    shutil.copytree(paths.STORE_DIR, store, ignore=shutil.ignore_patterns("modpo-*", "dpo-*", "sft", "soup-*",
                                                                            "joint-*", "judge"))
    monkeypatch.setattr(paths, "REWARD_DIR", store / "reward")
    Scorer.load(store / "reward")
    with open(store / "reward" / "heads.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    with pytest.raises(IntegrityError, match="heads.safetensors"):
        Scorer.load(store / "reward")


@pytest.mark.asyncio
async def test_the_shipped_reward_model_lets_the_service_start_with_its_fallback_reply():
    """What ChatService.ensure_started checks, with the shipped model and its threshold as the scorer deployment
    serves them: a fallback reply that this model scored below its threshold would keep the service from starting."""
    from serving.config import ServeConfig
    from serving.safety import FALLBACK_REPLY
    from serving.streaming import FALLBACK_PROBES, GateSetup, ScorerInfo

    scorer = Scorer.load()
    threshold, detail = scorer.classifier_threshold()
    setup = GateSetup.build(ServeConfig(), ScorerInfo(scorer.crisis_threshold, threshold, detail))

    async def score(prompt: str, reply: str) -> dict[str, float]:
        return scorer.score([prompt], [reply])[0]

    await setup.verify_fallback(score)
    safety = [r["safety"] for r in scorer.score(list(FALLBACK_PROBES), [FALLBACK_REPLY] * len(FALLBACK_PROBES))]
    assert min(safety) >= threshold + 0.5, f"little margin: {safety} against {threshold:.3f}"


def test_the_scorer_folds_the_reward_models_lora_into_its_encoder_and_scores_as_before(tmp_path):
    """Scorer.load merges the reward model's LoRA (faster gate scoring): the same scores as the model loaded for
    training, and the merged model refuses to be saved. The crisis detector keeps the form it was calibrated in."""
    from alignment.reward import RewardModel
    from attune import paths

    scorer = Scorer.load()
    assert scorer.reward_model.merged and not hasattr(scorer.reward_model.encoder, "merge_and_unload")
    assert hasattr(scorer.crisis_model.encoder, "merge_and_unload")
    prompts = ["I can't sleep and work keeps piling up.", "I don't see the point of anything anymore."]
    replies = ["That sounds exhausting; what has been hardest this week?", "Have you tried just ignoring it?"]
    unmerged = RewardModel.load(paths.REWARD_DIR)
    assert not unmerged.merged and hasattr(unmerged.encoder, "merge_and_unload")
    want = unmerged.score_and_unsafe(prompts, replies)
    got = scorer.reward_model.score_and_unsafe(prompts, replies)
    np.testing.assert_allclose(got[0], want[0], atol=1e-4)
    np.testing.assert_allclose(got[1], want[1], atol=1e-5)
    with pytest.raises(RuntimeError, match="merged for inference"):
        scorer.reward_model.save(tmp_path / "reward")
    with pytest.raises(RuntimeError, match="merged for inference"):
        scorer.reward_model.crisis_prob(prompts)
