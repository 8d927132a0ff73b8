"""The real application (Ray Serve, vLLM on SmolLM2 with two LoRA adapters, the reward model, SQLite) driven over
HTTP with the official `openai` client: plain and streamed chat, preference routing, the crisis protocol, a fault
injected into the scorer, every rejection (401/403/404/413/422/429), metrics per adapter and health.
(deploy/serve-cpu.yaml is loaded by tests/deploy/test_deploy_files.py.)"""
from __future__ import annotations

import json
import re
import time

import httpx
import pytest

from alignment.objectives import OBJECTIVES
from serving.crisis_reply import CRISIS_REPLY_ID, resources_block
from serving.safety import FALLBACK_REPLY
from tests.integration.api import FEELING, new_key, operator_status

GATES = {"pass", "regenerated", "fallback", "crisis"}


def test_app_config_layers_file_settings_then_environment(tmp_path):
    from serving.app import AppArgs, FaultSpec, load_config
    from serving.config import ConfigError

    path = tmp_path / "serve.yaml"
    path.write_text("limits: {requests_per_minute: 5, max_tokens_cap: 200}\nmerge_policy: true\n")
    args = AppArgs(config=str(path), settings={"limits": {"requests_per_minute": 9}})
    cfg = load_config(args, {"ATTUNE_DATA_DIR": str(tmp_path / "d"), "ATTUNE_MERGE_POLICY": "false"})
    assert (cfg.limits.requests_per_minute, cfg.limits.max_tokens_cap, cfg.merge_policy) == (9, 200, False)
    assert cfg.database_url == f"sqlite:///{tmp_path / 'd' / 'attune.db'}"
    with pytest.raises(ConfigError, match="limits.max_tokens_cap"):
        load_config(AppArgs(settings={"limits": {"max_tokens_cap": 99999}}), {})
    with pytest.raises(ValueError, match="crisis_prob"):
        FaultSpec.model_validate({"crisis_prob": 2})


def client(server, key: str | None = None):
    from openai import OpenAI

    return OpenAI(base_url=server.v1, api_key=key or server.api_key, max_retries=0, timeout=600)


def faults(server, spec: dict, key: str | None = None) -> httpx.Response:
    return httpx.post(f"{server.v1}/admin/faults", json={"scorer": spec},
                      headers={"Authorization": f"Bearer {key or server.operator_key}"})


def extremes(server) -> list[str]:
    """The routable adapters with the least and the most safety weight (the latter answers crises)."""
    order = sorted(server.adapters, key=lambda i: (server.adapters[i]["safety"], [-ord(ch) for ch in i]))
    return [order[0], order[-1]]


@pytest.mark.integration
def test_healthz_reports_ready(server):
    r = httpx.get(f"{server.url}/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok", "engine": "ok", "scorer": "ok", "database": "ok"}
    print(f"\nstart to /healthz 200: {server.startup_seconds:.1f} s")


@pytest.mark.integration
def test_the_private_ray_instance_runs_lean_and_leaves_the_callers_environment_alone(server):
    """start_local's Ray processes (children of this test process) start with serving.app.LEAN_LOCAL_ENV; this
    process's environment, which a later `ray start` would inherit, does not keep it."""
    import os

    import psutil

    from serving.app import LEAN_LOCAL_ENV

    controllers = [p for p in psutil.Process().children(recursive=True)
                   if "ServeController" in " ".join(p.cmdline())]
    assert controllers, "no Serve controller among this process's descendants"
    env = controllers[0].environ()
    assert {var: env.get(var) for var in LEAN_LOCAL_ENV} == LEAN_LOCAL_ENV
    assert not set(LEAN_LOCAL_ENV) & set(os.environ)


