"""The UI's API client against a fake transport: the request shapes the API expects, streamed replies yielded as
they grow with the crisis flag at the end, and every failure (HTTP error, error inside a stream, no answer) as
an ApiProblem that keeps the status, the server's message and code, and Retry-After."""
from __future__ import annotations

import httpx
import pytest
from fake_attune_api import CRISIS_BLOCK, CRISIS_REPLY, FakeApi, chunk, error, sse

from ui.client import ApiProblem, AttuneClient, ReplyUpdate
from ui.questionnaire import preference_from_answers

PREF = preference_from_answers({"empathy": "A lot"})


@pytest.fixture
def api() -> FakeApi:
    return FakeApi()


@pytest.fixture
def client(api) -> AttuneClient:
    c = AttuneClient("http://attune.test/", "att-patient-key", transport=api.transport())
    yield c
    c.close()


def test_sessions_are_created_and_changed_with_six_weights_and_the_key(api, client):
    sid = client.create_session(PREF)
    assert api.bodies("POST", "/v1/sessions") == [{"preference": PREF.as_dict()}]
    assert all(r.headers["authorization"] == "Bearer att-patient-key" for r in api.requests)
    other = preference_from_answers({"patient_autonomy": "A lot"})
    client.set_preference(sid, other)
    assert api.sessions[sid]["preference"] == other.as_dict()
    assert str(api.requests[-1].url) == f"http://attune.test/v1/sessions/{sid}"


def test_a_streamed_reply_grows_then_ends_with_the_crisis_flag(api, client):
    sid = client.create_session(PREF)
    updates = list(client.stream_reply(sid, "I had a rough week."))
    assert [u.text for u in updates if not u.done] == ["", "I hear you. ", "I hear you. What feels hardest?"]
    assert updates[-1] == ReplyUpdate("I hear you. What feels hardest?", done=True, crisis=False)
    (body,) = api.bodies("POST", "/v1/chat/completions")
    assert body["stream"] is True and body["session_id"] == sid
    assert body["messages"] == [{"role": "user", "content": "I had a rough week."}], "the session keeps history"

    api.crisis = True
    first, *_, last = list(client.stream_reply(sid, "I want to end it."))
    assert first == ReplyUpdate(CRISIS_REPLY, crisis=True, resources=CRISIS_BLOCK), "the resources come first"
    assert last.done and last.crisis and last.resources == CRISIS_BLOCK


def test_the_last_reply_id_is_the_newest_assistant_message(api, client):
    sid = client.create_session(PREF)
    with pytest.raises(ApiProblem, match="no reply yet"):
        client.last_reply_id(sid)
    list(client.stream_reply(sid, "one"))
    list(client.stream_reply(sid, "two"))
    assert client.last_reply_id(sid) == "m4"
    assert client.feedback(sid, "m4", liked=False) == "f1"
    assert api.sessions[sid]["feedback"] == [{"message_id": "m4", "rating": "down"}]


def test_http_errors_keep_status_message_code_and_retry_after(api, client):
    api.fail["POST /v1/sessions"] = error(429, "slow down", "rate_limit_exceeded", {"Retry-After": "7"})
    with pytest.raises(ApiProblem) as e:
        client.create_session(PREF)
    assert (e.value.status, e.value.message, e.value.code, e.value.retry_after) == (
        429, "slow down", "rate_limit_exceeded", 7.0)
    assert not e.value.unreachable

    api.fail["POST /v1/chat/completions"] = error(503, "the model failed", "engine_unavailable",
                                                  {"Retry-After": "2"})
    with pytest.raises(ApiProblem) as e:
        list(client.stream_reply("s1", "hello"))
    assert (e.value.status, e.value.code, e.value.retry_after) == (503, "engine_unavailable", 2.0)
    assert e.value.message == "the model failed"

    with pytest.raises(ApiProblem) as e:
        client.delete_session("nope")
    assert (e.value.status, e.value.code) == (404, "session_not_found")


def test_an_error_inside_a_started_stream_is_a_problem_after_the_released_text(api, client):
    sid = client.create_session(PREF)
    api.mid_stream_error = {"message": "the model failed; retry", "type": "server_error",
                            "code": "engine_unavailable"}
    seen = []
    with pytest.raises(ApiProblem) as e:
        for update in client.stream_reply(sid, "hello"):
            seen.append(update.text)
    assert seen == ["", "I hear you. ", "I hear you. What feels hardest?"]
    assert e.value.status is None and e.value.code == "engine_unavailable" and not e.value.unreachable
    assert e.value.crisis_resources is None


def test_an_error_that_ends_a_crisis_stream_carries_its_resources():
    error_event = sse({"error": {"message": "database down", "type": "server_error", "code": "db_unavailable",
                                 "crisis_resources": CRISIS_BLOCK}})

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=chunk("") + error_event + b"data: [DONE]\n\n")

    c = AttuneClient("http://attune.test", "k", transport=httpx.MockTransport(handle))
    with pytest.raises(ApiProblem) as e:
        list(c.stream_reply("s1", "I want to end my life"))
    assert e.value.code == "db_unavailable" and e.value.crisis_resources == CRISIS_BLOCK


class _BreaksAfter(httpx.SyncByteStream):
    def __init__(self, first: bytes):
        self.first = first

    def __iter__(self):
        yield self.first
        raise httpx.ReadError("connection reset")


@pytest.mark.parametrize("cut", ["ends", "breaks"])
def test_a_stream_that_stops_before_the_attune_chunk_is_a_problem(cut):
    first = chunk("I hear ")

    def handle(request: httpx.Request) -> httpx.Response:
        headers = {"content-type": "text/event-stream"}
        if cut == "ends":
            return httpx.Response(200, headers=headers, content=first + b"data: [DONE]\n\n")
        return httpx.Response(200, headers=headers, stream=_BreaksAfter(first))

    c = AttuneClient("http://attune.test", "k", transport=httpx.MockTransport(handle))
    seen = []
    with pytest.raises(ApiProblem) as e:
        for update in c.stream_reply("s1", "hi"):
            seen.append(update)
    assert seen == [ReplyUpdate("I hear ")]
    assert e.value.code == "stream_cut" and e.value.status is None and not e.value.unreachable


def test_no_answer_at_all_is_unreachable():
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    c = AttuneClient("http://attune.test", "k", transport=httpx.MockTransport(refuse))
    for call in (lambda: c.create_session(PREF), lambda: list(c.stream_reply("s1", "hi"))):
        with pytest.raises(ApiProblem) as e:
            call()
        assert e.value.unreachable and "attune.test" in e.value.message
