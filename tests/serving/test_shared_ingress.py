"""What ingress replicas share (serving.rate_limits, the metrics board of serving.metrics) and the proxy middleware
that makes a lost replica's requests retryable, without Ray: replicas are SharedRateLimiters over one TokenBank,
registries pushed to one MetricsBoard. The Ray actor itself runs in tests/integration/test_cluster.py and
benchmarks/ingress_state.py."""
from __future__ import annotations

import asyncio
import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.auth import RateLimited
from serving.metrics import REPLICA_LABEL, MetricsBoard, ServingMetrics, gate_totals, render_replicas
from serving.proxy_middleware import CODE, RETRY_AFTER_S, ReplicaLost, middlewares
from serving.rate_limits import SharedRateLimiter, TokenBank, lease_size


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def replicas(bank: TokenBank, n: int, per_minute: int, clock, **kw) -> list[SharedRateLimiter]:
    calls = []

    async def lease(key, per_minute, want, give_back):
        calls.append((key, want, give_back))
        return bank.lease(key, per_minute, want, give_back)

    out = [SharedRateLimiter(per_minute, lease, clock=clock, **kw) for _ in range(n)]
    for r in out:
        r.calls = calls
    return out


async def admitted(limiter: SharedRateLimiter, key, n: int) -> int:
    ok = 0
    for _ in range(n):
        try:
            await limiter.acquire(key)
            ok += 1
        except RateLimited:
            pass
    return ok


def test_two_replicas_together_admit_the_limit_once_not_twice():
    clock = FakeClock()
    bank = TokenBank(clock=clock)
    a, b = replicas(bank, 2, 60, clock)
    got = asyncio.run(_alternate(a, b, "k1", 200))
    assert got == 60, "per-replica buckets would admit 120"
    with pytest.raises(RateLimited) as exc:
        asyncio.run(a.acquire("k1"))
    assert 0 < exc.value.retry_after <= 1.0
    assert asyncio.run(admitted(b, "k2", 1)) == 1, "another key has its own bucket"
    clock.now += 10  # 10 s at 1/s refill
    assert asyncio.run(_alternate(a, b, "k1", 50)) == 10


async def _alternate(a, b, key, n):
    ok = 0
    for i in range(n):
        try:
            await (a if i % 2 else b).acquire(key)
            ok += 1
        except RateLimited:
            pass
    return ok


def test_leases_spare_remote_calls_and_unspent_tokens_go_back():
    clock = FakeClock()
    bank = TokenBank(clock=clock)
    (a,) = replicas(bank, 1, 120, clock, ttl_s=2.0)
    assert a.size == lease_size(120) == 6
    assert asyncio.run(admitted(a, "k", 12)) == 12
    assert (a.remote_calls, a.local_hits) == (2, 10), "one bank call per lease of 6"
    asyncio.run(admitted(a, "k", 1))  # a third lease: 5 of its 6 tokens stay unspent
    clock.now += 3  # the lease expired; refill is 6 tokens
    tokens_before = bank._buckets[("chat", "k")][0]
    asyncio.run(admitted(a, "k", 1))
    assert a.calls[-1] == (("chat", "k"), 6, 5), "the expired lease's 5 tokens were given back"
    assert bank._buckets[("chat", "k")][0] == pytest.approx(min(120, tokens_before + 6 + 5) - 6)


def test_near_the_limit_a_lease_is_one_token():
    clock = FakeClock()
    bank = TokenBank(clock=clock)
    assert bank.lease("k", 100, want=5) == (5, 0.0)
    for _ in range(60):
        bank.lease("k", 100, want=1)
    assert bank.lease("k", 100, want=5) == (1, 0.0), "below half the bucket no replica hoards tokens"


def test_a_bank_that_fails_leaves_each_replica_its_own_limit():
    clock = FakeClock()

    async def broken(*_):
        raise ConnectionError("actor unreachable")

    limiter = SharedRateLimiter(6, broken, clock=clock)
    assert asyncio.run(admitted(limiter, "k", 10)) == 6
    assert limiter.fallbacks == 10

    async def slow(*_):
        await asyncio.sleep(5)

    limiter = SharedRateLimiter(6, slow, clock=clock, timeout_s=0.01)
    assert asyncio.run(admitted(limiter, "k", 1)) == 1 and limiter.fallbacks == 1
    assert asyncio.run(admitted(SharedRateLimiter(0, broken), "k", 3)) == 3, "0 turns the limit off"


