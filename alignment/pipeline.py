"""`attune train`: run a recipe end to end. Samples on-policy replies once (cached under runs/),
trains every adapter of the recipe, merges soups exactly, and registers each adapter in the store
with its weights, recipe, base model, data hash and file checksums."""
from __future__ import annotations

import gc
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from alignment import basemodel, data, grid_data, onpolicy
from alignment.generate import GenerationSettings, make_generator
from alignment.objectives import Preference
from alignment.recipe import AdapterSpec, Recipe, load_recipe
from alignment.trainers import TrainArgs, train_preference, train_sft
from attune.paths import REPO_ROOT, REWARD_DIR, STORE_DIR, DEFAULT_COUNSEL_CHAT

RUNS_DIR = REPO_ROOT / "runs"


def _log(msg: str) -> None:
    print(f"[attune train] {msg}", flush=True)


def counsel_chat_rows(source: str | None):
    src = source or (str(DEFAULT_COUNSEL_CHAT) if DEFAULT_COUNSEL_CHAT.exists() else None)
    return data.load_counsel_chat(src) if src else []


def counsel_chat_source(source: str | None) -> str | None:
    return source or (str(DEFAULT_COUNSEL_CHAT) if DEFAULT_COUNSEL_CHAT.exists() else None)


def extra_prompts(count: int, cc_source: str | None, rated: set[str]) -> list[str]:
    """Up to `count` counsel-chat train questions for reward-model pairs: none rated in this grid and none a corpus
    prompt of any split (the corpus's test, judge-train and rm-val prompts come from the same train questions)."""
    if not count or not cc_source:
        return []
    held = rated | grid_data.corpus_prompt_texts(cc_source)
    return [q for q in data.counsel_chat_questions(counsel_chat_rows(cc_source), "train") if q not in held][:count]


def onpolicy_samples(recipe: Recipe, base: str, cc_source: str | None, rated: set[str]) -> Path | None:
    """Sample (or reuse) replies for the recipe's extra, unrated prompts; returns the cache file (None: no extras)."""
    op = recipe.onpolicy
    prompts = extra_prompts(op.counsel_chat_prompts, cc_source, rated)
    if not prompts:
        return None
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


class GridData:
    """The rated prompts of a recipe (alignment.grid_data) and the reward model's raw scores of their replies,
    computed once and only for the replies that MODPO margins need."""

    def __init__(self, recipe: Recipe, base: str, train: list, cc_source: str | None, reward_model):
        from alignment.corpus_build import round_dir

        pairs = recipe.pairs
        self.items: list[grid_data.Rated] = []
        self.rounds = tuple(pairs.corpus_rounds)  # an adapter's own corpus_rounds replace these
        self._files = [*data.seed_files(), data.SPLITS_FILE]
        self._extra_files: list[Path] = []
        self.round_files: dict[int, list[Path]] = {}
        if pairs.corpus_labels:
            wanted = sorted({*self.rounds, *(n for a in recipe.adapters for n in a.corpus_rounds or ())})
            self.items += grid_data.corpus_rated(pairs.corpus_split, cc_source, log=_log, rounds=tuple(wanted))
            for n in wanted:
                folder = round_dir(n)
                self.round_files[n] = [folder / "prompts.jsonl", folder / "samples.jsonl",
                                       *sorted((folder / "labels").glob("pass1-*.jsonl"))]
        if pairs.seed_ratings:
            self.items += grid_data.seed_rated(train)
        self.reward_model, self.raw = reward_model, {}
        samples_file = onpolicy_samples(recipe, base, cc_source, {it.prompt for it in self.items})
        if samples_file:
            for d in onpolicy.load(samples_file):
                scores = reward_model.raw_scores([d["prompt"]] * len(d["replies"]), d["replies"])
                self.items.append(grid_data.scored_rated(d["prompt"], d["replies"], scores))
                self.raw.update({(d["prompt"], t): s for t, s in zip(d["replies"], scores)})
            self._extra_files.append(samples_file)
        self.max_pairs = pairs.max_pairs
        self.hash = self.data_hash(self.rounds)

    def data_hash(self, rounds: tuple[int, ...]) -> str:
        """What the rows of an adapter trained on `rounds` are drawn from (recorded in the store's manifest)."""
        files = [f for n in rounds for f in self.round_files.get(n, [])]
        return data.data_hash([*self._files, *files, *self._extra_files])

    def rows(self, primary: str, weights: Preference | None, modpo: bool, pair_weight: float = 1.0,
             selection: str = "best_worst", rounds: tuple[int, ...] | None = None, max_pairs: int | None = None
             ) -> list[dict]:
        rounds = rounds or self.rounds
        items = [it for it in self.items if it.round is None or it.round in rounds]
        rows = grid_data.interleave_sources(
            grid_data.pair_rows(items, primary, pair_weight=pair_weight, selection=selection),
            max_pairs or self.max_pairs)
        if not modpo:
            return rows
        need = sorted({(r["texts"][0], t) for r in rows for t in r["texts"][1:]} - set(self.raw))
        if need:
            scores = self.reward_model.raw_scores([p for p, _ in need], [t for _, t in need])
            self.raw.update(zip(need, scores))
        return grid_data.add_margins(rows, primary, weights, self.raw)


