"""`attune train`: run a recipe end to end. Samples on-policy replies once (cached under runs/),
trains every adapter of the recipe, merges soups exactly, and registers each adapter in the store
with its weights, recipe, base model, data hash and file checksums."""
from __future__ import annotations

import gc
import json
import shutil
import time
from pathlib import Path

import numpy as np

from alignment import basemodel, data, onpolicy
from alignment.generate import GenerationSettings, make_generator
from alignment.objectives import OBJECTIVES, Preference
from alignment.recipe import AdapterSpec, Recipe, load_recipe
from alignment.trainers import TrainArgs, train_preference, train_sft
from attune.paths import REPO_ROOT, REWARD_DIR, STORE_DIR, DEFAULT_COUNSEL_CHAT

RUNS_DIR = REPO_ROOT / "runs"


def _log(msg: str) -> None:
    print(f"[attune train] {msg}", flush=True)


def counsel_chat_rows(source: str | None):
    src = source or (str(DEFAULT_COUNSEL_CHAT) if DEFAULT_COUNSEL_CHAT.exists() else None)
    return data.load_counsel_chat(src) if src else []


def onpolicy_samples(recipe: Recipe, base: str, train: list, cc_rows: list) -> Path:
    """Sample (or reuse) the recipe's on-policy replies; returns the cache file."""
    op = recipe.onpolicy
    prompts = [ex.message for ex in train][:op.prompts]
    if op.counsel_chat_prompts:
        prompts += data.counsel_chat_questions(cc_rows, "train")[:op.counsel_chat_prompts]
    settings = GenerationSettings(max_tokens=op.max_tokens, temperature=op.temperature, seed=0)
    key = onpolicy.cache_key(basemodel.display_name(recipe.base_model), prompts, op.samples, settings)
    cache = RUNS_DIR / recipe.name / f"onpolicy-{key}.jsonl"
    if cache.exists():
        _log(f"on-policy samples: reusing {cache}")
        return cache
    _log(f"on-policy samples: {len(prompts)} prompts x {op.samples} replies")
    t0 = time.perf_counter()
    gen = make_generator(base, prefer_vllm=op.engine != "hf")
    onpolicy.save(onpolicy.sample(prompts, gen, op.samples, settings), cache)
    del gen
    gc.collect()
    _log(f"on-policy samples: done in {time.perf_counter() - t0:.0f}s -> {cache}")
    return cache


class PreferenceData:
    """On-policy samples and seed replies for a recipe, scored once by the reward model."""

    def __init__(self, recipe: Recipe, samples_file: Path, train: list, reward_model):
        op = recipe.onpolicy
        self.cache = samples_file
        self.samples = onpolicy.score(onpolicy.load(self.cache), reward_model)
        self.seed = onpolicy.seed_scored(train, reward_model) if op.seed_pairs else []
        self.seed_ratings = [np.array([[r.ratings[o] for o in OBJECTIVES] for r in ex.replies], float)
                             for ex in train] if op.seed_pairs else []
        self.min_gap, self.max_pairs = op.min_gap, op.max_pairs
        self.hash = data.data_hash([*data.seed_files(), data.SPLITS_FILE, self.cache])

    def rows(self, primary: str, weights: Preference | None, modpo: bool, pair_weight: float = 1.0):
        rows, dropped = onpolicy.preference_rows(self.samples, primary, weights, min_gap=self.min_gap,
                                                 modpo=modpo, pair_weight=pair_weight)
        if self.seed:
            seed_rows, _ = onpolicy.preference_rows(self.seed, primary, weights, min_gap=self.min_gap,
                                                    modpo=modpo, seed_ratings=self.seed_ratings,
                                                    pair_weight=pair_weight)
            rows = _interleave(rows, seed_rows)
        if self.max_pairs:
            rows = rows[:self.max_pairs]
        return rows, dropped


def _interleave(a: list, b: list) -> list:
    """a0, b0, a1, b1, ... so that a cap keeps both sources in equal measure."""
    out = [x for pair in zip(a, b) for x in pair]
    n = min(len(a), len(b))
    return out + a[n:] + b[n:]


def sft_rows(recipe: Recipe, train: list, cc_rows: list) -> list[dict]:
    from alignment import prompts as P

    rows = []
    if recipe.sft.seed_best:
        for ex in train:
            best = max(ex.replies, key=lambda r: sum(r.ratings.values()))
            rows.append({"prompt": P.chat(ex.message), "completion": P.assistant(best.text)})
    pairs = sorted(data.counsel_chat_sft(cc_rows, "train"), key=lambda qa: len(qa[1]))
    for q, a in pairs[:recipe.sft.counsel_chat_examples]:
        rows.append({"prompt": P.chat(q), "completion": P.assistant(a)})
    return rows


