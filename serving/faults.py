"""Injected failures for drills and tests, armed by POST /v1/admin/faults (operator key, only with
ATTUNE_TEST_HOOKS=1): `FaultSpec` forces or breaks the scorer, `EngineFault` breaks or slows generations in the
LLM replica (`EngineFaults.guard` wraps a stream) and `DatabaseFault` makes the ingress's SQL statements fail as
an outage would (`DatabaseFaults` hooks the SQLAlchemy engine). An empty object disarms its part.
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import AsyncIterator, Callable

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import event
from sqlalchemy.engine import Engine

from serving.engine import EngineError

WRITES = ("INSERT", "UPDATE", "DELETE")


class FaultSpec(BaseModel):
    """{"scorer": FaultSpec}: force the next `times` scores (None: until disarmed), or make them raise; {} disarms."""

    model_config = ConfigDict(extra="forbid")

    safety: float | list[float] | None = Field(
        default=None, description="Safety score every reply gets (1-5 scale); a list gives one score per scorer call, "
        "in order, and the fault ends after the last (leave `times` unset).")
    crisis_prob: float | None = Field(default=None, ge=0.0, le=1.0, description="Crisis probability of every message.")
    error: bool = Field(default=False, description="Scoring raises instead (the gate fails closed: the safe fallback "
                        "reply; the crisis rules decide alone) and the scorer reports unhealthy.")
    times: int | None = Field(default=None, ge=1, description="How many scorer calls the fault lasts.")

    @model_validator(mode="after")
    def _one_length(self) -> "FaultSpec":
        if isinstance(self.safety, list):
            if not self.safety:
                raise ValueError("safety: give at least one score, or null")
            if self.times is not None:
                raise ValueError("safety as a list lasts one call per score: leave times unset")
        return self


class EngineFault(BaseModel):
    """{"engine": EngineFault}: each of the next `times` generations that start on the LLM replica (None: all until
    disarmed) raises EngineError after `fail_after_tokens` tokens and/or waits `delay_s` before each token."""

    model_config = ConfigDict(extra="forbid")

    fail_after_tokens: int | None = Field(default=None, ge=0, description="Tokens a generation streams before it "
                                          "raises (0: before the first, so vLLM never sees it); None: no failure.")
    delay_s: float | None = Field(default=None, gt=0.0, le=10.0, description="Seconds added before every token "
                                  "(a slow forward pass); None: no delay.")
    times: int | None = Field(default=None, ge=1, description="How many generations the fault affects.")

    @model_validator(mode="after")
    def _injects_something(self) -> "EngineFault":
        if self.times is not None and not self.armed:
            raise ValueError("times alone injects nothing; set fail_after_tokens and/or delay_s, or send {} to disarm")
        return self

    @property
    def armed(self) -> bool:
        return self.fail_after_tokens is not None or self.delay_s is not None


class DatabaseFault(BaseModel):
    """{"database": DatabaseFault}: the ingress's SQL statements raise the driver's OperationalError, as when the
    database is down, locked or out of disk. Each failing statement aborts one Repository call (one transaction)."""

    model_config = ConfigDict(extra="forbid")

    times: int | None = Field(default=None, ge=1, description="How many statements fail; None: all of them "
                              "while the fault lasts.")
    seconds: float | None = Field(default=None, gt=0.0, le=600.0, description="How long the fault lasts from now.")
    skip: int = Field(default=0, ge=0, description="Matching statements that still succeed first (with "
                      "writes_only, 1 stores the patient's message and fails the reply).")
    writes_only: bool = Field(default=False, description="Only INSERT, UPDATE and DELETE fail (a full disk, a "
                              "locked file); reads, key checks and health pings still work.")

    @model_validator(mode="after")
    def _ends_or_lets_reads_through(self) -> "DatabaseFault":
        if self.model_fields_set and not self.armed:
            raise ValueError("a fault on every statement must end by itself: set times or seconds (keys are checked "
                             "against the database, so a disarm request could not get through), or set writes_only")
        return self

    @property
    def armed(self) -> bool:
        return bool(self.times or self.seconds or self.writes_only)


class FaultsIn(BaseModel):
    """POST /v1/admin/faults (test hooks only): the parts to arm, each as its spec; {} for a part disarms it, a part
    left out stays as it is. The answer gives every part's state."""

    model_config = ConfigDict(extra="forbid")

    scorer: FaultSpec | None = None
    engine: EngineFault | None = None
    database: DatabaseFault | None = None


