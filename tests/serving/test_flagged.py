"""Sessions a human must see, through the ASGI app: crisis turns appear in GET /v1/admin/flagged without their
text, an operator acknowledges them and opens a flagged session of any tenant (audited, no text in the audit),
erasure keeps the flag and answers 410, and patient keys, bad statuses and unknown ids get refusals that say why."""
from __future__ import annotations

import json
import logging

import pytest
from fastapi.testclient import TestClient

from serving.api_router import create_app
from tests.serving.test_chat import make  # noqa: F401  (a fixture)

CRISIS = "I want to kill myself tonight, I have the pills ready."
CALM = "Work has been overwhelming lately."


@pytest.fixture
def api(make):  # noqa: F811
    svc = make(limits={"admin_requests_per_minute": 40})
    client = TestClient(create_app(svc))

    def call(method: str, path: str, key: str = "operator", **kw):
        return client.request(method, path, headers={"Authorization": svc.test_keys[key]}, **kw)

    def say(key: str, text: str, session_id: str | None = None) -> str:
        body = {"messages": [{"role": "user", "content": text}], **({"session_id": session_id} if session_id else {})}
        r = call("POST", "/v1/chat/completions", key, json=body)
        assert r.status_code == 200, r.text
        return r.json()["attune"]["session_id"]

    call.svc, call.say = svc, say
    return call


def test_crisis_turns_are_listed_for_operators_with_no_message_text(api, caplog):
    caplog.set_level(logging.DEBUG)
    alice = api.say("alice", CRISIS)
    api.say("alice", CRISIS, alice)
    bob = api.say("bob", CRISIS)
    calm = api.say("alice", CALM)

    r = api("GET", "/v1/admin/flagged")
    assert r.status_code == 200 and r.json()["status"] == "open"
    flags = {f["session_id"]: f for f in r.json()["data"]}
    assert set(flags) == {alice, bob} and calm not in r.text
    a = flags[alice]
    assert (a["tenant"], a["flagged_turns"], a["messages"], a["acknowledged"], a["erased"]) == ("alice", 2, 4, False,
                                                                                                 False)
    assert a["first_flagged"] <= a["last_flagged"] and a["acknowledged_by"] is None and flags[bob]["tenant"] == "bob"
    assert "pills" not in r.text and "kill" not in r.text.replace("kill_myself", "")
    assert not any("pills" in rec.getMessage() for rec in caplog.records)
    assert r.json() == api("GET", "/v1/admin/flagged", params={"status": "open"}).json()


def test_the_list_shows_the_detector_and_the_rule_names_the_record_holds(api):
    sid = api.say("alice", CALM)
    api.svc.repo.flag_session(sid, detector="model", categories=["self_harm"])
    api.svc.repo.flag_session(sid, detector="rules", categories=["means"])
    (flag,) = api("GET", "/v1/admin/flagged").json()["data"]
    assert (flag["detector"], flag["categories"], flag["flagged_turns"]) == ("both", ["means", "self_harm"], 2)


def test_acknowledging_moves_a_flag_out_of_the_open_list_until_the_next_crisis_turn(api):
    sid = api.say("bob", CRISIS)
    operator = api.svc.keys.authenticate(api.svc.test_keys["operator"])
    r = api("POST", f"/v1/admin/flagged/{sid}/ack")
    assert r.status_code == 200
    assert (r.json()["session_id"], r.json()["acknowledged"], r.json()["acknowledged_by"]) == (sid, True,
                                                                                               operator.key_id)
    assert api("GET", "/v1/admin/flagged").json()["data"] == []
    assert [f["session_id"] for f in api("GET", "/v1/admin/flagged?status=acknowledged").json()["data"]] == [sid]
    assert [f["session_id"] for f in api("GET", "/v1/admin/flagged?status=all").json()["data"]] == [sid]
    assert api.svc.repo.list_audit("flag_acknowledged")[0].detail["key_id"] == operator.key_id

    api.say("bob", CRISIS, sid)
    (again,) = api("GET", "/v1/admin/flagged").json()["data"]
    assert (again["session_id"], again["acknowledged"], again["flagged_turns"]) == (sid, False, 2)

    r = api("POST", "/v1/admin/flagged/no-such-session/ack")
    assert r.status_code == 404 and r.json()["error"]["code"] == "flag_not_found"
    assert "GET /v1/admin/flagged" in r.json()["error"]["message"]
    calm = api.say("bob", CALM)
    assert api("POST", f"/v1/admin/flagged/{calm}/ack").status_code == 404


