"""The chat logic behind the API (vLLM's `serving.py` role): keys and limits, the crisis protocol and the output
gate around generation, with sessions and their routing in serving.sessions and the flagged sessions operators
review in serving.flagged. Knows nothing about HTTP frameworks or Ray: the engine and the scorer are clients behind
small protocols, and every rejection is an OpenAI-shaped `ApiError`.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Protocol

from pydantic import TypeAdapter, ValidationError

from adapters.registry import AdapterStore
from alignment.objectives import Preference
from alignment.prompts import SYSTEM_PROMPT
from serving.admission import AdmissionGate, Overloaded, Ticket
from serving.auth import AuthError, KeyStore, Principal, RateLimited, RateLimiter
from serving.config import ServeConfig
from serving.db import ChatSession, Repository
from serving.engine import AdapterRefused, GenerationRequest, PromptTooLong, Usage
from serving.errors import RETRY_AFTER_S, ApiError, db_call
from serving.flagged import FlaggedSessions
from serving.metrics import NO_ADAPTER, LocalExport, MetricsExport, ServingMetrics
from serving.protocol import (AttuneInfo, ChatCompletionRequest, ChatCompletionResponse, ChatMessage, Choice,
                              ModelCard, ModelInfo, ModelList, Usage as WireUsage, parse_chat_request)
from serving.router import PreferenceRouter
from serving.sessions import Sessions
from serving.safety import window_texts
from serving.streaming import FallbackRejected, GatedStream, GateSetup, Gated, ScorerInfo, gate_reply

__all__ = ["RETRY_AFTER_S", "ApiError", "ChatDeps", "ChatService", "EngineClient", "ScorerInfo", "ScoringClient",
           "Turn", "parse_model"]

log = logging.getLogger("attune.chat")
CHARS_PER_TOKEN = 3
"""Conservative characters per token for trimming history without a tokenizer (the engine checks exactly)."""
MAX_HISTORY = 40
HEALTH_TIMEOUT_S = 5.0
SCORER_TIMEOUT_S = 15.0
"""A scorer call that takes longer counts as failed: the gate fails closed, the crisis rules decide alone."""


class EngineClient(Protocol):
    """What the chat logic needs from an engine (serving.engine.LLMEngine, or a client of the LLM deployment)."""

    def stream(self, req: GenerationRequest) -> AsyncIterator[str]: ...

    async def abort(self, request_id: str) -> None: ...

    async def check_health(self) -> None: ...

    def usage(self, request_id: str) -> Usage | None: ...


class ScoringClient(Protocol):
    """Six scores for a (message, reply), a crisis probability for a message, and the calibrated thresholds."""

    async def score(self, prompt: str, reply: str) -> dict[str, float]: ...

    async def crisis(self, message: str) -> float: ...

    async def info(self) -> ScorerInfo: ...

    async def check_health(self) -> None:
        """Raises unless the scorer can score now."""


class Limiter(Protocol):
    """A per-key rate limit: auth.RateLimiter (one process) or rate_limits.SharedRateLimiter (every replica)."""

    async def acquire(self, key) -> None:
        """Spend one request for `key`; raises auth.RateLimited when none is left."""


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


@dataclass
class Turn:
    """One admitted chat request after the patient's message is stored, before generation."""

    request_id: str
    request: ChatCompletionRequest
    principal: Principal
    session: ChatSession
    adapter_id: str | None
    messages: list[dict]
    prompt: str
    crisis: bool
    started: float
    locale: str
    gate: bool = True
    """False only when an operator sent attune_options.gate = false: no output gate. Crisis detection always runs."""
    near: bool = False
    """Near the crisis line (or asking about means, concealment, dangerous acts): the safety path answers."""
    flagged_before: bool = False
    """The session was flagged by an earlier turn: the protocol's resources stay in view."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"

    @property
    def label(self) -> str:
        return self.adapter_id or NO_ADAPTER


class ChatService:
    """Serves the OpenAI-compatible chat API and Attune's sessions for one ingress replica."""

    def __init__(self, config: ServeConfig, deps: ChatDeps):
        self.config, self.deps = config, deps
        self.repo, self.engine, self.scorer = deps.repo, deps.engine, deps.scorer
        self.metrics = deps.metrics
        self.sessions = Sessions(config, deps)
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
        self._background: set[asyncio.Task] = set()

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

    def spawn(self, coro) -> asyncio.Task:
        """Run cleanup after a cancelled request without awaiting it (the caller may be cancelled again)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._cleaned_up)
        return task

    def _cleaned_up(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("cleanup after a request failed: %s", type(task.exception()).__name__)

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
            principal = await db_call(self.keys.authenticate, authorization)
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
        """The whole endpoint: a response, or (stream=true) an iterator of SSE events. Raises ApiError."""
        started, label, stream = time.perf_counter(), NO_ADAPTER, False
        try:
            principal = await self.admit(authorization)
            try:
                req = parse_chat_request(await read_body(), self.config.limits)
            except ValidationError as e:
                raise ApiError.from_validation(e) from None
            if req.attune_options is not None and not principal.is_operator:
                raise ApiError(403, "attune_options (pinning an adapter, turning the gate off) needs an operator "
                               "key; remove it: patient requests are always routed by preference and gated",
                               type="permission_error", param="attune_options", code="operator_only")
            stream = bool(req.stream)
            ticket: Ticket | None = await self._admit_generation()
            try:
                turn = await self.prepare(principal, req, started)
                label = turn.label
                if stream:
                    events, ticket = await GatedStream(self, turn, ticket).start(), None  # released when it ends
                    return events
                return await self.complete(turn)
            finally:
                if ticket is not None:
                    ticket.release()
        except ApiError as e:
            self.metrics.requests.labels(label, str(e.status), str(stream).lower()).inc()
            raise
        except Exception:
            self.metrics.requests.labels(label, "500", str(stream).lower()).inc()
            raise

    async def prepare(self, principal: Principal, req: ChatCompletionRequest, started: float) -> Turn:
        """Session, route (or an operator's pinned adapter), the stored patient message, then the crisis check.
        A request that repeats its session's last message, which got no reply (the engine, the database or the
        connection failed first), is a retry of that turn: the stored message is reused, not stored twice."""
        gating = await self.ensure_started()
        options = req.attune_options
        pin = options is not None and options.adapter is not None
        pinned = await self.sessions.pinned(options.adapter) if pin else None
        session, adapter_id = await self.sessions.session_for(principal, req)
        if pin:
            adapter_id = pinned
        text = req.messages[-1].content
        history = await db_call(self.repo.list_messages, session.id, MAX_HISTORY + 1)
        last = history[-1] if history else None
        if req.session_id is None or last is None or (last.role, last.content) != ("user", text):
            history = [*history, await db_call(self.repo.add_message, session.id, "user", text)][-(MAX_HISTORY + 1):]
        messages = self._engine_messages([{"role": m.role, "content": m.content} for m in history],
                                         req.max_tokens)
        turn = Turn(f"chatcmpl-{uuid.uuid4().hex}", req, principal, session, adapter_id, messages, text, False,
                    started, session.locale or self.config.default_locale, gate=options is None or options.gate,
                    flagged_before=session.flagged)
        if not turn.gate:
            log.info("output gate off for %s (operator request); crisis detection still runs", turn.request_id)
        users = [m.content for m in history if m.role == "user"]
        # A new session's imported history: every patient turn is checked, not only the recent window.
        imported = users[:-1] if req.session_id is None else []
        await self._crisis_check(turn, gating, imported + window_texts(users, gating.window))
        return turn

    async def _crisis_check(self, turn: Turn, gating: GateSetup, texts: list[str]) -> None:
        """The crisis detector over a window of the session's recent patient turns (rules as a second layer). A
        crisis flags the session and answers with the protocol; a message near the line (or asking about means,
        concealment or dangerous acts) is answered from the safety path."""
        texts = list(dict.fromkeys(texts))

        async def prob(t: str) -> float | None:
            try:
                return await asyncio.wait_for(self.scorer.crisis(t), SCORER_TIMEOUT_S)
            except Exception as e:
                self.metrics.scorer_errors.inc()
                log.warning("crisis detector failed (%s); rules decide alone for %s", type(e).__name__,
                            turn.request_id)
                return None

        assessment = gating.detector.assess_window(texts, await asyncio.gather(*(prob(t) for t in texts)))
        if assessment.crisis:
            turn.crisis = True
            turn.adapter_id = await self.sessions.safety_adapter()
            detector = "both" if assessment.by_rules and assessment.by_model else (
                "rules" if assessment.by_rules else "model")
            self.metrics.crisis.labels(detector).inc()
            await db_call(self.repo.flag_session, turn.session.id, detector=detector, categories=assessment.by_rules)
            await db_call(self.repo.add_audit, "crisis_protocol", tenant_id=turn.principal.tenant_id,
                          session_id=turn.session.id,
                          detail={"request_id": turn.request_id, "rules": assessment.by_rules,
                                  "by_model": assessment.by_model, "prob": assessment.prob, "texts": len(texts),
                                  "adapter": turn.adapter_id, "locale": turn.locale})
            log.info("crisis protocol for %s (detector %s)", turn.request_id, detector)
        elif assessment.near:
            turn.near = True
            turn.adapter_id = await self.sessions.safety_adapter()
            log.info("safety path for %s (near the crisis line: %s)", turn.request_id,
                     ",".join(assessment.near_rules) or "detector")

    def _engine_messages(self, history: list[dict], max_tokens: int) -> list[dict]:
        """System prompt + as much recent history as fits + the new message (always kept)."""
        budget = (self.config.engine.max_model_len - max_tokens) * CHARS_PER_TOKEN - len(SYSTEM_PROMPT)
        new, kept = history[-1], []
        budget -= len(new["content"])
        for m in reversed(history[:-1]):
            if m["role"] not in ("user", "assistant") or len(m["content"]) > budget:
                break
            kept.append(m)
            budget -= len(m["content"])
        kept.reverse()
        while kept and kept[0]["role"] != "user":
            kept.pop(0)
        return [{"role": "system", "content": SYSTEM_PROMPT}, *kept, new]

    async def score(self, prompt: str, reply: str) -> dict[str, float]:
        """The six scores, or {} when the scorer fails (the gate then fails closed)."""
        try:
            return dict(await asyncio.wait_for(self.scorer.score(prompt, reply), SCORER_TIMEOUT_S))
        except Exception as e:
            self.metrics.scorer_errors.inc()
            log.warning("scorer failed (%s); the gate treats the reply as unscored", type(e).__name__)
            return {}

    async def complete(self, turn: Turn) -> ChatCompletionResponse:
        """Generate, score, gate, store the reply after gating, respond."""
        gated = await gate_reply(self, turn)
        info = await self.finish(turn, gated, stream=False)
        return ChatCompletionResponse(
            id=turn.request_id, model=turn.request.model,
            choices=[Choice(message=ChatMessage(role="assistant", content=gated.text),
                            finish_reason=gated.finish_reason)],
            usage=WireUsage(prompt_tokens=turn.prompt_tokens, completion_tokens=turn.completion_tokens,
                            total_tokens=turn.prompt_tokens + turn.completion_tokens),
            attune=info)

    async def finish(self, turn: Turn, gated: Gated, *, stream: bool) -> AttuneInfo:
        """Store the reply as the patient saw it, record the gate and the request; the `attune` extension."""
        kind = "crisis" if turn.crisis else gated.kind
        await db_call(self.repo.add_message, turn.session.id, "assistant", gated.text, adapter_id=gated.adapter_id,
                  scores=gated.scores or None, gate=kind)
        if gated.kind in ("regenerated", "fallback", "truncated"):
            await db_call(self.repo.add_audit, f"gate_{gated.kind}", tenant_id=turn.principal.tenant_id,
                      session_id=turn.session.id, detail={"request_id": turn.request_id, "attempts": gated.attempts,
                                                          "reasons": gated.reasons[:5], "crisis": turn.crisis})
        self.metrics.observe_gate(kind)
        self.metrics.requests.labels(turn.label, "200", str(stream).lower()).inc()
        self.metrics.latency.labels(turn.label, str(stream).lower()).observe(time.perf_counter() - turn.started)
        return AttuneInfo(adapter=gated.adapter_id or self.config.base_model, scores=gated.scores, gate=kind,
                          crisis=turn.crisis, session_id=turn.session.id,
                          crisis_resources=self.gating.crisis.reply(turn.locale).resources
                          if turn.flagged_before and not turn.crisis else None)

    async def store_partial(self, turn: Turn, text: str, adapter_id: str | None) -> None:
        """What a patient saw of a stream that did not finish (client gone, engine failed)."""
        await db_call(self.repo.add_message, turn.session.id, "assistant", text, adapter_id=adapter_id,
                  gate="interrupted")

    def engine_failed(self, turn: Turn, err: Exception) -> ApiError:
        """The 503 (or 400 for a too-long prompt) that replaces a failed generation; the patient's message stays."""
        self.metrics.engine_errors.labels(turn.label).inc()
        if isinstance(err, PromptTooLong):
            return ApiError(400, str(err), param="messages", code="context_length_exceeded")
        refused = err.adapter_id if isinstance(err, AdapterRefused) else None
        log.error("engine failed for %s: %s%s", turn.request_id, type(err).__name__,
                  f" (adapter {refused} withdrawn from routing: it failed its integrity check)" if refused else "")
        self.spawn(db_call(self.repo.add_audit, "adapter_refused" if refused else "engine_error",
                       tenant_id=turn.principal.tenant_id, session_id=turn.session.id,
                       detail={"request_id": turn.request_id, "error": type(err).__name__, "adapter": refused}))
        if refused is not None:
            # A replica refused the adapter's files (changed after their checksums were recorded, or not in the
            # manifest): withdraw it from routing, so that the retry re-routes the session to a verified adapter.
            self.deps.router.quarantine(refused)
            return ApiError(503, f"the adapter for this session failed its integrity check and was withdrawn; your "
                            f"message was saved in session {turn.session.id}: retry with that session_id after "
                            f"{RETRY_AFTER_S} s and the nearest verified adapter answers", type="server_error",
                            code="adapter_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})
        return ApiError(503, f"the model failed to generate a reply; your message was saved in session "
                        f"{turn.session.id}: retry with that session_id after {RETRY_AFTER_S} s", type="server_error",
                        code="engine_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})

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
                engine = await asyncio.wait_for(self.deps.engine_status(), HEALTH_TIMEOUT_S)
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


def parse_model(model: type, body: bytes):
    """A JSON body as `model` (a pydantic model or a plain type such as dict), or a 422 ApiError naming the field."""
    try:
        return TypeAdapter(model).validate_json(body or b"{}")
    except ValidationError as e:
        raise ApiError.from_validation(e) from None
