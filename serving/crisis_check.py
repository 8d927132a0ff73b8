"""The chat pipeline's crisis check: the crisis detector (model and rules) over the session's recent patient turns.
A crisis flags the session, audits it and sends the turn to the crisis protocol; a message near the line (or asking
about means, concealment or dangerous acts) is answered from the safety path. Runs on every turn, gate on or off.
"""
from __future__ import annotations

import asyncio
import logging

from serving.clients import SCORER_TIMEOUT_S, ScoringClient
from serving.db import Repository
from serving.errors import db_call
from serving.metrics import ServingMetrics
from serving.safety import CrisisDetector, window_texts
from serving.sessions import Sessions
from serving.turn import Turn

log = logging.getLogger("attune.chat")


class CrisisCheck:
    """Marks a Turn `crisis` or `near` (its adapter then the safety adapter); stores the flag and the audit event."""

    def __init__(self, scorer: ScoringClient, repo: Repository, sessions: Sessions, metrics: ServingMetrics):
        self.scorer, self.repo, self.sessions, self.metrics = scorer, repo, sessions, metrics

    @staticmethod
    def texts(turn: Turn, window: int) -> list[str]:
        """What the check reads: the last `window` patient turns; a new session's imported history whole."""
        users = turn.patient_turns
        imported = users[:-1] if turn.request.session_id is None else []
        return list(dict.fromkeys(imported + window_texts(users, window)))

    def diverted_by_rules(self, turn: Turn, detector: CrisisDetector, window: int) -> bool:
        """Whether the rules alone already send the turn to the crisis protocol or the safety path (then the routed
        adapter's generation is not worth starting before the check)."""
        texts = self.texts(turn, window)
        by_rules = detector.assess_window(texts, [None] * len(texts))
        return by_rules.crisis or by_rules.near

    async def __call__(self, turn: Turn, detector: CrisisDetector, window: int) -> None:
        texts = self.texts(turn, window)

        async def prob(t: str) -> float | None:
            try:
                return await asyncio.wait_for(self.scorer.crisis(t), SCORER_TIMEOUT_S)
            except Exception as e:
                self.metrics.scorer_errors.inc()
                log.warning("crisis detector failed (%s); rules decide alone for %s", type(e).__name__,
                            turn.request_id)
                return None

        assessment = detector.assess_window(texts, await asyncio.gather(*(prob(t) for t in texts)))
        if assessment.crisis:
            turn.crisis = True
            turn.adapter_id = await self.sessions.safety_adapter()
            by = "both" if assessment.by_rules and assessment.by_model else (
                "rules" if assessment.by_rules else "model")
            self.metrics.crisis.labels(by).inc()
            await db_call(self.repo.flag_session, turn.session.id, detector=by, categories=assessment.by_rules)
            await db_call(self.repo.add_audit, "crisis_protocol", tenant_id=turn.principal.tenant_id,
                          session_id=turn.session.id,
                          detail={"request_id": turn.request_id, "rules": assessment.by_rules,
                                  "by_model": assessment.by_model, "prob": assessment.prob, "texts": len(texts),
                                  "adapter": turn.adapter_id, "locale": turn.locale})
            log.info("crisis protocol for %s (detector %s)", turn.request_id, by)
        elif assessment.near:
            turn.near = True
            turn.adapter_id = await self.sessions.safety_adapter()
            log.info("safety path for %s (near the crisis line: %s)", turn.request_id,
                     ",".join(assessment.near_rules) or "detector")
