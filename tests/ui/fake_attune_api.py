"""A fake Attune API behind httpx.MockTransport for the UI's unit tests: it records every request and answers
with the shapes serving/protocol.py and serving/sessions_protocol.py define (SSE framing as serving/streaming.py
writes it)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import httpx

CRISIS_BLOCK = ("You can talk to someone right now, any time of day or night:\n"
                "- 988 Suicide & Crisis Lifeline: call or text 988 (free, confidential, 24/7)\n"
                "- Find A Helpline: https://findahelpline.com (free, confidential helplines in your country)")
CRISIS_REPLY = f"{CRISIS_BLOCK}\n\nThank you for telling me.\n\nAre you safe right now?"


def sse(obj) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def chunk(content: str | None = None, *, finish: str | None = None, attune: dict | None = None,
          crisis_resources: str | None = None) -> bytes:
    delta = {} if content is None else {"content": content}
    body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "attune",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if attune is not None:
        body["attune"] = attune
    if crisis_resources is not None:
        body["crisis_resources"] = crisis_resources
    return sse(body)


def error(status: int, message: str, code: str, headers: dict | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": message, "type": "invalid_request_error",
                                                  "param": None, "code": code}}, headers=headers)


@dataclass
class FakeApi:
    """Sessions in memory; `pieces` is the next reply's deltas (with `crisis`, the crisis reply instead, its resources
    first and in the first chunk's `crisis_resources`); `fail` maps a route to a canned error."""

    pieces: list[str] = field(default_factory=lambda: ["I hear you. ", "What feels hardest?"])
    crisis: bool = False
    fail: dict[str, httpx.Response] = field(default_factory=dict)
    mid_stream_error: dict | None = None
    requests: list[httpx.Request] = field(default_factory=list)
    sessions: dict[str, dict] = field(default_factory=dict)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def bodies(self, method: str, path_end: str) -> list[dict]:
        return [json.loads(r.content or b"{}") for r in self.requests
                if r.method == method and r.url.path.endswith(path_end)]

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        route = f"{request.method} {request.url.path}"
        for key, response in self.fail.items():
            if route.startswith(key):
                return response
        parts = request.url.path.strip("/").split("/")
        body = json.loads(request.content or b"{}")
        if route == "POST /v1/sessions":
            sid = f"s{len(self.sessions) + 1}"
            self.sessions[sid] = {"preference": body["preference"], "messages": [], "feedback": []}
            return httpx.Response(201, json={"id": sid, "adapter": "modpo-balanced", "flagged": False,
                                             "preference": body["preference"], "created": 0})
        if route == "POST /v1/chat/completions":
            return self.chat(body)
        sid = parts[2]
        if sid not in self.sessions:
            return error(404, f"no session {sid!r} for this key", "session_not_found")
        session = self.sessions[sid]
        if request.method == "PATCH":
            session["preference"] = body["preference"]
            return httpx.Response(200, json={"id": sid, **session})
        if request.method == "DELETE":
            del self.sessions[sid]
            return httpx.Response(200, json={"id": sid, "object": "session.deleted", "deleted": True})
        if parts[-1] == "messages":
            return httpx.Response(200, json={"object": "list", "data": session["messages"]})
        if parts[-1] == "feedback":
            session["feedback"].append(body)
            return httpx.Response(201, json={"id": f"f{len(session['feedback'])}", "object": "feedback",
                                             "kind": "rating", "session_id": sid})
        raise AssertionError(f"unexpected request {route}")

    def chat(self, body: dict) -> httpx.Response:
        session = self.sessions[body["session_id"]]
        n = len(session["messages"])
        session["messages"].append({"id": f"m{n + 1}", "role": "user", "content": body["messages"][-1]["content"],
                                    "created": 0})
        text = CRISIS_REPLY if self.crisis else "".join(self.pieces)
        events = [chunk(CRISIS_REPLY, crisis_resources=CRISIS_BLOCK)] if self.crisis else \
            [chunk("")] + [chunk(p) for p in self.pieces]
        if self.mid_stream_error is not None:
            error = {**self.mid_stream_error, **({"crisis_resources": CRISIS_BLOCK} if self.crisis else {})}
            events.append(sse({"error": error}))
        else:
            session["messages"].append({"id": f"m{n + 2}", "role": "assistant", "content": text, "created": 0})
            events.append(chunk(finish="stop", attune={
                "adapter": "modpo-safety" if self.crisis else "modpo-balanced", "scores": {},
                "gate": "crisis" if self.crisis else "pass", "crisis": self.crisis,
                "session_id": body["session_id"]}))
        events.append(b"data: [DONE]\n\n")
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=b"".join(events))
