"""Generation starts beside the crisis check and is held until it passes: a crisis the detector finds while the
first attempt runs aborts it and the patient gets only the crisis reply (usage 0); a turn the detector puts near the
line restarts on the safety adapter; a detector that fails leaves the rules to decide, as before; rules that already
see a crisis start nothing. A new session is stored while the engine starts, and nothing of the reply is released
before it is stored; one that cannot be stored stops the attempt and stores nothing."""
from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy.exc import OperationalError

from serving.crisis_reply import CrisisReply
from serving.clients import ScorerInfo
from serving.errors import ApiError
from tests.serving.test_chat import (REPLIES, WARM, ScriptedScorer, chat, collect, make,  # noqa: F401 (make: fixture)
                                     settle)

LONG = "This reply runs on for a while. " * 8


class WaitingScorer(ScriptedScorer):
    """Answers the crisis detector only once the engine has streamed a token of the first attempt (an overlap that
    does not happen times out), with `prob`; or fails, with `prob` None."""

    def __init__(self, prob: float | None):
        super().__init__()
        self.prob, self.engine, self.tokens_seen = prob, None, []

    async def crisis(self, message: str) -> float:
        async def first_token() -> int:
            while True:
                for req in self.engine.requests:
                    usage = self.engine.usage(req.request_id)
                    if usage is not None and usage.completion_tokens:
                        return usage.completion_tokens
                await asyncio.sleep(0.005)

        self.tokens_seen.append(await asyncio.wait_for(first_token(), 5.0))
        if self.prob is None:
            raise RuntimeError("detector down")
        return self.prob

    async def info(self) -> ScorerInfo:
        return ScorerInfo(crisis_threshold=0.5, safety_threshold=3.0, calibration={"method": "test"},
                          crisis_near_threshold=0.25)


async def grey_day(svc, stream: bool) -> tuple[str, dict]:
    """(reply text, attune info) for an ordinary but low message, streamed or not."""
    r = await chat(svc, preference=WARM, stream=stream,
                   messages=[{"role": "user", "content": "Everything feels grey and far away."}])
    if stream:
        chunks, text = await collect(r)
        return text, chunks[-1]["attune"]
    return r.choices[0].message.content, r.attune.model_dump()


def build(make, prob):
    scorer = WaitingScorer(prob)
    svc = make(scorer=scorer, engine_kw={"token_delay": 0.01})
    scorer.engine = svc.engine
    svc.engine.replies["warm"] = LONG
    return svc, scorer


@pytest.mark.asyncio
@pytest.mark.parametrize("stream", [False, True])
async def test_a_crisis_found_while_generation_runs_aborts_it_and_nothing_generated_is_sent(make, stream):
    svc, scorer = build(make, 0.9)
    r = await chat(svc, preference=WARM, stream=stream, stream_options={"include_usage": True} if stream else None,
                   messages=[{"role": "user", "content": "Everything feels grey and far away."}])
    if stream:
        chunks, text = await collect(r)
        info, usage = chunks[-2]["attune"], chunks[-1]["usage"]
    else:
        text, info, usage = r.choices[0].message.content, r.attune.model_dump(), r.usage.model_dump()
    assert scorer.tokens_seen and scorer.tokens_seen[0] >= 1, "the attempt ran while the detector did"
    assert info["crisis"] and info["gate"] == "crisis" and text == CrisisReply().reply("en").text
    assert "runs on" not in text
    (req,) = svc.engine.requests
    assert req.adapter_id == "warm" and svc.engine.usage(req.request_id).finish_reason == "abort"
    assert usage["completion_tokens"] == 0 and usage["prompt_tokens"] == 0
    assert svc.repo.get_session("alice", info["session_id"]).flagged


@pytest.mark.asyncio
@pytest.mark.parametrize("stream", [False, True])
async def test_a_turn_near_the_line_restarts_on_the_safety_adapter(make, stream):
    svc, scorer = build(make, 0.3)
    text, info = await grey_day(svc, stream)
    assert not info["crisis"] and info["adapter"] == "safe" and text == REPLIES["safe"]
    early, restart = svc.engine.requests
    assert early.adapter_id == "warm" and svc.engine.usage(early.request_id).finish_reason == "abort"
    assert restart.adapter_id == "safe" and restart.request_id != early.request_id
    assert restart.seed is None and restart.temperature == early.temperature, "the restart is a first attempt"


