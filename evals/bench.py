"""`attune bench serve`: streaming load against a running Attune service. For (a) the base model, (b) one adapter
and (c) up to eight adapters round-robin, each with the gate on and off, at each concurrency: output tokens/s, time
to first token p50/p99 and end-to-end p50; then cold vs warm adapter first-token latency, with ratios against (a).

Talks to the service only over HTTP. The operator-only request extension `attune_options` pins the adapter and turns
the gate off; a patient key sending it must get 403, which the preflight checks.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import httpx

SCENARIOS = ("base", "one", "mixed")
GOALS = {"mixed_vs_base": 0.8, "gate_overhead_pct": 5.0, "cold_vs_warm": 2.0}
"""From the serving issue: (c) >= 0.8x (a) tok/s; the gate adds <= 5% to p50 e2e; cold <= 2x warm first token."""
RETRIES_ON_429 = 3


@dataclass
class BenchPlan:
    """What one benchmark run does; every count is bounded so that the run stops by itself."""

    url: str = "http://127.0.0.1:8000"
    """Base URL of the running service (without /v1)."""
    operator_key: str = ""
    """Operator key: every measured request sends attune_options, which only operators may."""
    api_key: str | None = None
    """Patient-app key, used only to check that attune_options is refused for patients (None skips the check)."""
    requests: int = 16
    """Requests per cell (scenario x gate x concurrency); raised to the cell's concurrency if lower."""
    max_tokens: int = 64
    """max_tokens of every measured request (greedy decoding, temperature 0)."""
    concurrency: tuple[int, ...] = (1, 4, 8)
    """Requests in flight at once, one cell per value."""
    max_adapters: int = 8
    """Adapters mixed round-robin in scenario (c)."""
    prompts: int = 8
    """Short non-crisis prompts taken from the seed test split (never ../shared/eval)."""
    cold_samples: int = 3
    """Adapters measured cold (first request while not resident in the engine)."""
    warm_repeats: int = 3
    """Repeated requests to the same adapter right after its cold one."""
    time_limit_s: float = 1800.0
    """No request starts after this many seconds; cells not finished by then are reported as cut short."""
    request_timeout_s: float = 120.0
    """One request's limit, so the run ends by time_limit_s + request_timeout_s at the latest."""

    def __post_init__(self):
        self.concurrency = tuple(sorted(set(self.concurrency)))
        problems = [f"{name} must be >= 1 (got {getattr(self, name)})"
                    for name in ("requests", "max_tokens", "max_adapters", "prompts", "warm_repeats")
                    if getattr(self, name) < 1]
        if not self.concurrency or min(self.concurrency) < 1:
            problems.append(f"concurrency needs values >= 1 (got {self.concurrency})")
        if self.cold_samples < 0:
            problems.append(f"cold_samples must be >= 0 (got {self.cold_samples})")
        if self.time_limit_s <= 0 or self.request_timeout_s <= 0:
            problems.append("time_limit_s and request_timeout_s must be positive")
        if not self.operator_key:
            problems.append("an operator key is needed: --operator-key, $ATTUNE_OPERATOR_KEY or "
                            "<data_dir>/operator_key")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def quick(cls, **overrides) -> "BenchPlan":
        """A smoke run: 2 requests of 8 tokens per cell at concurrency 1 and 2, one cold sample, 5 minutes at most."""
        preset = dict(requests=2, max_tokens=8, concurrency=(1, 2), cold_samples=1, warm_repeats=2,
                      time_limit_s=300.0, request_timeout_s=60.0)
        return cls(**{**preset, **{k: v for k, v in overrides.items() if v is not None}})


