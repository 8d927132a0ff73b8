"""Engine interface: FakeEngine's contract (determinism, faults, aborts, adapter LRU) in unit tests, and one
slow test that drives the real vLLM async engine on SmolLM2 with a random LoRA and aborts mid-stream."""
from __future__ import annotations

import asyncio

import pytest

from serving.engine import AdapterCache, EngineError, FakeEngine, GenerationRequest, LLMEngine, fit_to_window

MESSAGES = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "I feel low today."}]


def req(request_id="r1", adapter=None, messages=MESSAGES, **kw) -> GenerationRequest:
    return GenerationRequest(request_id, messages, adapter, f"/adapters/{adapter}" if adapter else None, **kw)


async def collect(engine, request: GenerationRequest) -> list[str]:
    return [d async for d in engine.stream(request)]


@pytest.mark.asyncio
async def test_fake_engine_is_deterministic_per_adapter_and_messages():
    a, b = FakeEngine(), FakeEngine()
    base = "".join(await collect(a, req()))
    assert base == "".join(await collect(b, req("other-id"))) == a.reply_for(req())
    assert "".join(await collect(a, req(adapter="warm"))) != base
    other = [{"role": "user", "content": "Work is overwhelming."}]
    assert "".join(await collect(a, req(messages=other))) != base
    assert isinstance(a, LLMEngine)


@pytest.mark.asyncio
async def test_fake_engine_streams_word_deltas_and_records_usage():
    engine = FakeEngine(replies={None: "One two three four five."})
    deltas = await collect(engine, req())
    assert deltas == ["One", " two", " three", " four", " five."]
    assert engine.usage("r1").completion_tokens == 5 and engine.usage("r1").finish_reason == "stop"
    assert engine.usage("r1").prompt_tokens == 6
    assert await collect(engine, req("r2", max_tokens=2)) == ["One", " two"]
    assert engine.usage("r2").finish_reason == "length"
    assert engine.usage("never-sent") is None


@pytest.mark.asyncio
async def test_fake_engine_fails_after_n_tokens():
    engine = FakeEngine(fail_after_tokens=3)
    got = []
    with pytest.raises(EngineError, match="after 3 tokens"):
        async for d in engine.stream(req()):
            got.append(d)
    assert len(got) == 3
    assert engine.usage("r1").finish_reason == "error" and not engine.in_flight


@pytest.mark.asyncio
async def test_fake_engine_health_fault():
    engine = FakeEngine()
    await engine.check_health()
    engine.fail_health = True
    with pytest.raises(EngineError, match="health"):
        await engine.check_health()


@pytest.mark.asyncio
async def test_abort_stops_an_in_flight_stream():
    engine = FakeEngine(token_delay=0.01, replies={None: " ".join(["word"] * 200)})
    got = []
    async for d in engine.stream(req("long")):
        got.append(d)
        if len(got) == 3:
            await engine.abort("long")
    assert 3 <= len(got) < 10
    assert engine.aborted == ["long"] and engine.usage("long").finish_reason == "abort"
    await engine.abort("unknown")
    assert engine.aborted == ["long", "unknown"]
    assert len(await collect(engine, req("long", max_tokens=5))) == 5


@pytest.mark.asyncio
async def test_closing_the_stream_early_counts_as_abort():
    engine = FakeEngine(token_delay=0.001)
    it = engine.stream(req("gone"))
    await it.__anext__()
    await it.aclose()
    assert engine.usage("gone").finish_reason == "abort" and engine.usage("gone").completion_tokens == 1
    assert not engine.in_flight


@pytest.mark.asyncio
async def test_concurrent_streams_interleave():
    engine = FakeEngine(token_delay=0.005)
    peak = 0

    async def watch():
        nonlocal peak
        while True:
            peak = max(peak, len(engine.in_flight))
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    outs = await asyncio.gather(*(collect(engine, req(f"r{i}", adapter=f"a{i % 2}")) for i in range(4)))
    watcher.cancel()
    assert peak == 4
    assert "".join(outs[0]) == "".join(outs[2]) != "".join(outs[1])


def test_adapter_cache_is_lru():
    cache = AdapterCache(2)
    for a in ("a", "b", "a", "c", "b"):
        cache.touch(a)
    assert cache.resident() == ["c", "b"]
    assert cache.loads == {"a": 1, "b": 2, "c": 1}
    assert cache.evictions == {"b": 1, "a": 1} and cache.hits == {"a": 1}
    assert cache.totals() == {"adapter_loads": 4, "adapter_evictions": 2, "adapter_hits": 1}
    with pytest.raises(ValueError):
        AdapterCache(0)


