"""Routing: the safety floor comes first, the nearest routable adapter wins, and with the merge policy a far
preference gets an exact merge that is built once (even under concurrent calls) into the merge cache, never into the
store, checksummed and reused."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import adapters.merge
from adapters.integrity import hash_folder
from adapters.merge import check_exact
from adapters.merge_cache import MergeCache
from adapters.registry import AdapterStore
from alignment.objectives import OBJECTIVES, Preference
from serving.router import NoRoutableAdapter, PreferenceRouter, plan_mix


def weights(**w) -> dict[str, float]:
    return {o: float(w.get(o, 0.0)) for o in OBJECTIVES}


EMPATHY = weights(empathy=0.75, safety=0.15, active_listening=0.1)
AUTONOMY = weights(patient_autonomy=0.75, safety=0.15, self_motivated_change=0.1)
SAFETY = weights(safety=0.7, empathy=0.1, trust_rapport=0.2)
FAR = Preference(weights(empathy=0.4, patient_autonomy=0.4, active_listening=0.05, self_motivated_change=0.05,
                         safety=0.1))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("router-llama")
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def make_lora(base: Path, out: Path, seed: int, r: int = 4) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                     init_lora_weights=False)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lora_folders(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("router-loras")
    return {name: make_lora(tiny_llama, root / name, seed) for seed, name in enumerate(["e", "a", "s", "x"])}


@pytest.fixture
def store(tmp_path, lora_folders) -> AdapterStore:
    s = AdapterStore(tmp_path / "store")
    exact = FAR.with_safety_floor(0.15).as_dict()
    for adapter_id, folder, recipe, w in [("empathy", "e", "modpo", EMPATHY), ("autonomy", "a", "modpo", AUTONOMY),
                                          ("safety-first", "s", "soup", SAFETY), ("sft-exact", "x", "sft", exact)]:
        s.add(lora_folders[folder], {"id": adapter_id, "recipe": recipe, "weights": w, "base_model": "tiny",
                                     "data_hash": "sha256:test"})
    return s


@pytest.fixture
def cache(tmp_path) -> MergeCache:
    return MergeCache(tmp_path / "merge-cache")


def test_safety_floor_applies_before_matching(tmp_path, lora_folders):
    s = AdapterStore(tmp_path / "floor")
    s.add(lora_folders["e"], {"id": "pure-empathy", "recipe": "modpo", "weights": weights(empathy=1.0),
                              "base_model": "tiny", "data_hash": "h"})
    s.add(lora_folders["a"], {"id": "floored-empathy", "recipe": "modpo", "weights": weights(empathy=0.8, safety=0.2),
                              "base_model": "tiny", "data_hash": "h"})
    router = PreferenceRouter(s, safety_floor=0.15)
    d = router.route(Preference(weights(empathy=1.0)))
    assert d.effective["safety"] == pytest.approx(0.15) and d.effective["empathy"] == pytest.approx(0.85)
    assert d.adapter_id == "floored-empathy" and d.distance == pytest.approx(0.1)
    assert not d.merged and d.merge_seconds is None
    assert PreferenceRouter(s, safety_floor=0.0).route(Preference(weights(empathy=1.0))).adapter_id == "pure-empathy"


def test_nearest_routable_adapter_wins(store):
    router = PreferenceRouter(store, safety_floor=0.15, merge_policy=False)
    assert router.route(Preference(EMPATHY)).adapter_id == "empathy"
    near_safety = router.route(Preference(weights(safety=0.6, empathy=0.2, trust_rapport=0.2)))
    assert near_safety.adapter_id == "safety-first" and near_safety.distance == pytest.approx(0.2)
    far = router.route(FAR)
    assert far.adapter_id != "sft-exact" and far.distance > 0.6 and not far.merged
    assert router.safety_adapter_id() == "safety-first"


def test_plan_mix_finds_the_convex_combination(store):
    entries = {a.id: a for a in store.list()}
    plan = plan_mix(FAR.with_safety_floor(0.15), [entries["empathy"], entries["autonomy"], entries["safety-first"]])
    assert dict(plan.parents) == {"autonomy": 0.5, "empathy": 0.5}
    assert plan.distance < 0.07 and plan.adapter_id.startswith("merge-")
    assert plan.weights["empathy"] == pytest.approx(0.375)
    retrained = entries["empathy"].model_copy(update={"files": {"adapter_model.safetensors": "0" * 64}})
    replan = plan_mix(FAR.with_safety_floor(0.15), [retrained, entries["autonomy"], entries["safety-first"]])
    assert replan.parents == plan.parents and replan.adapter_id != plan.adapter_id
    assert plan_mix(FAR, [entries["empathy"], entries["autonomy"]], max_rank=7) is None
    assert plan_mix(Preference(EMPATHY), [entries["empathy"], entries["autonomy"]]) is None


def test_merge_built_once_under_concurrency_and_reused(store, cache, tiny_llama, monkeypatch):
    """Four threads over two routers (two thread locks, like two processes): one build, one cache entry, and the
    store's manifest is not touched."""
    calls = []
    real = adapters.merge.merge_adapters

    def counting(*args, **kwargs):
        calls.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(adapters.merge, "merge_adapters", counting)
    manifest = store.manifest_path.read_bytes()
    routers = [PreferenceRouter(store, safety_floor=0.15, merge_policy=True, merge_threshold=0.3,
                                base_model_path=str(tiny_llama), merge_cache=MergeCache(cache.root))
               for _ in range(2)]
    barrier = threading.Barrier(4)

    def go(i):
        barrier.wait()
        return routers[i % 2].route(FAR)

    with ThreadPoolExecutor(4) as pool:
        decisions = list(pool.map(go, range(4)))
    assert len(calls) == 1 and sum(r.merges_built for r in routers) == 1
    router = next(r for r in routers if r.merges_built)
    assert len({d.adapter_id for d in decisions}) == 1
    built = [d for d in decisions if d.merge_seconds is not None]
    assert len(built) == 1 and built[0].merge_seconds > 0
    print(f"\nmerge of two r4 q/v LoRAs on a tiny Llama: {built[0].merge_seconds:.2f} s")
    d = decisions[0]
    assert d.merged and d.distance < 0.07 and d.effective == FAR.with_safety_floor(0.15)

    record = cache.lookup(d.adapter_id)
    entry = record.adapter
    assert entry.recipe == "merge" and {p.id: p.weight for p in entry.parents} == {"empathy": 0.5, "autonomy": 0.5}
    assert record.parent_files == {"empathy": store.entry("empathy").files, "autonomy": store.entry("autonomy").files}
    assert entry.files == hash_folder(cache.path(d.adapter_id))
    assert set(entry.files) == {"adapter_config.json", "adapter_model.safetensors"}
    check_exact(cache.path(d.adapter_id), [(store.path("empathy"), 0.5), (store.path("autonomy"), 0.5)])
    assert store.manifest_path.read_bytes() == manifest and d.adapter_id not in store.ids()
    assert not store.path(d.adapter_id).exists()

    again = router.route(FAR)
    assert again.adapter_id == d.adapter_id and again.merge_seconds is None and again.merged
    restarted = PreferenceRouter(store, 0.15, True, 0.3, str(tiny_llama), merge_cache=MergeCache(cache.root))
    assert restarted.route(FAR).adapter_id == d.adapter_id and restarted.merges_built == 0
    assert len(calls) == 1 and cache.ids() == [d.adapter_id]


