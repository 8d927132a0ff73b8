"""The chat pipeline's "generate under the gate" stage (`Generation`; streams: `GatedStream`): engine deltas (stop
strings, token usage), whole replies gated with bounded regeneration then a safe fallback, and SSE streams released
sentence by sentence, each scored before release; a crisis turn gets the vetted crisis reply (serving.crisis_reply)
and nothing generated. No reply mixes generated text with the fallback, and none cut by the token limit ends
mid-sentence. Also the gate's setup: the safety threshold from config, or the calibrated one (reward model v2: its
safety classifier's, on rm-val), and the fallback reply's check.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Sequence

from adapters.registry import AdapterStore
from serving.admission import Ticket
from serving.clients import SCORER_TIMEOUT_S, EngineClient, ScorerInfo, ScoringClient
from serving.config import SCORE_MAX, SCORE_MIN, ServeConfig
from serving.crisis_reply import CRISIS_REPLY_ID, CrisisReply, CrisisText
from serving.db import Repository
from serving.engine import AdapterRefused, EngineError, GenerationRequest, PromptTooLong
from serving.errors import RETRY_AFTER_S, ApiError, db_call
from serving.metrics import NO_ADAPTER, ServingMetrics
from serving.protocol import ChatCompletionChunk, ChunkChoice, DeltaMessage, SSE_DONE, Usage, sse
from serving.replies import Replies
from serving.router import PreferenceRouter
from serving.safety import CrisisDetector, GateDecision, SafetyGate, SentenceBuffer, whole_sentences
from serving.sessions import Sessions
from serving.turn import Gated, Turn

log = logging.getLogger("attune.streaming")
chat_log = logging.getLogger("attune.chat")


def calibrate_safety_threshold(pairs: Sequence[tuple[float, int]]) -> tuple[float, dict]:
    """(threshold, detail) from (safety score, human safety rating) of seed val replies: the threshold that best
    separates replies rated <= 2 from those rated >= 4 (Youden's J; the middle of the best candidates), or,
    with no rated-unsafe reply, the 5th percentile of the safe ones. Clipped to the 1-5 scale."""
    safe = sorted(s for s, r in pairs if r >= 4)
    unsafe = sorted(s for s, r in pairs if r <= 2)
    if not safe:
        raise ValueError("no replies rated safety >= 4 to calibrate on; check the val split")
    if unsafe:
        values = sorted(set(safe + unsafe))
        cands = [(a + b) / 2 for a, b in zip(values, values[1:])] or values

        def j(t: float) -> float:
            return sum(u < t for u in unsafe) / len(unsafe) + sum(s >= t for s in safe) / len(safe) - 1

        best = max(j(t) for t in cands)
        top = [t for t in cands if j(t) >= best - 1e-12]
        threshold, method = top[len(top) // 2], "youden"
    else:
        threshold, method = safe[int(0.05 * (len(safe) - 1))], "p05_safe"
    threshold = min(max(threshold, SCORE_MIN), SCORE_MAX)
    detail = {"threshold": round(threshold, 4), "method": method, "split": "val", "n_safe": len(safe),
              "n_unsafe": len(unsafe),
              "unsafe_caught": round(sum(u < threshold for u in unsafe) / max(len(unsafe), 1), 4),
              "safe_passed": round(sum(s >= threshold for s in safe) / len(safe), 4)}
    return float(threshold), detail


FALLBACK_PROBES = ("I get nervous before presentations.", "Work has been overwhelming lately.",
                   "My sister and I keep arguing about money.", "I haven't been sleeping well this week.")
"""Ordinary opening messages after which the fallback reply must pass the gate before the service starts."""
NO_FULL_SENTENCE = "no full sentence within max_tokens"


class FallbackRejected(RuntimeError):
    """The fallback reply would not pass the gate: a service that starts with it could answer with a reply that
    its own gate refuses."""


@dataclass
class GateSetup:
    """The gate, crisis detector and crisis reply, with thresholds resolved from config and scorer."""

    gate: SafetyGate
    detector: CrisisDetector
    crisis: CrisisReply
    threshold_source: str
    calibration: dict
    window: int = 1
    """Recent patient turns the crisis detector reads."""
    strict: SafetyGate | None = None
    """The safety path's gate (messages near the crisis line): threshold halfway from `gate`'s to the top of the
    scale, i.e. with the classifier, half the P(unsafe) the ordinary gate allows."""

    def __post_init__(self):
        if self.strict is None:
            g = self.gate
            self.strict = SafetyGate((g.threshold + SCORE_MAX) / 2, g.max_regenerations, g.output_rules, g.fallback_reply)

    def gate_for(self, turn: Turn) -> SafetyGate:
        return self.strict if turn.near else self.gate

    @classmethod
    def build(cls, config: ServeConfig, info: ScorerInfo) -> "GateSetup":
        if config.safety_threshold is not None:
            threshold, source = config.safety_threshold, "config"
        elif info.safety_threshold is not None:
            threshold, source = info.safety_threshold, f"calibrated on {info.calibration.get('split', 'val')}"
        else:
            raise ValueError("no safety threshold: set safety_threshold or give the scorer a calibration")
        resources = {loc: [r.model_dump() for r in rs] for loc, rs in config.crisis_resources.items()}
        detector = CrisisDetector(scorer_threshold=info.crisis_threshold, near_threshold=info.crisis_near_threshold)
        return cls(SafetyGate(threshold, config.max_regenerations), detector,
                   CrisisReply(resources, default_locale=config.default_locale), source, dict(info.calibration),
                   window=info.crisis_window)

    async def verify_fallback(self, score: Callable[[str, str], Awaitable[dict[str, float]]]) -> None:
        """Raise FallbackRejected, naming the probe, the score and the threshold, unless the fallback reply passes
        the gate after every message of FALLBACK_PROBES. A scorer that fails raises its own error."""
        reply = self.gate.fallback_reply
        results = await asyncio.gather(*(score(p, reply) for p in FALLBACK_PROBES))
        for probe, scores in zip(FALLBACK_PROBES, results):
            ok, reasons = self.gate.check_reply(reply, scores.get("safety"))
            if not ok:
                raise FallbackRejected(f"the fallback reply fails the safety gate ({'; '.join(reasons)}) after "
                                       f"{probe!r}; rewrite FALLBACK_REPLY or check safety_threshold")

    def crisis_reply(self, turn: Turn) -> CrisisText:
        """The crisis reply for the turn's locale, worded unlike the session's latest crisis reply."""
        return self.crisis.reply(turn.locale, [m["content"] for m in turn.messages if m["role"] == "assistant"])


class EarlyStart:
    """A turn's first attempt, started while the crisis check runs so that the check adds nothing to the time to
    the first token. Its first delta is awaited in a task and held: nothing of it is read until the check has
    passed (Generation.opening); `discard` aborts it (whether or not a delta came) and takes its tokens out of the
    turn's usage."""

    def __init__(self, source: AsyncIterator[str], adapter_id: str | None):
        self.source, self.adapter_id = source, adapter_id
        self.first = asyncio.ensure_future(anext(source, None))
        """The first delta (None: the reply is empty), or the attempt's ApiError."""
        self.arrived: float | None = None
        """When the first delta came (perf_counter)."""
        self.first.add_done_callback(self._arrived)

    def _arrived(self, _) -> None:
        self.arrived = time.perf_counter()

    async def discard(self, turn: Turn) -> None:
        if not self.first.done():
            self.first.cancel()
        await asyncio.wait([self.first])
        if not self.first.cancelled():
            self.first.exception()  # retrieved: a discarded attempt's failure is not the turn's
        await self.source.aclose()
        turn.prompt_tokens = turn.completion_tokens = 0
        turn.finish_reason = "stop"


def decide(gate: SafetyGate, scores: dict[str, float], attempt: int, text: str) -> GateDecision:
    """The gate's decision; an empty reply counts as a failure too."""
    if not text.strip():
        action = "regenerate" if attempt < gate.max_regenerations else "fallback"
        return GateDecision(action, attempt, scores.get("safety"), ["empty reply"])
    return gate.decide(scores.get("safety"), attempt, text)


class Generation:
    """The chat pipeline's "generate under the gate" stage: engine requests and their deltas (stop strings, token
    usage; failures become ApiError), the six scores of a reply (none when the scorer fails: the gate fails closed),
    and whole replies gated (`reply`; streams: GatedStream). Cleanup after a cancelled request runs in the background
    (`spawn`)."""

    def __init__(self, engine: EngineClient, scorer: ScoringClient, store: AdapterStore, router: PreferenceRouter,
                 sessions: Sessions, repo: Repository, metrics: ServingMetrics):
        self.engine, self.scorer, self.store, self.router = engine, scorer, store, router
        self.sessions, self.repo, self.metrics = sessions, repo, metrics
        self.background: set[asyncio.Task] = set()

    def spawn(self, coro) -> asyncio.Task:
        """Run cleanup after a cancelled request without awaiting it (the caller may be cancelled again)."""
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self._cleaned_up)
        return task

    def _cleaned_up(self, task: asyncio.Task) -> None:
        self.background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            chat_log.warning("cleanup after a request failed: %s", type(task.exception()).__name__)

    async def score(self, prompt: str, reply: str) -> dict[str, float]:
        """The six scores, or {} when the scorer fails (the gate then fails closed)."""
        try:
            return dict(await asyncio.wait_for(self.scorer.score(prompt, reply), SCORER_TIMEOUT_S))
        except Exception as e:
            self.metrics.scorer_errors.inc()
            chat_log.warning("scorer failed (%s); the gate treats the reply as unscored", type(e).__name__)
            return {}

    def request(self, turn: Turn, adapter_id: str | None, attempt: int) -> GenerationRequest:
        """Regenerations sample (temperature >= 0.7, a seed per attempt) so that they can differ. A first attempt
        restarted on the safety adapter gets an engine request id of its own (the aborted one may still be ending)."""
        req = turn.request
        temperature = 0.7 if req.temperature is None else req.temperature
        return GenerationRequest(
            f"{turn.request_id}-{attempt}{'' if attempt else turn.restart_tag}", turn.messages, adapter_id,
            str(self.store.path(adapter_id)) if adapter_id else None, max_tokens=req.max_tokens,
            temperature=max(temperature, 0.7) if attempt else temperature,
            top_p=0.95 if req.top_p is None else req.top_p, seed=attempt if attempt else None)

    async def deltas(self, turn: Turn, adapter_id: str | None, attempt: int) -> AsyncIterator[str]:
        """The engine's text deltas, cut before the first stop string (text that could begin one is held back until
        it is known not to); engine failures become ApiError (503). Closing this early aborts the engine request.
        Sets turn.finish_reason ("stop" or "length") and adds the attempt's tokens to the turn's usage."""
        greq = self.request(turn, adapter_id, attempt)
        label, stops, text, sent, done = adapter_id or NO_ADAPTER, turn.request.stop or [], "", 0, False
        hold = max((len(s) for s in stops), default=1) - 1
        turn.finish_reason = "stop"
        it = self.engine.stream(greq)
        try:
            async for delta in it:
                text += delta
                cut = min((i for i in (text.find(s, max(0, sent - hold)) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    if cut > sent:
                        yield text[sent:cut]
                    return
                if len(text) - hold > sent:
                    yield text[sent:len(text) - hold]
                    sent = len(text) - hold
            done = True
        except (EngineError, PromptTooLong) as e:
            done = True
            raise self.failed(turn, e) from None
        finally:
            if not done:
                # The engine records a request's tokens when its stream closes: read them after that, not before (an
                # early close, when the gate stopped a reply or a stop string cut it, used to count 0 tokens).
                await asyncio.shield(self.spawn(it.aclose()))
            usage = self.engine.usage(greq.request_id)
            if usage is not None:
                turn.prompt_tokens += usage.prompt_tokens
                turn.completion_tokens += usage.completion_tokens
                self.metrics.prompt_tokens.labels(label).inc(usage.prompt_tokens)
                self.metrics.generated_tokens.labels(label).inc(usage.completion_tokens)
                if done and usage.finish_reason in ("stop", "length"):
                    turn.finish_reason = usage.finish_reason
        if sent < len(text):
            yield text[sent:]

    def start_early(self, turn: Turn) -> None:
        """Start the turn's first attempt now, beside the crisis check (turn.early); `settle_early` then keeps or
        discards it."""
        turn.early = EarlyStart(self.deltas(turn, turn.adapter_id, 0), turn.adapter_id)

    async def settle_early(self, turn: Turn, check_failed: bool = False) -> None:
        """After the crisis check: keep the early attempt unless the check failed, found a crisis, or moved the
        turn to another adapter (the safety path); a discarded one is aborted and restarts under its own id."""
        early = turn.early
        if early is None or not (check_failed or turn.crisis or turn.adapter_id != early.adapter_id):
            return
        turn.early, turn.restart_tag = None, "s"
        await asyncio.shield(self.spawn(early.discard(turn)))

    async def opening(self, turn: Turn) -> tuple[AsyncIterator[str], str | None]:
        """The first attempt's deltas and its first delta (None: the reply is empty), from the early start if it was
        kept. The time to first token is observed here, when the first delta may be released."""
        early, turn.early = turn.early, None
        if early is not None:
            source, first = early.source, await early.first
            self.metrics.observe_stage("engine_first_delta", turn.started, early.arrived)
        else:
            source = self.deltas(turn, turn.adapter_id, 0)
            first = await anext(source, None)
            self.metrics.observe_stage("engine_first_delta", turn.started)
        if first is not None:
            self.metrics.ttft.labels(turn.label).observe(time.perf_counter() - turn.started)
        return source, first

    def failed(self, turn: Turn, err: Exception) -> ApiError:
        """The 503 (or 400 for a too-long prompt) that replaces a failed generation; the patient's message stays."""
        self.metrics.engine_errors.labels(turn.label).inc()
        if isinstance(err, PromptTooLong):
            return ApiError(400, str(err), param="messages", code="context_length_exceeded")
        refused = err.adapter_id if isinstance(err, AdapterRefused) else None
        chat_log.error("engine failed for %s: %s%s", turn.request_id, type(err).__name__,
                       f" (adapter {refused} withdrawn from routing: it failed its integrity check)" if refused else "")
        self.spawn(db_call(self.repo.add_audit, "adapter_refused" if refused else "engine_error",
                           tenant_id=turn.principal.tenant_id, session_id=turn.session.id,
                           detail={"request_id": turn.request_id, "error": type(err).__name__, "adapter": refused}))
        if refused is not None:
            # A replica refused the adapter's files (changed after their checksums were recorded, or not in the
            # manifest): withdraw it from routing, so that the retry re-routes the session to a verified adapter.
            self.router.quarantine(refused)
            return ApiError(503, f"the adapter for this session failed its integrity check and was withdrawn; your "
                            f"message was saved in session {turn.session.id}: retry with that session_id after "
                            f"{RETRY_AFTER_S} s and the nearest verified adapter answers", type="server_error",
                            code="adapter_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})
        return ApiError(503, f"the model failed to generate a reply; your message was saved in session "
                        f"{turn.session.id}: retry with that session_id after {RETRY_AFTER_S} s", type="server_error",
                        code="engine_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})

    async def reply(self, turn: Turn, gating: GateSetup) -> Gated:
        """Generate and gate a whole reply: regenerate with the safety adapter (bounded), else the fallback. A reply
        cut by the token limit is gated as its full sentences (none: the fallback); a crisis turn gets the crisis
        reply."""
        adapter, attempt, reasons = turn.adapter_id, 0, []
        if turn.crisis:
            return Gated(gating.crisis_reply(turn).text, CRISIS_REPLY_ID, {}, "crisis")
        source, first = await self.opening(turn)
        while True:
            if attempt:
                source, first = self.deltas(turn, adapter, attempt), None
            text = "".join([first or "", *[d async for d in source]])
            if not turn.gate:
                return Gated(text, adapter, {}, "off", finish_reason=turn.finish_reason)
            if turn.finish_reason == "length" and not (text := whole_sentences(text)).strip():
                reasons.append(NO_FULL_SENTENCE)
                finish = "length"
                break
            scores = await self.score(turn.prompt, text)
            decision = decide(gating.gate_for(turn), scores, attempt, text)
            if decision.action == "pass":
                return Gated(text, adapter, scores, "regenerated" if attempt else "pass", attempt, reasons,
                             turn.finish_reason)
            reasons += decision.reasons
            if decision.action == "fallback":
                finish = "content_filter"
                break
            attempt += 1
            adapter = await self.sessions.safety_adapter()
        text = gating.gate.fallback_reply
        return Gated(text, adapter, await self.score(turn.prompt, text), "fallback", attempt, reasons, finish)


class GatedStream:
    """One streamed reply. `start` fetches the first delta (so an engine failure is still a 503); `events`
    then releases text sentence by sentence, each scored with everything released before it. A failing
    sentence is never sent: with nothing released yet the safety adapter regenerates (bounded), else the fallback
    is the whole reply; with sentences released the reply ends at the last of them (gate "truncated",
    finish_reason content_filter), never stitched to the fallback. A reply cut by the token limit ends at its last
    full sentence. A crisis turn's first content is the crisis reply, resources first, and nothing is generated.
    The last chunk carries `attune`, then [DONE]. If the client goes away, the engine request is aborted and what
    the patient saw is stored (gate "interrupted"). Any failure after the first event ends the stream with an error
    event (carrying `crisis_resources` on a crisis turn), then (once what was seen is stored) [DONE]. The
    admission ticket is released when the stream ends, however it ends."""

    def __init__(self, generation: Generation, replies: Replies, turn: Turn, gating: GateSetup,
                 ticket: Ticket | None = None):
        self.gen, self.replies, self.turn, self.gating, self.ticket = generation, replies, turn, gating, ticket
        self.adapter, self.attempt, self.kind = turn.adapter_id, 0, "pass"
        self.released, self.scores, self.reasons = "", {}, []
        self.finish: str | None = None
        self.crisis: CrisisText | None = None
        self.created = int(time.time())
        self._source: AsyncIterator[str] | None = None
        self._pending: list[str] = []

    async def start(self) -> AsyncIterator[str]:
        if self.turn.crisis:
            self.crisis = self.gating.crisis_reply(self.turn)
            return self.events()
        self._source, first = await self.gen.opening(self.turn)
        if first is not None:
            self._pending.append(first)
        return self.events()

    def _chunk(self, content: str | None = None, *, role: str | None = None, finish: str | None = None,
               attune=None, usage: Usage | None = None, crisis_resources: str | None = None) -> str:
        choices = [] if usage else [ChunkChoice(delta=DeltaMessage(role=role, content=content), finish_reason=finish)]
        return sse(ChatCompletionChunk(id=self.turn.request_id, created=self.created, model=self.turn.request.model,
                                       choices=choices, attune=attune, usage=usage, crisis_resources=crisis_resources))

    async def _next(self) -> str | None:
        if self._pending:
            return self._pending.pop()
        try:
            return await self._source.__anext__()
        except StopAsyncIteration:
            return None

    async def _check(self, piece: str) -> GateDecision | None:
        text = self.released + piece
        scores = await self.gen.score(self.turn.prompt, text)
        decision = decide(self.gating.gate_for(self.turn), scores, self.attempt, text)
        if decision.action == "pass":
            self.scores = scores
            return None
        self.reasons += decision.reasons
        return decision

    async def _pieces(self) -> AsyncIterator[str]:
        """Text the patient may see, in release order (every delta as it comes when an operator turned the gate off)."""
        if not self.turn.gate:
            self.kind = "off"
            while (delta := await self._next()) is not None:
                yield delta
            return
        while True:
            buffer, failed = SentenceBuffer(), None
            while failed is None and (delta := await self._next()) is not None:
                for sentence in buffer.feed(delta):
                    if (failed := await self._check(sentence)) is not None:
                        break
                    yield sentence
            if failed is None:
                rest = buffer.flush()
                if self.turn.finish_reason == "length":
                    rest = whole_sentences(rest)
                    if not rest.strip() and not self.released:
                        self.reasons.append(NO_FULL_SENTENCE)
                        self.kind, self.finish = "fallback", "length"
                        yield self.gating.gate.fallback_reply
                        return
                if rest.strip() or not self.released:
                    failed = await self._check(rest)
                if failed is None:
                    if rest:
                        yield rest
                    return
            await self._source.aclose()
            if self.released:
                self.kind, self.finish = "truncated", "content_filter"
                return
            if failed.action == "regenerate":
                self.attempt += 1
                self.adapter = await self.gen.sessions.safety_adapter()
                self._source = self.gen.deltas(self.turn, self.adapter, self.attempt)
                continue
            self.kind, self.finish = "fallback", "content_filter"
            yield self.gating.gate.fallback_reply
            return

    async def _crisis_events(self) -> AsyncIterator[str]:
        """The crisis reply as the first content, in one chunk with the role and `crisis_resources`."""
        self.released, self.adapter, self.kind = self.crisis.text, CRISIS_REPLY_ID, "crisis"
        self.gen.metrics.first_release.labels(self.turn.label).observe(time.perf_counter() - self.turn.started)
        yield self._chunk(self.crisis.text, role="assistant", crisis_resources=self.crisis.resources)

    async def _generated_events(self) -> AsyncIterator[str]:
        gen, turn = self.gen, self.turn
        yield self._chunk("", role="assistant")
        async for piece in self._pieces():
            if not self.released:
                gen.metrics.first_release.labels(turn.label).observe(time.perf_counter() - turn.started)
            self.released += piece
            yield self._chunk(piece)
        if self.kind == "pass" and self.attempt:
            self.kind = "regenerated"
        if self.kind == "fallback":
            self.scores = await gen.score(turn.prompt, self.released)

    async def events(self) -> AsyncIterator[str]:
        gen, turn, status = self.gen, self.turn, "499"
        try:
            async for event in (self._crisis_events() if self.crisis else self._generated_events()):
                yield event
            finish = self.finish or turn.finish_reason
            info = await self.replies.finish(turn, Gated(self.released, self.adapter, self.scores, self.kind,
                                                         self.attempt, self.reasons, finish),
                                             self.gating.crisis, stream=True)
            status = "200"
            yield self._chunk(finish=finish, attune=info)
            if turn.request.include_usage:
                yield self._chunk(usage=Usage(prompt_tokens=turn.prompt_tokens, completion_tokens=turn.completion_tokens,
                                              total_tokens=turn.prompt_tokens + turn.completion_tokens))
            yield SSE_DONE
        except Exception as e:
            if not isinstance(e, ApiError):
                log.error("stream %s failed: %s", turn.request_id, type(e).__name__)
                e = ApiError(500, "internal error; retry, and tell the operator if it persists", type="server_error",
                             code="internal_error")
            status = str(e.status)
            body = e.body()
            if self.crisis is not None:  # whatever the client kept of the stream, the resources come with the error
                body["error"]["crisis_resources"] = self.crisis.resources
            yield sse(body)
            if self.released:  # stored before [DONE], so a client that then reads the session finds it
                kept, self.released = gen.spawn(self.replies.store_partial(turn, self.released, self.adapter)), ""
                await asyncio.wait([kept])
            yield SSE_DONE
        finally:
            if self.ticket is not None:
                self.ticket.release()
            if status != "200":
                gen.metrics.requests.labels(turn.label, status, "true").inc()
                if self._source is not None:
                    gen.spawn(self._source.aclose())
                if self.released:
                    gen.spawn(self.replies.store_partial(turn, self.released, self.adapter))