def preference_rows(spec: AdapterSpec, grid: GridData) -> list[dict]:
    """The rows an adapter trains on: DPO on its primary objective, MODPO with margins, joint DPO on each objective
    with its weight."""
    weights = spec.preference()
    if spec.recipe == "joint_dpo":
        return [r for o, w in weights.as_dict().items() if w > 0 for r in grid.rows(o, None, False, pair_weight=w)]
    return grid.rows(spec.primary, weights, modpo=spec.recipe == "modpo", selection=spec.pair_selection,
                     rounds=tuple(spec.corpus_rounds) if spec.corpus_rounds else None, max_pairs=spec.max_pairs)


# Spec fields added after adapters were trained, with their defaults: left out of the hash at the default.
ADDED_SPEC_FIELDS = {"pair_selection": "best_worst", "corpus_rounds": None, "max_pairs": None, "init_from": None}


def init_folder(spec: AdapterSpec) -> Path | None:
    """The adapter folder `spec.init_from` names (relative to the repository root, or absolute)."""
    if spec.init_from is None:
        return None
    path = Path(spec.init_from)
    return path if path.is_absolute() else REPO_ROOT / path


def init_weights_hash(spec: AdapterSpec) -> list[str]:
    """The hash of the weights an adapter starts from (none: [], so adapters trained from zero keep their hash)."""
    folder = init_folder(spec)
    if folder is None:
        return []
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"adapter {spec.id!r}: init_from {spec.init_from!r} has no adapter_model.safetensors "
                                f"(looked in {folder})")
    return [data.data_hash([weights])]


def spec_for_hash(spec: AdapterSpec) -> dict:
    """The spec as hashed: fields added later are left out at their defaults, so adapters trained before they
    existed keep their hash (and their resume markers)."""
    return _without_added_defaults(spec.model_dump(), ADDED_SPEC_FIELDS)


ADDED_TRAIN_FIELDS = {"rpo_alpha": 0.0}
"""TrainArgs fields added after adapters were trained, left out of the hash at their defaults (as ADDED_SPEC_FIELDS)."""


def train_args_for_hash(args: TrainArgs) -> dict:
    return _without_added_defaults(asdict(args), ADDED_TRAIN_FIELDS)


def _without_added_defaults(fields: dict, added: dict) -> dict:
    """`fields` without those of `added` that still hold the default they were added with."""
    return {k: v for k, v in fields.items() if added.get(k, object()) != v}


def recipe_hash(*parts) -> str:
    """What an adapter is made from (spec, train args, its rows or parents, base model): a trained adapter whose
    hash matches is reused, so an interrupted grid resumes where it stopped."""
    return onpolicy.cache_key(*parts)


def sequence_cache(recipe: Recipe, base: str, tok, args: TrainArgs, rows: list[dict]):
    """The grid's SequenceCache (alignment.fast_pref), kept under runs/ and extended with new sequences."""
    from alignment import fast_pref

    layer = fast_pref.first_lora_layer(args.layers_to_transform)
    path = RUNS_DIR / recipe.name / f"seqcache-{recipe_hash(basemodel.display_name(recipe.base_model), layer, args.max_length)}.pt"
    cache = fast_pref.SequenceCache.load(path) if path.exists() else None
    before = len(cache.encoded) if cache else 0
    seqs = [(r["prompt"], r[side]) for r in rows for side in ("chosen", "rejected")]
    cache = fast_pref.build_cache(base, tok, seqs, layer, args.max_length, cache=cache, log=_log)
    if len(cache.encoded) > before:
        cache.save(path)
    _log(f"sequence cache: {len(cache.encoded)} sequences ({len(cache.encoded) - before} new), "
         f"{cache.seconds:.0f}s of base-model passes in all -> {path}")
    return cache


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


PREFERENCE = ("dpo", "modpo", "joint_dpo")


