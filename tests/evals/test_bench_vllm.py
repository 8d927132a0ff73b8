"""`attune bench serve --vs-vllm` without starting either server: the raw vLLM server's arguments against what Attune's
engine gives vLLM, the screening and the cells against two fake servers (one Attune-shaped, one plain OpenAI), the
comparison and its goals, and that a launched server's whole process tree is stopped."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import threading
import time

import httpx
import psutil
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from evals.bench_vllm import (BASE_NAME, Launched, Target, VsPlan, attune_body, compare, goals, measure, pool,
                              render, screen, stage_means_ms, vllm_argv, vllm_body)


def test_vllm_argv_gives_the_raw_server_the_engine_arguments_attune_gives_vllm(tmp_path, monkeypatch):
    """Parsed by vLLM's own server parser, the raw server's engine arguments equal those VLLMEngine builds."""
    pytest.importorskip("vllm")
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm.v1.engine.async_llm import AsyncLLM

    from serving.config import ServeConfig
    from serving.engine import VLLMEngine

    cfg = ServeConfig.model_validate({"engine": {"max_loras": 3, "max_lora_rank": 32, "max_model_len": 1024,
                                                 "max_num_seqs": 5, "cpu_memory_fraction": 0.04}})
    e, kv = cfg.engine, 987_654_321
    captured = {}

    class Captured(Exception):
        pass

    def capture(args, **kw):
        captured["args"] = args
        raise Captured

    monkeypatch.setattr(AsyncLLM, "from_engine_args", staticmethod(capture))
    with pytest.raises(Captured):
        VLLMEngine(str(tmp_path), max_loras=e.max_loras, max_lora_rank=e.max_lora_rank, max_model_len=e.max_model_len,
                   cpu_memory_fraction=e.cpu_memory_fraction, gpu_memory_fraction=e.gpu_memory_utilization,
                   kv_cache_bytes=kv, dtype=e.dtype, max_num_seqs=e.max_num_seqs)
    ours = captured["args"]
    argv = vllm_argv(cfg, str(tmp_path), {"warm": tmp_path / "warm", "calm": tmp_path / "calm"}, 8123, kv)
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(argv[3:])
    raw = AsyncEngineArgs.from_cli_args(parsed)
    fields = ("model", "dtype", "enable_lora", "max_loras", "max_lora_rank", "max_model_len", "max_num_seqs", "seed",
              "kv_cache_memory_bytes", "disable_log_stats", "gpu_memory_utilization")
    assert {f: getattr(raw, f) for f in fields} == {f: getattr(ours, f) for f in fields}
    assert [(m.name, m.path) for m in parsed.lora_modules] == [("warm", str(tmp_path / "warm")),
                                                               ("calm", str(tmp_path / "calm"))]
    assert parsed.served_model_name == [BASE_NAME] and parsed.port == 8123


class FakeServers:
    """One app answering both shapes: Attune's (attune_options; a message with 'crisis' in it gets the crisis reply)
    and vLLM's (model = an adapter or 'base'). A token takes `delay` seconds on 'attune', `delay / speedup` on vLLM."""

    def __init__(self, delay=0.03, speedup=4.0):
        self.delay, self.speedup, self.bodies = delay, speedup, []
        self.app = FastAPI()

        @self.app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.bodies.append(body)
            return StreamingResponse(self._events(body), media_type="text/event-stream")

        @self.app.get("/metrics")
        async def metrics():
            """Attune's stage histogram, split over two replicas: each turn took 2 ms to admit, 10 to open."""
            n = sum("attune_options" in b for b in self.bodies)
            lines = ["# TYPE attune_turn_stage_seconds histogram"]
            for replica, share in (("r1", n // 2), ("r2", n - n // 2)):
                for stage, seconds in (("admitted", 0.002), ("session", 0.010)):
                    labels = f'replica="{replica}",stage="{stage}"'
                    lines += [f'attune_turn_stage_seconds_bucket{{{labels},le="+Inf"}} {share}',
                              f"attune_turn_stage_seconds_count{{{labels}}} {share}",
                              f"attune_turn_stage_seconds_sum{{{labels}}} {share * seconds}"]
            return PlainTextResponse("\n".join(lines) + "\n")

    async def _events(self, body):
        chunk = lambda **kw: "data: " + json.dumps({"object": "chat.completion.chunk", **kw}) + "\n\n"  # noqa: E731
        opts = body.get("attune_options")
        crisis = opts is not None and "crisis" in body["messages"][-1]["content"]
        n = 0 if crisis else body["max_tokens"]
        yield chunk(choices=[{"index": 0, "delta": {"role": "assistant", "content": "help is here" if crisis else ""}}])
        for i in range(n):
            await asyncio.sleep(self.delay if opts is not None else self.delay / self.speedup)
            yield chunk(choices=[{"index": 0, "delta": {"content": f" w{i}"}}])
        if opts is not None:
            yield chunk(choices=[{"index": 0, "delta": {}, "finish_reason": "length"}],
                        attune={"adapter": opts["adapter"] if opts["adapter"] != "base" else "smollm2",
                                "gate": "crisis" if crisis else "off"})
        yield chunk(choices=[], usage={"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n})
        yield "data: [DONE]\n\n"


@pytest.fixture
def fake_url():
    fake = FakeServers()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(fake.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}", fake
    server.should_exit = True
    thread.join(timeout=10)


def test_screening_then_cells_on_both_servers_and_their_ratio(fake_url):
    url, fake = fake_url
    plan = VsPlan(requests=4, max_tokens=6, concurrency=(1, 2), prompts=2, time_limit_s=60, request_timeout_s=10)
    attune = Target("attune", url, "op", attune_body, metrics_path="/metrics")
    vllm = Target("vllm", url, "unused", vllm_body)

    async def go():
        async with httpx.AsyncClient() as http:
            prompts, dropped = await screen(attune, ["a crisis message", "one", "two", "three"], "smollm2", 2, http)
            assert (prompts, dropped) == (["one", "two"], 1)
            ours = await measure(attune, plan, prompts, ["x", "y"], http, log=lambda m: None)
            theirs = await measure(vllm, plan, prompts, ["x", "y"], http, log=lambda m: None)
            return ours, theirs

    ours, theirs = asyncio.run(go())
    assert [(c.scenario, c.concurrency) for c in ours] == [("base", 1), ("mixed", 1), ("base", 2), ("mixed", 2)]
    assert all(len(c.samples) == 4 and all(s.ok and s.tokens == 6 for s in c.samples) for c in ours + theirs)
    # Stage times come from Attune's /metrics, counted over the cell's turns only (both replicas summed).
    assert all(c.stages["session"][1] == 4 and abs(c.stages["session"][0] - 0.04) < 1e-9 for c in ours)
    assert stage_means_ms(pool(ours)[0].stages) == {"admitted": 2.0, "session": 10.0}
    assert all(c.stages == {} for c in theirs)
    raw = [b for b in fake.bodies if "attune_options" not in b]
    assert {b["model"] for b in raw} == {BASE_NAME, "x", "y"}
    assert all(b["messages"][0]["role"] == "system" and b["temperature"] == 0 for b in raw)
    assert all(b["attune_options"]["gate"] is False for b in fake.bodies if "attune_options" in b)
    rows = compare([c.summary() for c in pool(ours)], [c.summary() for c in pool(theirs)])
    assert len(rows) == 4 and all(r["tokens"][0] == r["tokens"][1] for r in rows)
    # Attune's fake is 4x as slow per token (30 ms against 7.5 ms, far above a busy machine's jitter): every ratio is
    # well under 1, its TTFT overhead positive.
    assert all(r["tok_s_ratio"] < 0.9 for r in rows)
    g = goals(rows)
    assert g["tok_s_ratio"]["met"] is False and g["ttft_overhead_ms"]["worst"] > 0
    assert "| base | 1 |" in render({"comparison": rows, "goals": g, "notes": []})
    staged = render({"comparison": rows, "goals": g, "notes": [], "cells": {"attune": [
        {"scenario": "base", "concurrency": 1, "stages_ms": stage_means_ms(pool(ours)[0].stages)}]}})
    assert "| setup | conc | admitted | session |" in staged and "| base | 1 | 2.0 | 10.0 |" in staged


def test_compare_goals_and_pooled_rounds():
    from evals.bench import Cell, Sample

    a = [Cell("base", False, 1, ["base"], [Sample(True, 1.0, 0.10, 20)], wall_s=1.0, planned=1),
         Cell("base", False, 1, ["base"], [Sample(True, 1.0, 0.12, 20)], wall_s=1.0, planned=1, cpu_s={"x": 1.0})]
    pooled = pool(a)
    assert len(pooled) == 1 and pooled[0].wall_s == 2.0 and len(pooled[0].samples) == 2 and pooled[0].planned == 2
    ours = [{"scenario": "base", "concurrency": 1, "tok_s": 96.0, "ttft_p50_ms": 110.0, "e2e_p50_ms": 900.0,
             "tokens": 40}, {"scenario": "base", "concurrency": 8, "tok_s": 150.0, "ttft_p50_ms": 400.0,
                             "e2e_p50_ms": 3000.0, "tokens": 40}]
    theirs = [{**ours[0], "tok_s": 100.0, "ttft_p50_ms": 95.0}, {**ours[1], "tok_s": 150.0, "ttft_p50_ms": 300.0}]
    rows = compare(ours, theirs)
    assert [r["tok_s_ratio"] for r in rows] == [0.96, 1.0]
    assert [r["ttft_overhead_ms"] for r in rows] == [15.0, 100.0]
    g = goals(rows)  # TTFT is judged at the lowest concurrency only
    assert g["tok_s_ratio"]["met"] is True and g["ttft_overhead_ms"] == {"worst": 15.0, "goal": "<= 20 ms at "
                                                                         "concurrency 1", "met": True}


def test_stop_ends_the_server_and_every_process_it_started(tmp_path):
    """A server that ignores SIGINT and has a child of its own: both are gone after stop."""
    code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)")
    server = Launched("sleepy", [sys.executable, "-c", code], {}, "http://127.0.0.1:9", "/", tmp_path / "log")
    deadline = time.monotonic() + 20
    while not psutil.Process(server.proc.pid).children():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = psutil.Process(server.proc.pid).children()[0]
    server.stop(grace_s=1)
    assert server.proc.poll() is not None
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


def test_pause_freezes_the_server_and_its_children_and_resume_wakes_them(tmp_path):
    """The interleaved run freezes the server it is not measuring: SIGSTOP on the whole tree, SIGCONT after."""
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            "time.sleep(600)")
    server = Launched("sleepy", [sys.executable, "-c", code], {}, "http://127.0.0.1:9", "/", tmp_path / "log")
    try:
        deadline = time.monotonic() + 20
        while not psutil.Process(server.proc.pid).children():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        family = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children()]
        def settles(stopped: bool) -> bool:  # signals are delivered asynchronously
            until = time.monotonic() + 5
            while time.monotonic() < until:
                if all((p.status() == psutil.STATUS_STOPPED) == stopped for p in family):
                    return True
                time.sleep(0.02)
            return False

        server.pause()
        assert settles(True)
        server.resume()
        assert settles(False)
        server.pause()  # stop() resumes a frozen server first, so that it sees the signal
    finally:
        server.stop(grace_s=1)
    assert server.proc.poll() is not None and not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                                                      for p in family[1:])


