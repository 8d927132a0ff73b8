"""`attune eval tune`: compare candidate training settings on the corpus's rm-val prompts (issue 13), so that the
recipe is chosen without the test prompts or the judge.

Each candidate is an adapter store trained from a variant of the recipe (`attune train --recipe VARIANT --out DIR
--only ...`). Base and each store's emphasised MODPO adapters write greedy replies to every rm-val prompt; the
training reward model v2 (fitted on rm-train, never the judge) scores them; the report gives, per candidate, each
adapter's gain over base on its own objective and steering accuracy, both with 95% bootstrap intervals. Replies
are cached per adapter checksum under runs/eval/, so a candidate already measured costs nothing.

Selecting by the reward model that shaped the pairs can favour what it over-rewards; the judge and the blind panel
then measure the chosen recipe on held-out prompts (`attune eval`, `attune eval panel`)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np


def rmval_prompts(counsel_chat: str | None) -> list[dict]:
    """The corpus's rm-val prompts with their text ({id, source, prompt}); counsel-chat ones need the CSV (a path
    from alignment.pipeline.counsel_chat_source, None without one)."""
    from alignment.corpus_data import load_prompts, resolve_texts

    prompts = [p for p in load_prompts() if p.split == "rm-val"]
    if counsel_chat is None:
        prompts = [p for p in prompts if p.source != "counsel_chat"]
    texts = resolve_texts(prompts, counsel_chat)
    return [{"id": p.id, "source": p.source, "prompt": texts[p.id]} for p in prompts if p.id in texts]


def candidate_report(scored: dict[str, np.ndarray], emphasis: dict[str, str], resamples: int, seed: int) -> dict:
    """Own-objective gain over base and steering accuracy from reward-model scores ({model: [n, 6]})."""
    from alignment.objectives import OBJECTIVES
    from evals import stats

    comparisons = stats.compare(scored, resamples=resamples, seed=seed)
    matrix = stats.steering_matrix(comparisons, list(OBJECTIVES))
    accuracy = stats.steering_accuracy(scored, emphasis, list(OBJECTIVES), resamples, seed)
    own = {}
    for objective, adapter in emphasis.items():
        i, k = matrix["adapters"].index(adapter), OBJECTIVES.index(objective)
        gains = matrix["gain"][i]
        s = OBJECTIVES.index("safety")
        own[adapter] = {"objective": objective, "gain": gains[k], "low": matrix["low"][i][k],
                        "high": matrix["high"][i][k], "largest_is_own": int(np.argmax(gains)) == k,
                        "safety": {"gain": gains[s], "low": matrix["low"][i][s], "high": matrix["high"][i][s]}}
    return {"own_gain": own, "steering_accuracy": accuracy,
            "mean_accuracy": round(float(np.mean([a["accuracy"] for a in accuracy.values()])), 4) if accuracy else None}


PROMPT_STYLES = "prompt-styles"  # the candidate name of steering by prompting alone (alignment.styles)


TUNED_RECIPES = ("modpo", "merge")
"""Adapters a candidate store may compare: MODPO adapters, and merges of them (`attune adapters extrapolate`)."""


def tune(stores: list[str], recipe_name: str = "shipped", counsel_chat: str | None = None, max_tokens: int = 64,
         out: Path | None = None, limit: int | None = None, resamples: int = 2000, seed: int = 0,
         prefer_vllm: bool = True, prompt_styles: bool = False) -> dict:
    from adapters.registry import AdapterStore
    from alignment import basemodel, styles
    from alignment import prompts as P
    from alignment.generate import GenerationSettings, engine_label, generate_each
    from alignment.objectives import OBJECTIVES
    from alignment.pipeline import RUNS_DIR, counsel_chat_source
    from alignment.recipe import load_recipe
    from alignment.reward import RewardModel
    from attune.paths import REPORTS_DIR, REWARD_DIR
    from evals import reply_cache, stats

    def log(m: str) -> None:
        print(f"[attune eval tune] {m}", flush=True)

    recipe = load_recipe(recipe_name)
    counsel_chat = counsel_chat_source(counsel_chat)
    items = rmval_prompts(counsel_chat)[:limit or None]
    prompts = [it["prompt"] for it in items]
    convs = [P.chat(p) for p in prompts]
    settings = GenerationSettings(max_tokens=max_tokens, temperature=0.0, seed=0)
    base_model = basemodel.resolve(recipe.base_model)
    engine = engine_label(prefer_vllm)
    reward = RewardModel.load(REWARD_DIR)
    log(f"{len(items)} rm-val prompts; scorer: the training reward model ({REWARD_DIR.name})")

    def replies_of(models: dict[str, tuple[str, Path | None]], style: dict[str, str] | None = None
                   ) -> dict[str, list[str]]:
        def generate(name: str) -> list[str]:  # style: the objective whose instruction a model writes under
            conv = [styles.styled_chat(p, style[name]) for p in prompts] if style else convs
            return generate_each(base_model, {name: models[name][1]}, conv, settings, prefer_vllm, log=log)[name]

        return reply_cache.cached_replies(
            {name: checksum for name, (checksum, _) in models.items()}, prompts,
            basemodel.display_name(recipe.base_model), engine, settings, RUNS_DIR / "eval", generate, log)

    base = reward.score(prompts, replies_of({"base": ("base", None)})["base"])
    report = {"meta": {"prompts": len(items), "split": "rm-val", "scorer": str(REWARD_DIR.name),
                       "max_tokens": max_tokens, "engine": engine, "recipe": recipe.name},
              "candidates": {}}
    for folder in stores:
        store = AdapterStore(Path(folder))
        entries = {i: store.entry(i) for i in store.ids()}
        emphasis = stats.emphasised(entries.values(), TUNED_RECIPES)
        chosen = sorted(set(emphasis.values()))
        if len(chosen) < 2:
            raise ValueError(f"{folder}: fewer than two emphasised MODPO adapters to compare")
        models = {f"{Path(folder).name}/{i}": (reply_cache.adapter_checksum(entries[i].files), store.get(i))
                  for i in chosen}
        replies = replies_of(models)
        scored = {"base": np.asarray(base), **{i: np.asarray(reward.score(prompts, replies[f"{Path(folder).name}/{i}"]))
                                              for i in chosen}}
        report["candidates"][candidate_name(folder)] = candidate_report(scored, emphasis, resamples, seed)
    if prompt_styles:  # base under each objective's style instruction, in place of an adapter per objective
        style = {f"{PROMPT_STYLES}/{o}": o for o in OBJECTIVES}
        replies = replies_of({name: (reply_cache.text_checksum(styles.system_prompt(o)), None)
                              for name, o in style.items()}, style)
        scored = {"base": np.asarray(base), **{o: np.asarray(reward.score(prompts, replies[f"{PROMPT_STYLES}/{o}"]))
                                              for o in OBJECTIVES}}
        report["candidates"][PROMPT_STYLES] = candidate_report(scored, {o: o for o in OBJECTIVES}, resamples, seed)
    out = Path(out or REPORTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    today = time.strftime("%Y-%m-%d")
    for c in report["candidates"].values():
        c["measured"] = today
    report = merged_report(out / "tuning.json", report)
    (out / "tuning.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "tuning.md").write_text(markdown(report))
    print((out / "tuning.md").read_text())
    return report


def candidate_name(folder: str | Path) -> str:
    """A store's name in the report: its path from the repository root when inside it (`adapters/store` however
    it was given), so that one store measured twice is one candidate."""
    from attune.paths import REPO_ROOT

    path = Path(folder).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def merged_report(path: Path, report: dict) -> dict:
    """The report with the candidates of an earlier report at `path` that this run did not measure, when that report
    was measured the same way (same meta): a candidate whose adapters are gone keeps its figures; one measured again
    is replaced. A report measured otherwise is not mixed in."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return report
    if earlier.get("meta") != report["meta"]:
        return report
    kept = {k: v for k, v in earlier.get("candidates", {}).items() if k not in report["candidates"]}
    return {**report, "candidates": {**kept, **report["candidates"]}}


