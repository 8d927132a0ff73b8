"""Admission control: AdmissionGate admits up to max_in_flight, queues up to max_queue first come first served, and
refuses the rest at once or after queue_timeout_s, never leaking a slot (cancelled waiters, dropped tickets). Through
ChatService: a refused request is a 503 with Retry-After that stores nothing, and a stream holds its slot until it
ends, however it ends (finished, closed early, failed)."""
from __future__ import annotations

import asyncio
import gc
import json

import pytest

from serving.admission import AdmissionGate, Overloaded
from serving.chat import ApiError
from tests.serving.test_chat import chat, collect, make, settle  # noqa: F401  (make is a fixture)


async def waiting(gate: AdmissionGate, n: int) -> None:
    while gate.queued < n:
        await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_gate_admits_queues_in_order_and_refuses_beyond_the_queue():
    gate = AdmissionGate(max_in_flight=2, max_queue=2, queue_timeout_s=60)
    first, second = await gate.enter(), await gate.enter()
    order: list[str] = []

    async def queued(name: str):
        ticket = await gate.enter()
        order.append(name)
        return ticket

    a = asyncio.create_task(queued("a"))
    await waiting(gate, 1)
    b = asyncio.create_task(queued("b"))
    await waiting(gate, 2)
    with pytest.raises(Overloaded, match="queue is full: 2 chat completions in progress, 2 waiting"):
        await gate.enter()
    first.release()
    first.release()  # idempotent: frees one slot, not two
    ticket_a = await a
    assert order == ["a"] and gate.in_flight == 2 and gate.queued == 1
    second.release()
    ticket_b = await b
    assert order == ["a", "b"]
    ticket_a.release(), ticket_b.release()
    assert gate.stats() == {"in_flight": 0, "queued": 0, "max_in_flight": 2, "max_queue": 2, "queue_timeout_s": 60,
                            "admitted": 4, "rejected_full": 1, "rejected_timeout": 0}


@pytest.mark.asyncio
async def test_gate_times_out_waiters_and_cancelled_waiters_take_no_slot():
    gate = AdmissionGate(max_in_flight=1, max_queue=1, queue_timeout_s=0.01)
    held = await gate.enter()
    with pytest.raises(Overloaded, match="no slot within 0.01 s"):
        await gate.enter()
    gate.queue_timeout_s = 60
    waiter = asyncio.create_task(gate.enter())
    await waiting(gate, 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert gate.queued == 0 and gate.in_flight == 1
    held.release()
    again = await asyncio.wait_for(gate.enter(), 1)
    assert gate.in_flight == 1 and gate.counts["rejected_timeout"] == 1
    again.release()


@pytest.mark.asyncio
async def test_a_dropped_ticket_gives_its_slot_back():
    gate = AdmissionGate(max_in_flight=1, max_queue=0, queue_timeout_s=60)
    ticket = await gate.enter()
    with pytest.raises(Overloaded):
        await gate.enter()
    del ticket
    gc.collect()
    assert gate.in_flight == 0
    (await gate.enter()).release()


def test_gate_settings_are_checked():
    with pytest.raises(ValueError, match="max_in_flight >= 1"):
        AdmissionGate(0, 1, 1.0)


@pytest.mark.asyncio
async def test_a_refused_request_is_a_503_that_stores_nothing_and_a_stream_holds_its_slot(make):
    svc = make(engine_kw={"token_delay": 0.01}, limits={"max_in_flight": 1, "max_queue": 0})
    events = await chat(svc, stream=True, preference="warm")
    assert svc.admission.in_flight == 1 and svc.metrics.registry.get_sample_value("attune_requests_in_flight") == 1
    with pytest.raises(ApiError) as e:
        await chat(svc, key="bob")
    assert e.value.status == 503 and e.value.headers["Retry-After"] == "5"
    assert e.value.error.error.code == "overloaded" and "retry after 5 s" in e.value.error.error.message
    assert svc.repo.count_sessions("bob") == 0
    _, text = await collect(events)
    assert text and svc.admission.in_flight == 0
    reply = await chat(svc, key="bob")
    assert reply.choices[0].message.content and svc.admission.in_flight == 0
    closed_early = await chat(svc, stream=True)
    await closed_early.__anext__()
    await closed_early.aclose()
    assert svc.admission.in_flight == 0
    await settle(svc)


@pytest.mark.asyncio
async def test_a_stream_that_fails_unexpectedly_ends_with_an_error_event_and_frees_its_slot(make):
    svc = make(limits={"max_in_flight": 1, "max_queue": 0})

    async def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    svc.replies.finish = broken
    events = [e async for e in await chat(svc, stream=True)]
    assert events[-1] == "data: [DONE]\n\n"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "internal_error"
    assert svc.admission.in_flight == 0
    await settle(svc)


@pytest.mark.asyncio
async def test_a_free_slot_is_taken_without_giving_the_loop_away():
    """No queue to wait in: enter returns before any other ready task runs (a chat turn reaches the engine without
    first letting the loop run other work), and a free slot is not taken past a waiter."""
    gate = AdmissionGate(max_in_flight=1, max_queue=2, queue_timeout_s=60)
    ran: list[str] = []
    asyncio.get_running_loop().call_soon(ran.append, "other")
    ticket = await gate.enter()
    assert ran == [] and gate.in_flight == 1
    waiter = asyncio.create_task(gate.enter())
    await waiting(gate, 1)
    ticket.release()
    late = asyncio.create_task(gate.enter())  # the slot just freed belongs to the waiter, first come first served
    second = await waiter
    assert not late.done() and gate.in_flight == 1
    second.release()
    (await late).release()
    assert gate.in_flight == 0 and gate.counts["admitted"] == 3
