"""Admission control for chat completions on one ingress replica: at most `max_in_flight` generate at once, at
most `max_queue` wait (first come, first served) for at most `queue_timeout_s`, and every other request is refused
at once. So a burst costs bounded memory and bounded waiting, and what is refused can be retried elsewhere or later.
"""
from __future__ import annotations

import asyncio
import weakref
from collections import Counter


class Overloaded(Exception):
    """No slot now and the queue is full, or the wait for a slot timed out (the API answers 503 + Retry-After)."""

    def __init__(self, reason: str, in_flight: int, queued: int):
        super().__init__(f"{reason}: {in_flight} chat completions in progress, {queued} waiting")
        self.reason = reason


class Ticket:
    """One admitted request's slot. `release` is idempotent, and a ticket dropped without it (a stream the HTTP
    server never started) gives its slot back when it is garbage-collected, so no path leaks capacity."""

    def __init__(self, gate: "AdmissionGate"):
        self._finalizer = weakref.finalize(self, gate._free)
        self._finalizer.atexit = False

    def release(self) -> None:
        self._finalizer()


class AdmissionGate:
    """Bounded concurrency with a bounded, time-limited FIFO queue (asyncio; one per event loop)."""

    def __init__(self, max_in_flight: int, max_queue: int, queue_timeout_s: float):
        if max_in_flight < 1 or max_queue < 0 or queue_timeout_s <= 0:
            raise ValueError(f"need max_in_flight >= 1, max_queue >= 0 and queue_timeout_s > 0; got {max_in_flight}, "
                             f"{max_queue}, {queue_timeout_s}")
        self.max_in_flight, self.max_queue, self.queue_timeout_s = max_in_flight, max_queue, queue_timeout_s
        self._slots = asyncio.Semaphore(max_in_flight)
        self.in_flight = self.queued = 0
        self.counts: Counter[str] = Counter()

    async def enter(self) -> Ticket:
        """A slot, after waiting in the queue if every slot is taken; Overloaded when the queue is full or the wait
        times out. A caller cancelled while it waits leaves the queue without taking a slot."""
        if self._slots.locked() and self.queued >= self.max_queue:
            self.counts["rejected_full"] += 1
            raise Overloaded("the queue is full", self.in_flight, self.queued)
        if not self._slots.locked():  # a free slot and no one waiting: taken at once, not through wait_for's task
            await self._slots.acquire()
        else:
            self.queued += 1
            try:
                await asyncio.wait_for(self._slots.acquire(), self.queue_timeout_s)
            except asyncio.TimeoutError:
                self.counts["rejected_timeout"] += 1
                raise Overloaded(f"no slot within {self.queue_timeout_s:g} s", self.in_flight,
                                 self.queued - 1) from None
            finally:
                self.queued -= 1
        self.in_flight += 1
        self.counts["admitted"] += 1
        return Ticket(self)

    def _free(self) -> None:
        self.in_flight -= 1
        self._slots.release()

    def stats(self) -> dict[str, int | float]:
        return {"in_flight": self.in_flight, "queued": self.queued, "max_in_flight": self.max_in_flight,
                "max_queue": self.max_queue, "queue_timeout_s": self.queue_timeout_s, "admitted": self.counts["admitted"],
                "rejected_full": self.counts["rejected_full"], "rejected_timeout": self.counts["rejected_timeout"]}