@pytest.mark.asyncio
@pytest.mark.parametrize("stream", [False, True])
async def test_a_failed_detector_leaves_the_rules_to_decide_as_before(make, stream):
    svc, scorer = build(make, None)
    text, info = await grey_day(svc, stream)
    assert not info["crisis"] and info["adapter"] == "warm" and text.strip() == LONG.strip()
    assert len(svc.engine.requests) == 1 and svc.metrics.scorer_errors._value.get() >= 1
    # Rules that see a crisis in the message itself: the protocol, and no generation is even started.
    r = await chat(svc, preference=WARM, messages=[{"role": "user", "content": "I want to kill myself tonight."}])
    assert r.attune.crisis and len(svc.engine.requests) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("stream", [False, True])
async def test_stage_times_show_the_first_delta_arriving_before_the_check_ends(make, stream):
    """attune_turn_stage_seconds: one observation per stage of a turn, each measured from the request's start; the
    detector here answers only after a token came, so the engine's first delta is seen before the check ends."""
    from serving.metrics import TURN_STAGES

    svc, scorer = build(make, 0.1)
    text, info = await grey_day(svc, stream)
    assert not info["crisis"] and text.strip() == LONG.strip()
    value = svc.metrics.registry.get_sample_value
    assert [value("attune_turn_stage_seconds_count", {"stage": s}) for s in TURN_STAGES] == [1.0] * 4
    at = {s: value("attune_turn_stage_seconds_sum", {"stage": s}) for s in TURN_STAGES}
    assert 0 <= at["admitted"] <= at["session"] <= at["crisis_checked"]
    assert at["admitted"] <= at["engine_first_delta"] < at["crisis_checked"]


def store_after_the_engine_starts(svc, fail: bool = False) -> list[bool]:
    """Make the repository's start_session wait (in its worker thread) until the engine has begun a generation, then
    store (or fail as a database that cannot be reached does); returns [whether the engine had begun]."""
    original, seen = svc.repo.start_session, []

    def start_session(*args, **kw):
        deadline = time.monotonic() + 5.0
        while not svc.engine.stored_at_start and time.monotonic() < deadline:
            time.sleep(0.005)
        seen.append(bool(svc.engine.stored_at_start))
        if fail:
            raise OperationalError("INSERT INTO sessions", {}, Exception("disk I/O error"))
        return original(*args, **kw)

    svc.repo.start_session = start_session
    return seen


@pytest.mark.asyncio
@pytest.mark.parametrize("stream", [False, True])
async def test_a_new_session_is_stored_while_the_engine_starts_and_before_its_reply_is_released(make, stream):
    svc = make(engine_kw={"token_delay": 0.01})
    engine_first = store_after_the_engine_starts(svc)
    r = await chat(svc, preference=WARM, stream=stream)
    if stream:
        chunks, text = await collect(r)
        info = chunks[-1]["attune"]
    else:
        text, info = r.choices[0].message.content, r.attune.model_dump()
    assert engine_first == [True] and svc.engine.stored_at_start == [0], "the engine began before the session was"
    assert text == REPLIES["warm"] and info["gate"] == "pass"
    rows = svc.repo.list_messages(info["session_id"])
    assert [(m.role, m.content) for m in rows] == [("user", "Work has been overwhelming lately."),
                                                   ("assistant", REPLIES["warm"])]


@pytest.mark.asyncio
@pytest.mark.parametrize("stream", [False, True])
async def test_a_new_session_that_cannot_be_stored_stops_its_engine_request_and_stores_nothing(make, stream):
    svc = make(engine_kw={"token_delay": 0.01})
    engine_first = store_after_the_engine_starts(svc, fail=True)
    with pytest.raises(ApiError) as err:
        await chat(svc, preference=WARM, stream=stream)
    await settle(svc)
    assert err.value.status == 503 and err.value.error.error.code == "database_unavailable"
    assert err.value.headers.get("Retry-After")
    assert engine_first == [True]
    (req,) = svc.engine.requests
    assert svc.engine.usage(req.request_id).finish_reason == "abort"
    assert svc.repo.count_messages() == 0 and svc.repo.count_sessions() == 0