def test_scopes_keep_chat_and_admin_budgets_apart():
    clock = FakeClock()
    bank = TokenBank(clock=clock)

    async def lease(key, per_minute, want, give_back):
        return bank.lease(key, per_minute, want, give_back)

    chat, admin = (SharedRateLimiter(3, lease, scope=s, clock=clock) for s in ("chat", "admin"))
    assert asyncio.run(admitted(chat, 7, 5)) == 3
    assert asyncio.run(admitted(admin, 7, 5)) == 3


def test_bank_memory_is_bounded():
    clock = FakeClock()
    bank = TokenBank(max_keys=3, clock=clock)
    for i in range(10):
        bank.lease(f"k{i}", 60)
    assert len(bank) == 3
    clock.now += 61
    bank.lease("fresh", 60)
    assert len(bank) == 1


# ---------------------------------------------------------------- metrics of several replicas
def parsed(text: bytes) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text.decode()) for s in f.samples}


def test_one_rendering_carries_every_live_replica_and_sums_per_replica():
    clock = FakeClock()
    board = MetricsBoard(stale_after_s=60, clock=clock)
    a, b = ServingMetrics(), ServingMetrics()
    a.requests.labels("ad1", "200", "false").inc(3)
    b.requests.labels("ad1", "200", "false").inc(2)
    a.observe_gate("pass"), b.observe_gate("pass"), b.observe_gate("fallback")
    b.latency.labels("ad1", "true").observe(0.3)
    board.put("r1", a.snapshot())
    board.put("r2", b.snapshot())
    text, content_type = render_replicas(board.live())
    assert content_type.startswith("text/plain")
    samples = parsed(text)
    key = lambda r: ("attune_requests_total", (("adapter", "ad1"), (REPLICA_LABEL, r), ("status", "200"),
                                               ("stream", "false")))
    assert samples[key("r1")] == 3 and samples[key("r2")] == 2
    assert samples[("attune_request_latency_seconds_count", (("adapter", "ad1"), (REPLICA_LABEL, "r2"),
                                                             ("stream", "true")))] == 1
    assert gate_totals(board.live()) == {"pass": 2, "fallback": 1}
    own = parsed(a.render()[0])
    assert {n for n, _ in samples} == {n for n, _ in own} | {n for n, _ in parsed(b.render()[0])}

    clock.now += 30
    board.put("r1", a.snapshot())
    clock.now += 40  # r2 silent for 70 s: gone
    assert set(board.live()) == {"r1"}
    assert all(dict(labels)[REPLICA_LABEL] == "r1" for _, labels in parsed(render_replicas(board.live())[0]))


# ---------------------------------------------------------------- the proxy middleware
def run_asgi(inner, scope_type: str = "http") -> list[dict]:
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    app = middlewares()[0].cls(inner)
    asyncio.run(app({"type": scope_type}, receive, send))
    return sent


def test_a_replica_that_died_before_answering_becomes_a_retryable_503():
    async def died(scope, receive, send):  # what Serve's proxy relays after RayActorError: nothing
        return None

    start, body = run_asgi(died)
    assert start["status"] == 503 and dict(start["headers"])[b"retry-after"] == str(RETRY_AFTER_S).encode()
    assert json.loads(body["body"])["error"]["code"] == CODE


