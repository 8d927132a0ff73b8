"""Preference -> adapter: the safety floor first, then the nearest routable adapter, or (merge policy on, none
within the threshold) an exact `cat` merge of trained adapters on the merge grid, built once into the merge cache.

Distance is L1 over the six weights after the floor: sum_k |target_k - adapter_k|, in [0, 2] (twice the
weight that would have to move between objectives). Knows nothing about HTTP, Ray or the engine.
"""
from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

import adapters.merge as lora_merge
from adapters.integrity import IntegrityError
from adapters.manifest import AdapterManifest
from adapters.matching import ROUTABLE_RECIPES, NoRoutableAdapter, nearest_adapter
from adapters.merge_cache import MergeCache, MergeRecord, merge_fingerprint
from adapters.registry import AdapterStore
from alignment.objectives import DEFAULT_SAFETY_FLOOR, Preference
from attune.locks import file_lock


__all__ = ["MergeGrid", "MergePlan", "NoRoutableAdapter", "PreferenceRouter", "RouteDecision", "plan_mix"]

log = logging.getLogger(__name__)
PARENT_RECIPES = ("modpo", "soup")


@dataclass(frozen=True)
class RouteDecision:
    adapter_id: str
    distance: float
    merged: bool
    effective: Preference
    merge_seconds: float | None = None
    """Seconds this call spent building a merge; None when it built nothing (merges are built once)."""


@dataclass(frozen=True)
class MergePlan:
    parents: tuple[tuple[str, float], ...]
    weights: Preference
    distance: float
    fingerprint: str
    """sha256 over the parents' ids, coefficients and file digests: a retrained parent gives a new merge id."""

    @property
    def adapter_id(self) -> str:
        return "merge-" + self.fingerprint[:12]


def _simplex_lstsq(a: np.ndarray, t: np.ndarray) -> np.ndarray | None:
    """argmin ||a c - t||_2 subject to sum(c) = 1 (KKT system); None if the optimum needs a negative c."""
    k = a.shape[1]
    kkt = np.zeros((k + 1, k + 1))
    kkt[:k, :k] = 2 * a.T @ a
    kkt[:k, k] = kkt[k, :k] = 1.0
    rhs = np.concatenate([2 * a.T @ t, [1.0]])
    c = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:k]
    return None if (c < -1e-9).any() else np.clip(c, 0.0, None) / np.clip(c, 0.0, None).sum()


def _quantise(c: np.ndarray, grid: float) -> np.ndarray:
    """Multiples of `grid` summing to one, so nearby preferences share a merge (and its cache entry)."""
    q = np.round(c / grid) * grid
    q[int(np.argmax(q))] += 1.0 - q.sum()
    return q


def plan_mix(target: Preference, parents: Sequence[AdapterManifest], *, max_parents: int = 3,
             grid: float = 0.05, max_rank: int | None = None) -> MergePlan | None:
    """The convex mix of 2..max_parents parents whose weight vector is L1-closest to `target`.

    For each subset, coefficients are least squares on the simplex (c >= 0, sum c = 1; subsets whose
    optimum needs a negative or, after rounding to `grid`, a zero coefficient are left to the smaller
    subsets), then scored by L1 like routing. The mix's weights sum_i c_i w_i are the Preference the
    merge serves: an exact merge adds the LoRA deltas with the same c_i (delta W = sum c_i delta W_i).
    Subsets whose summed LoRA rank exceeds `max_rank` (the engine's max_lora_rank) are skipped.
    """
    pool = sorted(parents, key=lambda p: p.id)
    vectors = np.array([p.preference.as_vector() for p in pool])
    t = np.array(target.as_vector())
    best: MergePlan | None = None
    for k in range(2, min(max_parents, len(pool)) + 1):
        for subset in combinations(range(len(pool)), k):
            if max_rank is not None and sum(pool[i].lora.r for i in subset) > max_rank:
                continue
            c = _simplex_lstsq(vectors[list(subset)].T, t)
            if c is None:
                continue
            c = _quantise(c, grid)
            if (c < grid / 2).any():
                continue
            mix = c @ vectors[list(subset)]
            distance = float(np.abs(mix - t).sum())
            if best is None or distance < best.distance - 1e-12:
                mixed = tuple((pool[i].id, round(float(w), 6)) for i, w in zip(subset, c))
                fingerprint = merge_fingerprint([(pid, w, pool[i].files) for (pid, w), i in zip(mixed, subset)])
                best = MergePlan(mixed, Preference.from_vector(mix, normalize=True), distance, fingerprint)
    return best