@dataclass
class Sample:
    """One streamed request as the client saw it."""

    ok: bool
    e2e_s: float
    ttft_s: float | None = None
    """Request sent to the first non-empty content delta."""
    tokens: int = 0
    tokens_from: str = "usage"
    """'usage' (the service's count, regenerations included) or 'chunks' (content deltas, when no usage came)."""
    gate: str | None = None
    adapter: str | None = None
    error: str | None = None
    prompt: int | None = None
    """Index of the prompt in the run's prompt list (pairs gate-on with gate-off samples)."""
    throttled: int = 0
    """429 answers waited out before this request went through."""
    retry_after_s: float | None = None
    watch_s: float | None = None
    """Request sent to the content delta on which the request's `watch` first said yes (None: never, or no watch)."""


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation between order statistics (numpy's default); None if empty."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Cell:
    """One scenario x gate x concurrency measurement."""

    scenario: str
    gate: bool
    concurrency: int
    adapters: list[str]
    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0
    planned: int = 0
    cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds the server's processes spent during the cell, per role (filled by `bench serve --vs-vllm`)."""
    stages: dict[str, list[float]] = field(default_factory=dict)
    """Attune's attune_turn_stage_seconds during the cell: stage -> [seconds summed, turns] (`--vs-vllm`)."""

    def summary(self) -> dict[str, Any]:
        ok = [s for s in self.samples if s.ok]
        tokens = sum(s.tokens for s in ok)
        ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
        return {"scenario": self.scenario, "gate": self.gate, "concurrency": self.concurrency,
                "adapters": self.adapters, "planned": self.planned, "n": len(self.samples), "ok": len(ok),
                "errors": sorted({s.error for s in self.samples if s.error}), "tokens": tokens,
                "tokens_from": sorted({s.tokens_from for s in ok}), "wall_s": round(self.wall_s, 3),
                "tok_s": round(tokens / self.wall_s, 2) if self.wall_s > 0 and ok else None,
                "ttft_p50_ms": ms(percentile([s.ttft_s for s in ok if s.ttft_s is not None], 50)),
                "ttft_p99_ms": ms(percentile([s.ttft_s for s in ok if s.ttft_s is not None], 99)),
                "e2e_p50_ms": ms(percentile([s.e2e_s for s in ok], 50)),
                "gate_decisions": dict(Counter(s.gate or "?" for s in ok)),
                "throttled": sum(s.throttled for s in self.samples)}


# ---------------------------------------------------------------- the client
class BenchClient:
    """The few calls the benchmark makes; `http` is an httpx.AsyncClient (tests give one over a fake service)."""

    def __init__(self, plan: BenchPlan, http: httpx.AsyncClient):
        self.plan, self.http = plan, http
        self.operator = {"Authorization": f"Bearer {plan.operator_key}"}
        self.throttled = 0
        """429 answers seen in the whole run."""

    async def get(self, path: str, key: str | None = None) -> dict:
        headers = {"Authorization": f"Bearer {key}"} if key else self.operator
        r = await self.http.get(f"{self.plan.url}{path}", headers=headers, timeout=30)
        if r.status_code != 200:
            raise RuntimeError(f"GET {path}: HTTP {r.status_code}: {r.text[:300]}")
        return r.json()

    async def resident_adapters(self) -> set[str] | None:
        """Adapters in the engine's LoRA cache (GET /v1/admin/status), or None when the service does not say."""
        try:
            llm = (await self.get("/v1/admin/status")).get("engine", {}).get("llm", {})
        except (RuntimeError, httpx.HTTPError, ValueError):
            return None
        resident = llm.get("resident_in_vllm", llm.get("loaded_adapters"))
        return None if resident is None else set(resident)

    def body(self, prompt: str, adapter: str | None, gate: bool, max_tokens: int) -> dict:
        return {"model": "attune", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
                "attune_options": {"adapter": adapter or "base", "gate": gate}}

    async def patient_refused(self, prompt: str) -> bool:
        """True when the patient key's request with attune_options is refused with 403, as it must be."""
        body = self.body(prompt, None, False, 1)
        r = await self.http.post(f"{self.plan.url}/v1/chat/completions", json=body, timeout=30,
                                 headers={"Authorization": f"Bearer {self.plan.api_key}"})
        return r.status_code == 403

    async def chat(self, prompt: str, adapter: str | None, gate: bool, max_tokens: int | None = None,
                   deadline: float | None = None) -> Sample:
        return await self.send(self.body(prompt, adapter, gate, max_tokens or self.plan.max_tokens), deadline=deadline)

    async def send(self, body: dict, key: str | None = None, deadline: float | None = None,
                   watch: Callable[[], Callable[[str], bool]] | None = None) -> Sample:
        """Stream `body` with `key` (default: the operator's), waiting out 429s; `watch` makes, per attempt, a
        callable fed each content delta (see Sample.watch_s)."""
        throttled = 0
        while True:
            sample = await self._stream(body, key, watch() if watch else None)
            wait = sample.retry_after_s
            if wait is None or throttled >= RETRIES_ON_429 or (deadline and time.monotonic() + wait > deadline):
                sample.throttled = throttled
                return sample
            throttled += 1
            self.throttled += 1
            await asyncio.sleep(wait)

    async def _stream(self, body: dict, key: str | None = None, watch: Callable[[str], bool] | None = None) -> Sample:
        started = time.perf_counter()
        ttft, tokens, chunks, gate, adapter, seen = None, None, 0, None, None, None
        headers = {"Authorization": f"Bearer {key}"} if key else self.operator
        try:
            async with self.http.stream("POST", f"{self.plan.url}/v1/chat/completions", json=body,
                                        headers=headers, timeout=self.plan.request_timeout_s) as r:
                if r.status_code != 200:
                    text = (await r.aread()).decode(errors="replace")[:300]
                    return Sample(False, time.perf_counter() - started, error=f"HTTP {r.status_code}: {text}",
                                  retry_after_s=_retry_after(r) if r.status_code == 429 else None)
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        return Sample(False, time.perf_counter() - started, ttft,
                                      error=f"stream error: {str(event['error'].get('message'))[:200]}")
                    for choice in event.get("choices") or []:
                        if content := choice.get("delta", {}).get("content"):
                            chunks, now = chunks + 1, time.perf_counter() - started  # one clock read per delta
                            ttft = ttft if ttft is not None else now
                            if watch is not None and seen is None and watch(content):
                                seen = now
                    if event.get("attune"):
                        gate, adapter = event["attune"].get("gate"), event["attune"].get("adapter")
                    if event.get("usage"):
                        tokens = event["usage"].get("completion_tokens")
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            return Sample(False, time.perf_counter() - started, ttft, error=f"{type(e).__name__}: {str(e)[:200]}")
        e2e = time.perf_counter() - started
        if tokens is None:
            return Sample(True, e2e, ttft, chunks, "chunks", gate, adapter, watch_s=seen)
        return Sample(True, e2e, ttft, int(tokens), "usage", gate, adapter, watch_s=seen)


def _retry_after(r: httpx.Response) -> float:
    try:
        return max(float(r.headers.get("retry-after", "1")), 0.0)
    except ValueError:
        return 1.0


# ---------------------------------------------------------------- the run
def seed_prompts(n: int) -> list[str]:
    """The `n` shortest messages of the seed test split (never ../shared/eval) that are neither labelled crisis nor
    match a crisis rule, so that gate-on requests measure the gate, not the crisis protocol."""
    from alignment.data import load_seed, split_examples
    from serving.safety import CrisisRules

    rules = CrisisRules()
    test = [ex for ex in split_examples(load_seed(), "test") if not ex.is_crisis and not rules.match(ex.message)]
    if not test:
        raise RuntimeError("the seed test split has no non-crisis message; run `attune data split`")
    return [ex.message for ex in sorted(test, key=lambda e: (len(e.message), e.id))[:n]]


async def run_cell(client: BenchClient, cell: Cell, prompts: list[str], deadline: float) -> Cell:
    """`cell.planned` requests, `cell.concurrency` at a time, prompts and adapters round-robin; none starts after
    `deadline`."""
    jobs = [(prompts[i % len(prompts)], cell.adapters[i % len(cell.adapters)]) for i in range(cell.planned)]
    it = iter(jobs)

    async def worker():
        for prompt, adapter in it:
            if time.monotonic() >= deadline:
                return
            sample = await client.chat(prompt, None if adapter == "base" else adapter, cell.gate, deadline=deadline)
            sample.prompt = prompts.index(prompt)
            cell.samples.append(sample)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(cell.concurrency)))
    cell.wall_s = time.perf_counter() - started
    return cell


