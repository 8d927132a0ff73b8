"""Runtime merges with a signed store: built from verified parents into the merge cache (the store's manifest and
signature untouched), only on the merge grid, once across processes, and loaded by the LLM replica only after its
copy matches the merge's record, its signed parents and their exact weighted sum."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from adapters.integrity import IntegrityError, hash_folder, sha256_file
from adapters.merge_cache import MergeCache, MergeEvicted
from adapters.registry import AdapterStore
from adapters.signing import generate_key_pair, load_private_key
from alignment.objectives import OBJECTIVES, Preference
from serving.adapter_loader import AdapterLoader
from serving.config import ConfigError, ServeConfig
from serving.router import MergeGrid, MergePlan, PreferenceRouter

REPO = Path(__file__).resolve().parents[2]


def weights(**w) -> dict[str, float]:
    return {o: float(w.get(o, 0.0)) for o in OBJECTIVES}


PARENTS = {"empathy": weights(empathy=0.75, safety=0.15, active_listening=0.1),
           "autonomy": weights(patient_autonomy=0.75, safety=0.15, self_motivated_change=0.1),
           "rapport": weights(trust_rapport=0.6, safety=0.3, empathy=0.1)}
LOW_SAFETY = weights(empathy=0.5, trust_rapport=0.45, safety=0.05)
FAR = Preference(weights(empathy=0.4, patient_autonomy=0.4, active_listening=0.05, self_motivated_change=0.05,
                         safety=0.1))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("merge-llama")
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def loras(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root, out = tmp_path_factory.mktemp("merge-loras"), {}
    for seed, name in enumerate([*PARENTS, "low"]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
        get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                         init_lora_weights=False)).save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    private, public, _ = generate_key_pair(tmp_path_factory.mktemp("merge-keys") / "test.key")
    return private, public


@pytest.fixture
def store(tmp_path, loras, keys) -> AdapterStore:
    """Three trained parents and one below the safety floor, signed; opened with the public key, as serving does."""
    s = AdapterStore(tmp_path / "store")
    for adapter_id, w in [*PARENTS.items(), ("low-safety", LOW_SAFETY)]:
        s.add(loras["low" if adapter_id == "low-safety" else adapter_id],
              {"id": adapter_id, "recipe": "modpo", "weights": w, "base_model": "tiny", "data_hash": "sha256:t"})
    s.sign(load_private_key(keys[0]))
    return AdapterStore(s.root, public_key=keys[1])


def router_for(store, tiny_llama, cache_root, **kw) -> PreferenceRouter:
    return PreferenceRouter(store, 0.15, True, 0.3, str(tiny_llama), merge_cache=MergeCache(cache_root, **kw))


def built_merge(store, tiny_llama, tmp_path) -> tuple[PreferenceRouter, str]:
    router = router_for(store, tiny_llama, tmp_path / "cache")
    d = router.route(FAR)
    assert d.merged and d.merge_seconds is not None
    return router, d.adapter_id


def loader_for(store, cache_root) -> AdapterLoader:
    return AdapterLoader(store, MergeCache(cache_root), resident=lambda: [], keep=2)


# ---------------------------------------------------------------- the signed store
def test_merges_leave_the_signed_store_and_its_signature_untouched(store, tiny_llama, tmp_path):
    before = {p.name: hash_folder(p) if p.is_dir() else sha256_file(p) for p in store.root.iterdir()}
    router, merge_id = built_merge(store, tiny_llama, tmp_path)
    assert store.verify_signature().key_id
    assert {p.name: hash_folder(p) if p.is_dir() else sha256_file(p) for p in store.root.iterdir()} == before
    assert merge_id not in store.ids() and router.merge_cache.ids() == [merge_id]
    record = router.merge_cache.lookup(merge_id)
    assert record.parent_files == {p: store.entry(p).files for p in ("autonomy", "empathy")}


def test_the_ingress_starts_with_merge_policy_on_a_signed_store(store, keys, tmp_path, monkeypatch):
    from types import SimpleNamespace

    import serving.app
    import serving.ingress_state
    from serving.app import AttuneIngress
    from serving.auth import RateLimiter

    # Outside Serve: no replica context and no shared-state actor; the replica's own limiters stand in.
    replica = SimpleNamespace(deployment_id=SimpleNamespace(app_name="attune"), unique_id="r1")
    monkeypatch.setattr(serving.app.serve, "get_replica_context", lambda: SimpleNamespace(replica_id=replica))
    monkeypatch.setattr(serving.ingress_state, "SharedIngress",
                        lambda app, rid, metrics: SimpleNamespace(replica=rid, limiter=lambda s, n: RateLimiter(n)))

    cls = AttuneIngress.func_or_class.__mro__[1]
    ingress = object.__new__(cls)
    cfg = ServeConfig(store_dir=store.root, adapter_public_key=keys[1], data_dir=tmp_path / "data",
                      merge_policy=True, base_model=str(tmp_path / "base"))
    options = []
    handle = SimpleNamespace(options=lambda **kw: options.append(kw))  # results by value, over gRPC
    cls.__init__(ingress, cfg.model_dump(mode="json"), handle, handle)
    assert options == [{"_by_reference": False}] * 2
    router = ingress.service.deps.router
    assert router.merge_policy and router.merge_cache.root == tmp_path / "data" / "merge-cache"
    # Three parents at or above the floor, r4 each, engine.max_lora_rank 16: 3 pairs * 19 + 1 triple * C(19, 2).
    assert router.merge_grid_size() == {"tiny": 3 * 19 + 171}


# ---------------------------------------------------------------- the LLM replica's check
def test_the_replica_loads_a_checked_private_copy_that_survives_eviction(store, tiny_llama, tmp_path):
    router, merge_id = built_merge(store, tiny_llama, tmp_path)
    loader = loader_for(store, tmp_path / "cache")
    path = loader.path(merge_id)
    assert path.parent == loader.root and hash_folder(path) == router.merge_cache.lookup(merge_id).adapter.files
    assert loader.path("empathy") == store.root / "empathy", "store adapters still come from the store"
    assert router.merge_cache.evict(merge_id)
    assert loader.path(merge_id) == path, "a replica that holds the merge keeps serving its own copy"
    with pytest.raises(MergeEvicted):
        loader_for(store, tmp_path / "cache").path(merge_id)
    again = router.route(FAR)
    assert again.adapter_id == merge_id and again.merge_seconds is not None, "routing again rebuilds the same merge"
    assert loader_for(store, tmp_path / "cache").path(merge_id).is_dir()
    loader.close()
    assert not loader.root.exists()


def test_replica_copies_are_bounded_but_never_those_the_engine_may_read(store, tiny_llama, tmp_path):
    cache = MergeCache(tmp_path / "cache")
    router = PreferenceRouter(store, 0.15, True, 0.3, str(tiny_llama), merge_cache=cache)
    ids = [router.route(Preference(weights(empathy=e, patient_autonomy=0.85 - e, safety=0.15))).adapter_id
           for e in (0.25, 0.45, 0.6)]
    assert len(set(ids)) == 3 and all(i.startswith("merge-") for i in ids)
    resident = [ids[0]]
    loader = AdapterLoader(store, cache, resident=lambda: resident, keep=1)
    for i in ids:
        loader.path(i)
    assert list(loader.snapshots) == ids[0:1] + ids[2:], "the oldest is resident in the engine: the middle one goes"


def test_the_replica_refuses_a_tampered_cached_merge(store, tiny_llama, tmp_path):
    router, merge_id = built_merge(store, tiny_llama, tmp_path)
    cache = router.merge_cache
    index = cache.root / "index.json"
    clean = index.read_text()
    weights_file = cache.path(merge_id) / "adapter_model.safetensors"
    good = weights_file.read_bytes()

    def fresh_load():
        return loader_for(store, cache.root).path(merge_id)

    # 1. a changed file
    weights_file.write_bytes(good[:-4] + b"\x00\x00\x80\x3f")
    with pytest.raises(IntegrityError, match=r"changed: adapter_model\.safetensors"):
        fresh_load()
    # 2. a changed file re-hashed in the cache's record: no longer the weighted sum of the signed parents
    data = json.loads(clean)
    data["merges"][0]["adapter"]["files"]["adapter_model.safetensors"] = sha256_file(weights_file)
    index.write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match="not the weighted sum of its verified parents"):
        fresh_load()
    # 3. the record's coefficients edited to match other weights: the id no longer names that recipe
    weights_file.write_bytes(good)
    data = json.loads(clean)
    data["merges"][0]["adapter"]["parents"][0]["weight"] = 0.9
    index.write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match="not the fingerprint"):
        fresh_load()
    # 4. a parent the merge was built from that the signed store no longer holds as recorded
    data = json.loads(clean)
    data["merges"][0]["parent_files"]["empathy"]["adapter_model.safetensors"] = "0" * 64
    index.write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match="'empathy' changed in the signed store"):
        fresh_load()
    index.write_text(clean)
    assert fresh_load().is_dir()


def test_a_replica_refusal_withdraws_the_merge_and_routes_to_the_nearest(store, tiny_llama, tmp_path):
    router, merge_id = built_merge(store, tiny_llama, tmp_path)
    router.quarantine(merge_id)
    d = router.route(FAR)
    assert not d.merged and d.adapter_id in ("empathy", "autonomy")


# ---------------------------------------------------------------- the grid
def test_the_grid_is_finite_and_every_routed_merge_is_on_it(store):
    """2,000 random preferences plan only merges the grid enumerates, and fewer than it states."""
    grid = MergeGrid(step=0.1, max_parents=3, max_rank=8, safety_floor=0.15)
    parents = grid.parents(store.list(), "tiny")
    assert [p.id for p in parents] == ["autonomy", "empathy", "rapport"], "low-safety is below the floor"
    assert grid.size(parents) == 3 * 9, "r4 + r4 + r4 > max_rank 8: pairs only, 9 coefficient pairs each"
    assert MergeGrid(step=0.1, max_parents=3, safety_floor=0.15).size(parents) == 3 * 9 + 36
    rng = np.random.default_rng(0)
    planned = set()
    for v in rng.dirichlet(np.ones(6) * 0.5, size=2000):
        plan = grid.plan(Preference.from_vector(v, normalize=True).with_safety_floor(0.15), parents)
        if plan is not None:
            assert grid.admits(plan, parents) is None
            assert plan.weights["safety"] >= 0.15 - 1e-9
            planned.add(plan.parents)
    everything = {tuple((p.id, round(k / 10, 6)) for p, k in zip(pair, (k, 10 - k)))
                  for pair in combinations(parents, 2) for k in range(1, 10)}
    assert planned and planned <= everything


def test_plans_off_the_grid_are_refused_and_the_patient_gets_the_nearest_adapter(store, tiny_llama, tmp_path,
                                                                                   monkeypatch, caplog):
    grid = MergeGrid(step=0.05, safety_floor=0.15)
    parents = grid.parents(store.list(), "tiny")
    ok = grid.plan(FAR.with_safety_floor(0.15), parents)
    assert grid.admits(ok, parents) is None
    off = [MergePlan((("autonomy", 0.33), ("empathy", 0.67)), ok.weights, ok.distance, "f" * 64),
           MergePlan((("autonomy", 0.5), ("low-safety", 0.5)), ok.weights, ok.distance, "e" * 64),
           MergePlan((("autonomy", 0.25), ("empathy", 0.25), ("rapport", 0.25), ("x", 0.25)), ok.weights, 0, "d" * 64)]
    assert [grid.admits(p, parents) is not None for p in off] == [True, True, True]
    assert "off the grid" in grid.admits(off[0], parents) and "safety floor" in grid.admits(off[1], parents)
    with pytest.raises(ValueError, match="1/n"):
        MergeGrid(step=0.3)
    router = router_for(store, tiny_llama, tmp_path / "cache")
    monkeypatch.setattr(MergeGrid, "plan", lambda self, target, parents: off[0])
    d = router.route(FAR)
    assert not d.merged and d.adapter_id in ("empathy", "autonomy") and router.merge_cache.ids() == []
    assert "off the grid" in caplog.text


# ---------------------------------------------------------------- processes and config
def test_two_processes_build_one_merge(store, keys, tiny_llama, tmp_path):
    go = tmp_path / "go"
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        from adapters.merge_cache import MergeCache
        from adapters.registry import AdapterStore
        from alignment.objectives import Preference
        from serving.router import PreferenceRouter
        store = AdapterStore(Path({str(store.root)!r}), public_key={str(keys[1])!r})
        router = PreferenceRouter(store, 0.15, True, 0.3, {str(tiny_llama)!r},
                                  merge_cache=MergeCache(Path({str(tmp_path / "cache")!r})))
        while not Path({str(go)!r}).exists():
            time.sleep(0.01)
        d = router.route(Preference({FAR.as_dict()!r}))
        print(d.adapter_id, router.merges_built)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    go.touch()
    outs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0] == outs[1][0] and outs[0][0].startswith("merge-")
    assert sorted(int(o[1]) for o in outs) == [0, 1], "one process built it, the other waited and reused it"
    assert MergeCache(tmp_path / "cache").ids() == [outs[0][0]]
    assert store.verify_signature()


def test_merge_settings_and_their_environment_overrides(tmp_path):
    cfg = ServeConfig(data_dir=tmp_path / "d")
    assert (cfg.merge_cache_dir, cfg.merge_cache_max_count, cfg.merge_cache_max_bytes, cfg.merge_grid,
            cfg.merge_max_parents) == (tmp_path / "d" / "merge-cache", 16, 256 * 1024 ** 2, 0.05, 3)
    env = {"ATTUNE_DATA_DIR": str(tmp_path / "d"), "ATTUNE_MERGE_CACHE_DIR": str(tmp_path / "m"),
           "ATTUNE_MERGE_CACHE_MAX_COUNT": "4", "ATTUNE_MERGE_CACHE_MAX_BYTES": str(64 * 1024 ** 2),
           "ATTUNE_MERGE_GRID": "0.1", "ATTUNE_MERGE_MAX_PARENTS": "2"}
    cfg = ServeConfig.from_env(env)
    assert (cfg.merge_cache_dir, cfg.merge_cache_max_count, cfg.merge_cache_max_bytes, cfg.merge_grid,
            cfg.merge_max_parents) == (tmp_path / "m", 4, 64 * 1024 ** 2, 0.1, 2)
    with pytest.raises(ConfigError, match="merge_grid .*1/n"):
        ServeConfig.from_mapping({"merge_grid": 0.3})
    with pytest.raises(ConfigError, match="must not be the signed adapter store"):
        ServeConfig.from_mapping({"store_dir": str(tmp_path / "s"), "merge_cache_dir": str(tmp_path / "s" / "m")})
