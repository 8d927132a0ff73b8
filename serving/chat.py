"""The chat logic behind the API (vLLM's `serving.py` role). A chat completion is one pipeline, called in order from
`ChatService.chat_completion`: keys and limits, parse, admission, session and route (serving.sessions), the crisis
check (serving.crisis_check), generation under the gate (serving.streaming), persist and respond (serving.replies).
Generation's first attempt starts beside the crisis check and nothing of it is read until the check has passed
(serving.streaming.EarlyStart), so the check costs no time to the first token.
The stages take plain data (serving.turn) and the parts they need, never the service. Also the session endpoints
(serving.sessions), the flagged sessions operators review (serving.flagged), health, models and operator endpoints.
Knows nothing about HTTP frameworks or Ray: the engine and the scorer are clients behind small protocols
(serving.clients), and every rejection is an OpenAI-shaped `ApiError`.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

from pydantic import TypeAdapter, ValidationError

from adapters.registry import AdapterStore
from alignment.objectives import Preference
from serving.admission import AdmissionGate, Overloaded, Ticket
from serving.auth import AuthError, KeyStore, Principal, RateLimited, RateLimiter
from serving.clients import SCORER_TIMEOUT_S, EngineClient, Limiter, ScorerInfo, ScoringClient
from serving.config import Limits, ServeConfig
from serving.crisis_check import CrisisCheck
from serving.db import Repository
from serving.errors import RETRY_AFTER_S, ApiError, db_call
from serving.flagged import FlaggedSessions
from serving.metrics import NO_ADAPTER, LocalExport, MetricsExport, ServingMetrics
from serving.protocol import ChatCompletionRequest, ChatCompletionResponse, ModelCard, ModelInfo, ModelList, \
    parse_chat_request
from serving.replies import Replies
from serving.router import PreferenceRouter
from serving.sessions import Sessions
from serving.streaming import FallbackRejected, GatedStream, GateSetup, Generation
from serving.turn import Turn

__all__ = ["RETRY_AFTER_S", "ApiError", "ChatDeps", "ChatService", "EngineClient", "Limiter", "ScorerInfo",
           "ScoringClient", "Turn", "parse_model"]

log = logging.getLogger("attune.chat")
HEALTH_TIMEOUT_S = 5.0
ADMIN_STATUS_TIMEOUT_S = 30.0
"""How long GET /v1/admin/status waits for Serve's status and the LLM and scorer replicas' own (memory, adapters).
An operator asks for it most when the machine is busy: on a loaded 2-core machine (AVX2 only, vLLM at 8-10 tok/s)
a burst test's status call took over HEALTH_TIMEOUT_S; clients of the endpoint (`attune status`) wait 60 s."""


@dataclass
class ChatDeps:
    """The collaborators of a ChatService; operator hooks are optional (None: the endpoint answers 404)."""

    repo: Repository
    engine: EngineClient
    scorer: ScoringClient
    store: AdapterStore
    router: PreferenceRouter
    metrics: ServingMetrics = field(default_factory=ServingMetrics)
    keys: KeyStore | None = None
    limiter: Limiter | None = None
    admin_limiter: Limiter | None = None
    export: MetricsExport | None = None
    """What /metrics renders (None: this process's registry alone; serving.ingress_state: every ingress replica)."""
    engine_status: Callable[[], Awaitable[dict]] | None = None
    faults: Callable[[dict], Awaitable[dict]] | None = None