@pytest.mark.integration
def test_chat_without_streaming_carries_the_attune_extension(server):
    c = client(server, new_key(server))
    r = c.chat.completions.create(model="attune", messages=FEELING, max_tokens=24, temperature=0,
                                  extra_body={"preference": "balanced"})
    info = r.model_extra["attune"]
    assert r.choices[0].message.content.strip() and r.usage.completion_tokens > 0
    assert info["adapter"] in server.adapters and set(info["scores"]) == set(OBJECTIVES)
    assert info["gate"] in GATES - {"crisis"} and not info["crisis"]
    again = c.chat.completions.create(model="attune", messages=[{"role": "user", "content": "Thanks. Any ideas?"}],
                                      max_tokens=16, temperature=0, extra_body={"session_id": info["session_id"]})
    assert again.model_extra["attune"]["session_id"] == info["session_id"]
    assert again.model_extra["attune"]["adapter"] == info["adapter"]


@pytest.mark.integration
def test_chat_streaming_releases_text_then_attune_then_done(server):
    key = new_key(server)
    stream = client(server, key).chat.completions.create(
        model="attune", messages=FEELING, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"preference": "warm"})
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    final = [ch for ch in chunks if (ch.model_extra or {}).get("attune")]
    assert text.strip() and len(final) == 1 and chunks[-1].usage.completion_tokens > 0
    info = final[0].model_extra["attune"]
    assert info["gate"] in GATES - {"crisis"} and final[0].choices[0].finish_reason in ("stop", "length",
                                                                                        "content_filter")
    history = httpx.get(f"{server.v1}/sessions/{info['session_id']}/messages",
                        headers={"Authorization": f"Bearer {key}"}).json()["data"]
    assert [m["role"] for m in history] == ["user", "assistant"] and history[1]["content"] == text
    assert history[1]["gate"] == info["gate"] and history[1]["adapter"] == info["adapter"]


@pytest.mark.integration
def test_two_preferences_are_served_by_two_adapters_with_different_text(server):
    c = client(server, new_key(server))
    a, b = extremes(server)
    replies = {}
    for adapter_id in (a, b):  # 64 tokens: a reply ends at its last full sentence, and the shipped adapters'
        # first sentences are the same ("I'm so sorry to hear that you're going through a tough time.")
        r = c.chat.completions.create(model="attune", messages=FEELING, max_tokens=64, temperature=0,
                                      extra_body={"preference": server.adapters[adapter_id]})
        info = r.model_extra["attune"]
        assert info["adapter"] == adapter_id and info["gate"] == "pass", info
        replies[adapter_id] = r.choices[0].message.content
    assert replies[a] != replies[b], replies


@pytest.mark.integration
def test_crisis_message_triggers_the_protocol(server):
    key = new_key(server)
    r = client(server, key).chat.completions.create(
        model="attune", max_tokens=24, temperature=0, extra_body={"preference": "warm"},
        messages=[{"role": "user", "content": "I can't do this anymore. I want to kill myself tonight."}])
    info, text = r.model_extra["attune"], r.choices[0].message.content
    assert info["gate"] == "crisis" and info["crisis"] and info["adapter"] == CRISIS_REPLY_ID
    assert resources_block(text) and "findahelpline.com" in text and "your local emergency number" in text
    assert r.usage.completion_tokens == 0, "the vetted crisis reply: nothing generated"
    session = httpx.get(f"{server.v1}/sessions/{info['session_id']}", headers={"Authorization": f"Bearer {key}"})
    assert session.json()["flagged"] is True