def test_an_operator_opens_a_flagged_session_of_any_tenant_and_the_opening_is_audited(api):
    sid = api.say("bob", CRISIS)  # the operator key belongs to tenant alice
    operator = api.svc.keys.authenticate(api.svc.test_keys["operator"])
    r = api("GET", f"/v1/admin/sessions/{sid}/messages")
    assert r.status_code == 200
    assert [(m["role"], m.get("gate")) for m in r.json()["data"]] == [("user", None), ("assistant", "crisis")]
    assert r.json()["data"][0]["content"] == CRISIS
    (event,) = api.svc.repo.list_audit("operator_opened_session")
    assert (event.session_id, event.tenant_id, event.detail) == (sid, "bob", {"key_id": operator.key_id,
                                                                              "messages": 2})
    assert "pills" not in json.dumps(event.detail)


def test_opening_refuses_unknown_unflagged_and_erased_sessions_saying_why(api):
    r = api("GET", "/v1/admin/sessions/no-such-session/messages")
    assert r.status_code == 404 and "GET /v1/admin/flagged" in r.json()["error"]["message"]
    calm = api.say("alice", CALM)
    r = api("GET", f"/v1/admin/sessions/{calm}/messages")
    assert r.status_code == 403 and r.json()["error"]["code"] == "session_not_flagged"

    sid = api.say("bob", CRISIS)
    assert api("DELETE", f"/v1/sessions/{sid}", "bob").json()["deleted"] is True
    r = api("GET", f"/v1/admin/sessions/{sid}/messages")
    assert r.status_code == 410 and r.json()["error"]["code"] == "session_erased"
    assert "status=all" in r.json()["error"]["message"]
    (flag,) = api("GET", "/v1/admin/flagged?status=all").json()["data"]
    assert (flag["session_id"], flag["erased"], flag["messages"], flag["flagged_turns"]) == (sid, True, 0, 1)
    assert flag["erased_at"] >= flag["last_flagged"]
    assert api.svc.repo.count_audit("operator_opened_session") == 0


def test_patient_keys_bad_statuses_and_malformed_ids_are_refused(api):
    sid = api.say("bob", CRISIS)
    anonymous = TestClient(create_app(api.svc))
    for method, path in (("GET", "/v1/admin/flagged"), ("POST", f"/v1/admin/flagged/{sid}/ack"),
                         ("GET", f"/v1/admin/sessions/{sid}/messages")):
        r = api(method, path, "bob")  # even the session's own patient key
        assert r.status_code == 403 and r.json()["error"]["code"] == "operator_only", path
        assert anonymous.request(method, path).status_code == 401
    assert api.svc.repo.get_flag(sid).acknowledged_at is None
    assert api.svc.repo.count_audit("operator_opened_session") == 0

    r = api("GET", "/v1/admin/flagged", params={"status": "closed"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "status"
    assert "open (not yet acknowledged), acknowledged or all" in r.json()["error"]["message"]
    r = api("GET", "/v1/admin/flagged", params={"status": "all", "tenant": "x"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "tenant" and "only" in r.json()["error"]["message"]
    r = api("GET", "/v1/admin/sessions/not%20an%20id/messages")
    assert r.status_code == 422 and r.json()["error"]["param"] == "session_id"


def test_the_flag_routes_spend_the_admin_budget_not_the_chat_budget(make):  # noqa: F811
    svc = make(limits={"admin_requests_per_minute": 2})
    client = TestClient(create_app(svc))
    auth = {"Authorization": svc.test_keys["operator"]}
    assert [client.get("/v1/admin/flagged", headers=auth).status_code for _ in range(3)] == [200, 200, 429]
    r = client.get("/v1/admin/flagged", headers=auth)
    assert "admin requests per minute" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": CALM}]}, headers=auth)
    assert r.status_code == 200


def test_the_document_describes_the_flag_routes(api):
    doc = api("GET", "/openapi.json").json()
    listed = doc["paths"]["/v1/admin/flagged"]["get"]
    (param,) = listed["parameters"]
    assert param["name"] == "status" and param["schema"]["enum"] == ["open", "acknowledged", "all"]
    assert {"401", "403", "422", "429"} <= set(listed["responses"])
    assert "410" in doc["paths"]["/v1/admin/sessions/{session_id}/messages"]["get"]["responses"]
    assert "FlagOut" in doc["components"]["schemas"]
