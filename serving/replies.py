"""The chat pipeline's last stage, persist and respond: the reply stored as the patient saw it (also what they saw of
a stream that did not finish), the gate's audit event, the request's metrics, and the `attune` extension of the
response (the whole ChatCompletionResponse when not streaming).
"""
from __future__ import annotations

import time

from serving.config import ServeConfig
from serving.crisis_reply import CrisisReply
from serving.db import Repository
from serving.errors import db_call
from serving.metrics import ServingMetrics
from serving.protocol import AttuneInfo, ChatCompletionResponse, ChatMessage, Choice, Usage
from serving.turn import Gated, Turn


class Replies:
    """Stores replies and records requests for one ingress replica."""

    def __init__(self, config: ServeConfig, repo: Repository, metrics: ServingMetrics):
        self.config, self.repo, self.metrics = config, repo, metrics

    async def finish(self, turn: Turn, gated: Gated, crisis: CrisisReply, *, stream: bool) -> AttuneInfo:
        """Store the reply as the patient saw it, record the gate and the request; the `attune` extension (a session
        flagged by an earlier turn keeps `crisis`'s resources in view)."""
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
                          crisis_resources=crisis.reply(turn.locale).resources
                          if turn.flagged_before and not turn.crisis else None)

    async def store_partial(self, turn: Turn, text: str, adapter_id: str | None) -> None:
        """What a patient saw of a stream that did not finish (client gone, engine failed)."""
        await db_call(self.repo.add_message, turn.session.id, "assistant", text, adapter_id=adapter_id,
                      gate="interrupted")

    @staticmethod
    def response(turn: Turn, gated: Gated, info: AttuneInfo) -> ChatCompletionResponse:
        """The non-streaming answer."""
        return ChatCompletionResponse(
            id=turn.request_id, model=turn.request.model,
            choices=[Choice(message=ChatMessage(role="assistant", content=gated.text),
                            finish_reason=gated.finish_reason)],
            usage=Usage(prompt_tokens=turn.prompt_tokens, completion_tokens=turn.completion_tokens,
                        total_tokens=turn.prompt_tokens + turn.completion_tokens),
            attune=info)