async def measure_cold(client: BenchClient, adapters: list[str], prompt: str, deadline: float) -> dict:
    """First-token latency of an adapter's first request while the engine does not hold it (cold: after start, or
    evicted by others when there are more adapters than LoRA slots), then of repeats at once (warm)."""
    plan, notes = client.plan, []
    if plan.cold_samples == 0 or not adapters:
        return {"measured": False, "note": "no adapters" if not adapters else "cold_samples is 0"}
    resident = await client.resident_adapters()
    if resident is None:
        notes.append("the service did not report resident adapters; assuming none was loaded")
        candidates = list(adapters)
    else:
        candidates = [a for a in adapters if a not in resident]
    if not candidates:
        return {"measured": False, "note": f"the engine holds all {len(adapters)} adapters, so none can be cold; "
                "restart the service and run the benchmark first"}
    rows = []
    for adapter in candidates[:plan.cold_samples]:
        if time.monotonic() >= deadline:
            break
        cold = await client.chat(prompt, adapter, False, deadline=deadline)
        warm = [await client.chat(prompt, adapter, False, deadline=deadline) for _ in range(plan.warm_repeats)]
        rows.append({"adapter": adapter, "cold_ttft_s": cold.ttft_s if cold.ok else None,
                     "warm_ttft_s": [w.ttft_s for w in warm if w.ok and w.ttft_s is not None],
                     "errors": [s.error for s in [cold, *warm] if s.error]})
    cold_ttft = [r["cold_ttft_s"] for r in rows if r["cold_ttft_s"] is not None]
    warm_ttft = [t for r in rows for t in r["warm_ttft_s"]]
    cold_p50, warm_p50 = percentile(cold_ttft, 50), percentile(warm_ttft, 50)
    return {"measured": bool(cold_ttft and warm_ttft), "samples": rows, "notes": notes,
            "cold_ttft_p50_ms": None if cold_p50 is None else round(cold_p50 * 1000, 1),
            "warm_ttft_p50_ms": None if warm_p50 is None else round(warm_p50 * 1000, 1),
            "cold_vs_warm": round(cold_p50 / warm_p50, 3) if cold_p50 and warm_p50 else None}


