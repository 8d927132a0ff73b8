"""Where an LLM replica loads an adapter from: the signed store (files checked against its manifest), or, for a
runtime merge, a private copy of it out of the merge cache, checked against the merge's record and its signed parents.

The copy is why eviction cannot break a replica: the cache may delete a merge at any time, but vLLM reads the
replica's copy, which stays while the engine may still need it (see `AdapterLoader._prune`).
"""
from __future__ import annotations

import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from adapters.integrity import verify
from adapters.merge_cache import MERGE_ID, MergeCache, MergeRecord
from adapters.registry import AdapterStore, UnknownAdapter


class AdapterLoader:
    """`path(adapter_id)`: a verified folder for vLLM. Store adapters: `AdapterStore.get`. Runtime merges (ids the
    store does not list): `MergeCache.verified_snapshot` into this replica's own folder, or the copy it already
    holds, re-hashed. Raises IntegrityError for files that fail a check (the ingress then withdraws the id from
    routing), UnknownAdapter for an id neither holds, MergeEvicted for a merge evicted before this replica copied it
    (the ingress answers 503 and its retry re-routes, which rebuilds the merge)."""

    def __init__(self, store: AdapterStore, cache: MergeCache, resident: Callable[[], list[str]], keep: int):
        self.store, self.cache, self.resident, self.keep = store, cache, resident, keep
        self.snapshots: OrderedDict[str, tuple[Path, MergeRecord]] = OrderedDict()
        self.root = Path(tempfile.mkdtemp(prefix="attune-replica-merges-"))
        self._lock = threading.Lock()

    def path(self, adapter_id: str) -> Path:
        try:
            return self.store.get(adapter_id)
        except UnknownAdapter:
            if not MERGE_ID.fullmatch(adapter_id):
                raise
        with self._lock:
            held = self.snapshots.get(adapter_id)
            if held is not None and held[0].is_dir():
                verify(held[0], held[1].adapter.files)  # checked in place: vLLM may be reading it
            else:
                dest = self.root / adapter_id
                held = (dest, self.cache.verified_snapshot(adapter_id, self.store, dest))
            self.snapshots[adapter_id] = held
            self.snapshots.move_to_end(adapter_id)
            self._prune()
            return held[0]

    def _prune(self) -> None:
        """Keep every copy the engine may still read (its adapter LRU, which models vLLM's) plus the `keep` most
        recently loaded others; delete the rest."""
        busy = set(self.resident())
        spare = [i for i in self.snapshots if i not in busy]
        for old in spare[:max(0, len(spare) - self.keep)]:
            shutil.rmtree(self.snapshots.pop(old)[0], ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