def _make(spec: AdapterSpec, base: str, tok, args: TrainArgs, folder: Path, made_of: list, cache, store) -> dict:
    """Train (or merge) one adapter into `folder`; returns its statistics."""
    from adapters.merge import merge_adapters
    from alignment import fast_pref

    t0 = time.perf_counter()
    if spec.recipe == "sft":
        return train_sft(base, tok, made_of, args, folder)
    if spec.recipe == "soup":
        merge_adapters(base, [(store.get(p.id), p.weight) for p in spec.parents], folder)
        return {"seconds": round(time.perf_counter() - t0, 2)}
    sources = grid_data.source_counts(made_of)
    if cache is None:
        stats = train_preference(base, tok, [{k: v for k, v in r.items() if k != "source"} for r in made_of],
                                 args, folder)
        stats["pairs"] = len(made_of)
    else:
        pairs = [{"chosen_key": fast_pref.key(r["prompt"], r["chosen"]),
                  "rejected_key": fast_pref.key(r["prompt"], r["rejected"]),
                  "margin": r["margin"], "w_primary": r["w_primary"], "weight": r["weight"]} for r in made_of]
        stats = fast_pref.train_adapter(base, cache, pairs, args, folder, init_from=init_folder(spec),
                                        log=lambda m: _log(f"{spec.id}: {m}"))
        if spec.init_from is not None:
            stats["init_from"] = spec.init_from
    return {**stats, "pair_sources": sources}


def run_recipe(name: str, only: list[str] | None = None, base_model: str | None = None,
               out: Path | None = None, counsel_chat: str | None = None, max_steps: int | None = None) -> dict:
    import adapters

    adapters.ensure_attune_adapters()
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
    base_name = basemodel.display_name(recipe.base_model)
    store = AdapterStore(out or STORE_DIR)
    args: TrainArgs = recipe.train_args(max_steps=max_steps)
    train = data.split_examples(data.load_seed(), "train")
    cc_source = counsel_chat_source(counsel_chat)
    cc_rows = counsel_chat_rows(cc_source)
    tok = AutoTokenizer.from_pretrained(base)
    work = RUNS_DIR / recipe.name / "adapters"
    todo = [a for a in recipe.adapters if not only or a.id in only]
    if args.trainer != "cached" and any(a.init_from for a in todo):
        raise ValueError("init_from needs the cached trainer (train.trainer: cached)")
    rows: dict[str, list[dict]] = {}
    grid = None
    if any(a.recipe in PREFERENCE for a in todo):
        grid = GridData(recipe, base, train, cc_source, RewardModel.load(REWARD_DIR))
        rows = {a.id: preference_rows(a, grid) for a in todo if a.recipe in PREFERENCE}
    data_hash = grid.hash if grid else data.data_hash([*data.seed_files(), data.SPLITS_FILE])
    cache = None
    if rows and args.trainer == "cached":
        cache = sequence_cache(recipe, base, tok, args, [r for rs in rows.values() for r in rs])
    hashes: dict[str, str] = {}
    timings: dict[str, dict] = {}
    t_all = time.perf_counter()
    for spec in todo:
        weights = spec.preference()
        if spec.recipe == "soup":
            made_of = [[p.id, p.weight, hashes.get(p.id) or store.entry(p.id).eval.get("training", {}).get(
                "recipe_hash")] for p in spec.parents]
        elif spec.recipe == "sft":
            made_of = sft_rows(recipe, train, cc_rows)
        else:
            made_of = [{k: v for k, v in r.items() if k != "texts"} for r in rows[spec.id]]
        h = hashes[spec.id] = recipe_hash(spec_for_hash(spec), train_args_for_hash(args), base_name, made_of,
                                          *init_weights_hash(spec))
        folder = work / f"{spec.id}-{h}"
        done = work / f"{spec.id}-{h}.done.json"  # beside the folder: everything inside it goes into the store
        if done.exists():
            stats = json.loads(done.read_text())
            _log(f"{spec.id}: reusing {folder} (recipe hash {h})")
        else:
            shutil.rmtree(folder, ignore_errors=True)
            _log(f"{spec.id}: {spec.recipe}")
            done.unlink(missing_ok=True)
            stats = _make(spec, base, tok, args, folder, made_of, cache, store)
            if spec.recipe != "soup":
                _to_fp16(folder)
            stats["recipe_hash"] = h
            done.write_text(json.dumps(stats))
        if spec.recipe == "soup":
            mix = sum(np.asarray(store.entry(p.id).preference.as_vector()) * p.weight for p in spec.parents)
            weights = Preference.from_vector(mix, normalize=True)
        spec_data = grid.data_hash(tuple(spec.corpus_rounds)) if grid and spec.corpus_rounds else data_hash
        _register(store, folder, spec, weights, recipe, spec_data, stats, spec.parents or ())
        timings[spec.id] = stats
        _log(f"{spec.id}: {json.dumps(stats)}")
    total = time.perf_counter() - t_all
    summary = {"recipe": recipe.name, "adapters": timings, "seconds_total": round(total, 1)}
    (RUNS_DIR / recipe.name).mkdir(parents=True, exist_ok=True)
    (RUNS_DIR / recipe.name / "train_summary.json").write_text(json.dumps(summary, indent=2))
    _log(f"done: {len(todo)} adapters in {total:.0f}s")
    return summary
