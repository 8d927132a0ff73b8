"""`attune bench serve --vs-vllm`: what Attune's serving path costs over the engine alone. Starts Attune (`attune
serve`, gate off through the operator's `attune_options`), measures it, stops it; then starts a raw vLLM OpenAI server
(`python -m vllm.entrypoints.openai.api_server`) with the engine settings Attune gives vLLM (serving.engine,
serving.app._kv_bytes) and the same adapters, and measures it the same way. One server at a time: both would share
the same cores. Each gets the same untimed warm-up, then the same cells (base model and the adapters mixed, at each
concurrency): output tok/s, TTFT p50/p99, e2e p50, and Attune / vLLM ratios.

Both servers are started once and measured cell by cell in turn, the other one frozen (SIGSTOP on its whole process
tree, so that it spends no CPU): a cell of one server and the same cell of the other are seconds apart, so a change
in the machine's speed (on this shared 2-core machine, +-10% within minutes) weighs on both alike. Each cell is
measured `rounds` times per server, the order alternating.

Both see the same conversation (Attune's system prompt, then the message), greedy decoding, streaming with usage.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import httpx

from alignment.basemodel import engine_dtype
from evals.bench import BenchClient, BenchPlan, Cell, _fmt, seed_prompts
from serving import cpu_placement

SERVERS = ("attune", "vllm")
COLOCATED = "attune-colocated"
"""The third server of `--colocate-too`: Attune with engine.colocate (vLLM inside the ingress replica)."""
SCENARIOS = ("base", "mixed")
GOALS = {"tok_s_ratio": 0.95, "ttft_overhead_ms": 20.0}
"""Issue 14: Attune with the gate off >= 0.95x raw vLLM tok/s at every concurrency; TTFT p50 overhead <= 20 ms at
concurrency 1."""
BASE_NAME = "base"
"""The raw server's name for the base model (--served-model-name)."""


@dataclass
class VsPlan:
    """What one side-by-side run does; every count is bounded so that the run stops by itself."""

    requests: int = 16
    """Requests per cell (server x scenario x concurrency); raised to the cell's concurrency if lower."""
    max_tokens: int = 64
    """max_tokens of every measured request (greedy)."""
    concurrency: tuple[int, ...] = (1, 8)
    max_adapters: int = 8
    """Adapters mixed round-robin in the 'mixed' scenario (the first of the store's, as /v1/models lists them)."""
    prompts: int = 8
    """Short non-crisis prompts from the seed test split (never ../shared/eval)."""
    rounds: int = 2
    """Times each cell is measured on each server, in turn (attune then vllm, then vllm then attune, ...; with a third
    server each takes each place of the rotation in turn); the rounds of a cell pool."""
    start_timeout_s: float = 900.0
    request_timeout_s: float = 120.0
    time_limit_s: float = 1800.0
    """No request to a server starts this many seconds after its warm-up began (the other server's turns count too)."""
    place_vllm: bool = False
    """Start the raw server placed as `attune serve` places itself (serving/cpu_placement.py): its worker bound to the
    same cores, its API server and scheduler process on the others. Default: vLLM's own placement (`vllm serve`)."""
    colocate_too: bool = False
    """Also measure Attune with engine.colocate (a third server, `attune-colocated`, in the same rotation), so that
    both Attune setups meet the same machine in one run."""

    def __post_init__(self):
        self.concurrency = tuple(sorted(set(self.concurrency)))
        problems = [f"{k} must be >= 1 (got {getattr(self, k)})"
                    for k in ("requests", "max_tokens", "max_adapters", "prompts", "rounds") if getattr(self, k) < 1]
        if not self.concurrency or min(self.concurrency) < 1:
            problems.append(f"concurrency needs values >= 1 (got {self.concurrency})")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def quick(cls, **overrides) -> "VsPlan":
        """A smoke run: 2 requests of 8 tokens per cell at concurrency 1 and 2."""
        preset = dict(requests=2, max_tokens=8, concurrency=(1, 2), time_limit_s=300.0, request_timeout_s=60.0)
        return cls(**{**preset, **{k: v for k, v in overrides.items() if v is not None}})


