"""The UI's client of the Attune HTTP API: sessions, feedback and erasure with httpx, streamed replies with the
official `openai` client over the same connection pool. Every failure is an `ApiProblem` that keeps the status,
the server's message and code, and Retry-After, so the UI can say in plain words what to do next."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import httpx
import openai

from alignment.objectives import Preference

TIMEOUT = httpx.Timeout(180.0, connect=10.0)
"""Generous: on a busy CPU the gate releases a reply sentence by sentence, seconds apart."""


class ApiProblem(Exception):
    """A call that failed. `status` is None when the service gave no HTTP answer (unreachable, or an error
    inside a stream that had already begun, which then carries a `code`)."""

    def __init__(self, status: int | None, message: str, code: str | None = None,
                 retry_after: float | None = None, crisis_resources: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.retry_after = status, message, code, retry_after
        self.crisis_resources = crisis_resources
        """A crisis reply's resources, which the service sends with an error that ends its stream."""

    @property
    def unreachable(self) -> bool:
        return self.status is None and self.code is None


@dataclass(frozen=True)
class ReplyUpdate:
    """A streamed reply so far; the last update has `done`. `crisis` and `resources` are set from the first update
    of a crisis reply on (the service sends its resources before anything else), or at the latest with `done`."""

    text: str
    done: bool = False
    crisis: bool = False
    resources: str = ""
    """The crisis resources block (a lead line, then '- name: contact' lines), as the service sent it."""


def _retry_after(headers: httpx.Headers) -> float | None:
    try:
        return float(headers["retry-after"])
    except (KeyError, ValueError):
        return None


def _problem(response: httpx.Response) -> ApiProblem:
    try:
        error = response.json().get("error") or {}
    except ValueError:
        error = {}
    message = error.get("message") if isinstance(error, dict) else None
    return ApiProblem(response.status_code, message or f"HTTP {response.status_code}",
                      error.get("code") if isinstance(error, dict) else None, _retry_after(response.headers))


class AttuneClient:
    """One per UI process (thread-safe). `transport` replaces the network in unit tests."""

    def __init__(self, api_url: str, api_key: str, *, transport: httpx.BaseTransport | None = None,
                 timeout: httpx.Timeout = TIMEOUT):
        self.api_url = api_url.rstrip("/")
        self.http = httpx.Client(base_url=self.api_url, headers={"Authorization": f"Bearer {api_key}"},
                                 transport=transport, timeout=timeout)
        # No retries: a retried chat request would store the patient's message twice.
        self.openai = openai.OpenAI(base_url=f"{self.api_url}/v1", api_key=api_key, http_client=self.http,
                                    max_retries=0)

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, json: dict | None = None) -> dict[str, Any]:
        try:
            response = self.http.request(method, path, json=json)
        except httpx.TransportError as e:
            raise ApiProblem(None, f"cannot reach {self.api_url}: {type(e).__name__}") from None
        if response.is_error:
            raise _problem(response)
        return response.json()

    def create_session(self, preference: Preference) -> str:
        """A new session with this preference; its id."""
        return self._call("POST", "/v1/sessions", {"preference": preference.as_dict()})["id"]

    def set_preference(self, session_id: str, preference: Preference) -> None:
        """Change the session's style; the next reply is routed by it."""
        self._call("PATCH", f"/v1/sessions/{session_id}", {"preference": preference.as_dict()})

    def stream_reply(self, session_id: str, text: str) -> Iterator[ReplyUpdate]:
        """Send the patient's message (the session keeps the history) and yield the reply as it is released."""
        reply, resources, began, done = "", "", False, False
        try:
            with self.openai.chat.completions.create(
                    model="attune", messages=[{"role": "user", "content": text}], stream=True,
                    extra_body={"session_id": session_id}) as stream:
                for chunk in stream:
                    began = True
                    if chunk.choices:
                        reply += chunk.choices[0].delta.content or ""
                    extra = chunk.model_extra or {}
                    info = extra.get("attune")
                    resources = (resources or extra.get("crisis_resources") or (info or {}).get("crisis_resources")
                                 or "")
                    done = done or info is not None
                    crisis = bool(resources) or bool(info and info.get("crisis"))
                    yield ReplyUpdate(reply, done=info is not None, crisis=crisis, resources=resources)
        except openai.APIStatusError as e:
            body = e.body if isinstance(e.body, dict) else {}
            raise ApiProblem(e.status_code, body.get("message") or e.message, body.get("code"),
                             _retry_after(e.response.headers)) from None
        except openai.APIConnectionError as e:
            if began:
                raise ApiProblem(None, f"the reply from {self.api_url} was cut off: {type(e).__name__}",
                                 "stream_cut", crisis_resources=resources or None) from None
            raise ApiProblem(None, f"cannot reach {self.api_url}: {type(e).__name__}") from None
        except openai.APIError as e:  # an error event inside a stream that had begun
            body = e.body if isinstance(e.body, dict) else {}
            raise ApiProblem(None, e.message, e.code or "stream_error",
                             crisis_resources=body.get("crisis_resources") or resources or None) from None
        if not done:
            raise ApiProblem(None, f"the reply from {self.api_url} ended before it was complete", "stream_cut",
                             crisis_resources=resources or None)

    def last_reply_id(self, session_id: str) -> str:
        """The id of the session's latest assistant message (what a thumb refers to)."""
        messages = self._call("GET", f"/v1/sessions/{session_id}/messages")["data"]
        replies = [m["id"] for m in messages if m["role"] == "assistant"]
        if not replies:
            raise ApiProblem(None, f"session {session_id} has no reply yet", "no_reply")
        return replies[-1]

    def feedback(self, session_id: str, message_id: str, liked: bool) -> str:
        """Store a thumb on one reply; the feedback id."""
        return self._call("POST", f"/v1/sessions/{session_id}/feedback",
                          {"message_id": message_id, "rating": "up" if liked else "down"})["id"]

    def delete_session(self, session_id: str) -> None:
        """Erase the session's messages and feedback on the server."""
        self._call("DELETE", f"/v1/sessions/{session_id}")
