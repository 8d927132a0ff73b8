"""Runtime merges with the shipped store and base model: how long a merge takes to build, how long a cached one takes
to route to, how many bytes one holds, what eviction does under each bound, and how long an LLM replica's checked copy
takes. The signed store is only read (its signature is checked before and after); the cache lives in a temp folder.

    python benchmarks/merge_cache.py [--merges 5] [--max-count 3] [--hits 20] [--json out.json]

Not a test: it prints figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--merges", type=int, default=5, help="distinct merges to build (default %(default)s)")
    ap.add_argument("--max-count", type=int, default=3, help="merge_cache_max_count for the count phase")
    ap.add_argument("--hits", type=int, default=20, help="cache hits to time (default %(default)s)")
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")

    import numpy as np

    from adapters.matching import nearest_adapter
    from adapters.merge_cache import MergeCache
    from adapters.registry import AdapterStore
    from alignment.basemodel import resolve
    from alignment.objectives import DEFAULT_SAFETY_FLOOR as FLOOR
    from alignment.objectives import Preference
    from attune.paths import ADAPTER_PUBLIC_KEY, STORE_DIR
    from serving.adapter_loader import AdapterLoader
    from serving.config import ServeConfig
    from serving.router import MergeGrid, PreferenceRouter

    cfg = ServeConfig()
    store = AdapterStore(STORE_DIR, ADAPTER_PUBLIC_KEY)
    signed = store.verify_signature()
    manifest_before = store.manifest_path.read_bytes()
    base = resolve(cfg.base_model)
    grid = MergeGrid(cfg.merge_grid, cfg.merge_max_parents, cfg.engine.max_lora_rank, FLOOR)
    entries = store.list()
    base_name = entries[0].base_model
    parents = grid.parents(entries, base_name)
    print(f"store {STORE_DIR} (signed by key {signed.key_id}); base {base}")
    print(f"grid: step {grid.step}, 2-{grid.max_parents} of {len(parents)} parents (safety >= {FLOOR}), "
          f"rank <= {grid.max_rank}: at most {grid.size(parents)} distinct merges")

    # Preferences whose nearest adapter is beyond merge_threshold and whose grid plans differ.
    rng, prefs, plans = np.random.default_rng(0), [], set()
    while len(prefs) < a.merges:
        pref = Preference.from_vector(rng.dirichlet(np.ones(6)), normalize=True).with_safety_floor(FLOOR)
        _, distance = nearest_adapter(pref, entries, FLOOR)
        plan = grid.plan(pref, parents)
        if distance > cfg.merge_threshold and plan is not None and plan.distance < distance \
                and plan.adapter_id not in plans:
            plans.add(plan.adapter_id)
            prefs.append(pref)

    figures: dict = {"grid_size": grid.size(parents), "parents": len(parents)}
    with tempfile.TemporaryDirectory(prefix="attune-merge-bench-") as tmp:
        tmp = Path(tmp)
        # Phase 1: the count bound.
        cache = MergeCache(tmp / "count", max_count=a.max_count, max_bytes=cfg.merge_cache_max_bytes)
        router = PreferenceRouter(store, FLOOR, True, cfg.merge_threshold, base, merge_cache=cache, merge_grid=grid)
        t = time.perf_counter()
        router.route(Preference.from_vector(np.ones(6) / 6))
        nearest_route = time.perf_counter() - t
        builds, sizes = [], []
        print(f"\ncount bound {a.max_count}: building {a.merges} merges")
        print("| merge | parents | build s | bytes | cached | evicted so far |")
        print("|---|---|---|---|---|---|")
        for pref in prefs:
            d = router.route(pref)
            record = cache.lookup(d.adapter_id)
            builds.append(d.merge_seconds)
            sizes.append(record.bytes)
            parents_txt = " + ".join(f"{p.weight:g} {p.id}" for p in record.adapter.parents)
            print(f"| {d.adapter_id} | {parents_txt} | {d.merge_seconds:.2f} | {record.bytes} | {len(cache.ids())} "
                  f"| {cache.evictions} |")
        last = prefs[-1]
        hits = []
        for _ in range(a.hits):
            t = time.perf_counter()
            d = router.route(last)
            hits.append(time.perf_counter() - t)
            assert d.merge_seconds is None
        lookups = []
        for _ in range(a.hits):
            t = time.perf_counter()
            cache.lookup(d.adapter_id)
            lookups.append(time.perf_counter() - t)
        evicted = cache.evictions
        first = router.route(prefs[0])
        rebuilt = first.merge_seconds
        loader = AdapterLoader(store, cache, resident=lambda: [], keep=2)
        t = time.perf_counter()
        loader.path(d.adapter_id)
        replica_load = time.perf_counter() - t
        t = time.perf_counter()
        cache.verified_snapshot(d.adapter_id, store, tmp / "copy", exact=False)
        replica_load_no_exact = time.perf_counter() - t
        loader.close()
        print(f"\nbuild (route that builds): first {builds[0]:.2f} s (cold: imports, first base load), then median "
              f"{statistics.median(builds[1:]):.2f} s, max {max(builds[1:]):.2f}")
        print(f"cache hit (whole route, manifest signature checked): median {ms(statistics.median(hits))} ms; "
              f"cache lookup alone {ms(statistics.median(lookups))} ms; a route to a trained adapter "
              f"{ms(nearest_route)} ms")
        print(f"bytes per merge: {min(sizes)}-{max(sizes)} ({max(sizes) / 2 ** 20:.2f} MiB)")
        print(f"evictions: {evicted} for {a.merges} merges under max_count {a.max_count}; the first (evicted) merge "
              f"requested again: {'rebuilt in %.2f s' % rebuilt if rebuilt else 'still cached'} (evicting one more); "
              f"cache now {len(cache.ids())} merges, {cache.total_bytes()} bytes")
        print(f"LLM replica's checked copy: {ms(replica_load)} ms with the exactness check, "
              f"{ms(replica_load_no_exact)} ms with the record and parent checks only")

        # Phase 2: the byte bound (room for 2.5 merges, count bound out of the way).
        budget = int(2.5 * max(sizes))
        bcache = MergeCache(tmp / "bytes", max_count=100, max_bytes=budget)
        brouter = PreferenceRouter(store, FLOOR, True, cfg.merge_threshold, base, merge_cache=bcache, merge_grid=grid)
        peak = 0
        for pref in prefs[:4]:
            brouter.route(pref)
            peak = max(peak, bcache.total_bytes())
        print(f"byte bound {budget}: 4 merges built, {bcache.evictions} evicted, {len(bcache.ids())} kept, "
              f"peak {peak} bytes")
        assert peak <= budget

    assert store.manifest_path.read_bytes() == manifest_before and store.verify_signature()
    print("signed store unchanged, signature verifies")
    figures.update(build_s=builds, hit_route_ms=statistics.median(hits) * 1000,
                   hit_lookup_ms=statistics.median(lookups) * 1000, nearest_route_ms=nearest_route * 1000,
                   bytes_per_merge=sizes, evictions_count_phase=evicted, rebuild_s=rebuilt,
                   replica_load_ms=replica_load * 1000, replica_load_no_exact_ms=replica_load_no_exact * 1000,
                   byte_budget=budget, evictions_byte_phase=bcache.evictions, byte_peak=peak)
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
