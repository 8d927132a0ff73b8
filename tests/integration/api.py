"""HTTP helpers for the integration tests that drive the live app with httpx (raw status codes, headers and SSE
events, which the official client hides). Admin calls have a budget of their own (limits.admin_requests_per_minute),
so a 429 on one is a failure, not something to wait out."""
from __future__ import annotations

import json
import uuid

import httpx

FEELING_TEXT = "I had a rough week at work and I feel completely drained."
FEELING = [{"role": "user", "content": FEELING_TEXT}]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def operator(server, method: str, path: str, **kwargs) -> httpx.Response:
    """An operator request to /v1<path>."""
    return httpx.request(method, f"{server.v1}{path}", headers=auth(server.operator_key), timeout=60, **kwargs)


def new_key(server, tenant: str | None = None) -> str:
    r = operator(server, "POST", "/admin/keys", json={"tenant": tenant or f"t-{uuid.uuid4().hex[:8]}"})
    assert r.status_code == 201, r.text
    return r.json()["key"]


def inject(server, **parts) -> dict:
    """POST /v1/admin/faults with {part: fault}; the state of every part."""
    r = operator(server, "POST", "/admin/faults", json=parts)
    assert r.status_code == 200, r.text
    return r.json()


def operator_status(server) -> dict:
    r = operator(server, "GET", "/admin/status")
    assert r.status_code == 200, r.text
    return r.json()


def health(server) -> httpx.Response:
    return httpx.get(f"{server.url}/healthz", timeout=60)


def new_session(server, key: str) -> str:
    r = httpx.post(f"{server.v1}/sessions", json={"preference": "warm"}, headers=auth(key), timeout=60)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def history(server, key: str, session_id: str) -> list[tuple[str, str, str | None]]:
    """(role, content, gate) of every stored message of the session, oldest first."""
    r = httpx.get(f"{server.v1}/sessions/{session_id}/messages", headers=auth(key), timeout=60)
    assert r.status_code == 200, r.text
    return [(m["role"], m["content"], m.get("gate")) for m in r.json()["data"]]


def chat(server, key: str, **body) -> httpx.Response:
    body = {"model": "attune", "messages": FEELING, "max_tokens": 32, "temperature": 0, **body}
    return httpx.post(f"{server.v1}/chat/completions", json=body, headers=auth(key), timeout=600)


def stream_chat(server, key: str, **body) -> tuple[httpx.Response, list]:
    """The response and, when it is 200, its events: parsed chunks, then "[DONE]"."""
    body = {"model": "attune", "messages": FEELING, "max_tokens": 32, "temperature": 0, "stream": True, **body}
    with httpx.stream("POST", f"{server.v1}/chat/completions", json=body, headers=auth(key), timeout=600) as r:
        if r.status_code != 200:
            r.read()
            return r, []
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    return r, [e if e == "[DONE]" else json.loads(e) for e in events]


def text_of(events: list) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e.get("choices"))


def assert_refused(r: httpx.Response, status: int, code: str) -> None:
    """An OpenAI-shaped error with a Retry-After header."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"], error
    assert int(r.headers["Retry-After"]) >= 1


def assert_completed(events: list) -> dict:
    """A stream that ended with the attune chunk and [DONE], with text; its attune extension."""
    assert events and events[-1] == "[DONE]", events[-3:]
    final = [e for e in events[:-1] if e.get("attune")]
    assert len(final) == 1 and text_of(events).strip(), events[-3:]
    return final[0]["attune"]


def assert_error_event(events: list, code: str) -> None:
    """A stream that ended with an error event, then [DONE] (no hang, no cut connection)."""
    assert events and events[-1] == "[DONE]" and events[-2]["error"]["code"] == code, events[-3:]
