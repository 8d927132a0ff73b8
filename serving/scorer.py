"""Online scoring for the safety gate: six objective scores per (message, reply) and a crisis probability
per message, from `alignment.reward.RewardModel` (or anything with its `score` / `crisis_prob` API).
`FaultyScorer` wraps a scorer to inject faults in tests and drills."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol, Sequence

from alignment.objectives import OBJECTIVES


class RewardModelLike(Protocol):
    crisis_threshold: float

    def score(self, prompts: list[str], replies: list[str]): ...  # -> array [N, 6] in OBJECTIVES order

    def crisis_prob(self, messages: list[str]): ...  # -> array [N]


def classifier_scale(unsafe_prob: float) -> float:
    """The safety classifier's P(unsafe) on the gate's 1-5 safety scale: 5 = surely safe, 1 = surely unsafe."""
    return 5.0 - 4.0 * float(unsafe_prob)


class ScorerError(RuntimeError):
    """The scorer could not produce scores; the gate treats the reply as unscored (fails closed)."""


class Scorer:
    """Plain-Python results around a reward model: [{objective: score}] and [probability]."""

    def __init__(self, reward_model: RewardModelLike, crisis_model=None):
        self.reward_model = reward_model
        self.crisis_model = crisis_model
        """The crisis detector (alignment.crisis.CrisisClassifier); None: the reward model's crisis head."""
        self.classifier = bool(getattr(reward_model, "has_safety_classifier", False))
        """With a safety classifier (reward model v2), the "safety" score is the classifier's view on the 1-5
        scale (classifier_scale), which is what the gate compares with its threshold."""

    def classifier_threshold(self) -> tuple[float, dict] | None:
        """The gate threshold on the 1-5 scale from the classifier's own (rm-val calibrated) threshold, or None."""
        if not self.classifier:
            return None
        gate = (getattr(self.reward_model, "meta", None) or {}).get("gate")
        if gate:  # chosen for a stated false-rejection rate (alignment.reward_training.calibrate_gate)
            t = float(gate["unsafe_prob_threshold"])
            return classifier_scale(t), {"method": "safety classifier, stated false-rejection rate",
                                         "split": gate["split"], "target_false_rejection": gate["target_false_rejection"],
                                         "unsafe_prob_threshold": round(t, 4), "threshold": round(classifier_scale(t), 4),
                                         "rm-val": gate["rm-val"], "test": gate["test"]}
        t = float(self.reward_model.config.safety_threshold)
        return classifier_scale(t), {"method": "safety classifier", "split": "rm-val (on-policy corpus)",
                                     "unsafe_prob_threshold": round(t, 4), "threshold": round(classifier_scale(t), 4)}

    @classmethod
    def load(cls, path: str | Path | None = None, *, crisis_path: str | Path | None = None,
             device: str | None = None, public_key: str | Path | None = None) -> "Scorer":
        """Load the shipped reward model (attune.paths.REWARD_DIR by default) and the crisis detector at
        `crisis_path` (default: the `crisis` folder beside the reward model, when there is one). Folders of the
        shipped store, and with `public_key` of any store, must match its manifest, signed by that key."""
        from alignment.crisis import CrisisClassifier
        from alignment.reward import RewardModel
        from attune.paths import REWARD_DIR

        path = Path(path or REWARD_DIR)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"no reward model at {path}: train one with `attune reward train` "
                                    "or pass the folder of a saved RewardModel")
        crisis = Path(crisis_path) if crisis_path else path.parent / "crisis"
        if crisis_path and not (crisis / "config.json").exists():
            raise FileNotFoundError(f"no crisis detector at {crisis}: train one with `attune crisis train`")
        for folder in (path, crisis):  # models in a store: their files must match its (signed) manifest
            shipped = folder.resolve().parent == Path(REWARD_DIR).resolve().parent
            in_store = shipped or (public_key is not None and (folder.parent / "manifest.json").is_file())
            if in_store and (folder / "config.json").exists():
                from adapters.registry import AdapterStore

                AdapterStore(folder.parent, public_key).scorer(folder.name)
        detector = CrisisClassifier.load(crisis, device=device) if (crisis / "config.json").exists() else None
        reward = RewardModel.load(path, device=device)
        # The reward model only scores here: its LoRA folded into the encoder's weights (fp32: the same scores to
        # ~1e-6, faster: benchmarks/reward_latency.py), unless its own crisis head is the detector (that head reads
        # the encoder without LoRA). The crisis detector is not merged: under bf16 autocast (where the hardware has
        # bf16) merging moved its probabilities by up to 0.007 and one val message fell below the threshold
        # calibrated for recall >= 0.99.
        if detector is not None:
            reward.merge_for_inference()
        return cls(reward, detector)

    @property
    def crisis_threshold(self) -> float:
        if self.crisis_model is not None:
            return float(self.crisis_model.config.threshold)
        return float(self.reward_model.crisis_threshold)

    @property
    def crisis_near_threshold(self) -> float | None:
        """Crisis probability from which a message is near the line (the safety path answers it); None without a
        crisis detector (serving.safety.CrisisDetector then uses its own default)."""
        return float(self.crisis_model.config.near_threshold) if self.crisis_model is not None else None

    @property
    def crisis_window(self) -> int:
        """Recent patient turns the detector reads."""
        return int(self.crisis_model.config.window_turns) if self.crisis_model is not None else 1

    def score(self, prompts: Sequence[str], replies: Sequence[str]) -> list[dict[str, float]]:
        if len(prompts) != len(replies):
            raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies; pass one reply per prompt")
        if not prompts:
            return []
        unsafe = None
        if self.classifier:  # one encoder pass for the six scores and the classifier
            rows, unsafe = self.reward_model.score_and_unsafe(list(prompts), list(replies))
        else:
            rows = self.reward_model.score(list(prompts), list(replies))
        if len(rows) != len(prompts) or any(len(r) != len(OBJECTIVES) for r in rows):
            raise ScorerError(f"reward model returned shape {getattr(rows, 'shape', len(rows))}, "
                              f"expected ({len(prompts)}, {len(OBJECTIVES)})")
        out = [{o: float(v) for o, v in zip(OBJECTIVES, row)} for row in rows]
        if unsafe is not None:
            for row, p in zip(out, unsafe):
                row["safety"] = classifier_scale(p)
        return out

    def crisis(self, messages: Sequence[str]) -> list[float]:
        if not messages:
            return []
        model = self.crisis_model
        probs = model.prob(list(messages)) if model is not None else self.reward_model.crisis_prob(list(messages))
        if len(probs) != len(messages):
            raise ScorerError(f"reward model returned {len(probs)} crisis probabilities for {len(messages)} messages")
        return [float(p) for p in probs]


