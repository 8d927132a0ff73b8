"""Route a `Preference` to the nearest stored adapter, after raising its safety weight to the floor.

Distance is L1 between weight vectors: on the simplex it is twice the total weight that has to
move between objectives, so every unit of weight moved counts the same wherever it goes.
"""
from __future__ import annotations

from typing import Iterable, Sequence

from adapters.manifest import AdapterManifest
from alignment.objectives import Preference

ROUTABLE_RECIPES: tuple[str, ...] = ("modpo", "soup", "merge")


class NoRoutableAdapter(LookupError):
    """No candidate adapter has a recipe that may be routed to."""


def nearest_adapter(
    pref: Preference,
    candidates: Sequence[AdapterManifest],
    safety_floor: float,
    *,
    recipes: Iterable[str] | None = ROUTABLE_RECIPES,
) -> tuple[AdapterManifest, float]:
    """The candidate closest to `pref.with_safety_floor(safety_floor)` and its L1 distance.

    Only `recipes` are considered (default modpo, soup, merge: adapters trained or merged for a
    weight vector); pass `recipes=None` to consider every candidate. Ties go to the smallest id.
    """
    target = pref.with_safety_floor(safety_floor)
    allowed = None if recipes is None else frozenset(recipes)
    pool = [c for c in candidates if allowed is None or c.recipe in allowed]
    if not pool:
        have = sorted({c.recipe for c in candidates})
        raise NoRoutableAdapter(
            f"no adapter with a routable recipe {sorted(allowed or ())} among {len(candidates)} candidate(s) "
            f"(recipes present: {have}); train a MODPO adapter or soup, or pass recipes=None"
        )
    scored = [(round(target.distance(c.preference), 9), c.id, c) for c in pool]
    distance, _, best = min(scored, key=lambda t: (t[0], t[1]))
    return best, distance