def _to_fp16(folder: Path) -> None:
    """Shipped adapters are stored in float16 (half the bytes; vLLM casts to the model dtype)."""
    from safetensors.torch import load_file, save_file
    import torch

    f = folder / "adapter_model.safetensors"
    save_file({k: v.to(torch.float16).contiguous() for k, v in load_file(f).items()}, str(f))


def _register(store, folder: Path, spec: AdapterSpec, weights: Preference, recipe: Recipe,
              data_hash: str, stats: dict, parents=()) -> None:
    from adapters.registry import UnknownAdapter

    try:
        store.remove(spec.id)
    except UnknownAdapter:
        pass
    for junk in ("README.md", "_trainer"):
        p = folder / junk
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    store.add(folder, {"id": spec.id, "recipe": spec.recipe, "weights": weights.as_dict(),
                       "primary_objective": spec.primary, "base_model": basemodel.display_name(recipe.base_model),
                       "data_hash": data_hash, "eval": {"training": stats},
                       "parents": [{"id": p.id, "weight": p.weight} for p in parents]})


def run_recipe(name: str, only: list[str] | None = None, base_model: str | None = None,
               out: Path | None = None, counsel_chat: str | None = None, max_steps: int | None = None) -> dict:
    import adapters

    adapters.ensure_attune_adapters()
    from adapters.merge import merge_adapters
    from adapters.registry import AdapterStore
    from alignment.reward import RewardModel
    from transformers import AutoTokenizer

    recipe = load_recipe(name)
    if base_model:
        recipe = recipe.model_copy(update={"base_model": base_model})
    unknown = sorted(set(only or []) - {a.id for a in recipe.adapters})
    if unknown:
        raise ValueError(f"--only names unknown adapter(s) {unknown}; recipe has {[a.id for a in recipe.adapters]}")
    base = basemodel.resolve(recipe.base_model)
    store = AdapterStore(out or STORE_DIR)
    args: TrainArgs = recipe.train_args(max_steps=max_steps)
    examples = data.load_seed()
    train = data.split_examples(examples, "train")
    cc_rows = counsel_chat_rows(counsel_chat)
    tok = AutoTokenizer.from_pretrained(base)
    work = RUNS_DIR / recipe.name / "adapters"
    todo = [a for a in recipe.adapters if not only or a.id in only]
    pref_data = None
    if any(a.recipe in ("dpo", "modpo", "joint_dpo") for a in todo):
        samples_file = onpolicy_samples(recipe, base, train, cc_rows)
        pref_data = PreferenceData(recipe, samples_file, train, RewardModel.load(REWARD_DIR))
    data_hash = pref_data.hash if pref_data else data.data_hash([*data.seed_files(), data.SPLITS_FILE])
    timings: dict[str, dict] = {}
    t_all = time.perf_counter()
    for spec in todo:
        folder = work / spec.id
        shutil.rmtree(folder, ignore_errors=True)
        weights = spec.preference()
        _log(f"{spec.id}: {spec.recipe}")
        if spec.recipe == "sft":
            stats = train_sft(base, tok, sft_rows(recipe, train, cc_rows), args, folder)
        elif spec.recipe == "soup":
            t0 = time.perf_counter()
            parents = [(store.get(p.id), p.weight) for p in spec.parents]
            merge_adapters(base, parents, folder)
            mix = sum(np.asarray(store.entry(p.id).preference.as_vector()) * p.weight for p in spec.parents)
            weights = Preference.from_vector(mix, normalize=True)
            stats = {"seconds": round(time.perf_counter() - t0, 2)}
        elif spec.recipe == "joint_dpo":
            rows = []
            for o, w in weights.as_dict().items():
                if w > 0:
                    rows += pref_data.rows(o, None, modpo=False, pair_weight=w)[0]
            stats = train_preference(base, tok, rows, args, folder)
        else:
            modpo = spec.recipe == "modpo"
            rows, dropped = pref_data.rows(spec.primary, weights if modpo else None, modpo=modpo)
            stats = {**train_preference(base, tok, rows, args, folder), "pairs": len(rows),
                     "dropped_small_gap": dropped}
        if spec.recipe != "soup":
            _to_fp16(folder)
        _register(store, folder, spec, weights, recipe, data_hash, stats, spec.parents or ())
        timings[spec.id] = stats
        _log(f"{spec.id}: {json.dumps(stats)}")
    total = time.perf_counter() - t_all
    summary = {"recipe": recipe.name, "adapters": timings, "seconds_total": round(total, 1)}
    (RUNS_DIR / recipe.name).mkdir(parents=True, exist_ok=True)
    (RUNS_DIR / recipe.name / "train_summary.json").write_text(json.dumps(summary, indent=2))
    _log(f"done: {len(todo)} adapters in {total:.0f}s")
    return summary
