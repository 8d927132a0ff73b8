"""Redeploying the application with a changed setting while three streams are open (named to run last: it replaces
every replica, then restores the fixture's settings). The old replicas drain: each stream ends with its attune chunk
and [DONE], its whole reply stored as passed (not interrupted, not the fallback); the new config is live after."""
from __future__ import annotations

import copy
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.integration.api import (FEELING_TEXT, assert_completed, auth, history, inject, new_key, operator_status,
                                   text_of)

DELAY_S = 0.25
"""Added before every token on the old LLM replica, so the streams outlast the start of the redeploy."""


def _stream(server, key: str, opened: threading.Event) -> list:
    """A streamed reply's events; `opened` is set at the first one (the generation has begun)."""
    body = {"model": "attune", "messages": [{"role": "user", "content": FEELING_TEXT}], "max_tokens": 24,
            "temperature": 0, "stream": True}
    events = []
    with httpx.stream("POST", f"{server.v1}/chat/completions", json=body, headers=auth(key), timeout=600) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                opened.set()
                payload = line.removeprefix("data: ")
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def _redeploy(server, settings: dict) -> None:
    from ray import serve

    from serving import app

    serve.run(app.build_app({"settings": settings}), name="attune", route_prefix="/")
    app.wait_ready(server.url, timeout_s=900)


@pytest.mark.integration
def test_redeploy_with_a_new_config_lets_open_streams_finish(server):
    from ray import serve

    changed = copy.deepcopy(server.settings)
    changed["limits"]["max_queue"] = server.settings["limits"]["max_queue"] + 1
    keys = [new_key(server) for _ in range(3)]
    old_replica = operator_status(server)["engine"]["llm"]["replica"]
    inject(server, engine={"delay_s": DELAY_S})
    opened = [threading.Event() for _ in keys]
    states: list[tuple[str, int]] = []
    try:
        with ThreadPoolExecutor(3) as pool:
            streams = [pool.submit(_stream, server, key, event) for key, event in zip(keys, opened)]
            assert all(event.wait(300) for event in opened)
            done = threading.Event()

            def watch():  # the application's state while streams are still open
                while not done.is_set():
                    states.append((serve.status().applications["attune"].status.value,
                                   sum(not s.done() for s in streams)))
                    done.wait(0.5)

            watcher = threading.Thread(target=watch)
            watcher.start()
            try:
                _redeploy(server, changed)
            finally:
                done.set()
                watcher.join()
            results = [s.result() for s in streams]
        assert any(state == "DEPLOYING" and still_open for state, still_open in states), states
        for key, events in zip(keys, results):
            info = assert_completed(events)
            assert info["gate"] == "pass" and events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
            assert history(server, key, info["session_id"]) == [("user", FEELING_TEXT, None),
                                                               ("assistant", text_of(events), "pass")]
        status = operator_status(server)
        assert status["admission"]["max_queue"] == changed["limits"]["max_queue"]
        assert status["engine"]["llm"]["replica"] != old_replica
        assert inject(server)["engine"]["delay_s"] is None  # the new replica starts without the old one's faults
    finally:
        _redeploy(server, server.settings)
    assert operator_status(server)["admission"]["max_queue"] == server.settings["limits"]["max_queue"]


@pytest.mark.integration
def test_colocated_engine_serves_the_same_api_without_the_llm_deployment(server):
    """engine.colocate: the ingress replica runs vLLM itself. The LLM deployment is gone, the ingress answers for the
    engine (its replica id, its adapters), a pinned adapter streams through the official client with the gate passing
    it and the turn stored, the crisis path still answers, and a client that leaves aborts its generation."""
    import time

    from openai import OpenAI

    colocated = copy.deepcopy(server.settings)
    colocated["engine"]["colocate"] = True
    try:
        _redeploy(server, colocated)
        status = operator_status(server)["engine"]
        assert set(status["deployments"]["attune"]) == {"AttuneIngress", "RewardScorer"}, status["deployments"]
        replica = status["llm"]["replica"]
        assert replica == status["memory"]["ingress"]["replica"], status["memory"]

        key = new_key(server)
        adapter = sorted(server.adapters)[0]
        client = OpenAI(base_url=server.v1, api_key=server.operator_key, max_retries=0, timeout=600)
        chunks = list(client.chat.completions.create(
            model="attune", max_tokens=16, temperature=0, stream=True,
            messages=[{"role": "user", "content": FEELING_TEXT}], extra_body={"attune_options": {"adapter": adapter}}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        (info,) = [ch.model_extra["attune"] for ch in chunks if (ch.model_extra or {}).get("attune")]
        assert text.strip() and info["adapter"] == adapter and info["gate"] in ("pass", "regenerated"), info
        assert history(server, server.operator_key, info["session_id"]) == [("user", FEELING_TEXT, None),
                                                                            ("assistant", text, info["gate"])]
        assert adapter in operator_status(server)["engine"]["llm"]["loaded_adapters"]

        crisis = OpenAI(base_url=server.v1, api_key=key, max_retries=0, timeout=600).chat.completions.create(
            model="attune", max_tokens=16, messages=[{"role": "user", "content": "I want to kill myself tonight."}])
        assert crisis.model_extra["attune"]["gate"] == "crisis" and crisis.usage.completion_tokens == 0

        story = "Tell me a long story about a lighthouse keeper, in many parts."
        body = {"model": "attune", "max_tokens": 64, "temperature": 0, "stream": True,
                "messages": [{"role": "user", "content": story}]}
        with httpx.stream("POST", f"{server.v1}/chat/completions", json=body, headers=auth(key), timeout=600) as r:
            lines = r.iter_lines()
            request_id = json.loads(next(line for line in lines if line).removeprefix("data: "))["id"] + "-0"
            assert request_id in operator_status(server)["engine"]["llm"]["in_flight"]
        deadline, llm = time.monotonic() + 300, {}
        while time.monotonic() < deadline:
            llm = operator_status(server)["engine"]["llm"]
            if request_id not in llm["in_flight"] and any(c["request_id"] == request_id for c in llm["cancelled"]):
                break
            time.sleep(1)
        (cancelled,) = [c for c in llm["cancelled"] if c["request_id"] == request_id]
        assert cancelled["finish_reason"] == "abort" and llm["unfinished"] == 0, llm
    finally:
        _redeploy(server, server.settings)
    assert "LLMServer" in operator_status(server)["engine"]["deployments"]["attune"]
