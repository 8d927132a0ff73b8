"""Preference -> adapter: the safety floor first, then the nearest routable adapter, or (merge policy on, none
within the threshold) an exact `cat` merge of trained adapters built once, checksummed and stored.

Distance is L1 over the six weights after the floor: sum_k |target_k - adapter_k|, in [0, 2] (twice the
weight that would have to move between objectives). Knows nothing about HTTP, Ray or the engine.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
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
from adapters.registry import AdapterStore
from alignment.objectives import DEFAULT_SAFETY_FLOOR, Preference
from attune.locks import file_lock


__all__ = ["MergePlan", "NoRoutableAdapter", "PreferenceRouter", "RouteDecision", "plan_mix"]

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
                body = json.dumps([[pid, w, pool[i].files] for (pid, w), i in zip(mixed, subset)], sort_keys=True)
                best = MergePlan(mixed, Preference.from_vector(mix, normalize=True), distance,
                                 hashlib.sha256(body.encode()).hexdigest())
    return best


class PreferenceRouter:
    """Routes a Preference to an adapter id in `store` (see the module docstring for the distance).

    With `merge_policy` on and the nearest adapter farther than `merge_threshold`, a merge planned by
    `plan_mix` is used when it is strictly closer; it is built once per id (a thread lock and a file lock
    per id, so concurrent callers in any process wait for the first build), added with recipe "merge",
    its parents and their weights, and its files' sha256 (by `AdapterStore.add`).
    """

    def __init__(self, store: AdapterStore, safety_floor: float = DEFAULT_SAFETY_FLOOR, merge_policy: bool = False,
                 merge_threshold: float = 0.3, base_model_path: str | None = None, *, max_parents: int = 3,
                 max_merged_rank: int | None = None, grid: float = 0.05):
        if not 0.0 <= safety_floor <= 1.0:
            raise ValueError(f"safety_floor={safety_floor} must be within [0, 1]")
        if not 0.0 <= merge_threshold <= 2.0:
            raise ValueError(f"merge_threshold={merge_threshold} is an L1 distance between preferences: use [0, 2]")
        if merge_policy and not base_model_path:
            raise ValueError("merge_policy needs base_model_path (the base model the adapters were trained on)")
        if max_parents < 2:
            raise ValueError(f"max_parents={max_parents}: a merge needs at least 2 parents")
        self.store = store
        self.safety_floor = safety_floor
        self.merge_policy = merge_policy
        self.merge_threshold = merge_threshold
        self.base_model_path = base_model_path
        self.max_parents, self.max_merged_rank, self.grid = max_parents, max_merged_rank, grid
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self.merges_built = 0
        self.merge_seconds: list[float] = []
        self.quarantined: set[str] = set()
        """Adapters an LLM replica refused to load (integrity): never routed to again by this router."""

    def quarantine(self, adapter_id: str) -> None:
        self.quarantined.add(adapter_id)

    def _entries(self) -> list[AdapterManifest]:
        return [a for a in self.store.list() if a.id not in self.quarantined]

    def routable(self) -> list[AdapterManifest]:
        return [a for a in self._entries() if a.recipe in ROUTABLE_RECIPES]

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
        if not self.merge_policy or distance <= self.merge_threshold:
            return RouteDecision(best.id, distance, best.recipe == "merge", effective)
        parents = [a for a in entries if a.recipe in PARENT_RECIPES and a.base_model == best.base_model]
        plan = plan_mix(effective, parents, max_parents=self.max_parents, grid=self.grid,
                        max_rank=self.max_merged_rank)
        if plan is None or plan.distance >= distance - 1e-9:
            return RouteDecision(best.id, distance, best.recipe == "merge", effective)
        try:
            entry, seconds = self._ensure_merge(plan, base_model=best.base_model)
        except (lora_merge.MergeError, IntegrityError, ValueError, OSError) as e:
            log.warning("merge %s of %s failed, routing to the nearest adapter %s instead: %s",
                        plan.adapter_id, plan.parents, best.id, e)
            return RouteDecision(best.id, distance, best.recipe == "merge", effective)
        return RouteDecision(entry.id, round(effective.distance(entry.preference), 9), True, effective, seconds)

    def _lock_for(self, adapter_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(adapter_id, threading.Lock())

    @contextlib.contextmanager
    def _build_lock(self, adapter_id: str) -> Iterator[None]:
        """This process's lock for the id, then a file lock shared with other processes (Ray replicas)."""
        with self._lock_for(adapter_id), file_lock("attune-merge", f"{Path(self.store.root).resolve()}:{adapter_id}"):
            yield

    def _ensure_merge(self, plan: MergePlan, base_model: str) -> tuple[AdapterManifest, float | None]:
        merge_id = plan.adapter_id
        with self._build_lock(merge_id):
            found = self.store.manifest().find(merge_id)
            if found is not None:
                return found, None
            started = time.perf_counter()
            folders = [(self.store.get(pid), w) for pid, w in plan.parents]
            with tempfile.TemporaryDirectory(prefix=f"attune-{merge_id}-") as tmp:
                folder = lora_merge.merge_adapters(self.base_model_path, folders, Path(tmp) / merge_id)
                entry = {"id": merge_id, "recipe": "merge", "weights": plan.weights.as_dict(),
                         "base_model": base_model, "data_hash": "",
                         "parents": [{"id": pid, "weight": w} for pid, w in plan.parents],
                         "eval": {"merge_seconds": round(time.perf_counter() - started, 3)}}
                try:
                    added = self.store.add(folder, entry)
                except ValueError:
                    found = self.store.manifest().find(merge_id)
                    if found is None:
                        raise
                    return found, None
            seconds = time.perf_counter() - started
            self.merges_built += 1
            self.merge_seconds.append(seconds)
            return added, seconds
