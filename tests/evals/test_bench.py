"""`attune bench serve` against a fake Attune on a local uvicorn server (SSE as the service frames it): cells, ratios,
cold vs warm, the patient-key check, 429 waits and the time limit; plus the statistics and the table. No Ray, no vLLM."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import OrderedDict

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from attune import cli
from evals.bench import BenchPlan, add_ratios, goals, percentile, render_table, run

OPERATOR, PATIENT = "op-key", "patient-key"
PROMPTS = ["I can't sleep before exams.", "My sister and I keep fighting."]


class FakeAttune:
    """Streams `tokens` words; a token takes `delay` s (x`adapter_factor` with an adapter); an adapter missing from
    the 2-slot LRU first waits `cold_s`; the gate adds `gate_s` before the first token."""

    def __init__(self, adapters=("a1", "a2", "a3"), delay=0.002, adapter_factor=1.0, cold_s=0.0, gate_s=0.0,
                 refuse_patient=True, throttle_first=0, usage=True):
        self.adapters, self.delay, self.adapter_factor = list(adapters), delay, adapter_factor
        self.cold_s, self.gate_s, self.refuse_patient, self.usage = cold_s, gate_s, refuse_patient, usage
        self.throttle_left, self.resident = throttle_first, OrderedDict()
        self.bodies: list[dict] = []
        self.app = self._build()

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.get("/healthz")
        async def healthz():
            return {"status": "ok"}

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": "smollm2", "attune": {"kind": "base"}}]
                    + [{"id": a, "attune": {"kind": "adapter"}} for a in self.adapters]
                    + [{"id": "warm", "attune": {"kind": "profile"}}]}

        @app.get("/v1/admin/status")
        async def status():
            return {"engine": {"llm": {"resident_in_vllm": list(self.resident)}}}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            operator = request.headers["authorization"] == f"Bearer {OPERATOR}"
            if body.get("attune_options") and not operator and self.refuse_patient:
                return JSONResponse({"error": {"message": "operator only"}}, status_code=403)
            if self.throttle_left:
                self.throttle_left -= 1
                return JSONResponse({"error": {"message": "slow down"}}, status_code=429, headers={"Retry-After": "0"})
            self.bodies.append(body)
            return StreamingResponse(self._events(body), media_type="text/event-stream")

        return app

    async def _events(self, body: dict):
        opts = body.get("attune_options") or {}
        adapter = None if opts.get("adapter") in (None, "base") else opts["adapter"]
        if adapter is not None and adapter not in self.resident:
            await asyncio.sleep(self.cold_s)
            self.resident[adapter] = None
            while len(self.resident) > 2:
                self.resident.popitem(last=False)
        elif adapter is not None:
            self.resident.move_to_end(adapter)
        chunk = lambda **kw: "data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", **kw}) + "\n\n"  # noqa: E731
        yield chunk(choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}}])
        if opts.get("gate", True):
            await asyncio.sleep(self.gate_s)
        for i in range(body["max_tokens"]):
            await asyncio.sleep(self.delay * (self.adapter_factor if adapter else 1.0))
            yield chunk(choices=[{"index": 0, "delta": {"content": f" w{i}"}}])
        gate = "pass" if opts.get("gate", True) else "off"
        yield chunk(choices=[{"index": 0, "delta": {}, "finish_reason": "length"}],
                    attune={"adapter": adapter or "smollm2", "gate": gate, "scores": {}, "session_id": "s"})
        if self.usage:
            yield chunk(choices=[], usage={"prompt_tokens": 5, "completion_tokens": body["max_tokens"],
                                           "total_tokens": 5 + body["max_tokens"]})
        yield "data: [DONE]\n\n"


@pytest.fixture
def serve_fake():
    servers = []

    def start(fake: FakeAttune) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(fake.app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "fake server did not start"
            time.sleep(0.01)
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)


def plan(url: str, **kw) -> BenchPlan:
    base = dict(url=url, operator_key=OPERATOR, api_key=PATIENT, requests=2, max_tokens=4, concurrency=(1, 2),
                cold_samples=1, warm_repeats=2, time_limit_s=60, request_timeout_s=10)
    return BenchPlan(**{**base, **kw})


def bench(p: BenchPlan) -> dict:
    return asyncio.run(run(p, prompts=PROMPTS, log=lambda m: None))


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        xs = list(rng.exponential(size=n))
        for q in (0, 50, 90, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentile([], 50) is None


def _summary(scenario, gate, c, tok_s, e2e):
    return {"scenario": scenario, "gate": gate, "concurrency": c, "tok_s": tok_s, "e2e_p50_ms": e2e,
            "ttft_p50_ms": 10.0, "ttft_p99_ms": 20.0, "ok": 4, "planned": 4, "gate_decisions": {"pass": 4}}


def test_ratios_goals_and_table():
    cells = [_summary("base", False, 1, 100.0, 200.0), _summary("base", True, 1, 90.0, 204.0),
             _summary("mixed", False, 1, 40.0, 500.0), _summary("mixed", True, 1, 45.0, 600.0)]
    add_ratios(cells)
    assert [c["tok_s_vs_base"] for c in cells] == [1.0, 1.0, 0.4, 0.5]
    assert [c["gate_overhead_pct"] for c in cells] == [None, 2.0, None, 20.0]
    g = goals(cells, {"cold_vs_warm": 1.5})
    assert g["mixed_vs_base"] == {"worst": 0.4, "goal": ">= 0.8x", "met": False}
    assert g["gate_overhead_pct"]["worst"] == 20.0 and g["gate_overhead_pct"]["met"] is False
    assert g["cold_vs_warm"]["met"] is True
    table = render_table({"cells": cells, "adapters_mixed": ["a", "b"], "goals": g, "notes": ["only 2 adapters"],
                          "cold": {"measured": True, "cold_ttft_p50_ms": 30.0, "warm_ttft_p50_ms": 20.0,
                                   "cold_vs_warm": 1.5, "samples": [{}]}})
    rows = [line for line in table.splitlines() if line.startswith("| (")]
    assert len(rows) == 4 and rows[3].startswith("| (c) 2 mixed | on | 1 | 4/4 | 45.0 | 0.50x |")
    assert "+20.0%" not in table and "| 20.0% |" in rows[3]
    assert "1.50x" in table and "NOT met" in table and "- only 2 adapters" in table


def test_bench_against_a_fake_service(serve_fake):
    fake = FakeAttune(cold_s=0.3, delay=0.002)
    report = bench(plan(serve_fake(fake)))
    cells = report["cells"]
    assert [(c["scenario"], c["gate"], c["concurrency"]) for c in cells] == [
        (s, g, c) for c in (1, 2) for s in ("base", "one", "mixed") for g in (False, True)]
    assert all(c["ok"] == c["planned"] == 2 and c["tokens"] == 8 and c["tokens_from"] == ["usage"] for c in cells)
    assert all(c["gate_decisions"] == {"pass" if c["gate"] else "off": 2} for c in cells)
    assert report["adapters_mixed"] == ["a1", "a2", "a3"] and cells[4]["adapters"] == ["a1", "a2", "a3"]
    assert "only 3 adapter(s) exist, so (c) mixes 3 instead of 8" in report["notes"]
    assert all(c["tok_s_vs_base"] == 1.0 for c in cells if c["scenario"] == "base")
    assert all(c["gate_overhead_pct"] is not None for c in cells if c["gate"])
    measured = [b for b in fake.bodies if b["max_tokens"] == 4]
    assert all(b["temperature"] == 0 and b["stream_options"] == {"include_usage": True} for b in measured)
    assert {b["messages"][0]["content"] for b in measured} == set(PROMPTS)
    cold = report["cold"]
    assert cold["measured"] and cold["samples"][0]["adapter"] == "a1" and cold["cold_vs_warm"] > 5
    assert not any("WARNING" in n for n in report["notes"])


def test_mixed_slower_adapters_show_in_the_ratio(serve_fake):
    report = bench(plan(serve_fake(FakeAttune(delay=0.01, adapter_factor=4.0)), concurrency=(1,), max_tokens=6))
    one = [c for c in report["cells"] if c["scenario"] == "one" and not c["gate"]][0]
    assert one["tok_s_vs_base"] < 0.6
    assert report["goals"]["mixed_vs_base"]["met"] is False


def test_cold_uses_an_adapter_the_engine_does_not_hold(serve_fake):
    fake = FakeAttune(adapters=("a1", "a2", "a3"), cold_s=0.3)
    fake.resident.update({"a1": None, "a2": None})
    report = bench(plan(serve_fake(fake), concurrency=(1,), max_adapters=1))
    assert report["adapters_mixed"] == ["a1"] and report["cold"]["samples"][0]["adapter"] == "a3"
    assert report["cold"]["cold_vs_warm"] > 5
    fake = FakeAttune(adapters=("a1", "a2"))
    fake.resident.update({"a1": None, "a2": None})
    report = bench(plan(serve_fake(fake), concurrency=(1,)))
    assert not report["cold"]["measured"] and "restart the service" in report["cold"]["note"]
    assert "not measured" in render_table(report)


def test_patient_key_that_is_not_refused_is_a_warning(serve_fake):
    report = bench(plan(serve_fake(FakeAttune(refuse_patient=False)), concurrency=(1,)))
    assert any(n.startswith("WARNING: the patient key was NOT refused") for n in report["notes"])


def test_429_is_waited_out_and_reported(serve_fake):
    report = bench(plan(serve_fake(FakeAttune(throttle_first=2)), concurrency=(1,)))
    assert all(c["ok"] == c["planned"] for c in report["cells"])
    assert any("ATTUNE_REQUESTS_PER_MINUTE=0" in n for n in report["notes"])


def test_streams_without_usage_count_chunks(serve_fake):
    report = bench(plan(serve_fake(FakeAttune(usage=False)), concurrency=(1,)))
    assert all(c["tokens_from"] == ["chunks"] and c["tokens"] == 8 for c in report["cells"])
    assert any("no usage" in n for n in report["notes"])


def test_time_limit_stops_the_run(serve_fake):
    started = time.monotonic()
    report = bench(plan(serve_fake(FakeAttune(delay=0.05)), time_limit_s=0.8, concurrency=(1, 2, 4)))
    assert time.monotonic() - started < 5
    assert len(report["cells"]) < 18 and any("time limit" in n for n in report["notes"])


def test_plan_checks_and_quick_preset():
    with pytest.raises(ValueError, match="operator key"):
        BenchPlan()
    with pytest.raises(ValueError, match="concurrency"):
        BenchPlan(operator_key="k", concurrency=(0,))
    q = BenchPlan.quick(operator_key="k", max_tokens=None, requests=3)
    assert (q.requests, q.max_tokens, q.concurrency, q.time_limit_s) == (3, 8, (1, 2), 300.0)


def test_cli_quick_run_writes_json(serve_fake, tmp_path, capsys):
    url = serve_fake(FakeAttune())
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "serve", "--quick", "--url", url, "--api-key", PATIENT, "--operator-key", OPERATOR,
                     "--concurrency", "1", "--max-tokens", "3", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["plan"]["max_tokens"] == 3 and "operator_key" not in report["plan"]
    assert len(report["prompts"]) == 8 and len(report["cells"]) == 6
    printed = capsys.readouterr().out
    assert printed.startswith("| setup | gate | conc |") and report["table"] in printed


def test_pass_overhead_pairs_the_same_prompt_and_ignores_regenerations():
    from evals.bench import Cell, Sample, add_pass_overhead

    off = Cell("one", False, 1, ["a"], [Sample(True, 1.0, prompt=0, adapter="a"), Sample(True, 2.0, prompt=1, adapter="a"),
                                        Sample(True, 4.0, prompt=2, adapter="a")])
    on = Cell("one", True, 1, ["a"], [Sample(True, 1.02, prompt=0, adapter="a", gate="pass"),
                                      Sample(True, 2.10, prompt=1, adapter="a", gate="pass"),
                                      Sample(True, 9.0, prompt=2, adapter="a", gate="regenerated")])
    summaries = [off.summary(), on.summary()]
    add_pass_overhead([off, on], summaries)
    assert summaries[1]["gate_pass_pairs"] == 2
    assert summaries[1]["gate_pass_overhead_pct"] == pytest.approx(3.5)  # median of +2% and +5%
    assert summaries[0]["gate_pass_overhead_pct"] is None