class ChatService:
    """Serves the OpenAI-compatible chat API and Attune's sessions for one ingress replica."""

    def __init__(self, config: ServeConfig, deps: ChatDeps):
        self.config, self.deps = config, deps
        self.repo, self.engine, self.scorer = deps.repo, deps.engine, deps.scorer
        self.metrics = deps.metrics
        self.sessions = Sessions(config, deps.repo, deps.store, deps.router, deps.metrics)
        self.flagged = FlaggedSessions(deps.repo)
        self.keys = deps.keys or KeyStore(deps.repo)
        # `is None`, not `or`: a RateLimiter with no buckets yet has len() 0 and would be falsy.
        self.limiter = deps.limiter if deps.limiter is not None else RateLimiter(config.limits.requests_per_minute)
        self.admin_limiter = (deps.admin_limiter if deps.admin_limiter is not None
                              else RateLimiter(config.limits.admin_requests_per_minute))
        self.export = deps.export or LocalExport(self.metrics)
        lim = config.limits
        self.admission = AdmissionGate(lim.max_in_flight, lim.max_queue, lim.queue_timeout_s)
        self.metrics.in_flight.set_function(lambda: self.admission.in_flight)
        self.gating: GateSetup | None = None
        self._start_lock = asyncio.Lock()
        # The chat pipeline's later stages (the first ones: admit, parse, admission, self.sessions.open_turn).
        self.crisis_check = CrisisCheck(deps.scorer, deps.repo, self.sessions, deps.metrics)
        self.generation = Generation(deps.engine, deps.scorer, deps.store, deps.router, self.sessions, deps.repo,
                                     deps.metrics)
        self.replies = Replies(config, deps.repo, deps.metrics)

    # ------------------------------------------------------------ startup and health
    async def ensure_started(self) -> GateSetup:
        """Fetch the scorer's thresholds once, build the gate and check the fallback reply against it (503 until
        the scorer answers; 503 `fallback_rejected`, also on /healthz, while the fallback would fail the gate)."""
        if self.gating is not None:
            return self.gating
        async with self._start_lock:
            if self.gating is None:
                try:
                    info = await asyncio.wait_for(self.scorer.info(), HEALTH_TIMEOUT_S * 6)
                except Exception as e:
                    raise self._not_ready(e) from None
                gating = GateSetup.build(self.config, info)
                try:
                    await asyncio.wait_for(gating.verify_fallback(self.scorer.score), SCORER_TIMEOUT_S)
                except FallbackRejected as e:
                    log.error("refusing to start: %s", e)
                    raise ApiError(503, str(e), type="server_error", code="fallback_rejected") from None
                except Exception as e:
                    raise self._not_ready(e) from None
                self.gating = gating
                self.metrics.safety_threshold.set(self.gating.gate.threshold)
                log.info("gate ready: safety threshold %.3f (%s), crisis threshold %.3f",
                         self.gating.gate.threshold, self.gating.threshold_source, self.gating.detector.threshold)
        return self.gating

    @staticmethod
    def _not_ready(err: Exception) -> ApiError:
        return ApiError(503, f"the scorer is not ready ({type(err).__name__}); retry shortly", type="server_error",
                        code="not_ready", headers={"Retry-After": str(RETRY_AFTER_S)})

    async def health(self) -> tuple[bool, dict[str, str]]:
        """(ready, {part: "ok" or why not}) for engine, scorer and database."""
        async def check(name: str, coro) -> tuple[str, str]:
            try:
                result = await asyncio.wait_for(coro, HEALTH_TIMEOUT_S)
                return name, "ok" if result is not False else "not ready"
            except Exception as e:
                return name, f"{type(e).__name__}: {str(e)[:120]}"

        async def scorer() -> None:
            await self.ensure_started()
            await self.scorer.check_health()

        parts = dict(await asyncio.gather(check("engine", self.engine.check_health()), check("scorer", scorer()),
                                          check("database", db_call(self.repo.ping))))
        return all(v == "ok" for v in parts.values()), parts

    async def _admit_generation(self) -> Ticket:
        try:
            return await self.admission.enter()
        except Overloaded as e:
            raise ApiError(503, f"the service is at capacity ({e}); retry after {RETRY_AFTER_S} s",
                           type="server_error", code="overloaded",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None

    # ------------------------------------------------------------ keys and limits
    async def admit(self, authorization: str | None, *, operator: bool = False) -> Principal:
        try:
            principal = self.keys.cached(authorization) or await db_call(self.keys.authenticate, authorization)
        except AuthError as e:
            raise ApiError(401, str(e), type="authentication_error", code="invalid_api_key") from None
        if operator and not principal.is_operator:
            raise ApiError(403, "this endpoint needs an operator key; use the key in <data_dir>/operator_key "
                           "or $ATTUNE_OPERATOR_KEY", type="permission_error", code="operator_only")
        # Operator administration has a budget of its own: it never spends (or waits on) the chat budget.
        limiter, per_minute = ((self.admin_limiter, self.config.limits.admin_requests_per_minute) if operator
                               else (self.limiter, self.config.limits.requests_per_minute))
        try:
            await limiter.acquire(principal.key_id)
        except RateLimited as e:
            raise ApiError(429, f"{e}: this key may make {per_minute} {'admin ' if operator else ''}requests per "
                           "minute; wait for Retry-After seconds or ask the operator for a higher limit",
                           type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": e.retry_after_header}) from None
        return principal

    # ------------------------------------------------------------ chat completions
    async def chat_completion(self, authorization: str | None, read_body: Callable[[], Awaitable[bytes]],
                              ) -> ChatCompletionResponse | AsyncIterator[str]:
        """The whole endpoint: a response, or (stream=true) an iterator of SSE events. Raises ApiError. Every stage
        of a chat turn is called from here, in order; streaming and not differ only in generating and responding."""
        started, label, stream = time.perf_counter(), NO_ADAPTER, False
        try:
            principal = await self.admit(authorization)
            self.metrics.observe_stage("admitted", started)
            req = parse_turn_request(await read_body(), self.config.limits, principal)
            stream = bool(req.stream)
            ticket: Ticket | None = await self._admit_generation()
            try:
                gating = await self.ensure_started()
                turn = await self.sessions.open_turn(principal, req, started)
                # Generation starts before a new session is stored and beside the crisis check, held until both are
                # done (serving.streaming.EarlyStart), unless the rules alone already send the turn to the crisis
                # protocol or the safety path.
                if not self.crisis_check.diverted_by_rules(turn, gating.detector, gating.window):
                    self.generation.start_early(turn)
                try:
                    await self.sessions.store_new(turn)
                    self.metrics.observe_stage("session", started)
                    await self.crisis_check(turn, gating.detector, gating.window)
                except BaseException:
                    await self.generation.settle_early(turn, check_failed=True)
                    raise
                self.metrics.observe_stage("crisis_checked", started)
                await self.generation.settle_early(turn)
                label = turn.label
                if stream:  # generates, persists and responds as the client reads
                    events = await GatedStream(self.generation, self.replies, turn, gating, ticket).start()
                    ticket = None  # the stream releases it when it ends, however it ends
                    return events
                gated = await self.generation.reply(turn, gating)
                info = await self.replies.finish(turn, gated, gating.crisis, stream=False)
                return self.replies.response(turn, gated, info)
            finally:
                if ticket is not None:
                    ticket.release()
        except ApiError as e:
            self.metrics.requests.labels(label, str(e.status), str(stream).lower()).inc()
            raise
        except Exception:
            self.metrics.requests.labels(label, "500", str(stream).lower()).inc()
            raise

    # ------------------------------------------------------------ models and operators
    async def models(self) -> ModelList:
        manifest = await asyncio.to_thread(self.deps.store.manifest)
        cards = [ModelCard(id=self.config.base_model, attune=ModelInfo(kind="base"))]
        cards += [ModelCard(id=a.id, attune=ModelInfo(kind="adapter", weights=a.weights))
                  for a in sorted(manifest.adapters, key=lambda a: a.id)]
        cards += [ModelCard(id=name, attune=ModelInfo(kind="profile", weights=Preference(w).as_dict()))
                  for name, w in sorted(manifest.profiles.items())]
        return ModelList(data=cards)

    async def admin_status(self) -> dict:
        gating = await self.ensure_started()
        engine: dict = {}
        if self.deps.engine_status is not None:
            try:
                engine = await asyncio.wait_for(self.deps.engine_status(), ADMIN_STATUS_TIMEOUT_S)
            except TimeoutError:
                engine = {"error": f"TimeoutError: Serve's controller or the LLM or scorer replicas did not answer "
                                   f"within {ADMIN_STATUS_TIMEOUT_S:g} s; see `serve status` and the replicas' logs"}
            except Exception as e:
                engine = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        return {"object": "attune.status", "engine": engine, "admission": self.admission.stats(),
                "adapters": await asyncio.to_thread(self.deps.store.ids),
                "gate": {"safety_threshold": gating.gate.threshold, "threshold_source": gating.threshold_source,
                         "calibration": gating.calibration, "crisis_threshold": gating.detector.threshold,
                         "max_regenerations": gating.gate.max_regenerations,
                         "decisions": await self.export.gate_counts()},
                "crisis_sessions": await db_call(self.repo.count_sessions, None, True),
                "merges_built": self.deps.router.merges_built}

    async def create_key(self, body: dict) -> dict:
        tenant, role = body.get("tenant"), body.get("role", "patient-app")
        if not isinstance(tenant, str) or not 1 <= len(tenant) <= 64:
            raise ApiError(422, "tenant: give the tenant id as a string of 1-64 characters", param="tenant")
        try:
            key = await db_call(self.keys.create_key, tenant, role, str(body.get("label", ""))[:64])
        except ValueError as e:
            raise ApiError(422, f"role: {e}", param="role") from None
        return {"object": "api_key", "tenant": tenant, "role": role, "key": key}

    async def inject_faults(self, body: dict) -> dict:
        if self.deps.faults is None:
            raise ApiError(404, "fault injection is off; start the service with ATTUNE_TEST_HOOKS=1 to use it",
                           code="not_found")
        return await self.deps.faults(body)


def parse_turn_request(body: bytes, limits: Limits, principal: Principal) -> ChatCompletionRequest:
    """The chat request (422 naming the field); attune_options only from an operator key (403)."""
    try:
        req = parse_chat_request(body, limits)
    except ValidationError as e:
        raise ApiError.from_validation(e) from None
    if req.attune_options is not None and not principal.is_operator:
        raise ApiError(403, "attune_options (pinning an adapter, turning the gate off) needs an operator "
                       "key; remove it: patient requests are always routed by preference and gated",
                       type="permission_error", param="attune_options", code="operator_only")
    return req


def parse_model(model: type, body: bytes):
    """A JSON body as `model` (a pydantic model or a plain type such as dict), or a 422 ApiError naming the field."""
    try:
        return TypeAdapter(model).validate_json(body or b"{}")
    except ValidationError as e:
        raise ApiError.from_validation(e) from None
