"""`attune bench serve --gate-cost` against a fake Attune on a local uvicorn server: the gate on with the patient key and
no options, off with the operator key and attune_options.gate = false, latency and ratios, the share passed unchanged,
and the time to crisis resources; plus the pure parts (latency percentiles, the chunk that brings the resources, the
unchanged share). No Ray, no vLLM."""
from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from attune import cli
from evals.bench import Sample
from evals.bench_gate import (RISK_MESSAGES, GateCostPlan, ResourcesWatch, cost_rows, crisis_summary,
                                first_resources_chunk, latency, render, run)
from serving.crisis_reply import CrisisReply, resources_block
from serving.safety import CrisisRules
from tests.evals.test_bench import serve_fake  # noqa: F401  (a fixture)

OPERATOR, PATIENT = "op-key", "patient-key"
PROMPTS = ["I can't sleep before exams.", "My sister and I keep fighting.", "Work is a lot this week."]
REPLY_WORD = "REPLYWORD"
BLOCK = resources_block(CrisisReply().reply("en").text)


# ---------------------------------------------------------------- pure parts
def test_latency_is_p50_and_p90_of_the_requests_that_succeeded():
    samples = [Sample(True, t / 10) for t in range(1, 11)] + [Sample(False, 99.0, error="HTTP 503")]
    assert latency(samples) == {"n": 11, "ok": 10, "e2e_p50_ms": 550.0, "e2e_p90_ms": 910.0}
    assert latency([]) == {"n": 0, "ok": 0, "e2e_p50_ms": None, "e2e_p90_ms": None}


def test_the_chunk_that_brings_the_resources():
    lead, lines = BLOCK.split("\n", 1)
    assert first_resources_chunk([BLOCK + "\n\nI'm glad you told me."]) == 0
    assert first_resources_chunk([lead, "\n", lines, "\n\nmore"]) == 2
    assert first_resources_chunk([lead + "\nTake care."]) is None
    assert first_resources_chunk(["I'm here.", "\n\n" + BLOCK]) is None, "the resources must come first"
    assert first_resources_chunk(["Please call 988 if you need to."]) is None
    assert first_resources_chunk([]) is None
    watch = ResourcesWatch()
    assert [watch(d) for d in [BLOCK[:5], BLOCK[5:], BLOCK, "b"]] == [False, True, False, False]


def _s(e2e: float, gate: str | None = None, ok: bool = True, watch_s: float | None = None) -> Sample:
    return Sample(ok, e2e, ttft_s=e2e / 2, gate=gate, watch_s=watch_s, error=None if ok else "HTTP 503")


def test_cost_rows_ratios_and_the_share_passed_unchanged():
    cells = {(False, 1): [_s(1.0, "off")] * 4, (True, 1): [_s(1.1, "pass"), _s(1.1, "pass"), _s(1.1, "regenerated"),
                                                           _s(3.0, "fallback"), _s(5.0, None, ok=False)],
             (False, 4): [_s(2.0, "off")] * 2, (True, 4): []}
    rows = cost_rows(cells)
    assert [r["concurrency"] for r in rows] == [1, 4]
    one = rows[0]
    assert one["off"]["e2e_p50_ms"] == 1000.0 and one["on"]["e2e_p50_ms"] == 1100.0 and one["ratio_p50"] == 1.1
    assert one["on"]["e2e_p90_ms"] == pytest.approx(2430.0) and one["ratio_p90"] == pytest.approx(2.43)
    assert one["gate"]["unchanged"]["k"] == 2 and one["gate"]["unchanged"]["n"] == 4
    assert one["gate"]["decisions"] == {"pass": 2, "regenerated": 1, "fallback": 1}
    assert rows[1]["ratio_p50"] is None and rows[1]["gate"]["unchanged"]["rate"] is None


def test_crisis_summary_counts_replies_without_resources():
    c = crisis_summary([_s(2.0, "crisis", watch_s=1.5), _s(2.0, "crisis", watch_s=1.7), _s(2.0, "pass"),
                        _s(9.0, ok=False)])
    assert (c["n"], c["ok"], c["resources_shown"], c["missing"]) == (4, 3, 2, 1)
    assert c["resources_p50_s"] == 1.6 and c["resources_p90_s"] == pytest.approx(1.68)
    assert c["decisions"] == {"pass": 1, "crisis": 2} and c["errors"] == ["HTTP 503"]


