"""`MergeCache`: runtime merges of signed-store adapters, kept outside the signed store in a folder of their own,
bounded in count and bytes with least-recently-used eviction, and checked against their own record before loading.

Layout: `<root>/index.json` (one `MergeRecord` per merge: its manifest entry with the sha256 of its files, the sha256
of each parent's files as the signed manifest listed them, its size and when it was last used) and `<root>/<id>/`
(the PEFT folder). Every change of the index and every copy out of the cache holds `<root>/.lock` (flock, so it also
serialises processes on other hosts that share the folder); builds run outside it, in `<root>/.building/`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adapters.integrity import IntegrityError, hash_folder, list_files, verify
from adapters.manifest import AdapterManifest, format_errors
from adapters.registry import AdapterStore, UnknownAdapter, lora_spec_from_config, read_lora_config
from attune.locks import path_lock

__all__ = ["MERGE_ID", "MergeCache", "MergeEvicted", "MergeRecord", "MergeTooLarge", "merge_fingerprint", "merge_id"]

INDEX_FILE = "index.json"
MERGE_ID = re.compile(r"merge-[0-9a-f]{12}")
"""What a runtime merge's id looks like (`merge_id`)."""
_STALE_BUILD_S = 3600.0


def merge_fingerprint(parents: Sequence[tuple[str, float, Mapping[str, str]]]) -> str:
    """sha256 over the parents' ids, coefficients and file digests (in id order): the merge's identity. A retrained
    parent or another coefficient gives another id; the same recipe always gives the same id."""
    body = json.dumps([[pid, round(float(w), 6), dict(files)] for pid, w, files in parents], sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def merge_id(parents: Sequence[tuple[str, float, Mapping[str, str]]]) -> str:
    return "merge-" + merge_fingerprint(parents)[:12]


class MergeEvicted(LookupError):
    """A merge id the cache does not hold (evicted, or never built here): rebuild it by routing again."""


class MergeTooLarge(ValueError):
    """A merge bigger than the cache's whole byte budget: it is not kept, and the router uses a trained adapter."""


class MergeRecord(BaseModel):
    """One cached merge: what it is (a manifest entry, recipe "merge"), what it was built from, and its LRU state."""

    model_config = ConfigDict(extra="forbid")

    adapter: AdapterManifest = Field(description="The merge's entry: id, weights, parents with their coefficients, "
                                     "lora shape and the sha256 of every file of its folder.")
    parent_files: dict[str, dict[str, str]] = Field(description="Parent id -> the sha256 allowlist of its files in "
                                                    "the signed manifest when the merge was built.")
    bytes: int = Field(ge=0, description="Total size of the merge's files.")
    last_used: float = Field(description="Unix time of the last route to it (least recently used goes first).")

    @property
    def id(self) -> str:
        return self.adapter.id

    def parents(self) -> list[tuple[str, float, dict[str, str]]]:
        return [(p.id, float(p.weight), self.parent_files[p.id]) for p in self.adapter.parents]


class MergeCache:
    """At most `max_count` merges and `max_bytes` bytes under `root`; `insert` evicts the least recently used merges
    (index entry first, then the folder) until the new one fits. Safe for threads and processes sharing `root`."""

    def __init__(self, root: str | Path, max_count: int = 16, max_bytes: int = 256 * 1024 ** 2):
        if max_count < 1 or max_bytes < 1:
            raise ValueError(f"merge cache bounds must be positive (max_count={max_count}, max_bytes={max_bytes})")
        self.root = Path(root)
        self.max_count, self.max_bytes = max_count, max_bytes
        self.evictions = 0
        """Merges this object evicted (other processes count their own)."""

    # ------------------------------------------------------------ index
    def _locked(self) -> contextlib.AbstractContextManager[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        return path_lock(self.root / ".lock")

    def _read(self) -> dict[str, MergeRecord]:
        path = self.root / INDEX_FILE
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            records = [MergeRecord.model_validate(r) for r in data["merges"]]
        except (json.JSONDecodeError, KeyError, TypeError, ValidationError) as e:
            detail = format_errors(e) if isinstance(e, ValidationError) else str(e)
            raise IntegrityError(self.root, detail=f"the merge cache index {path} is unreadable ({detail}); delete "
                                 "the folder: merges are rebuilt on demand") from None
        return {r.id: r for r in records}

    def _write(self, records: Mapping[str, MergeRecord]) -> None:
        body = {"version": 1, "merges": [r.model_dump(mode="json") for r in sorted(records.values(),
                                                                                key=lambda r: r.id)]}
        fd, tmp = tempfile.mkstemp(prefix=f".{INDEX_FILE}.", dir=self.root)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(body, f, indent=1, sort_keys=True)
        os.replace(tmp, self.root / INDEX_FILE)

    def path(self, merge_id: str) -> Path:
        return self.root / merge_id

    def records(self) -> list[MergeRecord]:
        """Every cached merge, least recently used first."""
        with self._locked():
            return sorted(self._read().values(), key=lambda r: (r.last_used, r.id))

    def ids(self) -> list[str]:
        return sorted(r.id for r in self.records())

    def total_bytes(self) -> int:
        return sum(r.bytes for r in self.records())

    # ------------------------------------------------------------ use
    def lookup(self, merge_id: str) -> MergeRecord | None:
        """The merge's record, marked as just used; None if the cache lacks it or its folder lost a file (the record
        is then dropped so the merge is rebuilt)."""
        with self._locked():
            records = self._read()
            record = records.get(merge_id)
            if record is None:
                return None
            if not all((self.path(merge_id) / rel).is_file() for rel in record.adapter.files):
                self._drop(records, merge_id)
                return None
            record.last_used = _now(records)
            self._write(records)
            return record

    def snapshot(self, merge_id: str, dest: str | Path) -> MergeRecord:
        """Copy the merge's folder to `dest` (under the lock, so eviction cannot tear it), then check the copy
        against the record's sha256 allowlist: IntegrityError naming the files that differ; MergeEvicted if absent."""
        dest = Path(dest)
        with self._locked():
            record = self._read().get(merge_id)
            if record is None:
                raise MergeEvicted(f"merge {merge_id!r} is not in the merge cache {self.root} (evicted, or never "
                                   "built there); routing the preference again rebuilds it")
            if dest.exists():
                shutil.rmtree(dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(self.path(merge_id), dest, symlinks=True)
        verify(dest, record.adapter.files)
        return record

    def verified_snapshot(self, merge_id: str, store: AdapterStore, dest: str | Path, *,
                          exact: bool = True) -> MergeRecord:
        """`snapshot`, then tie the copy to the signed store: each parent must be in the store's (signature-checked)
        manifest with the files the merge was built from, the id must be the fingerprint of those parents and
        coefficients, and (exact=True) the copy's LoRA delta must equal the weighted sum of the verified parents'
        (`adapters.merge.check_exact`). IntegrityError says which check failed."""
        record = self.snapshot(merge_id, dest)
        problems = []
        for pid, _, files in record.parents():
            try:
                entry = store.entry(pid)
            except UnknownAdapter:
                problems.append(f"parent {pid!r} is not in the signed store")
                continue
            if entry.files != files:
                problems.append(f"parent {pid!r} changed in the signed store since the merge was built")
        if merge_id != merge_id_of(record):
            problems.append("its id is not the fingerprint of its recorded parents and coefficients")
        if problems:
            raise IntegrityError(Path(dest), detail=f"merge {merge_id}: {'; '.join(problems)}")
        if exact:
            from adapters.merge import MergeError, check_exact

            try:
                check_exact(Path(dest), [(store.get(pid), w) for pid, w, _ in record.parents()])
            except MergeError as e:
                raise IntegrityError(Path(dest), detail=f"merge {merge_id} is not the weighted sum of its verified "
                                     f"parents: {e}") from None
        return record

    # ------------------------------------------------------------ build and evict
    @contextlib.contextmanager
    def staging(self, merge_id: str) -> Iterator[Path]:
        """A fresh folder on the cache's filesystem to build `merge_id` in (removed afterwards unless inserted)."""
        building = self.root / ".building"
        building.mkdir(parents=True, exist_ok=True)
        self._sweep_builds(building)
        tmp = Path(tempfile.mkdtemp(prefix=f"{merge_id}.", dir=building))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def _sweep_builds(building: Path) -> None:
        """Builds left by a crashed process (older than an hour)."""
        cutoff = time.time() - _STALE_BUILD_S
        for p in building.iterdir():
            with contextlib.suppress(OSError):
                if p.stat().st_mtime < cutoff:
                    shutil.rmtree(p, ignore_errors=True)

    def insert(self, folder: str | Path, entry: AdapterManifest | Mapping[str, Any],
               parent_files: Mapping[str, Mapping[str, str]]) -> MergeRecord:
        """Move a built merge `folder` (on the cache's filesystem, e.g. from `staging`) into the cache under
        `entry.id`, hashing its files; evict least recently used merges until max_count and max_bytes hold. An id
        already cached (built meanwhile by another process) is kept and returned, and `folder` is left alone."""
        folder = Path(folder)
        data = entry.model_dump() if isinstance(entry, AdapterManifest) else dict(entry)
        data.setdefault("lora", lora_spec_from_config(read_lora_config(folder)))
        data["files"] = hash_folder(folder)
        data.setdefault("recipe", "merge")
        try:
            adapter = AdapterManifest.model_validate(data)
        except ValidationError as e:
            raise ValueError(f"merge entry for {folder} is invalid:\n{format_errors(e)}") from None
        size = sum((folder / rel).stat().st_size for rel in list_files(folder))
        if size > self.max_bytes:
            raise MergeTooLarge(f"merge {adapter.id} is {size} bytes, over merge_cache_max_bytes={self.max_bytes}; "
                                "raise the bound to serve merges of these parents")
        record = MergeRecord(adapter=adapter, parent_files={k: dict(v) for k, v in parent_files.items()},
                             bytes=size, last_used=time.time())
        if sorted(record.parent_files) != sorted(p.id for p in adapter.parents):
            raise ValueError(f"parent_files must list exactly the parents of {adapter.id}")
        with self._locked():
            records = self._read()
            if adapter.id in records:
                return records[adapter.id]
            record.last_used = _now(records)
            self._sweep_orphans(records)
            lru = sorted(records.values(), key=lambda r: (r.last_used, r.id))
            while lru and (len(records) + 1 > self.max_count
                           or sum(r.bytes for r in records.values()) + size > self.max_bytes):
                self._drop(records, lru.pop(0).id)
                self.evictions += 1
            dest = self.path(adapter.id)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(folder, dest)
            records[adapter.id] = record
            self._write(records)
        return record

    def evict(self, merge_id: str) -> bool:
        """Remove one merge (index entry, then folder); False if it was not cached."""
        with self._locked():
            records = self._read()
            if merge_id not in records:
                return False
            self._drop(records, merge_id)
            return True

    def _drop(self, records: dict[str, MergeRecord], merge_id: str) -> None:
        """Under the lock: the index first (a reader never finds an entry whose folder is half deleted), then the
        folder, renamed away before it is deleted."""
        records.pop(merge_id, None)
        self._write(records)
        self._remove_folder(merge_id)

    def _remove_folder(self, name: str) -> None:
        src = self.path(name)
        if not src.exists():
            return
        trash = self.root / f".trash-{name}-{uuid.uuid4().hex[:8]}"
        os.replace(src, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _sweep_orphans(self, records: Mapping[str, MergeRecord]) -> None:
        """Under the lock: merge folders without an index entry (a process died between moving and recording)."""
        for p in self.root.iterdir():
            if p.name.startswith(".trash-"):
                shutil.rmtree(p, ignore_errors=True)
            elif p.is_dir() and not p.name.startswith(".") and p.name not in records:
                self._remove_folder(p.name)


def _now(records: Mapping[str, MergeRecord]) -> float:
    """The time, but later than every recorded use, so the LRU order is strict even on a coarse clock."""
    return max([time.time(), *(r.last_used + 1e-6 for r in records.values())])


def merge_id_of(record: MergeRecord) -> str:
    return merge_id(record.parents())
