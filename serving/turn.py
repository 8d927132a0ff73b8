"""The data that passes between the chat pipeline's stages (serving.chat): a `Turn`, one admitted request after the
patient's message is stored, and a `Gated` reply, what the gate let through and how it decided. Plain data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from serving.auth import Principal
from serving.db import ChatSession
from serving.metrics import NO_ADAPTER
from serving.protocol import ChatCompletionRequest


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
    patient_turns: list[str] = field(default_factory=list)
    """The patient's messages among the session's latest stored ones (serving.sessions.MAX_HISTORY + 1), oldest
    first, this turn's last: what the crisis check reads."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    early: Any = None
    """The first attempt (serving.streaming.EarlyStart), started beside the crisis check and held until it passed."""
    unstored: bool = False
    """A new session planned by serving.sessions.Sessions.open_turn and not yet in the database (`store_new` stores
    it with its first messages)."""
    restart_tag: str = ""
    """Set when the early start was discarded for the safety path: the restart's engine request id differs."""

    @property
    def label(self) -> str:
        return self.adapter_id or NO_ADAPTER


@dataclass
class Gated:
    """A reply after the gate: what the patient sees, where it came from, and how the gate decided."""

    text: str
    adapter_id: str | None
    scores: dict[str, float]
    kind: str
    attempts: int = 0
    reasons: list[str] = field(default_factory=list)
    finish_reason: str = "stop"