@pytest.mark.asyncio
async def test_fake_engine_tracks_loaded_adapters():
    engine = FakeEngine(max_loras=2)
    for i, a in enumerate(["x", None, "y", "z"]):
        await collect(engine, req(f"r{i}", adapter=a))
    assert engine.loaded_adapters() == ["y", "z"]
    assert engine.stats()["adapter_evictions"] == 1 and engine.stats()["requests"] == 4


def test_request_validation():
    with pytest.raises(ValueError, match="together"):
        GenerationRequest("r", MESSAGES, adapter_id="warm")
    with pytest.raises(ValueError, match="max_tokens"):
        GenerationRequest("r", MESSAGES, max_tokens=0)
    with pytest.raises(ValueError, match="empty"):
        GenerationRequest("r", [])


def random_lora(base, out, seed: int):
    """A random LoRA on q_proj/v_proj with non-zero B (alpha = 2r): greedy text changes but stays readable."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(out)
    return out


@pytest.mark.slow
@pytest.mark.asyncio
async def test_vllm_engine_base_vs_lora_and_abort(tmp_path):
    pytest.importorskip("vllm")
    from alignment.basemodel import prepare
    from serving.engine import VLLMEngine

    base = prepare()
    lora = random_lora(base, tmp_path / "rand-lora", 0)
    engine = VLLMEngine(str(base), max_loras=2, max_lora_rank=16, max_model_len=1024,
                        cpu_memory_fraction=0.3, kv_cache_bytes=256 << 20)
    print(f"\nVLLMEngine ready in {engine.start_seconds:.1f} s")
    try:
        await engine.check_health()
        msgs = [{"role": "user", "content": "I had a rough day at work. Any thoughts?"}]
        base_text = "".join(await collect(engine, GenerationRequest("base", msgs, max_tokens=24, temperature=0.0)))
        lora_req = GenerationRequest("lora", msgs, "rand", str(lora), max_tokens=24, temperature=0.0)
        lora_text = "".join(await collect(engine, lora_req))
        print(f"base: {base_text!r}\nlora: {lora_text!r}")
        assert base_text.strip() and lora_text.strip() and base_text != lora_text
        assert engine.loaded_adapters() == ["rand"] == await engine.resident_in_vllm()
        assert engine.stats()["adapter_loads"] == 1
        assert engine.usage("base").completion_tokens > 0 and engine.usage("base").finish_reason in ("stop", "length")

        story = [{"role": "user", "content": "Write a very long story about a lighthouse keeper, with many chapters."}]
        got = []
        async for d in engine.stream(GenerationRequest("long", story, max_tokens=600, temperature=0.0)):
            got.append(d)
            if len(got) == 3:
                await engine.abort("long")
        usage = engine.usage("long")
        assert usage.finish_reason == "abort" and usage.completion_tokens < 100
        assert engine.num_unfinished() == 0

        it = engine.stream(GenerationRequest("gone", story, max_tokens=600, temperature=0.0))
        await it.__anext__()
        await it.aclose()
        assert engine.num_unfinished() == 0 and engine.usage("gone").completion_tokens < 100
        assert engine.usage("gone").finish_reason == "abort"
    finally:
        engine.shutdown()


def _words(messages: list[dict]) -> list[int]:
    """A stand-in tokenizer: one token per word plus two per message."""
    return [0] * sum(len(m["content"].split()) + 2 for m in messages)


def test_fit_to_window_drops_the_oldest_turns_and_keeps_system_and_new_message():
    system = {"role": "system", "content": "be kind"}
    turns = [{"role": r, "content": f"{r} turn {i} " + "word " * 10} for i in range(3) for r in ("user", "assistant")]
    new = {"role": "user", "content": "the new message"}
    messages = [system, *turns, new]
    assert len(fit_to_window(messages, _words, 10_000)) == len(_words(messages))  # fits: nothing dropped

    seen: list[list[dict]] = []

    def encode(ms):
        seen.append(ms)
        return _words(ms)

    ids = fit_to_window(messages, encode, 50)
    kept = seen[-1]
    assert len(ids) <= 50 and kept[0] == system and kept[-1] == new
    assert kept[1]["role"] == "user" and kept[1:-1] == turns[len(turns) - (len(kept) - 2):]  # a recent suffix
    assert len(kept) < len(messages)
    assert messages == [system, *turns, new]  # the caller's list is untouched

    # Even the system prompt and the new message alone are over: they are returned whole (the engine then refuses).
    assert len(fit_to_window(messages, _words, 3)) == len(_words([system, new]))


class _RayStream:
    """A Ray Serve streaming response: items, then nothing once cancelled (the last item never comes)."""

    def __init__(self, items: list[dict]):
        self.items, self.cancelled = items, False

    async def _items(self):
        for item in self.items:
            if self.cancelled:
                return
            yield item

    def __aiter__(self):
        return self._items()

    def cancel(self) -> None:
        self.cancelled = True


class _LLMHandle:
    def __init__(self, items: list[dict]):
        self.items, self.generate = items, self

    def options(self, **kw):
        return self

    def remote(self, request: dict) -> _RayStream:
        return _RayStream(self.items)


def _colocated_replica(engine: FakeEngine):
    """serving.app.LLMReplica around a FakeEngine, as the ingress holds one with engine.colocate (no vLLM here)."""
    from collections import deque

    from serving.app import LLMReplica

    class Replica(LLMReplica):
        def __del__(self):  # the real one shuts vLLM down
            pass

    replica = Replica.__new__(Replica)
    replica.engine, replica.replica, replica.engine_faults = engine, "ingress-1", None
    replica.cancelled, replica.live, replica.loaded = deque(maxlen=32), set(), []

    async def adapter_path(adapter_id: str) -> str:
        replica.loaded.append(adapter_id)
        return f"/store/{adapter_id}"

    replica.adapter_path = adapter_path
    return replica


@pytest.mark.asyncio
async def test_colocated_engine_streams_from_the_replica_in_this_process():
    """engine.colocate: the ingress reads the LLM replica's items without Ray: the text, the usage, the replica's
    adapters; the adapter is loaded by id, with no multiplexed model id to match (there is no Serve routing)."""
    from serving.engine import Usage
    from serving.metrics import ServingMetrics
    from serving.remote import ColocatedEngine

    fake = FakeEngine(replies={"warm": "One two three."})
    engine = ColocatedEngine(_colocated_replica(fake), ServingMetrics())
    assert "".join(await collect(engine, req("r1", adapter="warm"))) == "One two three."
    assert engine.usage("r1") == Usage(6, 3, "stop")
    assert engine.replica.loaded == ["warm"] and fake.requests[-1].adapter_path == "/store/warm"
    assert engine.replicas == {"ingress-1": ["warm"]}
    await engine.check_health()
    fake.fail_health = True
    with pytest.raises(EngineError):
        await engine.check_health()


@pytest.mark.asyncio
async def test_colocated_engine_closing_a_stream_early_stops_the_generation():
    """A stream the client or the gate left: the replica's clean-up runs at once (no Ray cancel to wait for): the
    generation is recorded as cancelled with the tokens sent, and the engine holds nothing."""
    from serving.metrics import ServingMetrics
    from serving.remote import ColocatedEngine

    fake = FakeEngine(replies={None: "One two three four five six."}, token_delay=0.01)
    replica = _colocated_replica(fake)
    engine = ColocatedEngine(replica, ServingMetrics())
    stream = engine.stream(req("cut"))
    assert [await stream.__anext__(), await stream.__anext__()] == ["One", " two"]
    assert replica.live == {"cut"}
    await stream.aclose()
    assert replica.live == set() and fake.in_flight == set()
    assert list(replica.cancelled) == [{"request_id": "cut", "completion_tokens": 2, "finish_reason": "abort"}]
    assert engine.usage("cut").completion_tokens == 2


@pytest.mark.asyncio
async def test_remote_engine_counts_the_tokens_of_a_stream_cancelled_before_its_end():
    """The LLM deployment sends the tokens so far with each delta: a stream the gate stopped (cancelled, so its last
    item with the final usage never arrives) still has its tokens counted, not 0."""
    from serving.engine import Usage
    from serving.metrics import ServingMetrics
    from serving.remote import RemoteEngine

    items = [{"text": w, "usage": {"prompt_tokens": 9, "completion_tokens": i + 1, "finish_reason": None}}
             for i, w in enumerate(["One", " two", " three."])]
    items.append({"usage": {"prompt_tokens": 9, "completion_tokens": 3, "finish_reason": "stop"},
                  "stats": {"replica": "r1", "loads": {}, "evictions": {}}})
    engine = RemoteEngine(_LLMHandle(items), ServingMetrics())
    stream = engine.stream(req("cut"))
    assert [await stream.__anext__(), await stream.__anext__()] == ["One", " two"]
    await stream.aclose()
    assert engine.usage("cut") == Usage(9, 2, None)
    assert engine._live == {}  # forgotten at the close, not when the garbage collector finds the stream
    assert "".join(await collect(engine, req("whole"))) == "One two three."
    assert engine.usage("whole") == Usage(9, 3, "stop")
