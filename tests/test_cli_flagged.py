"""`attune flagged`, `attune flagged --all`, `attune flagged ack ID` and `attune flagged show ID`: the list is a table
without message text, `show` marks client-written turns and cannot drive the terminal, refusals end with the
service's reason and a non-zero exit; and the commands against the real ASGI app (reached through an
httpx.MockTransport) list, open and acknowledge a crisis session end to end."""
from __future__ import annotations

import json

import httpx
import pytest
from fastapi.testclient import TestClient

from attune import cli, operators
from serving.api_router import create_app
from tests.serving.test_chat import make  # noqa: F401  (a fixture)

OPERATOR_KEY = "att-" + "o" * 40
CRISIS = "I want to kill myself tonight, I have the pills ready."
FLAG = {"session_id": "3f2a9c1e-0000-4000-8000-000000000001", "object": "session.flag", "tenant": "clinic-a",
        "first_flagged": 1714564800, "last_flagged": 1714566600, "flagged_turns": 2, "detector": "both",
        "categories": ["kill_myself", "means"], "acknowledged": False, "acknowledged_at": None,
        "acknowledged_by": None, "erased": False, "erased_at": None, "messages": 4}
ERASED = {**FLAG, "session_id": "erased-1", "tenant": "clinic-b", "categories": [], "flagged_turns": 1,
          "acknowledged": True, "acknowledged_at": 1714570000, "acknowledged_by": 3, "erased": True,
          "erased_at": 1714569000, "messages": 0}


def test_the_list_is_fetched_with_the_operator_key_and_shown_as_a_table():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path, dict(request.url.params), request.headers["authorization"]))
        return httpx.Response(200, json={"object": "list", "status": "all", "data": [FLAG, ERASED]})

    client = operators.OperatorClient("http://attune.test/", OPERATOR_KEY, transport=httpx.MockTransport(handler))
    lines = operators.format_flags(client.flagged("all")).splitlines()
    assert seen == [("GET", "/v1/admin/flagged", {"status": "all"}, f"Bearer {OPERATOR_KEY}")]
    assert lines[0].split() == ["SESSION", "TENANT", "FIRST", "FLAGGED", "LAST", "FLAGGED", "TURNS", "DETECTOR",
                                "CATEGORIES", "MSGS", "STATE"]
    assert lines[1].split() == [FLAG["session_id"], "clinic-a", "2024-05-01", "12:00", "2024-05-01", "12:30", "2",
                                "both", "kill_myself,means", "4", "open"]
    assert lines[2].split()[-3:] == ["0", "acknowledged,", "erased"] and lines[2].split()[8] == "-"
    col = lines[0].index("DETECTOR")  # columns line up under their headings
    assert lines[1][col:].startswith("both ") and lines[2][col:].startswith("both ")
    assert lines[-1].startswith("2 flagged session(s), times in UTC") and "attune flagged ack SESSION_ID" in lines[-1]
    assert operators.format_flags({"status": "open", "data": []}) == "no open flagged sessions"


def test_show_marks_client_written_turns_and_escapes_control_characters():
    payload = {"data": [
        {"id": "m1", "role": "user", "content": "hello\x1b[2J\x07", "created": 1714564800},
        {"id": "m2", "role": "assistant", "content": "typed by the app", "created": 1714564801, "gate": "client"},
        {"id": "m3", "role": "assistant", "content": "line one\nline two", "created": 1714564802, "gate": "crisis"}]}
    text = operators.format_messages("s1", payload)
    assert "\x1b" not in text and "\x07" not in text and "hello\\x1b[2J\\x07" in text
    assert "--- 2024-05-01 12:00 assistant (written by the client)" in text
    assert "--- 2024-05-01 12:00 assistant [crisis]\nline one\nline two" in text
    assert text.startswith("session s1: 3 messages (this opening is in the audit log)")