@dataclass(frozen=True)
class MergeGrid:
    """The merges a patient population can trigger, and nothing else.

    Parents: trained adapters (recipes modpo, soup) of the routed adapter's base model whose safety weight is at least
    the safety floor, so every mix keeps the floor too. A merge mixes 2..`max_parents` of them whose ranks sum to at
    most `max_rank` (the engine's max_lora_rank), with coefficients that are positive multiples of `step` = 1/n
    summing to one. Hence at most `size(parents)` = sum_k C(subsets of k parents within max_rank) * C(n-1, k-1)
    distinct merges (`plan_mix` snaps every preference onto this grid; `admits` refuses any plan off it).
    """

    step: float = 0.05
    max_parents: int = 3
    max_rank: int | None = None
    safety_floor: float = DEFAULT_SAFETY_FLOOR

    def __post_init__(self):
        if not 0 < self.step <= 0.5 or abs(1 / self.step - round(1 / self.step)) > 1e-6:
            raise ValueError(f"merge grid step {self.step} must be 1/n for an integer n >= 2 (e.g. 0.05, 0.1, 0.25), "
                             "so that coefficients on the grid can sum to one")
        if self.max_parents < 2:
            raise ValueError(f"max_parents={self.max_parents}: a merge needs at least 2 parents")

    @property
    def parts(self) -> int:
        return round(1 / self.step)

    def parents(self, entries: Sequence[AdapterManifest], base_model: str) -> list[AdapterManifest]:
        return sorted((a for a in entries if a.recipe in PARENT_RECIPES and a.base_model == base_model
                       and a.weights["safety"] >= self.safety_floor - 1e-9), key=lambda a: a.id)

    def _subsets(self, parents: Sequence[AdapterManifest]) -> Iterator[tuple[AdapterManifest, ...]]:
        for k in range(2, min(self.max_parents, len(parents)) + 1):
            for subset in combinations(parents, k):
                if self.max_rank is None or sum(p.lora.r for p in subset) <= self.max_rank:
                    yield subset

    def size(self, parents: Sequence[AdapterManifest]) -> int:
        """How many distinct merges the grid allows over `parents` (the most a patient population can trigger)."""
        return sum(math.comb(self.parts - 1, len(s) - 1) for s in self._subsets(parents))

    def plan(self, target: Preference, parents: Sequence[AdapterManifest]) -> MergePlan | None:
        return plan_mix(target, parents, max_parents=self.max_parents, grid=self.step, max_rank=self.max_rank)

    def admits(self, plan: MergePlan, parents: Sequence[AdapterManifest]) -> str | None:
        """None if `plan` is a point of the grid over `parents`, else why not."""
        by_id = {p.id: p for p in parents}
        if not 2 <= len(plan.parents) <= self.max_parents:
            return f"{len(plan.parents)} parents (the grid allows 2..{self.max_parents})"
        if any(pid not in by_id for pid, _ in plan.parents):
            return "a parent that is not a trained adapter at or above the safety floor"
        if self.max_rank is not None and sum(by_id[pid].lora.r for pid, _ in plan.parents) > self.max_rank:
            return f"a summed rank over max_rank={self.max_rank}"
        units = [w * self.parts for _, w in plan.parents]
        if any(u < 1 - 1e-6 or abs(u - round(u)) > 1e-4 for u in units) or round(sum(units)) != self.parts:
            return f"coefficients {[w for _, w in plan.parents]} off the grid of step {self.step}"
        return None


