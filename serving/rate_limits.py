"""Per-key rate limits shared by every ingress replica: one `TokenBank` holds the buckets (in the IngressState actor of
serving.ingress_state), and each replica's `SharedRateLimiter` leases a few tokens at a time from it and spends them
locally, so most requests never leave the replica. Leased tokens come out of the shared bucket, so together the
replicas never admit more than the limit; a lease not spent in time goes back.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from typing import Awaitable, Callable, Hashable

from serving.auth import RateLimited, RateLimiter, evict_buckets

log = logging.getLogger("attune.limits")
LEASE_TTL_S = 2.0
"""How long a replica may spend the tokens of one lease; the rest is given back with its next lease of that key."""
BANK_TIMEOUT_S = 0.5
"""A lease that takes longer counts as failed: the replica's own limiter decides that request."""
RECONNECT_S = 5.0

Lease = Callable[[Hashable, int, int, int], Awaitable[tuple[int, float]]]
"""(key, per_minute, want, give_back) -> (tokens granted, seconds until one more if none was)."""


def lease_size(per_minute: int) -> int:
    """Tokens asked for per lease: 1/20 of a minute's budget, 1 to 8 (60/min: 3)."""
    return max(1, min(8, per_minute // 20))


class TokenBank:
    """Per-key token buckets of capacity `per_minute`, refilled evenly; tokens leave in leases and may come back.
    Below half a bucket a lease gets one token, so that near the limit no replica holds tokens another needs.
    Memory is bounded as in auth.RateLimiter: buckets idle long enough to be full again are dropped, then LRU."""

    def __init__(self, *, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic):
        self.max_keys, self.clock = max_keys, clock
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()

    def lease(self, key: Hashable, per_minute: int, want: int = 1, give_back: int = 0) -> tuple[int, float]:
        if per_minute <= 0:
            return want, 0.0
        capacity, rate, now = float(per_minute), per_minute / 60.0, self.clock()
        tokens, last = self._buckets.pop(key, (capacity, now))
        tokens = min(capacity, tokens + max(0.0, now - last) * rate + max(0, give_back))
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return 0, (1.0 - tokens) / rate
        granted = min(max(1, want), math.floor(tokens)) if tokens >= capacity / 2 else 1
        self._buckets[key] = (tokens - granted, now)
        self._evict(now, capacity / rate)
        return granted, 0.0

    def _evict(self, now: float, full_after: float) -> None:
        evict_buckets(self._buckets, self.max_keys, now, full_after)

    def __len__(self) -> int:
        return len(self._buckets)


class SharedRateLimiter:
    """A replica's side of the shared limit: `acquire(key)` spends a token of the key's current lease, or leases
    `lease_size` more from the bank (one remote call). While the bank cannot be reached the replica's own
    RateLimiter decides, so an outage of the bank at worst multiplies the limit by the number of replicas."""

    def __init__(self, per_minute: int, lease: Lease, *, scope: str = "chat", size: int | None = None,
                 ttl_s: float = LEASE_TTL_S,
                 timeout_s: float = BANK_TIMEOUT_S, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        if per_minute < 0:
            raise ValueError("per_minute must be >= 0 (0 turns the limit off)")
        self.per_minute, self.lease, self.scope = per_minute, lease, scope
        self.ttl_s, self.timeout_s = ttl_s, timeout_s
        self.size = size or lease_size(per_minute)
        self.max_keys, self.clock = max_keys, clock
        self.fallback = RateLimiter(per_minute, max_keys=max_keys, clock=clock)
        self._held: OrderedDict[Hashable, tuple[int, float]] = OrderedDict()
        """key -> (tokens left of its lease, when the lease expires)."""
        self.remote_calls = self.local_hits = self.fallbacks = 0

    async def acquire(self, key: Hashable) -> None:
        """Spend one request for `key` (a stable caller id, never the secret); RateLimited when none is left."""
        if self.per_minute <= 0:
            return
        now = self.clock()
        tokens, expires = self._held.pop(key, (0, now))
        if tokens >= 1 and now < expires:
            self.local_hits += 1
            if tokens > 1:
                self._held[key] = (tokens - 1, expires)
            return
        self.remote_calls += 1
        try:
            lease = self.lease((self.scope, key), self.per_minute, self.size, tokens)
            granted, retry_after = await asyncio.wait_for(lease, self.timeout_s)
        except Exception as e:
            self.fallbacks += 1
            if self.fallbacks == 1 or self.fallbacks % 1000 == 0:
                log.warning("the shared rate-limit bank failed (%s, %d times): this replica limits alone",
                            type(e).__name__, self.fallbacks)
            self.fallback.check(key)
            return
        if granted < 1:
            raise RateLimited(retry_after)
        if granted > 1:
            left, _ = self._held.pop(key, (0, 0.0))  # a concurrent lease of the same key: keep both
            self._held[key] = (left + granted - 1, self.clock() + self.ttl_s)
            while len(self._held) > self.max_keys:
                self._held.popitem(last=False)