def add_ratios(summaries: list[dict]) -> None:
    """Per cell: tok/s against (a) at the same gate and concurrency, and (gate on only) the gate's p50 e2e overhead
    against the same scenario and concurrency with the gate off."""
    by = {(s["scenario"], s["gate"], s["concurrency"]): s for s in summaries}
    for s in summaries:
        base = by.get(("base", s["gate"], s["concurrency"]))
        s["tok_s_vs_base"] = (round(s["tok_s"] / base["tok_s"], 3)
                              if base and s["tok_s"] and base["tok_s"] else None)
        off = by.get((s["scenario"], False, s["concurrency"]))
        s["gate_overhead_pct"] = (round((s["e2e_p50_ms"] / off["e2e_p50_ms"] - 1) * 100, 1)
                                  if s["gate"] and off and s["e2e_p50_ms"] and off["e2e_p50_ms"] else None)


def add_pass_overhead(cells: list[Cell], summaries: list[dict]) -> None:
    """Per gate-on cell: the median of e2e(gate on) / e2e(gate off) - 1 over replies the gate passed, each paired
    with the same prompt and adapter in the same scenario and concurrency with the gate off (greedy decoding, so
    the same reply). That is what scoring costs a reply that needs no regeneration; `gate_overhead_pct` (p50
    against p50) also carries the regenerations and fallbacks."""
    off = {(c.scenario, c.concurrency): c for c in cells if not c.gate}
    for cell, s in zip(cells, summaries):
        s["gate_pass_overhead_pct"], s["gate_pass_pairs"] = None, 0
        twin = off.get((cell.scenario, cell.concurrency))
        if not cell.gate or twin is None:
            continue
        plain = {(x.prompt, x.adapter): x.e2e_s for x in twin.samples if x.ok and x.e2e_s > 0}
        ratios = [x.e2e_s / plain[(x.prompt, x.adapter)] - 1 for x in cell.samples
                  if x.ok and x.gate == "pass" and (x.prompt, x.adapter) in plain]
        if ratios:
            s["gate_pass_overhead_pct"], s["gate_pass_pairs"] = round(percentile(ratios, 50) * 100, 1), len(ratios)


def goals(summaries: list[dict], cold: dict) -> dict[str, dict]:
    """The issue's three goals, each judged on its worst cell in this run."""
    mixed = [s["tok_s_vs_base"] for s in summaries if s["scenario"] == "mixed" and s["tok_s_vs_base"] is not None]
    gate = [s["gate_overhead_pct"] for s in summaries if s["gate_overhead_pct"] is not None]
    passed = [s["gate_pass_overhead_pct"] for s in summaries if s.get("gate_pass_overhead_pct") is not None]
    ratio = cold.get("cold_vs_warm")
    out = {"mixed_vs_base": {"worst": min(mixed, default=None), "goal": f">= {GOALS['mixed_vs_base']}x"},
           "gate_overhead_pct": {"worst": max(gate, default=None), "goal": f"<= {GOALS['gate_overhead_pct']}%"},
           "gate_pass_overhead_pct": {"worst": max(passed, default=None),
                                      "goal": f"<= {GOALS['gate_overhead_pct']}%"},
           "cold_vs_warm": {"worst": ratio, "goal": f"<= {GOALS['cold_vs_warm']}x"}}
    checks: dict[str, Callable[[float], bool]] = {"mixed_vs_base": lambda v: v >= GOALS["mixed_vs_base"],
                                                  "gate_overhead_pct": lambda v: v <= GOALS["gate_overhead_pct"],
                                                  "gate_pass_overhead_pct":
                                                      lambda v: v <= GOALS["gate_overhead_pct"],
                                                  "cold_vs_warm": lambda v: v <= GOALS["cold_vs_warm"]}
    for name, g in out.items():
        g["met"] = None if g["worst"] is None else checks[name](g["worst"])
    return out