def test_a_placed_server_and_its_children_run_only_on_the_given_cpus_and_the_caller_keeps_its_own(tmp_path):
    mine = os.sched_getaffinity(0)
    one = (min(mine),)
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            "time.sleep(600)")
    server = Launched("placed", [sys.executable, "-c", code], {}, "http://127.0.0.1:9", "/", tmp_path / "log", cpus=one)
    try:
        deadline = time.monotonic() + 20
        while not psutil.Process(server.proc.pid).children():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        child = psutil.Process(server.proc.pid).children()[0]
        assert psutil.Process(server.proc.pid).cpu_affinity() == list(one) == child.cpu_affinity()
        assert os.sched_getaffinity(0) == mine
    finally:
        server.stop(grace_s=1)


def test_the_table_says_where_each_server_ran():
    rows = compare([{"scenario": "base", "concurrency": 1, "tok_s": 96.0, "ttft_p50_ms": 110.0, "e2e_p50_ms": 900.0,
                     "tokens": 40}], [{"scenario": "base", "concurrency": 1, "tok_s": 100.0, "ttft_p50_ms": 95.0,
                                       "e2e_p50_ms": 900.0, "tokens": 40}])
    text = render({"comparison": rows, "goals": goals(rows), "notes": [],
                   "placement": {"attune": {"engine": [0, 1], "service": [2]}, "vllm": None}})
    assert "Attune: worker on CPUs 0,1, its other processes on 2; raw vLLM: as the OS and vLLM place it" in text


