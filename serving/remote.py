"""The ingress's clients of the LLM and scorer: `RemoteEngine` streams from the LLM deployment, `ColocatedEngine` from
an LLM replica in the ingress's own process (`engine.colocate`), and `RemoteScorer` calls the scorer deployment,
behind the protocols the chat logic expects (serving.clients).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, Callable

from ray.serve.handle import DeploymentHandle

from serving.engine import AdapterRefused, EngineError, GenerationRequest, PromptTooLong, Usage
from serving.metrics import ServingMetrics
from serving.clients import ScorerInfo


class _ReplicaEngine:
    """EngineClient over an LLM replica's items (serving.app.LLMReplica.generate): {"text", "usage"} deltas, then
    {"usage", "stats"}, or {"error"}. Subclasses open the stream and say how to stop one early."""

    def __init__(self, metrics: ServingMetrics):
        self.metrics = metrics
        self._usage: OrderedDict[str, Usage] = OrderedDict()
        self.replicas: dict[str, list[str]] = {}
        """LLM replica id -> adapters in its LoRA cache after its last generation (a status call reaches one)."""

    def _open(self, req: GenerationRequest) -> tuple[AsyncGenerator[dict, None], Callable[[], Awaitable[None]]]:
        """The replica's items for `req`, and how to stop them before their end (which aborts the vLLM request)."""
        raise NotImplementedError

    async def stream(self, req: GenerationRequest) -> AsyncIterator[str]:
        items, stop = self._open(req)
        finished = False
        try:
            async for item in items:
                if "text" in item:
                    if item.get("usage"):  # tokens so far: all there is of a request cancelled before its end
                        self._record(req.request_id, Usage(**item["usage"]))
                    yield item["text"]
                elif "error" in item:
                    finished = True
                    err = item["error"]
                    if err["kind"] == "adapter_refused":
                        raise AdapterRefused(err["adapter_id"], err["message"])
                    raise (PromptTooLong if err["kind"] == "prompt_too_long" else EngineError)(err["message"])
                else:
                    if item.get("usage"):
                        self._record(req.request_id, Usage(**item["usage"]))
                    stats = item.get("stats") or {}
                    self.metrics.observe_engine_stats(stats.get("replica", "?"), stats.get("loads", {}),
                                                      stats.get("evictions", {}))
                    if "loaded" in stats:
                        self.replicas[stats["replica"]] = stats["loaded"]
            finished = True
        except (EngineError, PromptTooLong):
            raise
        except Exception as e:
            finished = True
            raise EngineError(f"the LLM deployment failed: {type(e).__name__}") from e
        finally:
            if not finished:
                await stop()
            await items.aclose()  # runs its clean-up now, not when the garbage collector finds it

    def _record(self, request_id: str, usage: Usage) -> None:
        self._usage[request_id] = usage
        while len(self._usage) > 1024:
            self._usage.popitem(last=False)

    def usage(self, request_id: str) -> Usage | None:
        return self._usage.get(request_id)


class RemoteEngine(_ReplicaEngine):
    """EngineClient over the LLM deployment: streams with multiplexed_model_id = adapter id; closing a stream
    early cancels the replica's generator, which aborts the vLLM request."""

    def __init__(self, handle: DeploymentHandle, metrics: ServingMetrics):
        super().__init__(metrics)
        self.handle = handle
        self._live: dict[str, Any] = {}

    def _open(self, req: GenerationRequest) -> tuple[AsyncGenerator[dict, None], Callable[[], Awaitable[None]]]:
        options = {"stream": True}
        if req.adapter_id is not None:
            options["multiplexed_model_id"] = req.adapter_id
        gen = self.handle.options(**options).generate.remote(asdict(req))
        self._live[req.request_id] = gen

        async def items() -> AsyncGenerator[dict, None]:
            try:
                async for item in gen:
                    yield item
            finally:
                self._live.pop(req.request_id, None)

        async def stop() -> None:
            gen.cancel()
        return items(), stop

    async def abort(self, request_id: str) -> None:
        gen = self._live.get(request_id)
        if gen is not None:
            gen.cancel()

    async def check_health(self) -> None:
        try:
            await self.handle.ready.remote()
        except Exception as e:
            raise _cause(e) from None


class ColocatedEngine(_ReplicaEngine):
    """EngineClient over an LLM replica in this process (serving.app.LLMReplica, `engine.colocate`): the same items
    as from the LLM deployment, without a Ray call per request and per delta."""

    def __init__(self, replica: Any, metrics: ServingMetrics):
        super().__init__(metrics)
        self.replica = replica

    def _open(self, req: GenerationRequest) -> tuple[AsyncGenerator[dict, None], Callable[[], Awaitable[None]]]:
        gen = self.replica.generate(asdict(req))
        return gen, gen.aclose  # closing it runs the replica's clean-up, which aborts the vLLM request

    async def abort(self, request_id: str) -> None:
        await self.replica.engine.abort(request_id)

    async def check_health(self) -> None:
        await self.replica.ready()


class RemoteScorer:
    """ScoringClient over the scorer deployment (each call joins a `serve.batch`)."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def score(self, prompt: str, reply: str) -> dict[str, float]:
        return await self.handle.score.remote((prompt, reply))

    async def crisis(self, message: str) -> float:
        return await self.handle.crisis.remote(message)

    async def info(self) -> ScorerInfo:
        return ScorerInfo(**(await self.handle.info.remote()))

    async def check_health(self) -> None:
        try:
            await self.handle.ready.remote()
        except Exception as e:
            raise _cause(e) from None


def _cause(err: Exception) -> Exception:
    """The replica's own exception inside Ray's wrapper, so that /healthz says what failed in one line."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, Exception) else err