def test_no_merge_when_nearest_is_within_threshold(store, cache, tiny_llama):
    router = PreferenceRouter(store, 0.15, True, merge_threshold=1.5, base_model_path=str(tiny_llama),
                              merge_cache=cache)
    d = router.route(FAR)
    assert not d.merged and d.adapter_id in ("empathy", "autonomy") and router.merges_built == 0


def test_failed_merge_falls_back_to_nearest(store, cache, tiny_llama, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise adapters.merge.MergeError("injected: not exact")

    monkeypatch.setattr(adapters.merge, "merge_adapters", broken)
    router = PreferenceRouter(store, 0.15, True, 0.3, str(tiny_llama), merge_cache=cache)
    d = router.route(FAR)
    assert not d.merged and d.adapter_id in ("empathy", "autonomy") and d.distance > 0.6
    assert "injected: not exact" in caplog.text and router.merges_built == 0
    assert cache.ids() == [] and not list((cache.root / ".building").iterdir())


def test_router_config_errors(tmp_path, store):
    with pytest.raises(ValueError, match="base_model_path"):
        PreferenceRouter(store, merge_policy=True)
    with pytest.raises(ValueError, match="merge_cache"):
        PreferenceRouter(store, merge_policy=True, base_model_path="base")
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        PreferenceRouter(store, merge_threshold=3.0)
    empty = PreferenceRouter(AdapterStore(tmp_path / "empty"))
    with pytest.raises(NoRoutableAdapter):
        empty.route(FAR)
    with pytest.raises(NoRoutableAdapter, match="crisis"):
        empty.safety_adapter_id()


def test_quarantined_adapters_are_never_routed_to(store):
    router = PreferenceRouter(store, safety_floor=0.15)
    pref = Preference(EMPATHY)
    first = router.route(pref).adapter_id
    router.quarantine(first)
    second = router.route(pref).adapter_id
    assert second != first and first not in {a.id for a in router.routable()}
    router.quarantine("safety-first")
    assert router.safety_adapter_id() != "safety-first"