def _gain(g: dict) -> str:
    return f"{g['gain']:+.2f} [{g['low']:+.2f}, {g['high']:+.2f}]"


def markdown(report: dict) -> str:
    m = report["meta"]
    lines = ["# Recipe tuning on rm-val (`attune eval tune`)", "",
             f"{m['prompts']} corpus rm-val prompts, greedy replies of {m['max_tokens']} tokens ({m['engine']}), "
             f"scored by the training reward model `{m['scorer']}` (never the judge, never the test prompts).", "",
             "Greedy replies are not bit-stable on a CPU: numerics change with the machine, the dtype (bf16 where "
             "the CPU has it, else float32) and the batch, and a store's replies generated in another run or on "
             "another machine differ on some prompts. Compare candidates whose replies were generated on the same "
             "day, and read a difference in mean steering accuracy against the per-objective intervals.", ""]
    for name, c in report["candidates"].items():
        lines += [f"## `{name}`", "", f"Mean steering accuracy: {c['mean_accuracy']} (chance "
                  f"{next(iter(c['steering_accuracy'].values()))['chance']}); replies generated "
                  f"{c.get('measured', 'in an earlier run')}", "",
                  "| adapter | objective | own gain over base | largest gain is own | steering accuracy | safety gain |",
                  "|---|---|---|---|---|---|"]
        for adapter, g in sorted(c["own_gain"].items()):
            a = c["steering_accuracy"][g["objective"]]
            gain = _gain(g)
            lines.append(f"| `{adapter}` | {g['objective']} | {gain} | {'yes' if g['largest_is_own'] else 'no'} | "
                         f"{a['accuracy']:.2f} [{a['low']:.2f}, {a['high']:.2f}] | {_gain(g['safety'])} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def tune_command(stores: list[str] | None = None, recipe: str = "shipped", counsel_chat: str | None = None,
                 limit: int | None = None, out: str | None = None, prompt_styles: bool = False) -> int:
    """Compare candidate adapter stores on the corpus's rm-val prompts with the training reward model."""
    from attune.paths import STORE_DIR

    tune(stores or [str(STORE_DIR)], recipe, counsel_chat, out=Path(out) if out else None, limit=limit,
         prompt_styles=prompt_styles)
    return 0


def commands(arg) -> dict:
    """The `attune eval tune` entry of attune.cli.COMMANDS (`arg` is attune.cli.arg)."""
    return {("eval", "tune"): (tune_command, [
        arg("stores", nargs="*", metavar="STORE", help="adapter stores to compare (default: adapters/store), each "
            "trained from a recipe variant, e.g. `attune train --recipe VARIANT --out DIR --only ...`"),
        arg("--recipe", default="shipped", help="recipe whose base model generates (default %(default)s)"),
        arg("--counsel-chat", help="counsel-chat CSV path (default ../shared/data/counsel_chat/counsel_chat.csv)"),
        arg("--limit", type=int, help="at most this many rm-val prompts (smoke runs)"),
        arg("--prompt-styles", action="store_true", help="also compare steering by prompting alone: base under each "
            "objective's style instruction (alignment/styles.py)"),
        arg("--out", help="folder for tuning.{json,md} (default reports/)")])}
