"""What a patient sees of a reply, with FakeEngine and a scripted scorer: a crisis turn's first content is the vetted
crisis reply (nothing generated), and an error that ends it still carries the resources; released text is never
stitched to the fallback; a reply cut by the token limit ends at its last full sentence; streams count every
attempt's tokens; the service does not start with a fallback reply that fails its own gate."""
from __future__ import annotations

import json
import logging

import pytest
from sqlalchemy import exc as sa_exc

from serving.chat import ApiError
from serving.crisis_reply import CRISIS_REPLY_ID, CrisisReply
from serving.safety import FALLBACK_REPLY
from serving.streaming import FALLBACK_PROBES
from tests.serving.test_chat import REPLIES, ScriptedScorer, chat, collect, make, settle  # noqa: F401 (make: fixture)

CRISIS = [{"role": "user", "content": "I want to kill myself tonight."}]


def events_of(raw: list[str]) -> list[dict]:
    return [json.loads(e.removeprefix("data: ")) for e in raw if e != "data: [DONE]\n\n"]


# ---------------------------------------------------------------- the crisis reply
@pytest.mark.asyncio
async def test_a_crisis_streams_its_resources_first_and_generates_nothing(make, caplog):
    caplog.set_level(logging.DEBUG)
    svc = make()
    chunks, text = await collect(await chat(svc, preference="warm", stream=True, messages=CRISIS,
                                            stream_options={"include_usage": True}))
    expected = CrisisReply().reply("en")
    first = next(c for c in chunks if c.get("choices") and c["choices"][0]["delta"].get("content"))
    assert first is chunks[0] and first["choices"][0]["delta"] == {"role": "assistant", "content": expected.text}
    assert first["crisis_resources"] == expected.resources and expected.text.startswith(expected.resources)
    assert text == expected.text and svc.engine.requests == []
    assert chunks[-2]["attune"]["gate"] == "crisis" and chunks[-2]["attune"]["adapter"] == CRISIS_REPLY_ID
    assert chunks[-1]["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    row = svc.repo.list_messages(chunks[-2]["attune"]["session_id"])[-1]
    assert (row.content, row.gate, row.adapter_id) == (expected.text, "crisis", CRISIS_REPLY_ID)
    assert "kill myself" not in caplog.text


@pytest.mark.asyncio
async def test_a_crisis_stream_that_fails_later_still_carries_the_resources(make):
    svc = make()
    add = svc.repo.add_message

    def failing(session_id, role, content, **kw):
        if role == "assistant":
            raise sa_exc.OperationalError("INSERT", {}, Exception("disk I/O error"))
        return add(session_id, role, content, **kw)

    svc.repo.add_message = failing
    events = events_of([e async for e in await chat(svc, preference="warm", stream=True, messages=CRISIS)])
    expected = CrisisReply().reply("en")
    assert events[0]["choices"][0]["delta"]["content"] == expected.text
    assert events[-1]["error"]["code"] == "database_unavailable"
    assert events[-1]["error"]["crisis_resources"] == expected.resources
    await settle(svc)


@pytest.mark.asyncio
@pytest.mark.parametrize("stream", [False, True])
async def test_a_repeated_crisis_turn_is_not_answered_word_for_word(make, stream):
    svc = make()
    first = await chat(svc, preference="warm", messages=CRISIS)
    session = first.attune.session_id
    again = await chat(svc, session_id=session, stream=stream,
                       messages=[{"role": "user", "content": "I still want to end my life."}])
    text = (await collect(again))[1] if stream else again.choices[0].message.content
    reply = first.choices[0].message.content
    assert reply == CrisisReply().reply("en").text and text == CrisisReply().reply("en", [reply]).text
    assert text.splitlines()[0] != reply.splitlines()[0] and text.splitlines()[1:3] == reply.splitlines()[1:3]


# ---------------------------------------------------------------- never stitched, never mixed
@pytest.mark.asyncio
async def test_a_whole_reply_is_never_mixed_with_the_fallback(make):
    svc = make(max_regenerations=1)
    svc.engine.replies = {k: "I hear you. UNSAFE advice follows here." for k in REPLIES}
    r = await chat(svc, preference="warm")
    assert r.choices[0].message.content == FALLBACK_REPLY and r.attune.gate == "fallback"
    chunks, text = await collect(await chat(svc, preference="warm", stream=True))
    assert text == "I hear you." and chunks[-1]["attune"]["gate"] == "truncated"


@pytest.mark.asyncio
async def test_a_stream_that_fails_before_releasing_anything_is_the_fallback_alone(make):
    svc = make(max_regenerations=1)
    svc.engine.replies = {k: "UNSAFE from the first word. More." for k in REPLIES}
    chunks, text = await collect(await chat(svc, preference="warm", stream=True))
    assert text == FALLBACK_REPLY and chunks[-1]["attune"]["gate"] == "fallback"
    assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter" and len(svc.engine.requests) == 2


# ---------------------------------------------------------------- no reply ends mid-sentence
@pytest.mark.asyncio
@pytest.mark.parametrize("stream", [False, True])
async def test_a_reply_cut_by_the_token_limit_ends_at_its_last_full_sentence(make, stream):
    svc = make()
    r = await chat(svc, preference="warm", max_tokens=7, stream=stream)  # "That sounds so heavy. I am here"
    if stream:
        chunks, text = await collect(r)
        finish, info = chunks[-1]["choices"][0]["finish_reason"], chunks[-1]["attune"]
    else:
        text, finish, info = r.choices[0].message.content, r.choices[0].finish_reason, r.attune.model_dump()
    assert text == "That sounds so heavy." and finish == "length" and info["gate"] == "pass"
    assert svc.repo.list_messages(info["session_id"])[-1].content == "That sounds so heavy."


@pytest.mark.asyncio
@pytest.mark.parametrize("stream", [False, True])
async def test_a_cut_reply_without_a_full_sentence_is_the_fallback(make, stream):
    svc = make()
    r = await chat(svc, preference="warm", max_tokens=3, stream=stream)  # "That sounds so"
    if stream:
        chunks, text = await collect(r)
        finish, info = chunks[-1]["choices"][0]["finish_reason"], chunks[-1]["attune"]
    else:
        text, finish, info = r.choices[0].message.content, r.choices[0].finish_reason, r.attune.model_dump()
    assert text == FALLBACK_REPLY and info["gate"] == "fallback" and finish == "length"
    assert len(svc.engine.requests) == 1, "a longer reply would be cut again: no regeneration"
    audit = svc.repo.list_audit("gate_fallback")[0].detail
    assert audit["reasons"] == ["no full sentence within max_tokens"]


# ---------------------------------------------------------------- true usage
@pytest.mark.asyncio
async def test_streams_count_the_tokens_of_every_attempt(make):
    svc = make(engine_kw={"token_delay": 0.001})
    svc.engine.replies["warm"] = "UNSAFE from the start. " + " ".join(["more"] * 20) + "."
    chunks, text = await collect(await chat(svc, preference="warm", stream=True,
                                             stream_options={"include_usage": True}))
    assert text == REPLIES["safe"] and chunks[-2]["attune"]["gate"] == "regenerated"
    await settle(svc)
    first, second = (svc.engine.usage(q.request_id) for q in svc.engine.requests)
    assert first.finish_reason == "abort" and first.completion_tokens > 0 and second.finish_reason == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == first.completion_tokens + second.completion_tokens
    assert chunks[-1]["usage"]["prompt_tokens"] == first.prompt_tokens + second.prompt_tokens > 0

    svc.engine.replies["warm"] = "I hear you. UNSAFE advice follows here. " + " ".join(["more"] * 20) + "."
    chunks, text = await collect(await chat(svc, preference="warm", stream=True,
                                             stream_options={"include_usage": True}))
    await settle(svc)
    cut = svc.engine.usage(svc.engine.requests[-1].request_id)
    assert text == "I hear you." and cut.finish_reason == "abort"
    assert chunks[-1]["usage"]["completion_tokens"] == cut.completion_tokens > 0


# ---------------------------------------------------------------- the fallback reply at start-up
@pytest.mark.asyncio
async def test_the_service_refuses_to_start_with_a_fallback_that_fails_its_gate(make):
    scorer = ScriptedScorer(unsafe_words=("UNSAFE", FALLBACK_REPLY[:20]))
    svc = make(scorer=scorer)
    with pytest.raises(ApiError) as e:
        await chat(svc)
    message = e.value.error.error.message
    assert e.value.status == 503 and e.value.error.error.code == "fallback_rejected"
    assert "safety score 1.000 < threshold 3.000" in message and FALLBACK_PROBES[0] in message
    assert svc.gating is None and svc.engine.requests == [] and svc.repo.count_messages() == 0
    ready, parts = await svc.health()
    assert not ready and "fallback reply fails the safety gate (safety score 1.000 < threshold 3.000)" in parts["scorer"]
    scorer.unsafe_words = ("UNSAFE",)
    assert (await chat(svc)).attune.gate == "pass" and (await svc.health())[0]


@pytest.mark.asyncio
async def test_a_scorer_that_cannot_score_at_start_up_is_not_ready_yet(make):
    scorer = ScriptedScorer(fail=True)
    svc = make(scorer=scorer)
    with pytest.raises(ApiError) as e:
        await chat(svc)
    assert e.value.status == 503 and e.value.error.error.code == "not_ready" and svc.gating is None
    scorer.fail = False
    assert set(scorer.scored) == set() and (await chat(svc)).attune.gate == "pass"
    assert scorer.scored[:len(FALLBACK_PROBES)] == [FALLBACK_REPLY] * len(FALLBACK_PROBES)


# ---------------------------------------------------------------- deltas of several tokens
@pytest.mark.asyncio
@pytest.mark.parametrize("case", ["pass", "truncated", "regenerated", "length", "stop"])
async def test_deltas_of_several_tokens_release_store_and_count_what_single_tokens_do(make, case):
    """The LLM replica sends engine.stream_interval tokens per delta: the patient sees the same reply, in the same
    sentences when gated, with the same gate decision, finish reason, stored message and token counts as one token
    per delta. An attempt the gate stopped counts the tokens that reached it (at least one), and a reply cut at a stop
    string the tokens of the delta that held it, up to stream_interval - 1 more than one token per delta counts (the
    engine generated them)."""
    body = {"preference": "warm", "stream": True, "stream_options": {"include_usage": True}}
    body.update({"length": {"max_tokens": 7}, "stop": {"stop": ["here"], "attune_options": {"gate": False}}}.get(case, {}))
    reply = {"truncated": "I hear you. UNSAFE advice follows here. More words after it.",
             "regenerated": "UNSAFE from the start. " + " ".join(["more"] * 9) + "."}.get(case, REPLIES["warm"])
    seen = []
    for interval in (1, 4):
        svc = make(engine_kw={"stream_interval": interval})
        svc.engine.replies["warm"] = reply
        key = "operator" if case == "stop" else "alice"
        chunks, text = await collect(await chat(svc, key, **body))
        await settle(svc)
        contents = [c["choices"][0]["delta"].get("content") for c in chunks if c.get("choices")]
        info = chunks[-2]["attune"]
        rows = [(m.role, m.content, m.gate, m.adapter_id) for m in svc.repo.list_messages(info["session_id"])]
        usage = [svc.engine.usage(q.request_id) for q in svc.engine.requests]
        seen.append({"text": text, "gate": info["gate"], "finish": chunks[-2]["choices"][0]["finish_reason"],
                     "rows": rows, "finished": [(u.prompt_tokens, u.completion_tokens, u.finish_reason)
                                                for u in usage if u.finish_reason != "abort"],
                     "aborted": [u.completion_tokens > 0 for u in usage if u.finish_reason == "abort"],
                     "sentences": contents if case != "stop" else None,
                     "usage": chunks[-1]["usage"]["completion_tokens"]})
    if case in ("truncated", "regenerated", "stop"):
        low, high = seen[0].pop("usage"), seen[1].pop("usage")
        assert 0 < low <= high < low + 4 if case == "stop" else low > 0 and high > 0
    assert seen[0] == seen[1]
    assert seen[0]["gate"] == {"stop": "off", "length": "pass"}.get(case, case)