class EngineFaults:
    """The LLM replica's armed EngineFault. A generation takes one of `times` when it starts and keeps that fault
    until it ends; disarming affects generations that start later. Used from the replica's event loop only."""

    def __init__(self):
        self.fault, self.remaining = EngineFault(), None
        self.injected = 0

    def arm(self, fault: EngineFault) -> None:
        self.fault, self.remaining = fault, fault.times

    @property
    def armed(self) -> bool:
        return self.fault.armed and self.remaining != 0

    def state(self) -> dict:
        armed = self.armed
        return {"fail_after_tokens": self.fault.fail_after_tokens if armed else None,
                "delay_s": self.fault.delay_s if armed else None, "times": self.remaining if armed else None,
                "injected": self.injected}

    def check(self) -> None:
        """For the replica's readiness: raises while generations are set to fail (a slow engine still serves)."""
        if self.armed and self.fault.fail_after_tokens is not None:
            left = "until disarmed" if self.remaining is None else f"{self.remaining} more generation(s)"
            raise EngineError(f"injected engine fault: generations fail after {self.fault.fail_after_tokens} "
                              f"tokens ({left})")

    def _take(self) -> EngineFault | None:
        if not self.armed:
            return None
        if self.remaining is not None:
            self.remaining -= 1
        return self.fault

    async def guard(self, stream: AsyncIterator[str]) -> AsyncIterator[str]:
        """`stream` with the fault it takes applied; closing this closes `stream` (which aborts its request)."""
        fault, sent = self._take(), 0
        try:
            while True:
                if fault is not None and fault.fail_after_tokens is not None and sent >= fault.fail_after_tokens:
                    self.injected += 1
                    raise EngineError(f"injected engine fault after {sent} tokens")
                if fault is not None and fault.delay_s:
                    await asyncio.sleep(fault.delay_s)
                try:
                    delta = await stream.__anext__()
                except StopAsyncIteration:
                    return
                sent += 1
                yield delta
        finally:
            await stream.aclose()


class DatabaseFaults:
    """Arms a DatabaseFault on one SQLAlchemy engine. A `before_cursor_execute` hook raises the driver's own
    OperationalError, which SQLAlchemy wraps as it does a real one, so the Repository's transactions and the
    connection pool take their real failure paths. Thread-safe: Repository calls run in a thread pool."""

    def __init__(self, engine: Engine, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._lock = threading.Lock()
        self.fault, self.remaining, self.skip, self.until = DatabaseFault(), None, 0, None
        self.failed = 0
        event.listen(engine, "before_cursor_execute", self._before_execute)

    def arm(self, fault: DatabaseFault) -> None:
        with self._lock:
            self.fault, self.remaining, self.skip = fault, fault.times, fault.skip
            self.until = self.clock() + fault.seconds if fault.seconds else None

    def _armed(self) -> bool:
        return (self.fault.armed and self.remaining != 0
                and (self.until is None or self.clock() < self.until))

    def state(self) -> dict:
        with self._lock:
            if not self._armed():
                return {"times": None, "seconds_left": None, "skip": 0, "writes_only": False, "failed": self.failed}
            left = None if self.until is None else round(self.until - self.clock(), 1)
            return {"times": self.remaining, "seconds_left": left, "skip": self.skip,
                    "writes_only": self.fault.writes_only, "failed": self.failed}

    def trips(self, statement: str) -> bool:
        """Whether this statement fails (and uses up one of `skip`, then of `times`)."""
        with self._lock:
            if not self._armed():
                return False
            if self.fault.writes_only and not statement.lstrip().upper().startswith(WRITES):
                return False
            if self.skip:
                self.skip -= 1
                return False
            if self.remaining is not None:
                self.remaining -= 1
            self.failed += 1
            return True

    def _before_execute(self, conn, cursor, statement, parameters, context, executemany) -> None:
        if self.trips(statement):
            raise conn.dialect.loaded_dbapi.OperationalError("injected fault: the database is unavailable")