# ---------------------------------------------------------------- the two servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_argv(cfg, model_path: str, adapters: dict[str, Path], port: int, kv_cache_bytes: int | None) -> list[str]:
    """The raw server with the arguments serving.engine.VLLMEngine gives AsyncEngineArgs for `cfg.engine`."""
    e = cfg.engine
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
            "--served-model-name", BASE_NAME, "--host", "127.0.0.1", "--port", str(port),
            "--dtype", engine_dtype(e.dtype), "--max-model-len", str(e.max_model_len),
            "--max-num-seqs", str(e.max_num_seqs), "--seed", "0",
            "--enable-lora", "--max-loras", str(e.max_loras), "--max-lora-rank", str(e.max_lora_rank),
            "--disable-log-stats"]
    if kv_cache_bytes is not None:
        argv += ["--kv-cache-memory-bytes", str(kv_cache_bytes), "--gpu-memory-utilization",
                 str(e.cpu_memory_fraction)]
    else:
        argv += ["--gpu-memory-utilization", str(e.gpu_memory_utilization)]
    if adapters:
        argv += ["--lora-modules", *(f"{a}={p}" for a, p in adapters.items())]
    return argv


class Launched:
    """A server in its own process group, its output in `log`; `stop` ends it and every process it started."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], url: str, ready_path: str, log: Path,
                 cpus: tuple[int, ...] | None = None):
        """`cpus`: the only CPUs the server's process (and what it starts) may run on; None: any."""
        self.name, self.url, self.ready_path, self.log = name, url, ready_path, log
        with open(log, "wb") as out, cpu_placement.affinity(cpus):  # inherited by the child
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def _family(self) -> list:
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _each(self, action: str) -> None:
        import psutil

        for p in self._family():
            try:
                getattr(p, action)()
            except psutil.NoSuchProcess:
                pass

    def pause(self) -> None:
        """Freeze the server and every process under it (SIGSTOP): a frozen server spends no CPU."""
        self._each("suspend")

    def resume(self) -> None:
        self._each("resume")

    def tail(self, n: int = 2000) -> str:
        return self.log.read_bytes()[-n:].decode(errors="replace")

    async def wait_ready(self, http: httpx.AsyncClient, timeout_s: float) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was ready:\n{self.tail()}")
            try:
                if (await http.get(f"{self.url}{self.ready_path}", timeout=10)).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            await asyncio.sleep(1.0)
        raise TimeoutError(f"{self.name} not ready after {timeout_s:.0f} s:\n{self.tail()}")

    def stop(self, grace_s: float = 90.0) -> None:
        import psutil

        try:
            family = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        self.resume()  # a frozen process would never see the signal
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # attune serve: stop_local(); vLLM: a clean shutdown
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        alive = [p for p in family if p.is_running()]  # only what this server started (Ray, vLLM's engine core)
        for p in alive:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(alive, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)


def server_env() -> dict[str, str]:
    from attune.paths import REPO_ROOT

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["ATTUNE_REQUESTS_PER_MINUTE"] = "0"
    env["ATTUNE_ADMIN_REQUESTS_PER_MINUTE"] = "0"
    return env


ROLES = (("VLLM::Worker", "vllm worker"), ("EngineCore", "vllm engine core"), ("LLMServer", "LLMServer replica"), ("AttuneIngress", "ingress replica"),
         ("ProxyActor", "Serve proxy"), ("RewardScorer", "scorer replica"), ("ServeController", "Serve controller"),
         ("raylet", "raylet"), ("gcs_server", "Ray GCS"), ("api_server", "vllm api server"))


