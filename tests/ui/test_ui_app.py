"""The page's handlers without a browser, against the fake API: onboarding creates the session and a later save
changes it, a reply streams into the history and is mapped to its server message for thumbs, the crisis
banner shows the resources the service sent as soon as they arrive (also when the stream then fails), failures read as plain words and give the message back, delete
erases the session and starts over. Also the wording helpers on their own."""
from __future__ import annotations

import gradio as gr
import httpx
import pytest
from fake_attune_api import CRISIS_BLOCK, CRISIS_REPLY, FakeApi, chunk, error, sse

from ui import wording
from ui.app import Conversation, PatientApp
from ui.client import ApiProblem, AttuneClient
from ui.questionnaire import QUESTIONS

DEFAULTS = ["Somewhat"] * len(QUESTIONS)


@pytest.fixture
def api() -> FakeApi:
    return FakeApi()


@pytest.fixture
def app(api) -> PatientApp:
    client = AttuneClient("http://attune.test", "k", transport=api.transport())
    yield PatientApp(client)
    client.close()


def visible(update) -> bool:
    return update["visible"]


def started(app) -> Conversation:
    conv, *_ = app.save_style(Conversation(), *DEFAULTS)
    return conv


def test_onboarding_creates_the_session_and_a_later_save_changes_it(api, app):
    conv, questionnaire, chat, style, _ = app.save_style(Conversation(), *DEFAULTS)
    assert conv.session_id in api.sessions and not visible(questionnaire) and visible(chat)
    assert "balance" in style and "0." not in style
    answers = ["A lot" if q.objective == "patient_autonomy" else "Not so much" for q in QUESTIONS]
    conv, *_, style, status = app.save_style(conv, *answers)
    assert len(api.sessions) == 1, "a change of style keeps the conversation"
    pref = api.sessions[conv.session_id]["preference"]
    assert max(pref, key=pref.get) == "patient_autonomy" and "decisions with you" in style
    assert "saved" in status


def test_a_failed_start_stays_on_the_questionnaire_and_says_why(api, app):
    api.fail["POST /v1/sessions"] = error(401, "invalid key", "invalid_api_key")
    conv, questionnaire, chat, _, status = app.save_style(Conversation(), *DEFAULTS)
    assert conv.session_id is None and visible(questionnaire) and not visible(chat)
    assert "did not accept this app's key" in status


def test_a_reply_streams_into_the_history_and_can_be_rated(api, app):
    conv = started(app)
    steps = list(app.send(conv, "  I had a rough week.  ", []))
    histories = [h for _, h, *_ in steps]
    assert histories[0][-2:] == [{"role": "user", "content": "I had a rough week."},
                                 {"role": "assistant", "content": ""}]
    assert [h[-1]["content"] for h in histories[1:]] == ["", "I hear you. ", "I hear you. What feels hardest?",
                                                         "I hear you. What feels hardest?"]
    assert all(box == "" for _, _, box, *_ in steps)
    conv = steps[-1][0]
    assert conv.reply_ids == {1: "m2"}
    like = gr.LikeData(None, {"index": 1, "value": ["I hear you."], "liked": True})
    assert "saved" in app.rate(conv, like)
    assert api.sessions[conv.session_id]["feedback"] == [{"message_id": "m2", "rating": "up"}]
    assert "can't be rated" in app.rate(conv, gr.LikeData(None, {"index": 0, "value": [], "liked": False}))
    assert "stays as you gave it" in app.rate(conv, gr.LikeData(None, {"index": 1, "value": [], "liked": ""}))
    assert len(api.sessions[conv.session_id]["feedback"]) == 1


