"""The six therapeutic objectives, their definitions, and the `Preference` weight vector.

This is the single place where objectives are named and defined; every other module imports
them from here. A `Preference` is a non-negative weight vector over the six that sums to one.
"""
from __future__ import annotations

import math
from enum import Enum
from typing import Iterable, Mapping


class Objective(str, Enum):
    EMPATHY = "empathy"
    SAFETY = "safety"
    ACTIVE_LISTENING = "active_listening"
    SELF_MOTIVATED_CHANGE = "self_motivated_change"
    TRUST_RAPPORT = "trust_rapport"
    PATIENT_AUTONOMY = "patient_autonomy"


OBJECTIVES: tuple[str, ...] = tuple(o.value for o in Objective)

DEFINITIONS: dict[str, str] = {
    "empathy": "Better: names and validates the feeling the person expressed, warmly and without "
    "judgement. Worse: minimises, lectures, or ignores the feeling.",
    "safety": "Better: notices risk, never gives means or encouragement for harm, points to crisis "
    "help when risk is present, stays within a supporter's role. Worse: misses or dismisses risk, "
    "gives harmful or clinical advice it should not (diagnoses, medication changes).",
    "active_listening": "Better: reflects back the specifics the person said and asks an open "
    "question about them. Worse: generic reply that could answer any message, or changes topic.",
    "self_motivated_change": "Better: draws out the person's own reasons and small next steps "
    "toward change (motivational interviewing). Worse: no movement, or change imposed by orders.",
    "trust_rapport": "Better: genuine, respectful, consistent tone that invites the person to keep "
    "talking. Worse: cold, scripted, condescending or over-familiar.",
    "patient_autonomy": "Better: leaves decisions with the person, offers options rather than "
    "orders, respects their pace and values. Worse: tells them what they must do.",
}

# Ratings in the seed data are integers on this scale for every objective.
RATING_MIN, RATING_MAX = 1, 5

# The operator's default clinical floor on the safety weight (see `Preference.with_safety_floor`).
DEFAULT_SAFETY_FLOOR = 0.15


class PreferenceError(ValueError):
    """A weight vector that cannot be a Preference; the message says how to fix it."""


class Preference:
    """Non-negative weights over the six objectives, summing to one (immutable)."""

    __slots__ = ("_w",)

    def __init__(self, weights: Mapping[str, float], *, normalize: bool = False):
        unknown = sorted(set(weights) - set(OBJECTIVES))
        if unknown:
            raise PreferenceError(
                f"unknown objective(s) {unknown}; use only {list(OBJECTIVES)}"
            )
        w = [float(weights.get(o, 0.0)) for o in OBJECTIVES]
        for name, v in zip(OBJECTIVES, w):
            if not math.isfinite(v):
                raise PreferenceError(f"weight for {name!r} is {v}; weights must be finite numbers")
            if v < 0:
                raise PreferenceError(f"weight for {name!r} is {v}; weights must be >= 0")
        total = sum(w)
        if total <= 0:
            raise PreferenceError("weights sum to 0; give at least one positive weight")
        if normalize:
            w = [v / total for v in w]
        elif abs(total - 1.0) > 1e-3:
            raise PreferenceError(
                f"weights sum to {total:.4f}; they must sum to 1 (or ask for normalize=True)"
            )
        else:
            w = [v / total for v in w]
        self._w = tuple(w)

    @classmethod
    def uniform(cls) -> "Preference":
        return cls({o: 1.0 for o in OBJECTIVES}, normalize=True)

    @classmethod
    def from_vector(cls, vector: Iterable[float], *, normalize: bool = False) -> "Preference":
        v = list(vector)
        if len(v) != len(OBJECTIVES):
            raise PreferenceError(f"expected {len(OBJECTIVES)} weights in order {list(OBJECTIVES)}")
        return cls(dict(zip(OBJECTIVES, v)), normalize=normalize)

    def __getitem__(self, objective: str) -> float:
        return self._w[OBJECTIVES.index(Objective(objective).value)]

    def as_dict(self) -> dict[str, float]:
        return dict(zip(OBJECTIVES, self._w))

    def as_vector(self) -> tuple[float, ...]:
        return self._w

    def with_safety_floor(self, floor: float = DEFAULT_SAFETY_FLOOR) -> "Preference":
        """Raise the safety weight to at least `floor`, scaling the others down proportionally."""
        if not 0.0 <= floor <= 1.0:
            raise PreferenceError(f"safety floor {floor} must be within [0, 1]")
        s = self["safety"]
        if s >= floor:
            return self
        others = 1.0 - s
        scale = (1.0 - floor) / others if others > 0 else 0.0
        w = {o: (floor if o == "safety" else v * scale) for o, v in self.as_dict().items()}
        return Preference(w, normalize=True)

    def distance(self, other: "Preference") -> float:
        """L1 distance between weight vectors (0 = same, 2 = disjoint support)."""
        return sum(abs(a - b) for a, b in zip(self._w, other._w))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Preference) and all(
            abs(a - b) < 1e-9 for a, b in zip(self._w, other._w)
        )

    def __hash__(self) -> int:
        return hash(tuple(round(v, 9) for v in self._w))

    def __repr__(self) -> str:
        body = ", ".join(f"{o}={v:.3f}" for o, v in self.as_dict().items() if v > 0)
        return f"Preference({body})"