class PreferenceRouter:
    """Routes a Preference to an adapter id in `store` (see the module docstring for the distance).

    With `merge_policy` on and the nearest adapter farther than `merge_threshold`, the plan of `merge_grid` is used
    when it is strictly closer: looked up in `merge_cache`, or built there once (a thread lock and a file lock per id,
    so concurrent callers in any process wait for the first build) from parents verified against the signed store.
    The signed store is only read. Anything that prevents a merge (off the grid, quarantined, too large for the
    cache, a failed build) routes to the nearest trained adapter instead.
    """

    def __init__(self, store: AdapterStore, safety_floor: float = DEFAULT_SAFETY_FLOOR, merge_policy: bool = False,
                 merge_threshold: float = 0.3, base_model_path: str | None = None, *,
                 merge_cache: MergeCache | None = None, merge_grid: MergeGrid | None = None):
        if not 0.0 <= safety_floor <= 1.0:
            raise ValueError(f"safety_floor={safety_floor} must be within [0, 1]")
        if not 0.0 <= merge_threshold <= 2.0:
            raise ValueError(f"merge_threshold={merge_threshold} is an L1 distance between preferences: use [0, 2]")
        if merge_policy and not base_model_path:
            raise ValueError("merge_policy needs base_model_path (the base model the adapters were trained on)")
        if merge_policy and merge_cache is None:
            raise ValueError("merge_policy needs merge_cache (a MergeCache outside the signed store)")
        grid = merge_grid or MergeGrid(safety_floor=safety_floor)
        if grid.safety_floor != safety_floor:
            raise ValueError(f"merge_grid.safety_floor={grid.safety_floor} differs from safety_floor={safety_floor}")
        self.store = store
        self.safety_floor = safety_floor
        self.merge_policy = merge_policy
        self.merge_threshold = merge_threshold
        self.base_model_path = base_model_path
        self.merge_cache, self.merge_grid = merge_cache, grid
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self.merges_built = 0
        self.merge_seconds: list[float] = []
        self.quarantined: set[str] = set()
        """Adapters (or merges) an LLM replica refused to load (integrity): never routed to again by this router."""

    def quarantine(self, adapter_id: str) -> None:
        self.quarantined.add(adapter_id)

    def _entries(self) -> list[AdapterManifest]:
        return sorted((a for a in self.store.snapshot().adapters if a.id not in self.quarantined), key=lambda a: a.id)

    def routable(self) -> list[AdapterManifest]:
        return [a for a in self._entries() if a.recipe in ROUTABLE_RECIPES]

    def merge_grid_size(self) -> dict[str, int]:
        """{base model: the most distinct merges the grid allows over that base's parents in the store}."""
        entries = self._entries()
        return {base: self.merge_grid.size(self.merge_grid.parents(entries, base))
                for base in sorted({a.base_model for a in entries})}

    def safety_adapter_id(self) -> str:
        """The routable adapter with the highest safety weight (ties: smallest id)."""
        pool = self.routable()
        if not pool:
            raise NoRoutableAdapter(f"the store at {self.store.root} has no routable adapter "
                                    f"(recipes {list(ROUTABLE_RECIPES)}) to answer a crisis with")
        return min(pool, key=lambda a: (-a.weights["safety"], a.id)).id

    def route(self, pref: Preference) -> RouteDecision:
        effective = pref.with_safety_floor(self.safety_floor)
        entries = self._entries()
        best, distance = nearest_adapter(effective, entries, self.safety_floor)
        nearest = RouteDecision(best.id, distance, best.recipe == "merge", effective)
        if not self.merge_policy or distance <= self.merge_threshold:
            return nearest
        parents = self.merge_grid.parents(entries, best.base_model)
        plan = self.merge_grid.plan(effective, parents)
        if plan is None or plan.distance >= distance - 1e-9 or plan.adapter_id in self.quarantined:
            return nearest
        off_grid = self.merge_grid.admits(plan, parents)
        if off_grid is not None:
            log.warning("merge %s refused (%s); routing to the nearest adapter %s", plan.adapter_id, off_grid, best.id)
            return nearest
        try:
            record, seconds = self._ensure_merge(plan, parents, base_model=best.base_model)
        except (lora_merge.MergeError, IntegrityError, ValueError, OSError) as e:
            log.warning("merge %s of %s failed, routing to the nearest adapter %s instead: %s",
                        plan.adapter_id, plan.parents, best.id, e)
            return nearest
        return RouteDecision(record.id, round(effective.distance(record.adapter.preference), 9), True, effective,
                             seconds)

    def _lock_for(self, adapter_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(adapter_id, threading.Lock())

    @contextlib.contextmanager
    def _build_lock(self, adapter_id: str) -> Iterator[None]:
        """This process's lock for the id, then a file lock shared with other processes (Ray replicas)."""
        key = f"{Path(self.merge_cache.root).resolve()}:{adapter_id}"
        with self._lock_for(adapter_id), file_lock("attune-merge", key):
            yield

    def _ensure_merge(self, plan: MergePlan, parents: Sequence[AdapterManifest],
                      base_model: str) -> tuple[MergeRecord, float | None]:
        merge_id, cache = plan.adapter_id, self.merge_cache
        found = cache.lookup(merge_id)
        if found is not None:
            return found, None
        with self._build_lock(merge_id):
            found = cache.lookup(merge_id)
            if found is not None:
                return found, None
            started = time.perf_counter()
            by_id = {p.id: p for p in parents}
            folders = [(self.store.get(pid), w) for pid, w in plan.parents]  # signature and sha256 checked
            with cache.staging(merge_id) as tmp:
                folder = lora_merge.merge_adapters(self.base_model_path, folders, tmp / merge_id)
                entry = {"id": merge_id, "recipe": "merge", "weights": plan.weights.as_dict(),
                         "base_model": base_model, "data_hash": "",
                         "parents": [{"id": pid, "weight": w} for pid, w in plan.parents],
                         "eval": {"merge_seconds": round(time.perf_counter() - started, 3)}}
                record = cache.insert(folder, entry, {pid: by_id[pid].files for pid, _ in plan.parents})
            seconds = time.perf_counter() - started
            self.merges_built += 1
            self.merge_seconds.append(seconds)
            return record, seconds