def test_the_crisis_banner_shows_as_soon_as_the_resources_arrive(api, app):
    conv = started(app)
    conv, history, _, banner, _ = list(app.send(conv, "hello", []))[-1]
    assert banner == gr.update()
    api.crisis = True
    steps = list(app.send(conv, "I want to kill myself tonight", history))
    shown = [i for i, (*_, banner, _) in enumerate(steps) if banner != gr.update()]
    assert len(shown) == 1 and shown[0] < len(steps) - 1, "shown once, before the reply is done"
    _, history, _, banner, status = steps[shown[0]]
    assert visible(banner) and status == "Replying…" and history[-1]["content"] == CRISIS_REPLY
    assert 'role="alert"' in banner["value"] and "988 Suicide &amp; Crisis Lifeline" in banner["value"]
    assert '<a href="https://findahelpline.com"' in banner["value"]
    assert steps[-1][0].reply_ids[3] == "m4"


def test_a_crisis_stream_that_fails_still_shows_the_resources(api, app):
    conv = started(app)
    api.crisis = True
    api.mid_stream_error = {"message": "database down", "type": "server_error", "code": "db_unavailable"}
    steps = list(app.send(conv, "I want to end my life", []))
    banners = [banner for *_, banner, _ in steps if banner != gr.update()]
    assert len(banners) == 1 and "findahelpline.com" in banners[0]["value"]
    assert steps[-1][1][-1]["content"] == CRISIS_REPLY and "Sorry" in steps[-1][-1]


def test_resources_that_come_only_with_the_error_still_show_the_banner():
    def handle(request: httpx.Request) -> httpx.Response:
        error = {"message": "database down", "type": "server_error", "code": "db_unavailable",
                 "crisis_resources": CRISIS_BLOCK}
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=chunk("") + sse({"error": error}) + b"data: [DONE]\n\n")

    client = AttuneClient("http://attune.test", "k", transport=httpx.MockTransport(handle))
    *_, (conv, history, box, banner, status) = list(PatientApp(client).send(Conversation("s1"), "I can't go on", []))
    assert visible(banner) and "988 Suicide &amp; Crisis Lifeline" in banner["value"]
    assert history == [] and box == "I can't go on" and "Sorry" in status
    client.close()


def test_a_failed_reply_gives_the_message_back_in_plain_words(api, app):
    conv = started(app)
    api.fail["POST /v1/chat/completions"] = error(429, "too many", "rate_limit_exceeded", {"Retry-After": "12"})
    *_, (conv, history, box, _, status) = list(app.send(conv, "are you there?", []))
    assert history == [] and box == "are you there?"
    assert "wait about 12 seconds" in status
    del api.fail["POST /v1/chat/completions"]
    api.mid_stream_error = {"message": "engine died", "type": "server_error", "code": "engine_unavailable"}
    *_, (conv, history, box, _, status) = list(app.send(conv, "hello?", []))
    assert history[-1]["content"] == "I hear you. What feels hardest?" and box == ""
    assert "couldn't reply just now" in status and not conv.reply_ids


def test_delete_erases_the_session_and_starts_over(api, app):
    conv = started(app)
    list(app.send(conv, "hello", []))
    sid = conv.session_id
    conv, history, questionnaire, chat, confirm, banner, status = app.delete(conv)
    assert sid not in api.sessions and conv == Conversation() and history == []
    assert visible(questionnaire) and not visible(chat) and not visible(banner) and "deleted" in status
    gone = Conversation(session_id=sid)
    assert app.delete(gone)[-1] == status, "already gone on the service is what was asked for"
    api.fail["DELETE"] = error(500, "boom", "internal_error")
    conv = started(app)
    assert app.delete(conv)[0] is conv and conv.session_id in api.sessions


def test_wording():
    banner = wording.crisis_banner(f"I hear you <b>.\n\n{CRISIS_BLOCK}")
    assert "<b>" not in banner and banner.count("<li>") == 2 and "any time of day or night" in banner
    assert wording.crisis_banner(CRISIS_BLOCK) == wording.crisis_banner(CRISIS_REPLY) == banner
    assert wording.CRISIS_FALLBACK in wording.crisis_banner("no resources here")
    assert "can't be reached" in wording.problem_text(ApiProblem(None, "x"), "sending your message")
    assert "wait a moment" in wording.problem_text(ApiProblem(429, "x"), "sending your message")
    assert wording.problem_text(ApiProblem(422, "message 0 is too long"), "x").endswith("message 0 is too long")
