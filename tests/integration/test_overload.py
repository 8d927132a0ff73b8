"""A burst far beyond capacity: 60 streaming chat completions at once from 6 keys (within each key's rate limit)
against an app that admits 4 generating + 8 waiting. What is not admitted gets 503 + Retry-After in OpenAI's
error shape and stores nothing; everything admitted streams to [DONE] with a stored reply; afterwards nothing is
left in flight and the replicas' resident memory has not grown without bound."""
from __future__ import annotations

import asyncio
import json
import statistics
import time

import httpx
import pytest

from serving.db import Repository
from tests.integration.api import FEELING, assert_completed, auth, health, new_key, operator_status

KEYS, PER_KEY = 6, 10
MIB = 2**20
RSS_GROWTH_BOUND = 256 * MIB
"""Allowed growth of one replica's resident memory over the burst (measured: see the test's printout)."""


async def _one(client: httpx.AsyncClient, url: str, key: str) -> dict:
    body = {"model": "attune", "messages": FEELING, "max_tokens": 16, "temperature": 0, "stream": True}
    started = time.perf_counter()
    async with client.stream("POST", url, json=body, headers=auth(key)) as r:
        if r.status_code != 200:
            await r.aread()
            return {"key": key, "status": r.status_code, "headers": r.headers, "body": r.json()}
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    events = [line.removeprefix("data: ") for line in lines]
    parsed = [e if e == "[DONE]" else json.loads(e) for e in events]
    return {"key": key, "status": 200, "events": parsed, "seconds": time.perf_counter() - started}


async def _burst(server, keys: list[str]) -> tuple[list[dict], list[int]]:
    """Every request at once; the /healthz answers seen while they ran."""
    limits = httpx.Limits(max_connections=len(keys) * PER_KEY + 8)
    async with httpx.AsyncClient(limits=limits, timeout=600) as client:
        tasks = [asyncio.create_task(_one(client, f"{server.v1}/chat/completions", k)) for k in keys
                 for _ in range(PER_KEY)]
        seen = []
        while not all(t.done() for t in tasks):
            seen.append((await client.get(f"{server.url}/healthz")).status_code)
            await asyncio.sleep(1)
        return [t.result() for t in tasks], seen


def _memory(status: dict) -> dict[str, int]:
    memory = status["engine"]["memory"]
    return {"ingress": memory["ingress"]["rss_bytes"],
            "llm": memory["llm"]["rss_bytes"] + memory["llm"]["children_rss_bytes"],
            "scorer": memory["scorer"]["rss_bytes"]}


@pytest.mark.integration
def test_a_burst_beyond_capacity_is_refused_with_retry_after_and_memory_stays_bounded(server):
    limits = server.settings["limits"]
    tenants = [f"burst-{i}" for i in range(KEYS)]
    keys = [new_key(server, tenant) for tenant in tenants]
    assert health(server).status_code == 200
    before = _memory(operator_status(server))
    results, health_seen = asyncio.run(_burst(server, keys))
    after_status = operator_status(server)
    after = _memory(after_status)

    admitted = [r for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] != 200]
    assert len(admitted) + len(refused) == KEYS * PER_KEY
    assert len(admitted) >= limits["max_in_flight"] and refused
    for r in refused:
        assert r["status"] in (429, 503) and int(r["headers"]["Retry-After"]) >= 1, r
        assert r["body"]["error"]["code"] in ("overloaded", "rate_limit_exceeded") and r["body"]["error"]["message"]
    assert any(r["body"]["error"]["code"] == "overloaded" for r in refused)

    repo = Repository(f"sqlite:///{server.data_dir / 'attune.db'}", create_tables=False)
    try:
        for tenant, key in zip(tenants, keys):  # a refused request stores nothing: one session per admitted request
            assert repo.count_sessions(tenant) == sum(r["key"] == key for r in admitted)
        for r in admitted:
            info = assert_completed(r["events"])
            assert [m.role for m in repo.list_messages(info["session_id"])] == ["user", "assistant"]
    finally:
        repo.close()

    admission, llm = after_status["admission"], after_status["engine"]["llm"]
    assert admission["in_flight"] == 0 and admission["queued"] == 0, admission
    assert llm["unfinished"] == 0 and llm["in_flight"] == [], llm
    growth = {part: after[part] - before[part] for part in before}
    p50 = statistics.median(r["seconds"] for r in admitted)
    print(f"\nburst of {len(results)}: admitted {len(admitted)}, refused {len(refused)} "
          f"({sum(r['status'] == 503 for r in refused)} x 503, {sum(r['status'] == 429 for r in refused)} x 429); "
          f"p50 latency of admitted {p50:.1f} s; /healthz during the burst {sorted(set(health_seen))}")
    print("RSS MiB before -> after: " + ", ".join(f"{p} {before[p] / MIB:.0f} -> {after[p] / MIB:.0f}" for p in before))
    print(f"admission counters: {admission}")
    assert all(g < RSS_GROWTH_BOUND for g in growth.values()), growth