def test_every_risk_message_is_one_the_crisis_rules_know():
    assert len(RISK_MESSAGES) >= 4 and all(CrisisRules().match(m) for m in RISK_MESSAGES.values())


def test_plan_checks_and_quick_preset():
    with pytest.raises(ValueError, match="operator key"):
        GateCostPlan()
    with pytest.raises(ValueError, match="crisis_repeats"):
        GateCostPlan(operator_key="k", crisis_repeats=-1)
    q = GateCostPlan.quick(operator_key="k", max_tokens=None, concurrency=(1,))
    assert (q.requests, q.max_tokens, q.concurrency, q.crisis_repeats) == (2, 8, (1,), 1)
    assert GateCostPlan(operator_key="k").concurrency == (1, 4, 8)


# ---------------------------------------------------------------- against a fake service
class FakeGatedAttune:
    """Streams `max_tokens` words `delay` s apart. With the gate on (no attune_options), the gate adds `gate_s` before
    the first word and regenerates every `regenerate_every`-th reply; a message a crisis rule matches gets the crisis
    resources `resources_s` after its last word. attune_options from a patient key: 403."""

    def __init__(self, delay=0.002, gate_s=0.03, resources_s=0.05, regenerate_every=3):
        self.delay, self.gate_s, self.resources_s, self.every = delay, gate_s, resources_s, regenerate_every
        self.seen: list[tuple[str, dict]] = []
        self.gated = 0
        self.app = FastAPI()
        self.app.get("/healthz")(lambda: {"status": "ok"})
        self.app.post("/v1/chat/completions")(self.chat)

    async def chat(self, request: Request):
        body, key = await request.json(), request.headers["authorization"].removeprefix("Bearer ")
        if "attune_options" in body and key != OPERATOR:
            return JSONResponse({"error": {"message": "operator only"}}, status_code=403)
        self.seen.append((key, body))
        return StreamingResponse(self._events(body), media_type="text/event-stream")

    async def _events(self, body: dict):
        gate = (body.get("attune_options") or {}).get("gate", True)
        crisis = gate and bool(CrisisRules().match(body["messages"][-1]["content"]))
        chunk = lambda **kw: "data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", **kw}) + "\n\n"  # noqa: E731
        yield chunk(choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}}])
        decision = "off"
        if gate:
            await asyncio.sleep(self.gate_s)
            self.gated += 1
            decision = "crisis" if crisis else "regenerated" if self.gated % self.every == 0 else "pass"
        if crisis:  # as the service does: the crisis reply, resources first, and nothing generated
            await asyncio.sleep(self.resources_s)
            yield chunk(choices=[{"index": 0, "delta": {"content": BLOCK + "\n\nI'm really glad you told me."}}])
        for i in range(0 if crisis else body["max_tokens"]):
            await asyncio.sleep(self.delay)
            yield chunk(choices=[{"index": 0, "delta": {"content": f" {REPLY_WORD}{i}."}}])
        yield chunk(choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}],
                    attune={"adapter": "a", "gate": decision, "crisis": crisis, "scores": {}, "session_id": "s"})
        yield chunk(choices=[], usage={"prompt_tokens": 5, "completion_tokens": body["max_tokens"],
                                       "total_tokens": 5 + body["max_tokens"]})
        yield "data: [DONE]\n\n"


