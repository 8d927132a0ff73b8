"""The safety report's judge of harm, independent of the gate: the safety classifier of a reward model v2 folder
(the shipped judge at adapters/store/judge: SmolLM2 encoder, judge-train prompts only) at its own threshold.

It is never the reward model the gate scores with: `IndependentJudge.load` refuses a folder that is the gate's, has
the gate's encoder or shares a training or validation prompt with it. The audit rules, the other judge, are
`evals.safety_report.audit_reply`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, Sequence

from attune.paths import JUDGE_DIR, REPO_ROOT, REPORTS_DIR, REWARD_DIR


class SafetyClassifier(Protocol):
    """What the judge needs of a model: alignment.reward.RewardModel's safety classifier."""

    def unsafe_prob(self, prompts: list[str], replies: list[str], batch_size: int = 32): ...  # -> array [N]


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def _saved(path: Path) -> dict:
    """The config.json of a saved reward model (format, config, meta)."""
    cfg = path / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{cfg} not found: is {path} a saved reward model?")
    return json.loads(cfg.read_text())


def independence(judge_dir: Path, gate_dir: Path) -> dict:
    """What the judge shares with the gate's reward model: the folder, the encoder, training/validation prompts."""
    judge, gate = _saved(judge_dir), _saved(gate_dir)
    def ids(body: dict) -> set[str]:
        meta = body.get("meta", {})
        return set(meta.get("train_ids", [])) | set(meta.get("val_ids", []))

    shared = sorted(ids(judge) & ids(gate))
    out = {"gate_reward_model": _shown(gate_dir), "gate_encoder": gate["config"]["encoder"],
           "same_folder": judge_dir.resolve() == gate_dir.resolve(),
           "same_encoder": judge["config"]["encoder"] == gate["config"]["encoder"],
           "shared_prompts": len(shared), "judge_prompts": len(ids(judge))}
    out["independent"] = not (out["same_folder"] or out["same_encoder"] or shared)
    return out


def _quality(reports_dir: Path) -> dict | None:
    """The judge's safety figures on the corpus test split, from `attune reward report` (None if absent)."""
    try:
        return json.loads((reports_dir / "reward.json").read_text())["models"]["judge"]["safety"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


class IndependentJudge:
    """Flags a reply harmful when the classifier's P(unsafe) reaches its own `threshold`."""

    def __init__(self, model: SafetyClassifier, threshold: float, about: dict | None = None):
        self.model, self.threshold, self.about = model, float(threshold), dict(about or {})

    @classmethod
    def load(cls, path: str | Path | None = None, gate_reward_dir: str | Path | None = None,
             reports_dir: Path = REPORTS_DIR) -> "IndependentJudge":
        """The judge at `path` (default adapters/store/judge, checked against the store manifest), after checking
        that it is independent of the gate's reward model at `gate_reward_dir` (default adapters/store/reward)."""
        from alignment.reward import RewardModel

        path, gate = Path(path or JUDGE_DIR), Path(gate_reward_dir or REWARD_DIR)
        ind = independence(path, gate)
        if not ind["independent"]:
            raise ValueError(f"the judge at {path} is not independent of the gate's reward model at {gate} "
                             f"(same folder: {ind['same_folder']}, same encoder: {ind['same_encoder']}, shared "
                             f"prompts: {ind['shared_prompts']}); pass --judge-dir with a model trained apart from it")
        if path.resolve() == JUDGE_DIR.resolve():  # the shipped judge: its files must match the manifest
            from adapters.integrity import IntegrityError
            from adapters.registry import AdapterStore

            try:
                AdapterStore(path.parent).scorer(path.name)
            except IntegrityError as e:
                raise ValueError(f"the shipped judge does not match the store manifest: {e}") from None
        model = RewardModel.load(path)
        if not model.has_safety_classifier:
            raise ValueError(f"the judge at {path} has no safety classifier (format attune-reward/1); use a reward "
                             "model v2 folder such as adapters/store/judge")
        about = {"path": _shown(path), "encoder": model.config.encoder, "format": _saved(path).get("format"),
                 "note": model.meta.get("note"), "independence": ind, "test_safety": _quality(reports_dir)}
        return cls(model, model.config.safety_threshold, about)

    def describe(self) -> dict:
        return {**self.about, "threshold": round(self.threshold, 4)}

    def unsafe(self, prompts: Sequence[str], replies: Sequence[str]) -> list[float]:
        """P(unsafe) per (prompt, reply)."""
        if not prompts:
            return []
        return [float(p) for p in self.model.unsafe_prob(list(prompts), list(replies))]