@pytest.mark.integration
def test_forced_unsafe_score_replaces_the_reply(server):
    c = client(server, new_key(server))
    assert faults(server, {"safety": 0.0, "times": 1}, key=new_key(server)).status_code == 403
    try:
        # The first reply is forced unsafe and its regeneration forced safe: whether a real reply passes is the
        # gate's calibration, measured in reports/safety.md, not this test's.
        assert faults(server, {"safety": [0.0, 5.0]}).json()["scorer"]["times"] == 2
        # Room for a whole sentence: a reply cut before its first one falls back whatever it scores.
        r = c.chat.completions.create(model="attune", messages=FEELING, max_tokens=64, temperature=0,
                                      extra_body={"preference": "warm"})
        assert r.model_extra["attune"]["gate"] == "regenerated", r.model_extra["attune"]
        assert faults(server, None).json()["scorer"]["times"] == 0, "one score per reply: the fault is used up"
        faults(server, {"safety": 0.0, "times": 50})
        r = c.chat.completions.create(model="attune", messages=FEELING, max_tokens=64, temperature=0)
        assert r.model_extra["attune"]["gate"] == "fallback" and r.choices[0].message.content == FALLBACK_REPLY
        assert r.choices[0].finish_reason == "content_filter", r.model_extra["attune"]
        faults(server, {"safety": 0.0, "times": 50})
        chunks = list(c.chat.completions.create(model="attune", messages=FEELING, max_tokens=64, temperature=0,
                                                stream=True))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == FALLBACK_REPLY and chunks[-1].model_extra["attune"]["gate"] == "fallback"
    finally:
        assert faults(server, {}).json()["scorer"]["safety"] is None


