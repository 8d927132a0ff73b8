"""Fault injection (serving/faults.py): the specs refuse what would inject nothing or could not be disarmed;
EngineFaults fail a generation before vLLM sees it or mid-stream (closing, so aborting, the engine's stream), or slow
it; DatabaseFaults make a real database's statements fail through SQLAlchemy's own error path (SQLite and
PostgreSQL) with nothing stored and no connection leaked; and ChatService turns a database failure into a 503 whose
retry neither loses nor duplicates the patient's message."""
from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError

from serving.chat import ApiError
from serving.db import Repository
from serving.engine import EngineError, FakeEngine, GenerationRequest
from serving.faults import DatabaseFault, DatabaseFaults, EngineFault, EngineFaults, FaultSpec, FaultsIn
from tests.serving.test_chat import _session_body, chat, make, settle  # noqa: F401  (make is a fixture)

MESSAGES = [{"role": "user", "content": "I feel low today."}]


def test_specs_refuse_faults_that_inject_nothing_or_cannot_be_disarmed():
    assert not EngineFault().armed and not DatabaseFault().armed
    assert FaultSpec(error=True, times=2).error
    with pytest.raises(ValidationError, match="times alone injects nothing"):
        EngineFault(times=2)
    with pytest.raises(ValidationError, match="must end by itself"):
        DatabaseFault(skip=1)
    assert DatabaseFault(writes_only=True).armed and DatabaseFault(seconds=5).armed
    with pytest.raises(ValidationError) as e:
        FaultsIn.model_validate({"network": {}, "scorer": {"crisis_prob": 2}})
    assert {err["loc"] for err in e.value.errors()} == {("network",), ("scorer", "crisis_prob")}
    assert FaultSpec(safety=[0.0, 5.0]).safety == [0.0, 5.0]
    with pytest.raises(ValidationError, match="leave times unset"):
        FaultSpec(safety=[0.0, 5.0], times=2)
    with pytest.raises(ValidationError, match="at least one score"):
        FaultSpec(safety=[])


async def generate(faults: EngineFaults, engine: FakeEngine, request_id: str) -> list[str]:
    req = GenerationRequest(request_id, MESSAGES, max_tokens=8)
    return [d async for d in faults.guard(engine.stream(req))]


@pytest.mark.asyncio
async def test_engine_fault_at_start_never_reaches_the_engine_and_ends_after_times():
    faults, engine = EngineFaults(), FakeEngine(replies={None: "One two three four five."})
    faults.arm(EngineFault(fail_after_tokens=0, times=1))
    with pytest.raises(EngineError, match="injected engine fault: generations fail after 0 tokens"):
        faults.check()
    with pytest.raises(EngineError, match="after 0 tokens"):
        await generate(faults, engine, "r1")
    assert engine.requests == [] and faults.state()["injected"] == 1
    faults.check()
    assert "".join(await generate(faults, engine, "r2")) == "One two three four five."


@pytest.mark.asyncio
async def test_engine_fault_mid_stream_aborts_the_engine_request_and_binds_at_start():
    faults, engine = EngineFaults(), FakeEngine(replies={None: "One two three four five."})
    faults.arm(EngineFault(fail_after_tokens=2))
    req = GenerationRequest("r1", MESSAGES, max_tokens=8)
    stream, got = faults.guard(engine.stream(req)), []
    got.append(await stream.__anext__())
    faults.arm(EngineFault())  # disarming affects generations that start later, not this one
    with pytest.raises(EngineError, match="after 2 tokens"):
        async for delta in stream:
            got.append(delta)
    assert got == ["One", " two"] and not engine.in_flight
    assert engine.usage("r1").finish_reason == "abort" and engine.usage("r1").completion_tokens == 2
    assert faults.state() == {"fail_after_tokens": None, "delay_s": None, "times": None, "injected": 1}
    assert len(await generate(faults, engine, "r2")) == 5