def _fmt(v, suffix: str = "", digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}{suffix}"


def render_table(report: dict) -> str:
    """The markdown table, the cold/warm line, the goals and the notes."""
    labels = {"base": "(a) base", "one": "(b) 1 adapter", "mixed": f"(c) {len(report['adapters_mixed'])} mixed"}
    lines = ["| setup | gate | conc | ok/n | tok/s | vs (a) | TTFT p50 ms | TTFT p99 ms | e2e p50 ms | gate +% "
             "e2e p50 | gate +% passed (pairs) | gate decisions |", "|" + "---|" * 12]
    for s in report["cells"]:
        decisions = ", ".join(f"{k} {v}" for k, v in sorted(s["gate_decisions"].items())) or "-"
        lines.append(f"| {labels[s['scenario']]} | {'on' if s['gate'] else 'off'} | {s['concurrency']} | "
                     f"{s['ok']}/{s['planned']} | {_fmt(s['tok_s'])} | {_fmt(s['tok_s_vs_base'], 'x', 2)} | "
                     f"{_fmt(s['ttft_p50_ms'], '', 0)} | {_fmt(s['ttft_p99_ms'], '', 0)} | "
                     f"{_fmt(s['e2e_p50_ms'], '', 0)} | {_fmt(s['gate_overhead_pct'], '%')} | "
                     f"{_fmt(s.get('gate_pass_overhead_pct'), '%')} ({s.get('gate_pass_pairs', 0)}) | {decisions} |")
    cold = report["cold"]
    if cold.get("measured"):
        lines += ["", f"Cold adapter first token: p50 {cold['cold_ttft_p50_ms']:.0f} ms cold vs "
                  f"{cold['warm_ttft_p50_ms']:.0f} ms warm = {cold['cold_vs_warm']:.2f}x "
                  f"({len(cold['samples'])} adapter(s), gate off, concurrency 1)"]
    else:
        lines += ["", f"Cold adapter first token: not measured ({cold.get('note', 'no sample succeeded')})"]
    names = {"mixed_vs_base": "(c) tok/s vs (a)", "gate_overhead_pct": "gate overhead on p50 e2e",
             "gate_pass_overhead_pct": "gate overhead on passed replies (paired median)",
             "cold_vs_warm": "cold / warm first token"}
    lines += ["", "Goals (worst cell of this run):"]
    for key, g in report["goals"].items():
        verdict = {True: "met", False: "NOT met", None: "not measured"}[g["met"]]
        lines.append(f"- {names[key]} {g['goal']}: {_fmt(g['worst'], '', 2)} -> {verdict}")
    if report["notes"]:
        lines += ["", "Notes:"] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines)