def test_a_stream_cut_off_ends_with_an_error_event_and_done():
    async def cut(scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
        await send({"type": "http.response.body", "body": b'data: {"x": 1}\n\n', "more_body": True})

    *_, last = run_asgi(cut)
    event, done = last["body"].decode().split("\n\n")[:2]
    assert json.loads(event.removeprefix("data: "))["error"]["code"] == CODE and done == "data: [DONE]"
    assert not last.get("more_body")


def test_complete_answers_and_other_protocols_pass_untouched():
    async def fine(scope, receive, send):
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b"app's own 500"})

    assert [m.get("status") for m in run_asgi(fine)] == [500, None]

    async def half_json(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{", "more_body": True})

    assert len(run_asgi(half_json)) == 2, "a non-stream cut off is left to the server, which closes the connection"
    assert run_asgi(lambda s, r, send: asyncio.sleep(0), scope_type="websocket") == []
    assert isinstance(middlewares()[0].cls(None), ReplicaLost)


def test_adapter_loads_relayed_by_two_ingress_replicas_are_counted_once():
    """Both ingress replicas relay LLM replica X's cumulative counts; the rendering counts each load once and keeps
    the totals of an ingress replica that went away."""
    clock = FakeClock()
    board = MetricsBoard(stale_after_s=60, clock=clock)
    a, b = ServingMetrics(), ServingMetrics()
    a.observe_engine_stats("X", {"ad1": 3}, {})
    b.observe_engine_stats("X", {"ad1": 4}, {"ad1": 1})
    b.observe_engine_stats("Y", {"ad1": 2, "ad2": 1}, {})
    board.put("r1", a.snapshot(), a.engine_totals())
    board.put("r2", b.snapshot(), b.engine_totals())
    samples = parsed(render_replicas(board.live(), board.engine)[0])
    loads = {dict(labels)["adapter"]: v for (n, labels), v in samples.items() if n == "attune_adapter_loads_total"}
    assert loads == {"ad1": 6, "ad2": 1}, "X's 4 loads once, plus Y's 2 (per-replica sums would say 9)"
    assert samples[("attune_adapter_evictions_total", (("adapter", "ad1"),))] == 1
    clock.now += 120  # both ingress replicas gone from the board: the LLM replicas' totals stay
    assert parsed(render_replicas(board.live(), board.engine)[0])[
        ("attune_adapter_loads_total", (("adapter", "ad1"),))] == 6


def _lost_once():
    """An inner app whose first call dies before answering (a lost replica) and whose second answers the body."""
    calls = []

    async def inner(scope, receive, send):
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message["body"], message.get("more_body", False)
        calls.append(body)
        if len(calls) == 1:
            return None
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"answered " + body})

    return inner, calls


def _call(inner, method: str, path: str) -> list[dict]:
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    parts = [{"type": "http.request", "body": b'{"messages": ', "more_body": True},
             {"type": "http.request", "body": b"[]}", "more_body": False}]

    async def receive():
        return parts.pop(0) if parts else {"type": "http.disconnect"}

    asyncio.run(middlewares()[0].cls(inner)({"type": "http", "method": method, "path": path}, receive, send))
    return sent


def test_a_chat_completion_whose_replica_died_is_sent_once_more_with_its_whole_body():
    inner, calls = _lost_once()
    start, body = _call(inner, "POST", "/v1/chat/completions")
    assert calls == [b'{"messages": []}'] * 2, "the second attempt reads the same body"
    assert start["status"] == 200 and body["body"] == b'answered {"messages": []}'


def test_other_posts_are_not_repeated_and_get_the_retryable_503():
    inner, calls = _lost_once()
    start, body = _call(inner, "POST", "/v1/sessions")
    assert len(calls) == 1 and start["status"] == 503 and json.loads(body["body"])["error"]["code"] == CODE


def test_a_whole_chat_body_travels_in_the_scope_and_the_app_reads_it_there(monkeypatch):
    """The proxy's read-ahead body goes to the replica with the request (no call back to the proxy for it); the app's
    read_body takes it from there, still under the body limit; other POSTs and oversized bodies travel as before."""
    from types import SimpleNamespace

    from serving import proxy_middleware
    from serving.api_router import read_body
    from serving.chat import ApiError

    scopes = []

    async def inner(scope, receive, send):
        scopes.append(scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    _call(inner, "POST", "/v1/chat/completions")
    _call(inner, "POST", "/v1/sessions")
    monkeypatch.setattr(proxy_middleware, "INLINED_MAX", 8)
    _call(inner, "POST", "/v1/chat/completions")
    assert [s.get(proxy_middleware.BODY_SCOPE_KEY) for s in scopes] == [b'{"messages": []}', None, None]

    def request(scope, limit):
        async def stream():
            raise AssertionError("the body was in the scope: nothing to read from the connection")
            yield b""

        service = SimpleNamespace(config=SimpleNamespace(limits=SimpleNamespace(max_body_bytes=limit)))
        return SimpleNamespace(scope=scope, headers={}, stream=stream,
                               app=SimpleNamespace(state=SimpleNamespace(service=service)))

    assert asyncio.run(read_body(request(scopes[0], 1024))) == b'{"messages": []}'
    with pytest.raises(ApiError) as e:
        asyncio.run(read_body(request(scopes[0], 4)))
    assert e.value.status == 413
