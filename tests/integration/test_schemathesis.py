"""Schemathesis against the live service's own /openapi.json (Ray Serve, vLLM, the reward model, SQLite): every
operation except the test-only fault hook, with schemathesis's coverage cases (boundaries, each constraint broken
in turn) and hypothesis-generated cases that fit the schema and that break it. Every answer must be no 5xx, a
status, content type and body the document lists, and a refusal for every schema-breaking request; afterwards the
service must still be healthy and answer a chat.

The cases are spread over pools of keys made for this test, so each one reaches validation instead of the fixture's
20-requests-per-minute limit (any 429 fails the test); chat cases that fit the schema generate for real, with replies
cut to FUZZ_MAX_TOKENS tokens (the cap itself is still fuzzed by the cases that break it).

(schemathesis's pytest loader `from_fixture` needs a pytest internal that pytest 9.2 removed, so the cases are
drawn here with `APIOperation.as_strategy` and `iter_coverage_cases`, the API schemathesis's own runners use.)"""
from __future__ import annotations

import time
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                               response_schema_conformance, status_code_conformance)

from tests.integration.keys import KeyPool

CHAT = "/v1/chat/completions"
FUZZ_MAX_TOKENS = 4
EXAMPLES_PER_MODE = 30
"""Hypothesis examples per operation and generation mode (positive, negative), on top of the coverage cases."""
MIN_CASES = 1000
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


def cheap(body, cap: int) -> None:
    """Cut a chat body's reply length to FUZZ_MAX_TOKENS when that keeps it exactly as valid or invalid as it was."""
    if not isinstance(body, dict):
        return
    given_ = {k: body[k] for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None}
    if not given_:
        body["max_tokens"] = FUZZ_MAX_TOKENS
    elif len({repr(v) for v in given_.values()}) == 1 and all(
            type(v) is int and FUZZ_MAX_TOKENS < v <= cap for v in given_.values()):
        body.update(dict.fromkeys(given_, FUZZ_MAX_TOKENS))


class Fuzz:
    """Sends each case with a key from the pools, checks the answer, and keeps the tally and distinct failures."""

    def __init__(self, server, cap: int):
        self.pools = {"patient-app": KeyPool(server, "fuzz", size=60),
                      "operator": KeyPool(server, "fuzz", "operator", size=20)}
        self.cap = cap
        self.tally: Counter = Counter()
        self.failures: dict[str, str] = {}

    def send(self, case) -> None:
        label = f"{case.method.upper()} {case.path}"
        operator = case.path.startswith("/v1/admin/") or (isinstance(case.body, dict) and "attune_options" in case.body)
        if case.path == CHAT:
            cheap(case.body, self.cap)
        headers = {"Authorization": f"Bearer {self.pools['operator' if operator else 'patient-app'].next()}"}
        try:
            response = case.call(headers=headers, timeout=180)
            self.tally[(label, response.status_code)] += 1
            case.validate_response(response, checks=CHECKS, headers=headers)
        except (Exception, BaseExceptionGroup) as e:  # a FailureGroup is a BaseExceptionGroup
            self.failures.setdefault(f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", str(e)[:3000])


@pytest.mark.integration
def test_schemathesis_finds_no_5xx_and_no_off_schema_answer(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json").exclude(path="/v1/admin/faults")
    chat_props = schema.raw_schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    cap = next(b["maximum"] for b in chat_props["max_tokens"]["anyOf"] if b.get("type") == "integer")
    fuzz = Fuzz(server, cap)
    started = time.perf_counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        generation = schema.config.generation_for(operation=operation, phase="coverage")
        for case in schema.iter_coverage_cases(operation, generation_modes=list(GenerationMode),
                                               generation_config=generation):
            fuzz.send(case)
        for mode in GenerationMode:
            @settings(max_examples=EXAMPLES_PER_MODE, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                fuzz.send(case)

            try:
                run()
            except Unsatisfiable:  # nothing to break in a request without parameters or body (GET /healthz)
                assert mode is GenerationMode.NEGATIVE and not operation.body and not operation.path_parameters
    seconds = time.perf_counter() - started

    per_status: Counter = Counter()
    for (_, status), n in fuzz.tally.items():
        per_status[status] += n
    total = sum(per_status.values())
    print(f"\nschemathesis {schemathesis.__version__}: {total} cases in {seconds:.0f} s; by status "
          f"{dict(sorted(per_status.items()))}")
    for (op, status), n in sorted(fuzz.tally.items()):
        print(f"  {op:45s} {status}: {n}")
    assert not fuzz.failures, "\n\n".join(fuzz.failures.values())
    assert total >= MIN_CASES and per_status[429] == 0 and not any(s >= 500 for s in per_status)
    assert fuzz.tally[(f"POST {CHAT}", 200)] > 0, "some chat cases fit the schema and were answered"
    assert httpx.get(f"{server.url}/healthz", timeout=30).json()["status"] == "ok"
    r = httpx.post(f"{server.v1}/chat/completions", timeout=180, headers=fuzz.pools["patient-app"].headers(),
                   json={"messages": [{"role": "user", "content": "Thanks for listening."}], "max_tokens": 8})
    assert r.status_code == 200 and r.json()["attune"]["gate"] in {"pass", "regenerated", "fallback"}