@pytest.mark.integration
def test_rejections_are_4xx_in_openai_shape(server):
    import openai

    key = new_key(server)
    c = client(server, key)
    with pytest.raises(openai.AuthenticationError):
        client(server, "att-not-a-real-key-0000000000").chat.completions.create(model="attune", messages=FEELING)
    mine = c.chat.completions.create(model="attune", messages=FEELING, max_tokens=8).model_extra["attune"]
    with pytest.raises(openai.NotFoundError) as e:
        client(server, new_key(server)).chat.completions.create(
            model="attune", messages=FEELING, extra_body={"session_id": mine["session_id"]})
    assert e.value.body["param"] == "session_id"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        c.chat.completions.create(model="attune", messages=FEELING, n=2)
    assert e.value.body["param"] == "n" and "n must be 1" in e.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError) as e:
        c.chat.completions.create(model="attune", messages=FEELING, extra_body={"preference": {"empathy": 2.0}})
    assert e.value.body["param"] == "preference"
    huge = {"model": "attune", "messages": [{"role": "user", "content": "x" * 20000}]}
    r = httpx.post(f"{server.v1}/chat/completions", json=huge, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    burst_key = new_key(server)
    codes = [httpx.get(f"{server.v1}/models", headers={"Authorization": f"Bearer {burst_key}"}) for _ in range(24)]
    limited = [r for r in codes if r.status_code == 429]
    assert limited and int(limited[0].headers["Retry-After"]) >= 1
    assert "requests per minute" in limited[0].json()["error"]["message"]


@pytest.mark.integration
def test_models_list_base_adapters_and_profiles(server):
    data = client(server, new_key(server)).models.list().data
    kinds = {m.id: m.model_extra["attune"]["kind"] for m in data}
    assert set(server.adapters) <= {i for i, k in kinds.items() if k == "adapter"}
    assert "base" in kinds.values() and {"balanced", "warm"} <= {i for i, k in kinds.items() if k == "profile"}


def without_replica(text: str) -> str:
    """/metrics with the ingress replica label dropped (every series but the merged adapter loads carries one)."""
    return re.sub(r",\}", "}", re.sub(r'replica="[^"]*",?', "", text))


@pytest.mark.integration
def test_metrics_have_per_adapter_series_and_status_is_operator_only(server):
    c = client(server, new_key(server))
    used = extremes(server)
    for adapter_id in used:
        c.chat.completions.create(model="attune", messages=FEELING, max_tokens=8,
                                  extra_body={"preference": server.adapters[adapter_id]})
    text = without_replica(httpx.get(f"{server.url}/metrics").text)
    for adapter_id in used:
        assert f'attune_requests_total{{adapter="{adapter_id}",status="200",stream="false"}}' in text
        assert f'attune_time_to_first_token_seconds_count{{adapter="{adapter_id}"}}' in text
        assert f'attune_generated_tokens_total{{adapter="{adapter_id}"}}' in text
        assert f'attune_adapter_loads_total{{adapter="{adapter_id}"}}' in text
    assert 'attune_gate_decisions_total{kind="pass"}' in text and "attune_crisis_escalations_total" in text
    assert "I had a rough week" not in text
    assert httpx.get(f"{server.v1}/admin/status", headers={"Authorization": f"Bearer {server.api_key}"}
                     ).status_code == 403
    status = httpx.get(f"{server.v1}/admin/status", headers={"Authorization": f"Bearer {server.operator_key}"}).json()
    assert used[-1] in status["engine"]["llm"]["loaded_adapters"]
    calibration = status["gate"]["calibration"]  # reward model v2: the safety classifier's rm-val threshold
    assert calibration["method"].startswith("safety classifier") and calibration["split"].startswith("rm-val")
    assert calibration["target_false_rejection"] == 0.05, calibration
    print("\nadmin status:", json.dumps(status["gate"]), f"(threshold in use from {status['gate']['threshold_source']})")


@pytest.mark.integration
def test_session_erasure_and_feedback(server):
    key = new_key(server)
    auth = {"Authorization": f"Bearer {key}"}
    sid = httpx.post(f"{server.v1}/sessions", json={"preference": "warm"}, headers=auth).json()["id"]
    client(server, key).chat.completions.create(model="attune", messages=FEELING, max_tokens=8,
                                                extra_body={"session_id": sid})
    reply = httpx.get(f"{server.v1}/sessions/{sid}/messages", headers=auth).json()["data"][-1]
    r = httpx.post(f"{server.v1}/sessions/{sid}/feedback", json={"message_id": reply["id"], "rating": "up"}, headers=auth)
    assert r.status_code == 201 and r.json()["kind"] == "rating"
    assert httpx.delete(f"{server.v1}/sessions/{sid}", headers=auth).json()["deleted"] is True
    assert httpx.get(f"{server.v1}/sessions/{sid}/messages", headers=auth).status_code == 404


@pytest.mark.integration
def test_client_disconnect_aborts_the_generation(server):
    """While the client is connected, the LLM replica and vLLM hold the request (64 tokens take seconds on a CPU);
    once it leaves, the replica records the stream as cancelled before vLLM finished it, vLLM holds nothing, its
    abort counter went up by one and the request is counted as a 499."""
    key = new_key(server)
    aborts = operator_status(server)["engine"]["llm"]["stats"].get("aborts", 0)
    body = {"model": "attune", "max_tokens": 64, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse keeper, in many parts."}]}
    with httpx.stream("POST", f"{server.v1}/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {key}"}, timeout=600) as r:
        lines = r.iter_lines()  # kept referenced: a dropped line iterator closes the connection
        first = next(line for line in lines if line)
        request_id = json.loads(first.removeprefix("data: "))["id"] + "-0"
        live = operator_status(server)["engine"]["llm"]
        assert request_id in live["in_flight"] and live["unfinished"] == 1, live
    deadline, llm = time.monotonic() + 300, {}
    while time.monotonic() < deadline:
        llm = operator_status(server)["engine"]["llm"]
        if any(c["request_id"] == request_id for c in llm["cancelled"]) and request_id not in llm["in_flight"]:
            break
        time.sleep(1)
    (cancelled,) = [c for c in llm["cancelled"] if c["request_id"] == request_id]
    assert cancelled["finish_reason"] == "abort" and cancelled["completion_tokens"] < 64, cancelled
    assert llm["unfinished"] == 0 and llm["stats"]["aborts"] == aborts + 1
    metrics = without_replica(httpx.get(f"{server.url}/metrics").text)
    assert re.search(r'^attune_requests_total\{adapter="[^"]+",status="499",stream="true"\} [1-9]', metrics, re.M)