async def run(plan: BenchPlan, http: httpx.AsyncClient | None = None, prompts: list[str] | None = None,
              log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> dict:
    """The whole benchmark; returns the report (cells with ratios, cold/warm, goals, notes)."""
    own = http is None
    http = http or httpx.AsyncClient(limits=httpx.Limits(max_connections=max(plan.concurrency) + 4))
    client, notes = BenchClient(plan, http), []
    start = time.monotonic()
    deadline = start + plan.time_limit_s
    try:
        r = await http.get(f"{plan.url}/healthz", timeout=30)
        if r.status_code != 200:
            raise RuntimeError(f"{plan.url}/healthz answered {r.status_code}: {r.text[:300]}; wait until it is ready")
        prompts = prompts or seed_prompts(plan.prompts)
        models = (await client.get("/v1/models", plan.api_key))["data"]
        adapters = [m["id"] for m in models if (m.get("attune") or {}).get("kind") == "adapter"]
        mixed = adapters[:plan.max_adapters]
        if len(adapters) < plan.max_adapters:
            notes.append(f"only {len(adapters)} adapter(s) exist, so (c) mixes {len(mixed)} instead of "
                         f"{plan.max_adapters}")
        if plan.api_key:
            if not await client.patient_refused(prompts[0]):
                notes.append("WARNING: the patient key was NOT refused when it sent attune_options")
        else:
            notes.append("no patient key given: did not check that patients cannot send attune_options")
        log(f"bench: {len(adapters)} adapter(s) {adapters}; cold-start phase")
        for gate in (False, True):  # untimed: the first requests after a start also pay for the base model and scorer
            await client.chat(prompts[0], None, gate, max_tokens=2, deadline=deadline)
        cold = await measure_cold(client, adapters, prompts[0], deadline)
        for adapter in mixed:  # untimed: every adapter the cells use is loaded once before them
            await client.chat(prompts[0], adapter, False, max_tokens=2, deadline=deadline)
        scenarios = {"base": ["base"], "one": mixed[:1], "mixed": mixed}
        cells = [Cell(sc, gate, c, scenarios[sc], planned=max(plan.requests, c))
                 for c in plan.concurrency for sc in SCENARIOS if scenarios[sc] for gate in (False, True)]
        for i, cell in enumerate(cells, 1):
            if time.monotonic() >= deadline:
                notes.append(f"time limit of {plan.time_limit_s:.0f} s reached: {len(cells) - i + 1} cell(s) not run")
                cells = cells[:i - 1]
                break
            await run_cell(client, cell, prompts, deadline)
            s = cell.summary()
            log(f"bench [{i}/{len(cells)}] {cell.scenario} gate={'on' if cell.gate else 'off'} c={cell.concurrency}: "
                f"{s['ok']}/{cell.planned} ok, {_fmt(s['tok_s'])} tok/s, TTFT p50 {_fmt(s['ttft_p50_ms'], ' ms', 0)}, "
                f"e2e p50 {_fmt(s['e2e_p50_ms'], ' ms', 0)}")
    finally:
        if own:
            await http.aclose()
    summaries = [c.summary() for c in cells]
    add_ratios(summaries)
    add_pass_overhead(cells, summaries)
    short = [s for s in summaries if s["n"] < s["planned"]]
    if short:
        notes.append(f"{len(short)} cell(s) cut short by the time limit")
    errors = sorted({e for s in summaries for e in s["errors"]})
    if errors:
        notes.append(f"errors: {errors[:3]}")
    if client.throttled:
        notes.append(f"the service answered 429 {client.throttled} time(s): start it with "
                     "ATTUNE_REQUESTS_PER_MINUTE=0 for benchmarks (waits are inside the measured wall time)")
    if any("chunks" in s["tokens_from"] for s in summaries):
        notes.append("some streams carried no usage; their tokens were counted as content chunks")
    if any(s["gate"] and set(s["gate_decisions"]) - {"pass"} for s in summaries):
        notes.append("gate-on cells include regenerations or fallbacks (see gate decisions): their tokens count, "
                     "their latency is in e2e")
    report = {"plan": {k: v for k, v in asdict(plan).items() if k not in ("operator_key", "api_key")},
              "adapters": adapters, "adapters_mixed": mixed, "prompts": prompts, "cells": summaries, "cold": cold,
              "elapsed_s": round(time.monotonic() - start, 1), "notes": notes,
              "raw": [{"scenario": c.scenario, "gate": c.gate, "concurrency": c.concurrency,
                       "samples": [asdict(s) for s in c.samples]} for c in cells]}
    report["goals"] = goals(summaries, cold)
    return report


def bench_serve(plan: BenchPlan, out: Path) -> dict:
    """Run the benchmark, print the table and write the report as JSON to `out`."""
    report = asyncio.run(run(plan))
    table = render_table(report)
    report["table"] = table
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(table)
    print(f"\nwrote {out}")
    return report


def keys_from_env(api_key: str | None, operator_key: str | None) -> tuple[str | None, str]:
    """The keys given, else $ATTUNE_API_KEY / $ATTUNE_OPERATOR_KEY, else the local tenant's key files."""
    from serving.auth import ENV_KEY, ENV_OPERATOR_KEY, KEY_FILE, OPERATOR_KEY_FILE
    from serving.config import ServeConfig

    def find(given: str | None, env: str, filename: str) -> str | None:
        if given or os.environ.get(env):
            return given or os.environ[env]
        path = ServeConfig.from_env().data_dir / filename
        return path.read_text().strip() if path.is_file() else None

    return find(api_key, ENV_KEY, KEY_FILE), find(operator_key, ENV_OPERATOR_KEY, OPERATOR_KEY_FILE) or ""
