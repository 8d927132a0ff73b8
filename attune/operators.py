"""`attune flagged`: the sessions the crisis protocol flagged, for the humans who must see them, read from a running
service's operator routes (GET /v1/admin/flagged, POST /v1/admin/flagged/{id}/ack, GET /v1/admin/sessions/{id}/
messages). The list never shows message text; `show` does, and the service audits each opening."""
from __future__ import annotations

import os
import sys
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


class OperatorError(RuntimeError):
    """A call to the operator routes failed; the message says why and what to do."""


class OperatorClient:
    """The service's /v1/admin routes with the operator key (`transport`: httpx.MockTransport in tests)."""

    def __init__(self, url: str, operator_key: str, transport: httpx.BaseTransport | None = None):
        self.url, self.key, self.transport = url.rstrip("/"), operator_key, transport

    def call(self, method: str, path: str, **params) -> dict:
        import httpx

        endpoint = f"{self.url}{path}"
        try:
            with httpx.Client(transport=self.transport, timeout=60) as client:
                r = client.request(method, endpoint, params=params or None,
                                   headers={"Authorization": f"Bearer {self.key}"})
        except httpx.HTTPError as e:
            raise OperatorError(f"cannot reach {endpoint} ({type(e).__name__}: {e}); is the service running? Start "
                                "it with `attune serve`, or pass --url / $ATTUNE_URL") from None
        if r.status_code == 401 or (r.status_code == 403 and _error(r)[1] == "operator_only"):
            raise OperatorError(f"{endpoint} refused the key (HTTP {r.status_code}: {_error(r)[0]}); give the "
                                "operator key with --operator-key or $ATTUNE_OPERATOR_KEY (`attune serve` keeps it "
                                "in <data_dir>/operator_key)")
        if r.status_code != 200:
            raise OperatorError(f"HTTP {r.status_code}: {_error(r)[0]}")
        try:
            return r.json()
        except ValueError:
            raise OperatorError(f"{endpoint} did not answer JSON; is {self.url} an Attune service?") from None

    def flagged(self, status: str = "open") -> dict:
        return self.call("GET", "/v1/admin/flagged", status=status)

    def acknowledge(self, session_id: str) -> dict:
        return self.call("POST", f"/v1/admin/flagged/{session_id}/ack")

    def messages(self, session_id: str) -> dict:
        return self.call("GET", f"/v1/admin/sessions/{session_id}/messages")


def _error(r) -> tuple[str, str | None]:
    """(the service's error message, its code) of a refusal."""
    try:
        err = r.json()["error"]
        return str(err["message"])[:300], err.get("code")
    except (ValueError, KeyError, TypeError):
        return r.text[:300], None


def _safe(text: str) -> str:
    """`text` with control characters escaped, so that a message cannot drive the operator's terminal."""
    return "".join(c if c.isprintable() or c in "\n\t" else c.encode("unicode_escape").decode() for c in str(text))


def _when(ts: int | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M")


def format_flags(payload: dict) -> str:
    """GET /v1/admin/flagged as a table: ids, tenants, times (UTC), counts, detectors, rule names; no text."""
    flags, status = payload.get("data") or [], payload.get("status", "open")
    if not flags:
        return f"no {'' if status == 'all' else status + ' '}flagged sessions"
    head = ("SESSION", "TENANT", "FIRST FLAGGED", "LAST FLAGGED", "TURNS", "DETECTOR", "CATEGORIES", "MSGS", "STATE")
    rows = [tuple(_safe(c).replace("\n", " ") for c in (
        f["session_id"], f["tenant"], _when(f["first_flagged"]), _when(f["last_flagged"]), str(f["flagged_turns"]),
        f["detector"], ",".join(f["categories"]) or "-", str(f["messages"]),
        ("acknowledged" if f["acknowledged"] else "open") + (", erased" if f["erased"] else ""))) for f in flags]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i in (4, 7) else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in [head, *rows]]
    lines.append(f"{len(flags)} {'' if status == 'all' else status + ' '}flagged session(s), times in UTC. "
                 "`attune flagged show SESSION_ID` opens one (audited); `attune flagged ack SESSION_ID` marks it seen")
    return "\n".join(lines)


def format_messages(session_id: str, payload: dict) -> str:
    """One flagged session's messages, oldest first; turns the client wrote itself are marked as such."""
    messages = payload.get("data") or []
    lines = [f"session {session_id}: {len(messages)} messages (this opening is in the audit log)"]
    for m in messages:
        gate = m.get("gate")
        who = m["role"] + (" (written by the client)" if gate == "client" else f" [{gate}]" if gate else "")
        lines += [f"--- {_when(m.get('created'))} {_safe(who)}", _safe(m["content"])]
    return "\n".join(lines)


def _client(prog: str, url: str | None, operator_key: str | None) -> OperatorClient | None:
    """The client for --url / $ATTUNE_URL and the operator key; None (the reason printed) when there is no key."""
    from evals.bench import keys_from_env
    from serving.config import ConfigError

    try:
        key = keys_from_env(None, operator_key)[1]
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return None
    if not key:
        print(f"{prog}: no operator key; pass --operator-key, set $ATTUNE_OPERATOR_KEY, or run it where `attune "
              "serve` wrote <data_dir>/operator_key", file=sys.stderr)
        return None
    return OperatorClient(url or os.environ.get("ATTUNE_URL") or DEFAULT_URL, key)


def _run(prog: str, url: str | None, operator_key: str | None, act: Callable[[OperatorClient], str]) -> int:
    client = _client(prog, url, operator_key)
    if client is None:
        return 2
    try:
        print(act(client))
    except OperatorError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    return 0


def _session_id_refused(prog: str, session_id: str | None) -> bool:
    """True (the reason printed) unless `session_id` looks like an id the service issues."""
    import re

    from serving.fields import NOT_A_RECORD_ID, RECORD_ID

    if session_id and re.match(RECORD_ID, session_id):
        return False
    print(f"{prog}: {f'{session_id!r} {NOT_A_RECORD_ID}' if session_id else 'give the session id'}; "
          "`attune flagged` lists the flagged sessions", file=sys.stderr)
    return True


def flagged(url: str | None = None, operator_key: str | None = None, all_flags: bool = False) -> int:
    """List the sessions the crisis protocol flagged that no human has acknowledged yet (--all: every one)."""
    return _run("attune flagged", url, operator_key, lambda c: format_flags(c.flagged("all" if all_flags else "open")))


def flagged_ack(session_id: str | None = None, url: str | None = None, operator_key: str | None = None) -> int:
    """Acknowledge a flagged session: a human has seen it (a later crisis turn opens it again)."""
    def ack(client: OperatorClient) -> str:
        f = client.acknowledge(session_id)
        return (f"acknowledged {f['session_id']} (tenant {f['tenant']}, {f['flagged_turns']} flagged turn(s)) at "
                f"{_when(f['acknowledged_at'])} UTC by operator key {f['acknowledged_by']}")

    if _session_id_refused("attune flagged ack", session_id):
        return 2
    return _run("attune flagged ack", url, operator_key, ack)


def flagged_show(session_id: str | None = None, url: str | None = None, operator_key: str | None = None) -> int:
    """Print a flagged session's messages (any tenant's); the service records the opening in its audit log."""
    if _session_id_refused("attune flagged show", session_id):
        return 2
    return _run("attune flagged show", url, operator_key, lambda c: format_messages(session_id, c.messages(session_id)))
