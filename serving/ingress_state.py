"""What the ingress replicas of one application share: a small named Ray actor, `IngressState`, holding the rate-limit
`TokenBank` and the `MetricsBoard`, and each replica's `SharedIngress` client of it (leases, metric pushes, the
rendering of every replica's metrics). The actor is detached and restarted by Ray (max_restarts=-1), so losing any
ingress replica loses none of it; a restart loses only the buckets (they refill) and the pushed snapshots (the live
replicas push again within PUSH_S).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Hashable

import ray

from serving.metrics import (EngineTotals, LocalExport, MetricsBoard, ServingMetrics, Snapshot, gate_totals,
                             render_replicas)
from serving.rate_limits import SharedRateLimiter, TokenBank

log = logging.getLogger("attune.ingress_state")
NAMESPACE = "attune"
PUSH_S = 5.0
"""How often a replica pushes its metrics; a scrape sees other replicas' series at most this old."""
CALL_TIMEOUT_S = 2.0


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class IngressState:
    """The shared state of an application's ingress replicas (calls are microseconds; one at a time)."""

    def __init__(self):
        self.bank = TokenBank()
        self.board = MetricsBoard()

    def lease(self, key: Hashable, per_minute: int, want: int, give_back: int) -> tuple[int, float]:
        return self.bank.lease(key, per_minute, want, give_back)

    def exchange(self, replica: str, snapshot: Snapshot, engine: EngineTotals, read: bool = True,
                 ) -> tuple[dict[str, Snapshot], EngineTotals] | None:
        """Store `replica`'s snapshot and relayed engine counts; with `read`, return every live replica's
        snapshot and the merged engine counts."""
        self.board.put(replica, snapshot, engine)
        return (self.board.live(), self.board.engine) if read else None

    def ping(self) -> bool:
        return True


def state_name(app_name: str) -> str:
    return f"AttuneIngressState:{app_name}"


def connect(app_name: str):
    """The application's IngressState actor, created by the first replica that asks (Ray settles the race)."""
    return IngressState.options(name=state_name(app_name), namespace=NAMESPACE, get_if_exists=True,
                                lifetime="detached").remote()


class SharedIngress:
    """One ingress replica's client of IngressState: `limiter(per_minute)` builds a SharedRateLimiter over the bank,
    `render()` / `gate_counts()` read every live replica's metrics (this one's pushed first), and a daemon thread
    pushes this replica's snapshot every PUSH_S. Without the actor (it cannot be reached) a replica falls back to
    its own limiter and its own metrics, and says so in its log."""

    def __init__(self, app_name: str, replica: str, metrics: ServingMetrics, *, push_s: float = PUSH_S):
        self.app_name, self.replica, self.metrics = app_name, replica, metrics
        self.local = LocalExport(metrics)
        self.actor: Any = connect(app_name)
        self._reconnect_at = 0.0
        self._stop = threading.Event()
        self._pusher = threading.Thread(target=self._push_loop, args=(push_s,), name="attune-metrics-push",
                                        daemon=True)
        self._pusher.start()

    def limiter(self, scope: str, per_minute: int) -> SharedRateLimiter:
        """A limiter over the shared bank; `scope` keeps its buckets apart from other limiters' (chat, admin)."""
        return SharedRateLimiter(per_minute, self._lease, scope=scope)

    async def _lease(self, key: Hashable, per_minute: int, want: int, give_back: int) -> tuple[int, float]:
        try:
            return await self.actor.lease.remote(key, per_minute, want, give_back)
        except ray.exceptions.RayActorError:
            self._reconnect()
            raise

    def _reconnect(self) -> None:
        """A dead actor that Ray will not restart (killed with no_restart): make a new one, at most every 5 s."""
        now = time.monotonic()
        if now >= self._reconnect_at:
            self._reconnect_at = now + 5.0
            log.warning("the ingress state actor is gone; connecting to a new one")
            self.actor = connect(self.app_name)

    async def _exchange(self) -> tuple[dict[str, Snapshot], EngineTotals | None]:
        try:
            return await asyncio.wait_for(self.actor.exchange.remote(self.replica, self.metrics.snapshot(),
                                                                     self.metrics.engine_totals()), CALL_TIMEOUT_S)
        except Exception as e:
            if isinstance(e, ray.exceptions.RayActorError):
                self._reconnect()
            log.warning("metrics of the other ingress replicas unavailable (%s): /metrics shows this one only",
                        type(e).__name__)
            return {self.replica: self.metrics.snapshot()}, None

    async def render(self) -> tuple[bytes, str]:
        return render_replicas(*await self._exchange())

    async def gate_counts(self) -> dict[str, int]:
        return gate_totals((await self._exchange())[0])

    def _push_loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                push = self.actor.exchange.remote(self.replica, self.metrics.snapshot(),
                                                  self.metrics.engine_totals(), False)
                ray.get(push, timeout=CALL_TIMEOUT_S)
            except ray.exceptions.RayActorError:
                self._reconnect()
            except Exception as e:
                log.warning("metrics push failed: %s", type(e).__name__)

    def close(self) -> None:
        self._stop.set()