def process_cpu(root: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of `root` and every process under it, summed per role (ROLES)."""
    import psutil

    out: dict[str, float] = {}
    try:
        family = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for p in family:
        try:
            title, t = " ".join(p.cmdline())[:200], p.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        role = next((r for key, r in ROLES if key in title), "other")
        out[role] = out.get(role, 0.0) + t.user + t.system
    return out


# ---------------------------------------------------------------- measuring one server
@dataclass
class Target:
    """How one server is asked: its URL, key, the request body for (prompt, adapter or None) and its process."""

    name: str
    url: str
    key: str
    body: Callable[[str, str | None, int], dict]
    pid: int = 0
    metrics_path: str | None = None
    """Where the server exports attune_turn_stage_seconds (Attune's /metrics); None: it does not."""


STAGE_FAMILY = "attune_turn_stage_seconds"


def stage_totals(text: str) -> dict[str, list[float]]:
    """{stage: [seconds summed, turns]} from a Prometheus text exposition, summed over replicas."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != STAGE_FAMILY:
            continue
        for s in family.samples:
            if s.name in (f"{STAGE_FAMILY}_sum", f"{STAGE_FAMILY}_count"):
                totals = out.setdefault(s.labels["stage"], [0.0, 0.0])
                totals[s.name.endswith("_count")] += s.value
    return out


def stage_means_ms(stages: dict[str, list[float]]) -> dict[str, float]:
    return {stage: round(1000 * total / n, 1) for stage, (total, n) in stages.items() if n}


def attune_body(prompt: str, adapter: str | None, max_tokens: int) -> dict:
    return {"model": "attune", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            "attune_options": {"adapter": adapter or "base", "gate": False}}


def vllm_body(prompt: str, adapter: str | None, max_tokens: int) -> dict:
    from alignment.prompts import chat

    return {"model": adapter or BASE_NAME, "messages": chat(prompt), "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}


def cell_plan(plan: VsPlan, adapters: list[str]) -> list[tuple[str, int]]:
    """The (scenario, concurrency) cells, in order; "mixed" only with adapters."""
    return [(sc, c) for c in plan.concurrency for sc in SCENARIOS if sc == "base" or adapters]


class Measurer:
    """Requests to one server: the untimed warm-up and one cell at a time. No request starts after the plan's time
    limit, counted from when the measurer is made (just before the server's warm-up)."""

    def __init__(self, target: Target, plan: VsPlan, prompts: list[str], adapters: list[str],
                 http: httpx.AsyncClient, log: Callable[[str], None]):
        self.target, self.plan, self.prompts, self.adapters, self.log = target, plan, prompts, adapters, log
        self.client = BenchClient(BenchPlan(url=target.url, operator_key=target.key, max_tokens=plan.max_tokens,
                                            request_timeout_s=plan.request_timeout_s), http)
        self.deadline = time.monotonic() + plan.time_limit_s

    async def one(self, prompt: str, adapter: str | None, max_tokens: int):
        return await self.client.send(self.target.body(prompt, adapter, max_tokens), deadline=self.deadline)

    async def stages(self) -> dict[str, list[float]]:
        """The server's stage totals now ({} when it exports none)."""
        if self.target.metrics_path is None:
            return {}
        r = await self.client.http.get(f"{self.target.url}{self.target.metrics_path}", timeout=30)
        r.raise_for_status()
        return stage_totals(r.text)

    async def warm_up(self) -> None:
        """Each adapter once, then one full batch at the highest concurrency."""
        for adapter in [None, *self.adapters]:
            s = await self.one(self.prompts[0], adapter, 2)
            if not s.ok:
                raise RuntimeError(f"{self.target.name}: warm-up request ({adapter or 'base'}) failed: {s.error}")
        top, choices = max(self.plan.concurrency), [None, *self.adapters]
        await asyncio.gather(*(self.one(self.prompts[i % len(self.prompts)], choices[i % len(choices)],
                                        self.plan.max_tokens) for i in range(top)))

    async def cell(self, scenario: str, c: int) -> Cell:
        plan, prompts = self.plan, self.prompts
        adapters = {"base": [None], "mixed": self.adapters}[scenario]
        cell = Cell(scenario, False, c, [a or "base" for a in adapters], planned=max(plan.requests, c))
        jobs = iter([(i % len(prompts), adapters[i % len(adapters)]) for i in range(cell.planned)])

        async def worker():
            for p, adapter in jobs:
                if time.monotonic() >= self.deadline:
                    return
                sample = await self.one(prompts[p], adapter, plan.max_tokens)
                sample.prompt, sample.adapter = p, adapter or "base"
                cell.samples.append(sample)

        stages = await self.stages()
        cpu, started = process_cpu(self.target.pid), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(c)))
        cell.wall_s = time.perf_counter() - started
        after = process_cpu(self.target.pid)
        cell.cpu_s = {k: round(after[k] - cpu.get(k, 0.0), 2) for k in sorted(after)}
        cell.stages = {k: [total - stages.get(k, [0.0, 0.0])[0], n - stages.get(k, [0.0, 0.0])[1]]
                       for k, (total, n) in (await self.stages()).items()}
        s = cell.summary()
        self.log(f"vs-vllm {self.target.name} {scenario} c={c}: {s['ok']}/{cell.planned} ok, {_fmt(s['tok_s'])} "
                 f"tok/s, TTFT p50 {_fmt(s['ttft_p50_ms'], ' ms', 0)}, e2e p50 {_fmt(s['e2e_p50_ms'], ' ms', 0)}")
        return cell


async def measure(target: Target, plan: VsPlan, prompts: list[str], adapters: list[str], http: httpx.AsyncClient,
                  log: Callable[[str], None]) -> list[Cell]:
    """Warm-up (untimed), then every cell of the plan once, on one server."""
    m = Measurer(target, plan, prompts, adapters, http, log)
    await m.warm_up()
    return [await m.cell(sc, c) for sc, c in cell_plan(plan, adapters)]


async def listed_adapters(target: Target, http: httpx.AsyncClient, limit: int) -> list[str]:
    """The first `limit` adapters Attune's /v1/models lists (merges and the base model left out)."""
    models = (await http.get(f"{target.url}/v1/models", timeout=30,
                             headers={"Authorization": f"Bearer {target.key}"})).json()["data"]
    return [m["id"] for m in models if (m.get("attune") or {}).get("kind") == "adapter"][:limit]


async def screen(target: Target, candidates: list[str], base_model: str, n: int, http: httpx.AsyncClient
                 ) -> tuple[list[str], int]:
    """The first `n` prompts Attune answers by generating with the adapter asked for: a message the crisis detector
    flags gets the crisis reply (nothing generated), one near the line the safety adapter; neither measures the
    serving path. Returns (prompts, how many were left out)."""
    client = BenchClient(BenchPlan(url=target.url, operator_key=target.key), http)
    kept, dropped = [], 0
    for prompt in candidates:
        s = await client.send(target.body(prompt, None, 2))
        if not s.ok:
            raise RuntimeError(f"{target.name}: screening request failed: {s.error}")
        if s.gate == "off" and s.adapter == base_model:
            kept.append(prompt)
        else:
            dropped += 1
        if len(kept) == n:
            break
    if not kept:
        raise RuntimeError("every candidate prompt took the crisis or safety path; none measures generation")
    return kept, dropped


def pool(cells: list[Cell]) -> list[Cell]:
    """Cells of several rounds merged per (scenario, concurrency): samples joined, wall times added."""
    out: dict[tuple, Cell] = {}
    for c in cells:
        key = (c.scenario, c.concurrency)
        if key not in out:
            out[key] = Cell(c.scenario, c.gate, c.concurrency, c.adapters, planned=0)
        out[key].samples += c.samples
        out[key].wall_s += c.wall_s
        for role, v in c.cpu_s.items():
            out[key].cpu_s[role] = round(out[key].cpu_s.get(role, 0.0) + v, 2)
        for stage, (total, n) in c.stages.items():
            pooled = out[key].stages.setdefault(stage, [0.0, 0.0])
            pooled[0], pooled[1] = pooled[0] + total, pooled[1] + n
        out[key].planned += c.planned
    return list(out.values())


def compare(attune: list[dict], vllm: list[dict]) -> list[dict]:
    """Per (scenario, concurrency): Attune / vLLM tok/s, and Attune's TTFT p50 and e2e p50 minus vLLM's."""
    theirs = {(s["scenario"], s["concurrency"]): s for s in vllm}
    rows = []
    for a in attune:
        v = theirs.get((a["scenario"], a["concurrency"]))
        if v is None:
            continue
        diff = lambda k: None if a[k] is None or v[k] is None else round(a[k] - v[k], 1)  # noqa: E731
        rows.append({"scenario": a["scenario"], "concurrency": a["concurrency"], "attune_tok_s": a["tok_s"],
                     "vllm_tok_s": v["tok_s"],
                     "tok_s_ratio": round(a["tok_s"] / v["tok_s"], 3) if a["tok_s"] and v["tok_s"] else None,
                     "attune_ttft_p50_ms": a["ttft_p50_ms"], "vllm_ttft_p50_ms": v["ttft_p50_ms"],
                     "ttft_overhead_ms": diff("ttft_p50_ms"), "e2e_overhead_ms": diff("e2e_p50_ms"),
                     "tokens": [a["tokens"], v["tokens"]]})
    return rows


def goals(rows: list[dict]) -> dict[str, dict]:
    ratios = [r["tok_s_ratio"] for r in rows if r["tok_s_ratio"] is not None]
    lowest = min(r["concurrency"] for r in rows) if rows else None
    ttft = [r["ttft_overhead_ms"] for r in rows if r["concurrency"] == lowest and r["ttft_overhead_ms"] is not None]
    out = {"tok_s_ratio": {"worst": min(ratios, default=None), "goal": f">= {GOALS['tok_s_ratio']}x"},
           "ttft_overhead_ms": {"worst": max(ttft, default=None), "goal": f"<= {GOALS['ttft_overhead_ms']:.0f} ms "
                                f"at concurrency {lowest}"}}
    out["tok_s_ratio"]["met"] = None if not ratios else min(ratios) >= GOALS["tok_s_ratio"]
    out["ttft_overhead_ms"]["met"] = None if not ttft else max(ttft) <= GOALS["ttft_overhead_ms"]
    return out


def _cpus(ids) -> str:
    return ",".join(map(str, ids))


def _table(rows: list[dict]) -> list[str]:
    lines = ["| setup | conc | tok/s Attune | tok/s vLLM | ratio | TTFT p50 Attune ms | TTFT p50 vLLM ms | TTFT +ms | "
             "e2e p50 +ms |", "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['scenario']} | {r['concurrency']} | {_fmt(r['attune_tok_s'])} | {_fmt(r['vllm_tok_s'])} | "
                     f"{_fmt(r['tok_s_ratio'], 'x', 2)} | {_fmt(r['attune_ttft_p50_ms'], '', 0)} | "
                     f"{_fmt(r['vllm_ttft_p50_ms'], '', 0)} | {_fmt(r['ttft_overhead_ms'], '', 0)} | "
                     f"{_fmt(r['e2e_overhead_ms'], '', 0)} |")
    return lines


def _verdicts(goal_set: dict) -> list[str]:
    verdict = {True: "met", False: "NOT met", None: "not measured"}
    return [f"- {key} {g['goal']}: {_fmt(g['worst'], '', 2)} -> {verdict[g['met']]}" for key, g in goal_set.items()]


def render(report: dict) -> str:
    lines = _table(report["comparison"])
    if "comparison_colocated" in report:
        lines += ["", f"With engine.colocate ({COLOCATED}, vLLM inside the ingress replica), against the same raw "
                  "vLLM cells:", "", *_table(report["comparison_colocated"])]
    placed = report.get("placement") or {}
    where = [(name, placed.get(key)) for name, key in (("Attune", "attune"), ("raw vLLM", "vllm"))]
    lines += ["", "CPU placement (serving/cpu_placement.py): " + "; ".join(
        f"{name}: " + (f"worker on CPUs {_cpus(p['engine'])}, its other processes on {_cpus(p['service'])}" if p
                       else "as the OS and vLLM place it") for name, p in where)]
    lines += ["", "Goals (worst cell of this run):", *_verdicts(report["goals"])]
    if "goals_colocated" in report:
        lines += ["", "Goals with engine.colocate:", *_verdicts(report["goals_colocated"])]
    staged = [c for c in report.get("cells", {}).get("attune", []) if c.get("stages_ms")]
    if staged:
        names = list(staged[0]["stages_ms"])
        lines += ["", "Attune's turns, mean ms from request start to the end of each stage (attune_turn_stage_seconds):",
                  "", "| setup | conc | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
        lines += [f"| {c['scenario']} | {c['concurrency']} | " + " | ".join(_fmt(c["stages_ms"].get(n), "", 1)
                                                                         for n in names) + " |" for c in staged]
    if report["notes"]:
        lines += ["", "Notes:"] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines)


RESUME_SETTLE_S = 1.0
"""Seconds a server runs after it is unfrozen, before its untimed request and the cell (timers that fell due while it
was frozen fire then)."""


async def run(plan: VsPlan, workdir: Path, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr,
                                                                                          flush=True)) -> dict:
    """Start both servers (Attune first: the raw server gets the adapters Attune lists), each frozen while the other
    works; warm both up; then every cell `rounds` times on each server in turn. The report pools a cell's rounds."""
    from adapters.registry import AdapterStore
    from alignment.basemodel import resolve
    from serving.app import AppArgs, _kv_bytes, load_config

    cfg = load_config(AppArgs())
    store = AdapterStore(cfg.store_dir)
    prompts = seed_prompts(plan.prompts * 3)
    model_path = resolve(cfg.base_model)
    env = server_env()
    split = cpu_placement.plan(cfg.engine.cpu_placement, env)
    placement = {"attune": asdict(split) if split else None,
                 "vllm": asdict(split) if split and plan.place_vllm else None}
    names = (*SERVERS, COLOCATED) if plan.colocate_too else SERVERS
    cells: dict[str, list[Cell]] = {name: [] for name in names}
    started_s: dict[str, list[float]] = {name: [] for name in names}
    adapters: list[str] = []
    dropped = 0
    servers: dict[str, Launched] = {}
    measurers: dict[str, Measurer] = {}
    order: list[list[str]] = []

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=max(plan.concurrency) + 4)) as http:
        try:
            for name in names:
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                if name != "vllm":
                    data = workdir / f"{name}-data"
                    argv = [sys.executable, "-m", "attune.cli", "serve", "--port", str(port), "--data-dir", str(data)]
                    own = {**env, "ATTUNE_ENGINE_COLOCATE": "1" if name == COLOCATED else "0"} if plan.colocate_too \
                        else env
                    server, target = Launched(name, argv, own, url, "/healthz", workdir / f"{name}.log"), Target(
                        name, url, "", attune_body, metrics_path="/metrics")
                else:
                    argv = vllm_argv(cfg, model_path, {a: store.get(a) for a in adapters}, port,
                                     _kv_bytes(cfg.engine))
                    placed = placement["vllm"] is not None
                    vllm_env = {**env, cpu_placement.BIND_ENV: split.bind} if placed else env
                    server, target = Launched(name, argv, vllm_env, url, "/health", workdir / "vllm.log",
                                              split.service if placed else None), Target(name, url, "unused", vllm_body)
                servers[name], target.pid = server, server.proc.pid
                ready = await server.wait_ready(http, plan.start_timeout_s)
                if name != "vllm":
                    target.key = (data / "operator_key").read_text().strip()
                if name == "attune":
                    adapters = await listed_adapters(target, http, plan.max_adapters)
                    prompts, dropped = await screen(target, prompts, cfg.base_model, plan.prompts, http)
                log(f"vs-vllm: {name} ready in {ready:.0f} s")
                started_s[name].append(round(ready, 1))
                measurers[name] = Measurer(target, plan, prompts, adapters, http, log)
                await measurers[name].warm_up()
                server.pause()
            for r in range(plan.rounds):
                for k, (sc, c) in enumerate(cell_plan(plan, adapters)):
                    first = (r + k) % len(names)  # each server in each place of the rotation in turn
                    turn = [*names[first:], *names[:first]]
                    order.append(turn)
                    for name in turn:
                        servers[name].resume()
                        try:
                            await asyncio.sleep(RESUME_SETTLE_S)
                            await measurers[name].one(prompts[0], None, 2)
                            cells[name].append(await measurers[name].cell(sc, c))
                        finally:
                            servers[name].pause()
        finally:
            for server in servers.values():
                server.stop()
    pooled = {name: [{**c.summary(), "cpu_s": c.cpu_s, "stages_ms": stage_means_ms(c.stages)}
                     for c in pool(cells[name])] for name in names}
    notes = [f"{dropped} candidate prompt(s) left out: Attune answered them from the crisis or safety path"
             ] if dropped else []
    for name in names:
        errors = sorted({e for s in pooled[name] for e in s["errors"]})
        if errors:
            notes.append(f"{name} errors: {errors[:3]}")
    rows = compare(pooled["attune"], pooled["vllm"])
    if any(r["tokens"][0] != r["tokens"][1] for r in rows):
        notes.append("the two servers generated different token counts for the same cells (see tokens)")
    report = {"plan": asdict(plan), "engine": cfg.engine.model_dump(mode="json"), "model": model_path,
              "placement": placement, "adapters_mixed": adapters, "prompts": prompts, "ready_s": started_s,
              "order": order, "cells": pooled, "comparison": rows, "notes": notes,
              "raw": {name: [{"scenario": c.scenario, "concurrency": c.concurrency, "wall_s": c.wall_s,
                              "samples": [asdict(s) for s in c.samples]} for c in cells[name]] for name in names}}
    report["goals"] = goals(rows)
    if plan.colocate_too:
        report["comparison_colocated"] = compare(pooled[COLOCATED], pooled["vllm"])
        report["goals_colocated"] = goals(report["comparison_colocated"])
    return report


def vs_vllm_command(given: dict, quick: bool, out: str | None) -> int:
    """`attune bench serve --vs-vllm`: run, print the table, write the JSON report."""
    from attune.paths import REPORTS_DIR

    try:
        plan = (VsPlan.quick if quick else VsPlan)(**{k: v for k, v in given.items()
                                                       if v is not None and k != "time_limit_s"})
    except ValueError as e:
        print(f"attune bench serve --vs-vllm: {e}", file=sys.stderr)
        return 2
    if given.get("time_limit_s"):
        plan.time_limit_s = given["time_limit_s"]
    with tempfile.TemporaryDirectory(prefix="attune-vs-vllm-") as tmp:
        report = asyncio.run(run(plan, Path(tmp)))
    table = render(report)
    report["table"] = table
    path = Path(out) if out else REPORTS_DIR / ("bench_vs_vllm_quick.json" if quick else "bench_vs_vllm.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(table)
    print(f"\nwrote {path}")
    return 0
