"""Wire shapes of the model list, sessions and their messages, feedback on replies, and the operators' flag list.

Request models are strict, like the chat completions shapes in serving.protocol; shared field types are in
serving.fields.
"""
from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serving.fields import PreferenceIn, RecordId, Wire, check_preference


# ---------------------------------------------------------------- models
class ModelInfo(Wire):
    _omit_none = frozenset({"weights"})

    kind: Literal["base", "adapter", "profile"]
    weights: dict[str, float] | None = None


class ModelCard(Wire):
    _omit_none = frozenset({"attune"})

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "attune"
    attune: ModelInfo | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------- sessions and feedback
class SessionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    preference: PreferenceIn = Field(default=None, description="Six weights or a profile name; None = the "
                                     "'balanced' profile.")
    locale: str | None = Field(default=None, max_length=35, pattern=r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$",
                               description="BCP 47 tag such as 'en' or 'en-GB'; picks the crisis resources.")

    @field_validator("preference", mode="before")
    @classmethod
    def _pref(cls, v: Any) -> Any:
        return check_preference(v)


class SessionOut(BaseModel):
    id: str
    adapter: str | None
    preference: dict[str, float]
    flagged: bool
    created: int

    @classmethod
    def from_row(cls, row: Any) -> "SessionOut":
        """From a `serving.db.ChatSession`."""
        return cls(id=row.id, adapter=row.adapter_id, preference=row.preference, flagged=row.flagged,
                   created=int(row.created.timestamp()))


class MessageOut(Wire):
    _omit_none = frozenset({"adapter", "scores", "gate"})

    id: str
    role: Literal["system", "user", "assistant"]
    content: str
    created: int
    adapter: str | None = None
    scores: dict[str, float] | None = None
    gate: str | None = Field(default=None, description="How an assistant turn was released: pass, regenerated, "
                             "fallback, crisis, off (operator), interrupted (a stream that did not finish), or "
                             "client: written by the client in the request that created the session, not generated "
                             "or checked here. Absent on user messages.")

    @classmethod
    def from_row(cls, row: Any) -> "MessageOut":
        """From a `serving.db.Message`."""
        return cls(id=row.id, role=row.role, content=row.content, created=int(row.created.timestamp()),
                   adapter=row.adapter_id, scores=row.scores, gate=row.gate)


class MessageList(BaseModel):
    object: Literal["list"] = "list"
    data: list[MessageOut]


class FeedbackIn(BaseModel):
    """Either a thumb on one reply {message_id, rating} or a choice {chosen_message_id, rejected_message_id}."""

    model_config = ConfigDict(extra="forbid", strict=True)

    message_id: RecordId | None = Field(default=None, description="The reply a thumb rates.")
    rating: Literal["up", "down"] | None = None
    chosen_message_id: RecordId | None = Field(default=None, description="The better of two replies.")
    rejected_message_id: RecordId | None = Field(default=None, description="The worse of two replies.")

    @model_validator(mode="after")
    def _one_form(self) -> "FeedbackIn":
        thumb = self.message_id is not None or self.rating is not None
        choice = self.chosen_message_id is not None or self.rejected_message_id is not None
        if thumb == choice:
            raise ValueError("give either {message_id, rating} or {chosen_message_id, rejected_message_id}")
        if thumb and (self.message_id is None or self.rating is None):
            raise ValueError("a thumb needs both message_id and rating ('up' or 'down')")
        if choice and (self.chosen_message_id is None or self.rejected_message_id is None):
            raise ValueError("a choice needs both chosen_message_id and rejected_message_id")
        if choice and self.chosen_message_id == self.rejected_message_id:
            raise ValueError("chosen_message_id and rejected_message_id must name two different replies")
        return self

    @property
    def kind(self) -> Literal["rating", "choice"]:
        return "rating" if self.rating is not None else "choice"


class FeedbackOut(BaseModel):
    id: str
    object: Literal["feedback"] = "feedback"
    kind: Literal["rating", "choice"]
    session_id: str


class SessionDeleted(BaseModel):
    id: str
    object: Literal["session.deleted"] = "session.deleted"
    deleted: bool = True


# ---------------------------------------------------------------- flags (operators)
def _epoch(value: Any) -> int | None:
    return None if value is None else int(value.timestamp())


class FlagOut(BaseModel):
    """A session the crisis protocol flagged, as operators list it: times, counts and rule names, never text."""

    session_id: str
    object: Literal["session.flag"] = "session.flag"
    tenant: str
    first_flagged: int = Field(description="Unix time of the first flagged turn.")
    last_flagged: int = Field(description="Unix time of the latest flagged turn.")
    flagged_turns: int = Field(description="How many of the patient's messages fired the crisis protocol.")
    detector: str = Field(description="What fired over those turns: rules, model, both, or unknown.")
    categories: list[str] = Field(description="Names of the crisis rules or categories that fired.")
    acknowledged: bool
    acknowledged_at: int | None = None
    acknowledged_by: int | None = Field(default=None, description="Id of the operator key that acknowledged it.")
    erased: bool = Field(description="The patient erased the session: its messages are gone, this record stays.")
    erased_at: int | None = None
    messages: int = Field(description="Messages stored in the session now (0 once erased).")

    @classmethod
    def from_row(cls, row: Any, messages: int) -> "FlagOut":
        """From a `serving.db.SessionFlag` and its session's message count."""
        return cls(session_id=row.session_id, tenant=row.tenant_id, first_flagged=_epoch(row.first_flagged_at),
                   last_flagged=_epoch(row.last_flagged_at), flagged_turns=row.flagged_turns, detector=row.detector,
                   categories=list(row.categories), acknowledged=row.acknowledged_at is not None,
                   acknowledged_at=_epoch(row.acknowledged_at), acknowledged_by=row.acknowledged_by,
                   erased=row.erased_at is not None, erased_at=_epoch(row.erased_at), messages=messages)


class FlagList(BaseModel):
    object: Literal["list"] = "list"
    status: Literal["open", "acknowledged", "all"]
    data: list[FlagOut]