@pytest.mark.parametrize("status, body, message", [
    (401, {"error": {"message": "invalid API key", "code": "invalid_api_key"}}, "refused the key (HTTP 401"),
    (403, {"error": {"message": "needs an operator key", "code": "operator_only"}}, "--operator-key"),
    (403, {"error": {"message": "session 'x' is not flagged", "code": "session_not_flagged"}},
     "HTTP 403: session 'x' is not flagged"),
    (404, {"error": {"message": "no session 'x'; GET /v1/admin/flagged lists"}}, "HTTP 404: no session 'x'"),
    (410, {"error": {"message": "session 'x' was erased"}}, "HTTP 410: session 'x' was erased"),
])
def test_refusals_raise_with_the_services_reason(status, body, message):
    client = operators.OperatorClient("http://attune.test", OPERATOR_KEY,
                                      transport=httpx.MockTransport(lambda r: httpx.Response(status, json=body)))
    with pytest.raises(operators.OperatorError, match=message.replace("(", r"\(")):
        client.messages("x")


def test_an_unreachable_service_says_how_to_start_it():
    def refuse(request):
        raise httpx.ConnectError("connection refused")

    client = operators.OperatorClient("http://attune.test", OPERATOR_KEY, transport=httpx.MockTransport(refuse))
    with pytest.raises(operators.OperatorError, match="cannot reach http://attune.test/v1/admin/flagged.*attune serve"):
        client.flagged()


@pytest.fixture
def service(make, monkeypatch, tmp_path):  # noqa: F811
    """The real app behind every OperatorClient the commands make; no key file, the key in the environment."""
    svc = make()
    app = TestClient(create_app(svc))

    def forward(request: httpx.Request) -> httpx.Response:
        r = app.request(request.method, request.url.path, params=request.url.params, headers=dict(request.headers))
        return httpx.Response(r.status_code, content=r.content, headers={"content-type": "application/json"})

    class Wired(operators.OperatorClient):
        def __init__(self, url: str, key: str, transport=None):
            super().__init__(url, key, transport=httpx.MockTransport(forward))

    monkeypatch.setattr(operators, "OperatorClient", Wired)
    monkeypatch.setenv("ATTUNE_DATA_DIR", str(tmp_path / "no-keys-here"))
    monkeypatch.setenv("ATTUNE_OPERATOR_KEY", svc.test_keys["operator"].removeprefix("Bearer "))
    body = {"messages": [{"role": "user", "content": CRISIS}]}
    r = app.post("/v1/chat/completions", json=body, headers={"Authorization": svc.test_keys["bob"]})
    svc.crisis_session = r.json()["attune"]["session_id"]
    return svc


def test_commands_list_open_and_acknowledge_a_crisis_session(service, capsys):
    sid = service.crisis_session
    assert cli.main(["flagged"]) == 0
    out = capsys.readouterr().out
    assert sid in out and " bob " in out and out.splitlines()[1].endswith("open") and "pills" not in out

    assert cli.main(["flagged", "show", sid]) == 0
    out = capsys.readouterr().out
    assert CRISIS in out and f"session {sid}: 2 messages" in out
    (event,) = service.repo.list_audit("operator_opened_session")
    assert event.session_id == sid and "pills" not in json.dumps(event.detail)

    assert cli.main(["flagged", "ack", sid]) == 0
    assert capsys.readouterr().out.startswith(f"acknowledged {sid} (tenant bob, 1 flagged turn(s)) at ")
    assert cli.main(["flagged"]) == 0
    assert capsys.readouterr().out.strip() == "no open flagged sessions"
    assert cli.main(["flagged", "--all"]) == 0
    out = capsys.readouterr().out
    assert sid in out and out.splitlines()[1].endswith("acknowledged")


def test_commands_fail_clearly_on_a_wrong_key_an_unknown_id_or_a_malformed_one(service, monkeypatch, capsys):
    assert cli.main(["flagged", "show", "no-such-session"]) == 1
    err = capsys.readouterr().err
    assert "attune flagged show: HTTP 404" in err and "GET /v1/admin/flagged" in err
    assert cli.main(["flagged", "ack"]) == 2 and "give the session id" in capsys.readouterr().err
    assert cli.main(["flagged", "show", "../admin/status"]) == 2
    assert "is not an id this service issues" in capsys.readouterr().err
    monkeypatch.setenv("ATTUNE_OPERATOR_KEY", service.test_keys["bob"].removeprefix("Bearer "))
    assert cli.main(["flagged", "--all"]) == 1
    assert "refused the key (HTTP 403" in capsys.readouterr().err
    monkeypatch.delenv("ATTUNE_OPERATOR_KEY")
    assert cli.main(["flagged"]) == 2 and "no operator key" in capsys.readouterr().err
    assert service.repo.count_audit("operator_opened_session") == 0
