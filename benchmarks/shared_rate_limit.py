"""Milliseconds that a shared rate limit adds to one request, per design: the replica's own token bucket (no
sharing), the IngressState Ray actor leased one token per request (what a patient sending a message every few
seconds costs) or `lease_size` tokens per call (a busy key), and, for the choice, a token bucket in the database
(one locked read-modify-write transaction per request, through a worker thread as serving.errors.db_call does) on a
SQLite file and, when PostgreSQL is installed, on a private PostgreSQL. Also the metrics exchange a scrape makes.
Starts a private local Ray; prints a table of p50 / p95 / mean; not a test (no figure is asserted).

    flock /tmp/attune-live.lock timeout 600 env PYTHONPATH=. python benchmarks/shared_rate_limit.py [--n 2000]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

BUCKET_SQL = {
    "sqlite": "CREATE TABLE buckets (key TEXT PRIMARY KEY, tokens REAL NOT NULL, last REAL NOT NULL)",
    "postgresql": "CREATE TABLE buckets (key TEXT PRIMARY KEY, tokens DOUBLE PRECISION NOT NULL, "
                  "last DOUBLE PRECISION NOT NULL)",
}


def db_bucket(url: str, per_minute: int):
    """take(key) -> bool: one transaction per request that reads, refills and spends the key's bucket."""
    from sqlalchemy import create_engine, event, text

    engine = create_engine(url, connect_args={"timeout": 30} if url.startswith("sqlite") else {})
    if url.startswith("sqlite"):
        @event.listens_for(engine, "connect")
        def _wal(conn, _):
            conn.isolation_level = None
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")

        @event.listens_for(engine, "begin")
        def _immediate(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
    with engine.begin() as conn:
        conn.execute(text(BUCKET_SQL[engine.dialect.name]))
    lock = "" if engine.dialect.name == "sqlite" else " FOR UPDATE"
    capacity, rate = float(per_minute), per_minute / 60.0

    def take(key: str) -> bool:
        now = time.time()
        with engine.begin() as conn:
            row = conn.execute(text(f"SELECT tokens, last FROM buckets WHERE key = :k{lock}"), {"k": key}).first()
            tokens = capacity if row is None else min(capacity, row[0] + (now - row[1]) * rate)
            ok = tokens >= 1
            tokens -= ok
            if row is None:
                conn.execute(text("INSERT INTO buckets VALUES (:k, :t, :n)"), {"k": key, "t": tokens, "n": now})
            else:
                conn.execute(text("UPDATE buckets SET tokens = :t, last = :n WHERE key = :k"),
                             {"k": key, "t": tokens, "n": now})
        return ok

    return take, engine


async def timed(n: int, call) -> list[float]:
    for i in range(20):  # warm-up
        await call(i)
    out = []
    for i in range(n):
        t = time.perf_counter()
        await call(i)
        out.append((time.perf_counter() - t) * 1000)
    return out


def row(name: str, ms: list[float]) -> str:
    return (f"| {name} | {statistics.median(ms):.3f} | {np.percentile(ms, 95):.3f} | {statistics.fmean(ms):.3f} "
            f"| {len(ms)} |")


async def run(n: int, keys: int) -> None:
    from serving.auth import RateLimiter
    from serving.ingress_state import SharedIngress
    from serving.metrics import ServingMetrics, render_replicas

    big = 10**7  # no request is refused: the cost of admitting is measured
    metrics = ServingMetrics()
    for adapter in ("a1", "a2", "a3"):
        metrics.requests.labels(adapter, "200", "false").inc()
        metrics.latency.labels(adapter, "false").observe(1.0)
    shared = SharedIngress("bench", "replica-1", metrics, push_s=3600)
    assert await shared.actor.ping.remote()
    local = RateLimiter(big)
    per_request = shared.limiter("chat", big)
    per_request.size = 1
    leased = shared.limiter("hot", big)
    print(f"{n} requests per row over {keys} keys, one at a time from an asyncio loop (as an ingress replica calls);"
          " Ray actor on this machine")
    print("| design | p50 ms | p95 ms | mean ms | requests |")
    print("|---|---|---|---|---|")
    print(row("replica's own bucket (no sharing)", await timed(n, lambda i: local.acquire(i % keys))))
    ms = await timed(n, lambda i: per_request.acquire(i % keys))
    print(row("IngressState actor, one lease call per request", ms))
    calls = leased.remote_calls
    ms = await timed(n, lambda i: leased.acquire("busy-key"))
    print(row(f"IngressState actor, one busy key (lease {leased.size}; "
              f"{(leased.remote_calls - calls) / (n + 20):.0%} of requests call)", ms))

    snapshot = metrics.snapshot()
    ms = await timed(min(n, 500), lambda i: shared.actor.exchange.remote(f"replica-{i % 2}", snapshot, {}))
    print(row("metrics exchange (push one replica's snapshot, read all)", ms))
    ms = await timed(min(n, 500), lambda i: shared.render())
    print(row("GET /metrics rendering of 2 replicas (exchange + exposition)", ms))
    print(f"(exposition of 2 replicas: {len(render_replicas({'r1': snapshot, 'r2': snapshot})[0])} bytes)")

    with tempfile.TemporaryDirectory() as tmp:
        take, engine = db_bucket(f"sqlite:///{Path(tmp) / 'bench.db'}", big)
        ms = await timed(n, lambda i: asyncio.to_thread(take, f"k{i % keys}"))
        engine.dispose()
        print(row("database bucket, SQLite file (WAL), one transaction per request", ms))
    await postgres_row(n, keys, big)


async def postgres_row(n: int, keys: int, per_minute: int) -> None:
    from tests.pg import PrivatePostgres, find_bindir

    bindir = find_bindir()
    if bindir is None:
        print("| database bucket, PostgreSQL | not installed | | | |")
        return
    pg = PrivatePostgres(bindir).start()
    try:
        take, engine = db_bucket(pg.create_database("bench"), per_minute)
        ms = await timed(n, lambda i: asyncio.to_thread(take, f"k{i % keys}"))
        engine.dispose()
        print(row("database bucket, PostgreSQL on loopback, one transaction per request", ms))
    finally:
        pg.stop()


def main() -> None:
    import ray

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="requests per design (default %(default)s)")
    ap.add_argument("--keys", type=int, default=200, help="distinct API keys (default %(default)s)")
    a = ap.parse_args()
    ray.init(address="local", include_dashboard=False, num_cpus=2, logging_level="ERROR", log_to_driver=False)
    try:
        asyncio.run(run(a.n, a.keys))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