def test_the_table_gives_the_colocated_setup_its_own_rows_and_goals():
    """--colocate-too: a second table and a second verdict, each against the same raw vLLM cells."""
    raw = [{"scenario": "base", "concurrency": 1, "tok_s": 100.0, "ttft_p50_ms": 95.0, "e2e_p50_ms": 900.0,
            "tokens": 40}]
    ours = compare([{**raw[0], "tok_s": 90.0, "ttft_p50_ms": 120.0}], raw)
    colocated = compare([{**raw[0], "tok_s": 97.0, "ttft_p50_ms": 110.0}], raw)
    text = render({"comparison": ours, "goals": goals(ours), "notes": [], "comparison_colocated": colocated,
                   "goals_colocated": goals(colocated)})
    first, second = text.split("With engine.colocate")
    assert "| base | 1 | 90.0 | 100.0 | 0.90x |" in first and "| base | 1 | 97.0 | 100.0 | 0.97x |" in second
    assert "tok_s_ratio >= 0.95x: 0.90 -> NOT met" in second.split("Goals with engine.colocate:")[0]
    assert "tok_s_ratio >= 0.95x: 0.97 -> met" in second.split("Goals with engine.colocate:")[1]
    assert "ttft_overhead_ms <= 20 ms at concurrency 1: 15.00 -> met" in text