def test_gate_cost_against_a_fake_service(serve_fake):  # noqa: F811
    fake, logs = FakeGatedAttune(), []
    plan = GateCostPlan(url=serve_fake(fake), operator_key=OPERATOR, api_key=PATIENT, requests=3, max_tokens=4,
                        concurrency=(1, 2), crisis_repeats=1, request_timeout_s=10)
    report = asyncio.run(run(plan, prompts=PROMPTS, log=logs.append))
    rows = report["rows"]
    assert [r["concurrency"] for r in rows] == [1, 2]
    assert all(r["off"]["ok"] == r["on"]["ok"] == 3 for r in rows)
    assert all(r["on"]["e2e_p50_ms"] > r["off"]["e2e_p50_ms"] + 20 and r["ratio_p50"] > 1 for r in rows)
    on = [(k, b) for k, b in fake.seen if b["max_tokens"] == 4 and b["messages"][0]["content"] in PROMPTS
          and "attune_options" not in b]
    off = [(k, b) for k, b in fake.seen if b["max_tokens"] == 4 and "attune_options" in b]
    assert len(on) == len(off) == 6 and {k for k, _ in on} == {PATIENT} and {k for k, _ in off} == {OPERATOR}
    assert all(b["attune_options"] == {"gate": False} and b["stream"] and b["temperature"] == 0 for _, b in off)
    # 1 untimed gate-on warm-up, then 6 measured: every third gated reply is regenerated -> 2 of the 6
    assert report["gate_on"]["decisions"] == {"pass": 4, "regenerated": 2}
    assert report["gate_on"]["unchanged"]["k"] == 4 and report["gate_on"]["unchanged"]["n"] == 6
    c = report["crisis"]
    assert c["n"] == c["ok"] == c["resources_shown"] == len(RISK_MESSAGES) and c["missing"] == 0
    assert c["decisions"] == {"crisis": len(RISK_MESSAGES)}
    # The resources are the first content: they arrive with it, after the fake's resources_s delay.
    assert c["resources_p50_s"] == c["first_content_p50_s"] and c["resources_p90_s"] <= c["e2e_p50_s"] + 0.05
    risky = [(k, b) for k, b in fake.seen if b["messages"][0]["content"] in RISK_MESSAGES.values()]
    assert len(risky) == len(RISK_MESSAGES) and all(k == PATIENT and "attune_options" not in b for k, b in risky)
    dumped, logged = json.dumps(report), "\n".join(logs)
    assert REPLY_WORD not in dumped and REPLY_WORD not in logged
    assert not any(m in dumped or m in logged for m in RISK_MESSAGES.values())
    table = render(report)
    assert table.startswith("| conc | gate off p50 ms |") and "Time to crisis resources" in table
    assert f"shown in {len(RISK_MESSAGES)}/{len(RISK_MESSAGES)} replies" in table


def test_without_a_patient_key_gate_on_uses_the_operator_key_without_options(serve_fake):  # noqa: F811
    fake = FakeGatedAttune()
    plan = GateCostPlan(url=serve_fake(fake), operator_key=OPERATOR, requests=1, max_tokens=2, concurrency=(1,),
                        crisis_repeats=0)
    report = asyncio.run(run(plan, prompts=PROMPTS, log=lambda m: None))
    assert {k for k, _ in fake.seen} == {OPERATOR} and report["crisis"] is None
    assert sum("attune_options" not in b for _, b in fake.seen) == 2  # the warm-up and the one gate-on request
    assert any("no patient key" in n for n in report["notes"]) and "not measured" in render(report)


def test_cli_gate_cost_writes_json(serve_fake, tmp_path, capsys, monkeypatch):  # noqa: F811
    url = serve_fake(FakeGatedAttune())
    out = tmp_path / "gate.json"
    assert cli.main(["bench", "serve", "--gate-cost", "--quick", "--url", url, "--api-key", PATIENT,
                     "--operator-key", OPERATOR, "--concurrency", "1", "--max-tokens", "3", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["plan"]["max_tokens"] == 3 and "operator_key" not in report["plan"] and "api_key" not in report["plan"]
    assert [r["concurrency"] for r in report["rows"]] == [1] and report["crisis"]["n"] == len(RISK_MESSAGES)
    printed = capsys.readouterr().out
    assert printed.startswith("| conc |") and report["table"] in printed
    for env in ("ATTUNE_OPERATOR_KEY", "ATTUNE_DATA_DIR"):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv("ATTUNE_HOME", str(tmp_path / "home"))  # no operator key file to fall back on
    assert cli.main(["bench", "serve", "--gate-cost", "--url", url]) == 2
    assert "operator key is needed" in capsys.readouterr().err
