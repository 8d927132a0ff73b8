"""The clients the chat pipeline calls, as protocols: an engine (serving.engine.LLMEngine, or serving.remote's client
of the LLM deployment), a scorer (serving.scorer, or serving.remote's client) with the `ScorerInfo` it reports, and a
per-key rate limiter. Imports no other part of the chat path, so every stage may import it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

from serving.engine import GenerationRequest, Usage

SCORER_TIMEOUT_S = 15.0
"""A scorer call that takes longer counts as failed: the gate fails closed, the crisis rules decide alone."""


@dataclass(frozen=True)
class ScorerInfo:
    crisis_threshold: float
    """The crisis head's calibrated threshold (from the reward model)."""
    safety_threshold: float | None = None
    """The calibrated safety threshold on the 1-5 scale (used unless ServeConfig sets one)."""
    calibration: dict = field(default_factory=dict)
    crisis_near_threshold: float | None = None
    """From here up to crisis_threshold a message is near the line (None: half the crisis threshold)."""
    crisis_window: int = 1
    """Recent patient turns the crisis detector reads."""


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