@pytest.mark.asyncio
async def test_engine_delay_slows_every_token_and_keeps_the_engine_healthy(monkeypatch):
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr("serving.faults.asyncio.sleep", sleep)
    faults, engine = EngineFaults(), FakeEngine(replies={None: "One two three."})
    faults.arm(EngineFault(delay_s=0.5, times=1))
    faults.check()
    assert await generate(faults, engine, "r1") == ["One", " two", " three."]
    assert [s for s in slept if s] == [0.5] * 4  # before each token, and before learning that the stream ended
    await generate(faults, engine, "r2")
    assert len([s for s in slept if s]) == 4


def test_database_faults_fail_statements_through_sqlalchemy(database_url):
    repo = Repository(database_url)
    faults = DatabaseFaults(repo.engine)
    repo.ensure_tenant("t")
    session = repo.create_session("t", {"empathy": 1.0})
    faults.arm(DatabaseFault(times=3))
    assert repo.ping() is False
    with pytest.raises(OperationalError, match="injected fault"):
        repo.add_message(session.id, "user", "not stored")
    with pytest.raises(OperationalError):
        repo.list_messages(session.id)
    assert faults.state()["failed"] == 3 and faults.state()["times"] is None
    assert repo.ping() is True and repo.list_messages(session.id) == []
    faults.arm(DatabaseFault(writes_only=True, skip=1, times=1))
    repo.add_message(session.id, "user", "stored")
    with pytest.raises(OperationalError):
        repo.add_message(session.id, "assistant", "not stored")
    assert [m.content for m in repo.list_messages(session.id)] == ["stored"]
    repo.add_message(session.id, "assistant", "stored too")
    assert repo.count_messages(session.id) == 2 and repo.engine.pool.checkedout() == 0
    repo.close()


def test_database_fault_window_ends_by_itself(tmp_path):
    now = [100.0]
    repo = Repository(f"sqlite:///{tmp_path / 'a.db'}")
    faults = DatabaseFaults(repo.engine, clock=lambda: now[0])
    faults.arm(DatabaseFault(seconds=30))
    assert repo.ping() is False and repo.ping() is False and faults.state()["seconds_left"] == 30.0
    now[0] += 30
    assert repo.ping() is True and faults.state()["times"] is None
    repo.close()


@pytest.mark.asyncio
async def test_database_outage_is_a_503_and_a_retry_stores_the_patient_message_once(make):
    svc = make()
    faults = DatabaseFaults(svc.repo.engine)
    session = await svc.sessions.create(await svc.admit(svc.test_keys["alice"]), _session_body())
    faults.arm(DatabaseFault(times=1))
    with pytest.raises(ApiError) as e:
        await chat(svc, session_id=session.id)
    assert e.value.status == 503 and e.value.headers["Retry-After"] == "5"
    assert e.value.error.error.code == "database_unavailable"
    faults.arm(DatabaseFault(times=1))
    ready, parts = await svc.health()
    assert not ready and parts["database"] == "not ready" and parts["engine"] == parts["scorer"] == "ok"
    assert (await svc.health())[0]
    faults.arm(DatabaseFault(writes_only=True, skip=1, times=1))  # the patient's message is stored, the reply is not
    with pytest.raises(ApiError) as e:
        await chat(svc, session_id=session.id)
    assert e.value.error.error.code == "database_unavailable"
    assert [m.role for m in svc.repo.list_messages(session.id)] == ["user"]
    reply = await chat(svc, session_id=session.id)
    rows = svc.repo.list_messages(session.id)
    assert [(m.role, m.content) for m in rows] == [("user", "Work has been overwhelming lately."),
                                                   ("assistant", reply.choices[0].message.content)]


@pytest.mark.asyncio
async def test_database_failure_at_the_end_of_a_stream_is_an_error_event(make):
    svc = make()
    faults = DatabaseFaults(svc.repo.engine)
    session = await svc.sessions.create(await svc.admit(svc.test_keys["alice"]), _session_body())
    faults.arm(DatabaseFault(writes_only=True, skip=1, times=1))
    events = [e async for e in await chat(svc, session_id=session.id, stream=True)]
    assert events[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[-1]["error"]["code"] == "database_unavailable"
    seen = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    await settle(svc)
    rows = svc.repo.list_messages(session.id)
    assert [(m.role, m.gate) for m in rows] == [("user", None), ("assistant", "interrupted")]
    assert rows[1].content == seen and seen
