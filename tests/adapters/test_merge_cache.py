"""The merge cache's bounds: at most max_count merges and max_bytes bytes, least recently used evicted first (index
entry and folder), a merge over the whole budget refused, and both bounds held while two processes insert at once.
Folders here hold the two PEFT files with filler bytes: the cache hashes and moves them, it never reads weights."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adapters.integrity import IntegrityError, sha256_file
from adapters.merge_cache import MergeCache, MergeEvicted, MergeTooLarge
from alignment.objectives import OBJECTIVES

REPO = Path(__file__).resolve().parents[2]
CONFIG = json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]})


def built(tmp: Path, name: str, size: int = 1000) -> Path:
    """A folder as a build leaves it in the cache's staging area."""
    folder = tmp / ".building" / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(CONFIG)
    (folder / "adapter_model.safetensors").write_bytes(name.encode()[-1:] * size)
    return folder


def mid(i: int) -> str:
    return f"merge-{i:012x}"


def insert(cache: MergeCache, i: int, size: int = 1000):
    entry = {"id": mid(i), "weights": {o: 1 / 6 for o in OBJECTIVES}, "base_model": "test", "data_hash": "",
             "parents": [{"id": "a", "weight": 0.5}, {"id": "b", "weight": 0.5}]}
    return cache.insert(built(cache.root, mid(i), size), entry, {"a": {"x": "0" * 64}, "b": {"x": "1" * 64}})


def on_disk(cache: MergeCache) -> list[str]:
    return sorted(p.name for p in cache.root.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_the_count_bound_evicts_the_least_recently_used(tmp_path):
    cache = MergeCache(tmp_path / "c", max_count=2)
    insert(cache, 1)
    insert(cache, 2)
    assert cache.lookup(mid(1)) is not None  # 1 is now more recently used than 2
    insert(cache, 3)
    assert cache.ids() == [mid(1), mid(3)] == on_disk(cache)
    assert cache.evictions == 1 and cache.lookup(mid(2)) is None
    insert(cache, 4)
    assert cache.ids() == [mid(3), mid(4)] == on_disk(cache)


def test_the_byte_bound_evicts_until_the_new_merge_fits(tmp_path):
    one = 1000 + len(CONFIG)
    cache = MergeCache(tmp_path / "c", max_count=100, max_bytes=int(2.5 * one))
    for i in range(1, 5):
        record = insert(cache, i)
        assert record.bytes == one
    assert cache.ids() == [mid(3), mid(4)] == on_disk(cache)
    assert cache.total_bytes() == 2 * one <= cache.max_bytes
    insert(cache, 5, size=2 * 1000)  # twice as big: both others must go
    assert cache.ids() == [mid(5)] and cache.total_bytes() <= cache.max_bytes


def test_a_merge_over_the_whole_budget_is_refused_and_nothing_is_evicted(tmp_path):
    cache = MergeCache(tmp_path / "c", max_bytes=5000)
    insert(cache, 1)
    with pytest.raises(MergeTooLarge, match="merge_cache_max_bytes=5000"):
        insert(cache, 2, size=6000)
    assert cache.ids() == [mid(1)] and cache.evictions == 0


def test_an_id_already_cached_is_kept_and_a_lost_file_drops_the_record(tmp_path):
    cache = MergeCache(tmp_path / "c")
    first = insert(cache, 1)
    assert insert(cache, 1).adapter.files == first.adapter.files and cache.ids() == [mid(1)]
    (cache.path(mid(1)) / "adapter_model.safetensors").unlink()
    assert cache.lookup(mid(1)) is None and cache.ids() == [] and on_disk(cache) == []


def test_folders_without_a_record_are_swept_on_the_next_insert(tmp_path):
    cache = MergeCache(tmp_path / "c")
    insert(cache, 1)
    (cache.root / mid(9)).mkdir()  # a process died between moving a build in and recording it
    insert(cache, 2)
    assert on_disk(cache) == cache.ids() == [mid(1), mid(2)]


def test_a_snapshot_is_a_checked_copy_and_an_evicted_merge_raises(tmp_path):
    cache = MergeCache(tmp_path / "c")
    insert(cache, 1)
    dest = tmp_path / "replica" / mid(1)
    record = cache.snapshot(mid(1), dest)
    assert {p.name: sha256_file(p) for p in dest.iterdir()} == record.adapter.files
    weights = cache.path(mid(1)) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"!")
    with pytest.raises(IntegrityError, match=r"changed: adapter_model\.safetensors"):
        cache.snapshot(mid(1), tmp_path / "replica2" / mid(1))
    assert cache.evict(mid(1)) and not cache.evict(mid(1))
    with pytest.raises(MergeEvicted, match="rebuilds it"):
        cache.snapshot(mid(1), dest)
    assert dest.is_dir(), "a refused snapshot leaves the copy a replica already holds alone"


def test_bounds_hold_while_two_processes_insert_evict_and_copy_at_once(tmp_path):
    """Each process inserts 12 merges into one cache bounded to 3, reading a snapshot after each insert; at the end the
    index and the folders agree, the bounds hold, no process saw a torn copy and no staging or trash is left."""
    root, go = tmp_path / "c", tmp_path / "go"
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.path[:0] = [{str(REPO)!r}, {str(Path(__file__).parent)!r}]
        from test_merge_cache import insert, mid
        from adapters.merge_cache import MergeCache, MergeEvicted
        offset = int(sys.argv[1])
        cache = MergeCache(Path({str(root)!r}), max_count=3)
        while not Path({str(go)!r}).exists():
            time.sleep(0.01)
        torn = 0
        for i in range(offset, offset + 12):
            insert(cache, i)
            for j in range(offset, i + 1):
                try:
                    cache.snapshot(mid(j), Path({str(tmp_path)!r}) / f"copy{{offset}}" / mid(j))
                except MergeEvicted:
                    pass
                except Exception as e:
                    torn += 1
                    print("torn", type(e).__name__, e)
        print("evictions", cache.evictions, "torn", torn)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(off)], stdout=subprocess.PIPE, text=True)
             for off in (100, 200)]
    go.touch()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all(o.strip().endswith("torn 0") for o in outs), outs
    cache = MergeCache(root, max_count=3)
    assert len(cache.ids()) == 3 and cache.ids() == on_disk(cache)
    assert sum(int(o.split()[-3]) for o in outs) == 24 - 3, "every insert beyond the third evicted exactly one"
    assert not list((root / ".building").iterdir()) and not [p for p in root.iterdir() if p.name.startswith(".trash")]
