"""Faults injected into the real application (POST /v1/admin/faults): an engine whose generations fail mid-stream
or at the start, a scorer that raises, a database whose statements fail. Every request in flight ends cleanly (an
OpenAI-shaped 503 or an SSE error event and [DONE], or for the scorer the gate's safe fallback), /healthz is 503
while the part is broken and 200 once the fault is cleared or runs out, no generation is left running in vLLM, and
each session holds exactly the rows expected: the patient's message once, even after a retry."""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serving.safety import FALLBACK_REPLY
from tests.integration.api import (FEELING_TEXT, assert_error_event, assert_refused, chat, health, history, inject,
                                   new_key, new_session, operator_status, stream_chat, text_of)


def expected_rows(text_seen: str) -> list[tuple[str, str, str | None]]:
    """The patient's message, then what they saw of a reply that failed (stored as interrupted), if anything."""
    return [("user", FEELING_TEXT, None)] + ([("assistant", text_seen, "interrupted")] if text_seen else [])


@pytest.mark.integration
def test_engine_failing_mid_stream_ends_every_request_in_flight_cleanly(server):
    keys = [new_key(server) for _ in range(3)]
    sessions = [new_session(server, k) for k in keys]
    before = operator_status(server)["engine"]["llm"]["stats"]
    armed = inject(server, engine={"fail_after_tokens": 4})
    try:
        assert armed["engine"]["fail_after_tokens"] == 4 and armed["engine"]["times"] is None
        r = health(server)
        assert r.status_code == 503 and "injected engine fault" in r.json()["engine"] and r.json()["database"] == "ok"
        with ThreadPoolExecutor(3) as pool:
            streams = [pool.submit(stream_chat, server, k, session_id=s) for k, s in zip(keys[:2], sessions[:2])]
            plain = pool.submit(chat, server, keys[2], session_id=sessions[2])
            streamed = [f.result() for f in streams]
        assert_refused(plain.result(), 503, "engine_unavailable")
        for r, events in streamed:
            assert r.status_code == 200
            assert_error_event(events, "engine_unavailable")
    finally:
        assert inject(server, engine={})["engine"]["fail_after_tokens"] is None
    assert health(server).status_code == 200
    llm = operator_status(server)["engine"]["llm"]
    assert llm["unfinished"] == 0 and llm["in_flight"] == [], llm
    assert llm["stats"].get("aborts", 0) - before.get("aborts", 0) == 3  # each failed generation was aborted in vLLM
    seen = [text_of(events) for _, events in streamed] + [""]
    for key, session, text in zip(keys, sessions, seen):
        assert history(server, key, session) == expected_rows(text)
    for key, session, text in zip(keys, sessions, seen):
        retried = chat(server, key, session_id=session)
        assert retried.status_code == 200, retried.text
        reply = retried.json()["choices"][0]["message"]["content"]
        rows = expected_rows(text) + ([("user", FEELING_TEXT, None)] if text else [])
        assert history(server, key, session) == rows + [("assistant", reply, "pass")]


@pytest.mark.integration
def test_engine_failing_at_the_start_is_a_503_and_health_recovers_when_the_fault_runs_out(server):
    key = new_key(server)
    session = new_session(server, key)
    requests_before = operator_status(server)["engine"]["llm"]["stats"].get("requests", 0)
    inject(server, engine={"fail_after_tokens": 0, "times": 2})
    r = health(server)
    assert r.status_code == 503 and "2 more generation(s)" in r.json()["engine"]
    response, _ = stream_chat(server, key, session_id=session)
    assert_refused(response, 503, "engine_unavailable")
    assert_refused(chat(server, key, session_id=session), 503, "engine_unavailable")
    assert health(server).status_code == 200
    status = operator_status(server)["engine"]["llm"]
    assert status["stats"].get("requests", 0) == requests_before and status["unfinished"] == 0  # vLLM never saw them
    assert history(server, key, session) == expected_rows("")


@pytest.mark.integration
def test_scorer_failure_fails_closed_and_health_reports_it(server):
    key = new_key(server)
    session = new_session(server, key)
    errors = _scorer_errors(server)
    inject(server, scorer={"error": True})
    try:
        r = health(server)
        assert r.status_code == 503 and "injected scorer fault" in r.json()["scorer"] and r.json()["engine"] == "ok"
        plain = chat(server, key, session_id=session)
        assert plain.status_code == 200, plain.text
        assert plain.json()["choices"][0]["message"]["content"] == FALLBACK_REPLY
        assert plain.json()["attune"]["gate"] == "fallback" and plain.json()["choices"][0]["finish_reason"] == (
            "content_filter")
        response, events = stream_chat(server, key, session_id=session,
                                       messages=[{"role": "user", "content": "Thank you. What could help?"}])
        assert response.status_code == 200 and events[-1] == "[DONE]"
        assert text_of(events) == FALLBACK_REPLY and events[-2]["attune"]["gate"] == "fallback"
    finally:
        assert inject(server, scorer={})["scorer"]["error"] is False
    assert health(server).status_code == 200
    assert _scorer_errors(server) > errors
    assert history(server, key, session) == [("user", FEELING_TEXT, None), ("assistant", FALLBACK_REPLY, "fallback"),
                                             ("user", "Thank you. What could help?", None),
                                             ("assistant", FALLBACK_REPLY, "fallback")]


def _scorer_errors(server) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=60).text
    found = re.findall(r"^attune_scorer_errors_total\{replica=\"[^\"]+\"\} (\S+)$", text, re.M)
    assert found, "no attune_scorer_errors_total series"
    return sum(map(float, found))  # one series per ingress replica


@pytest.mark.integration
def test_database_outage_is_a_503_and_health_follows_it(server):
    key = new_key(server)
    inject(server, database={"times": 2})  # every statement fails: the next health check, then the next request
    r = health(server)
    assert r.status_code == 503 and r.json()["database"] == "not ready" and r.json()["engine"] == "ok"
    assert_refused(chat(server, key), 503, "database_unavailable")
    assert health(server).status_code == 200
    assert inject(server)["database"]["failed"] >= 2


@pytest.mark.integration
def test_database_failing_to_store_the_reply_loses_and_duplicates_nothing(server):
    key = new_key(server)
    plain, streamed = new_session(server, key), new_session(server, key)
    inject(server, database={"writes_only": True, "skip": 1, "times": 1})  # the patient's message is stored, the reply not
    assert_refused(chat(server, key, session_id=plain), 503, "database_unavailable")
    assert history(server, key, plain) == expected_rows("")
    retried = chat(server, key, session_id=plain)
    assert retried.status_code == 200, retried.text
    reply = retried.json()["choices"][0]["message"]["content"]
    assert history(server, key, plain) == expected_rows("") + [("assistant", reply, "pass")]
    inject(server, database={"writes_only": True, "skip": 1, "times": 1})
    response, events = stream_chat(server, key, session_id=streamed)
    assert response.status_code == 200
    assert_error_event(events, "database_unavailable")
    assert history(server, key, streamed) == expected_rows(text_of(events))  # what the patient saw, once
