"""A middleware for Serve's HTTP proxy (not for the app): when the ingress replica serving a request dies, Serve's proxy
answers a bare 500 (or, mid-stream, just stops). This turns that into what a client knows to retry: a 503 with
Retry-After and an OpenAI error body, or, in a stream already begun, a final OpenAI error event and [DONE]. The
patient's message is kept by the retry (a repeated unanswered message is not stored twice). The body it reads ahead
goes to the replica with the request (BODY_SCOPE_KEY), so the app does not wait for the body to be fetched back.

The proxy is Serve's own actor, so the app cannot install this: set, on every Ray node (before `ray start`),
  RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serving.proxy_middleware:middlewares
Imports only starlette and json: it runs in the proxy process of every node.
"""
from __future__ import annotations

import json

from starlette.middleware import Middleware

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "serving.proxy_middleware:middlewares"
RETRY_AFTER_S = 5
"""As serving.errors.RETRY_AFTER_S (not imported: that would load the app's modules into the proxy)."""
CODE = "ingress_unavailable"
MESSAGE = ("the server handling this request stopped before it answered; retry after {s} s (with session_id, a message "
           "already saved is not saved twice)")


def error_body() -> bytes:
    return json.dumps({"error": {"message": MESSAGE.format(s=RETRY_AFTER_S), "type": "server_error", "param": None,
                                 "code": CODE}}).encode()


RETRIED = {("POST", "/v1/chat/completions")}
"""Requests the proxy sends once more, to another replica, when the first died before answering: a chat completion
(with session_id, the retry answers the message already stored instead of storing it twice; without, the first
attempt's session, if it got that far, keeps its unanswered message) and any GET or HEAD. Nothing else is repeated
(a second session or feedback row would be a side effect the client never asked for)."""
MAX_BUFFERED = 4 * 2**20
"""A request body larger than this is never retried (the API refuses far smaller chat requests anyway)."""
BODY_SCOPE_KEY = "attune.body"
"""The scope key under which a whole body read ahead travels to the replica with the request (the app reads it there,
serving.api_router.read_body): without it the app waits for the replica's call back to the proxy for the body (2.6-3.2
ms per chat turn in a one-off timeline of 16 requests). Serve still makes that call, to watch for a disconnect, but
the chat turn no longer waits for it."""
INLINED_MAX = 1 * 2**20
"""Bodies up to this size travel in the scope; a larger one is fetched as Serve does it."""


class ReplicaLost:
    """Pure ASGI middleware: watches the response the proxy relays and completes one the replica left unfinished;
    a retryable request (RETRIED) that got no answer at all is first sent once more, so a lost replica costs the
    patient nothing when another is up."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"started": False, "done": False, "sse": False}

        async def relay(message):
            if message["type"] == "http.response.start":
                state["started"] = True
                state["sse"] = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                   for k, v in message.get("headers", []))
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["done"] = True
            await send(message)

        method = scope.get("method", "GET")
        retryable = method in ("GET", "HEAD") or (method, scope.get("path", "")) in RETRIED
        messages, whole = await _buffer(receive) if retryable else ([], False)
        if whole:
            body = b"".join(m.get("body", b"") for m in messages)
            if len(body) <= INLINED_MAX:
                scope = {**scope, BODY_SCOPE_KEY: body}
        for _ in range(2 if whole else 1):
            await self.app(scope, _replay(messages, receive), relay)
            if state["done"] or state["started"]:
                break
        if state["done"]:
            return
        if not state["started"]:
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"retry-after", str(RETRY_AFTER_S).encode())]})
            await send({"type": "http.response.body", "body": error_body()})
        elif state["sse"]:
            await send({"type": "http.response.body", "body": b"data: " + error_body() + b"\n\ndata: [DONE]\n\n"})
        # Any other response begun and cut off: the server closes the connection, which clients retry.


async def _buffer(receive) -> tuple[list[dict], bool]:
    """The request's messages read ahead, and whether they hold its whole body (False: too large, or the client
    went away; such a request is passed on once, these messages first)."""
    messages, size = [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, False
        size += len(message.get("body", b""))
        if size > MAX_BUFFERED:
            return messages, False
        if not message.get("more_body", False):
            return messages, True


def _replay(messages: list[dict], receive):
    """A receive() that gives the messages read ahead, in order, then waits on the client's connection."""
    queue = list(messages)

    async def replayed():
        return queue.pop(0) if queue else await receive()

    return replayed


def middlewares() -> list[Middleware]:
    """The callback Serve's proxy calls (see the module docstring)."""
    return [Middleware(ReplicaLost)]