class BatchingScorer:
    """The list-in, list-out shape that Ray Serve's `@serve.batch` needs: one call per batch of items.

    The scorer deployment wraps it as
        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
        async def score(self, items: list[tuple[str, str]]) -> list[dict[str, float]]:
            return self.batching.score_batch(items)
    so concurrent requests (including every sentence of every stream) share one encoder pass.
    """

    def __init__(self, scorer: Scorer):
        self.scorer = scorer

    def score_batch(self, items: Sequence[tuple[str, str]]) -> list[dict[str, float]]:
        return self.scorer.score([p for p, _ in items], [r for _, r in items])

    def crisis_batch(self, messages: Sequence[str]) -> list[float]:
        return self.scorer.crisis(messages)


class FaultyScorer:
    """A scorer with injected faults: force the safety score and/or crisis probability, or raise.

    Faults apply to the next `times` calls (None: until `disarm`). Thread-safe, so a test can arm it
    while requests run. Everything not forced comes from the wrapped scorer.
    """

    def __init__(self, inner: Scorer, *, safety: float | None = None, crisis_prob: float | None = None,
                 error: Exception | None = None, times: int | None = None):
        self.inner = inner
        self._lock = threading.Lock()
        self.calls = 0
        self.arm(safety=safety, crisis_prob=crisis_prob, error=error, times=times)

    @property
    def crisis_threshold(self) -> float:
        return self.inner.crisis_threshold

    def arm(self, *, safety: float | Sequence[float] | None = None, crisis_prob: float | None = None,
            error: Exception | None = None, times: int | None = None) -> None:
        """`safety` as a sequence: one forced score per `score` call, in order, then the fault ends."""
        with self._lock:
            if safety is not None and not isinstance(safety, (int, float)):
                safety = [float(v) for v in safety]
                times = len(safety)
            self.safety, self.crisis_prob, self.error, self.remaining = safety, crisis_prob, error, times

    def disarm(self) -> None:
        self.arm()

    def _fault(self, kind: str) -> tuple[float | None, Exception | None]:
        """(forced value, error) for a `score` or `crisis` call; a call with nothing armed uses no budget."""
        with self._lock:
            self.calls += 1
            value = self.safety if kind == "score" else self.crisis_prob
            if (value is None and self.error is None) or self.remaining == 0:
                return None, None
            if isinstance(value, list):
                value = value[len(value) - self.remaining]
            if self.remaining is not None:
                self.remaining -= 1
            return value, self.error

    def score(self, prompts: Sequence[str], replies: Sequence[str]) -> list[dict[str, float]]:
        safety, error = self._fault("score")
        if error is not None:
            raise error
        rows = self.inner.score(prompts, replies)
        return [{**r, "safety": safety} for r in rows] if safety is not None else rows

    def crisis(self, messages: Sequence[str]) -> list[float]:
        prob, error = self._fault("crisis")
        if error is not None:
            raise error
        return [prob] * len(messages) if prob is not None else self.inner.crisis(messages)
