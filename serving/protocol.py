"""The HTTP API's wire shapes: OpenAI chat completions and models, plus Attune's sessions and feedback.

Requests are validated here (limits included); a rejection's message says what to change. Request models are
strict (a JSON value is never converted: "0.5" is not a number, 0 is not false), so the JSON schemas that
/openapi.json publishes for them say exactly what is accepted.
"""
from __future__ import annotations

import json
import math
import re
import time
import uuid
from typing import Annotated, Any, Callable, ClassVar, Literal, Mapping, Sequence

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, WithJsonSchema,
                      field_validator, model_serializer, model_validator)
from pydantic.json_schema import SkipJsonSchema, models_json_schema

from alignment.objectives import OBJECTIVES, Preference, PreferenceError
from serving.config import Limits
from serving.db import Role

PROFILE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
RECORD_ID = r"^[A-Za-z0-9_-]{1,64}$"
"""Session and message ids (the server issues UUIDs); anything else cannot name a record."""
NOT_A_RECORD_ID = ("is not an id this service issues (1-64 letters, digits, '-' or '_'); use an id as the API "
                   "returned it (POST /v1/sessions, a reply's attune.session_id, GET /v1/sessions/{id}/messages)")
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
FinishReason = Literal["stop", "length", "content_filter"]

IGNORED_OPENAI_PARAMS: tuple[str, ...] = (
    "frequency_penalty", "presence_penalty", "seed", "metadata", "store", "service_tier",
    "safety_identifier", "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options",
    "reasoning_effort", "verbosity", "parallel_tool_calls", "moderation")
"""Sent by the official `openai` client, accepted and without effect on the reply."""

UNSUPPORTED: dict[str, str] = {
    "logit_bias": "token biasing is not supported (replies pass a safety gate); remove logit_bias",
    "tools": "tool calling is not supported; remove tools",
    "functions": "function calling is not supported; remove functions",
    "function_call": "function calling is not supported; remove function_call",
    "audio": "audio output is not supported; remove audio",
    "prediction": "predicted outputs are not supported; remove prediction",
    "web_search_options": "web search is not supported; remove web_search_options",
}

ONLY_WHEN: dict[str, tuple[Callable[[Any], bool], str]] = {
    "logprobs": (lambda v: not v, "logprobs is not supported: a reply may be replaced by the safety gate, "
                 "so token log-probabilities would not describe it; remove logprobs or set it to false"),
    "top_logprobs": (lambda v: not v, "top_logprobs is not supported (no logprobs); remove it or set it to 0"),
    "response_format": (lambda v: v.get("type") == "text", "only plain-text replies are supported; remove "
                        "response_format or use {\"type\": \"text\"}"),
    "modalities": (lambda v: set(v) <= {"text"}, "only the 'text' modality is supported; use ['text'] or leave it out"),
    "tool_choice": (lambda v: v == "none", "tool calling is not supported; remove tool_choice or set it to 'none'"),
}
"""Parameters accepted only with the value that asks for nothing we cannot honour."""


def _preference(value: Any) -> dict[str, float] | str | None:
    if value is None:
        return None
    if isinstance(value, str):
        if not re.match(PROFILE_NAME, value):
            raise ValueError(f"profile name {value!r} is not valid; use the id of a stored profile "
                             "(see GET /v1/models) or give six weights")
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"give a profile name or an object of weights over {list(OBJECTIVES)}")
    bad = [k for k, w in value.items() if isinstance(w, bool) or not isinstance(w, (int, float))]
    if bad:
        raise ValueError(f"weight(s) for {sorted(map(str, bad))} must be numbers")
    outside = [k for k, w in value.items() if isinstance(w, int) and not 0 <= w <= 1]
    if outside:  # also keeps integers too big for a float away from Preference
        raise ValueError(f"weight(s) for {sorted(map(str, outside))} are outside [0, 1]; each weight is a share "
                         "of the whole, and the six sum to 1")
    try:
        return Preference(value).as_dict()
    except PreferenceError as e:
        try:
            Preference(value, normalize=True)
        except PreferenceError:
            raise ValueError(str(e)) from None
    total = math.fsum(value.values())
    raise ValueError(f"weights sum to {total:.4f}, not 1 (an objective left out counts as 0); scale them, "
                     f"e.g. divide each by {total:.4g}")


PREFERENCE_SCHEMA: dict[str, Any] = {"anyOf": [
    {"type": "object", "description": "Weights in [0, 1] that sum to 1; an objective left out counts as 0.",
     "properties": {o: {"type": "number", "minimum": 0, "maximum": 1} for o in OBJECTIVES},
     "additionalProperties": False},
    {"type": "string", "pattern": PROFILE_NAME, "description": "A profile id from GET /v1/models."},
    {"type": "null"}]}
PreferenceIn = Annotated[dict[str, float] | str | None, WithJsonSchema(PREFERENCE_SCHEMA)]
"""The `preference` field of a request: its schema says what `_preference` checks (all but the sum)."""


def _record_id(value: str) -> str:
    if not re.match(RECORD_ID, value):
        raise ValueError(f"{value[:80]!r} {NOT_A_RECORD_ID}")
    return value


def _printable(value: str) -> str:
    if not re.match(PRINTABLE, value):
        raise ValueError("contains control characters; use printable characters only")
    return value


RecordId = Annotated[str, AfterValidator(_record_id), WithJsonSchema({"type": "string", "pattern": RECORD_ID})]
Printable = Annotated[str, AfterValidator(_printable)]


def _limits(info: ValidationInfo) -> Limits:
    return (info.context or {}).get("limits") or Limits()


def resolve_preference(value: dict[str, float] | str | None,
                       profiles: Mapping[str, Mapping[str, float]], default: str = "balanced") -> Preference:
    """A validated `preference` field as a Preference: weights as given, or a named profile."""
    name = default if value is None else value
    if isinstance(name, str):
        if name not in profiles:
            raise PreferenceError(f"unknown profile {name!r}; known profiles: {sorted(profiles)}")
        return Preference(profiles[name])
    return Preference(name)


class _Wire(BaseModel):
    """Drops the fields named in `_omit_none` from the JSON when they are None (as OpenAI does)."""

    _omit_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        data = handler(self)
        return {k: v for k, v in data.items() if not (v is None and k in self._omit_none)}


# ---------------------------------------------------------------- chat completions: request
BASE_ADAPTER = "base"
"""`attune_options.adapter` value that asks for the base model without an adapter."""


class AttuneOptions(BaseModel):
    """Operator keys only (benchmarks, diagnostics): pin the adapter, or serve one request without the gate.
    A patient-app key that sends this gets 403; patient traffic is always routed and gated."""

    model_config = ConfigDict(extra="forbid", strict=True)

    adapter: str | None = Field(default=None, min_length=1, max_length=128, description="'base' for the base "
                                "model alone, or an adapter id from GET /v1/models; None routes by preference.")
    gate: bool = Field(default=True, description="False skips the crisis check and the output gate: the reply "
                       "streams unscored (stored with gate 'off').")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"] = Field(description="Who wrote it ('developer' is read as system).")
    content: str = Field(description="The text (a list of text parts is joined).")

    @model_validator(mode="before")
    @classmethod
    def _openai_shapes(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if k != "name"}
        if data.get("role") == "developer":
            data["role"] = "system"
        if data.get("role") in ("tool", "function"):
            raise ValueError(f"role {data['role']!r} is not supported (no tool calling); "
                             "use system, user or assistant")
        content = data.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ValueError("only text content parts are supported; send images or audio as text or not at all")
            if not all(isinstance(p.get("text", ""), str) for p in content):
                raise ValueError("a text content part needs 'text' as a string: {'type': 'text', 'text': '...'}")
            data["content"] = "".join(p.get("text", "") for p in content)
        return data


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions. Limits come from `context={"limits": Limits}` (defaults otherwise)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(default="attune", description="Ignored for routing (the preference picks the adapter).")
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation, oldest first.")
    max_tokens: int | None = Field(default=None, ge=1, description="Reply length cap in tokens.")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="Same as max_tokens (newer name).")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="Sampling temperature.")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    stream: bool | None = Field(default=False, description="Server-sent events, as OpenAI frames them.")
    stream_options: dict[str, Any] | None = Field(default=None, description="{include_usage: bool} is honoured.")
    n: int | None = Field(default=1, description="Must be 1.")
    logprobs: bool | None = Field(default=None, description="Must be false or absent.")
    top_logprobs: int | None = Field(default=None, description="Must be 0 or absent.")
    stop: str | list[str] | None = Field(default=None, description="Up to 4 stop strings.")
    user: str | None = Field(default=None, description="End-user id; accepted, not used.")
    response_format: dict[str, Any] | None = Field(default=None, description="Only {type: text}.")
    modalities: list[str] | None = Field(default=None, description="Only ['text'].")
    tool_choice: Any = Field(default=None, description="Only 'none' (no tool calling).")
    preference: PreferenceIn = Field(default=None, description="Attune: six weights summing to 1, or a profile "
                                     "name; None keeps the session's.")
    session_id: RecordId | None = Field(default=None, description="Attune: continue this session.")
    attune_options: AttuneOptions | None = Field(default=None, description="Attune, operator keys only: pin the "
                                                 "adapter or turn the gate off for this request.")
    ignored: SkipJsonSchema[dict[str, Any]] = Field(default_factory=dict, exclude=True, description="Harmless "
                                                    "OpenAI parameters that were accepted without effect.")

    @model_validator(mode="before")
    @classmethod
    def _sort_openai_params(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for key, why in UNSUPPORTED.items():
            if data.pop(key, None) not in (None, [], {}):
                raise ValueError(f"{key}: {why}")
        data["ignored"] = {k: data.pop(k) for k in IGNORED_OPENAI_PARAMS if k in data}
        return data

    @field_validator("preference", mode="before")
    @classmethod
    def _pref(cls, v: Any) -> Any:
        return _preference(v)

    @field_validator("n")
    @classmethod
    def _n(cls, v: int | None) -> int:
        if v not in (None, 1):
            raise ValueError(f"n must be 1 (got {v}): Attune returns one gated reply per request; "
                             "send separate requests for more")
        return 1

    @field_validator(*ONLY_WHEN)
    @classmethod
    def _honourable(cls, v: Any, info: ValidationInfo) -> Any:
        ok, why = ONLY_WHEN[info.field_name]
        if v is not None and not ok(v):
            raise ValueError(why)
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is not None and (len(stops) > 4 or not all(stops)):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @field_validator("messages")
    @classmethod
    def _message_limits(cls, v: list[ChatMessage], info: ValidationInfo) -> list[ChatMessage]:
        limits = _limits(info)
        if len(v) > limits.max_messages:
            raise ValueError(f"{len(v)} messages; send at most {limits.max_messages} "
                             "(drop the oldest turns, the session keeps the history)")
        for i, m in enumerate(v):
            if len(m.content) > limits.max_message_chars:
                raise ValueError(f"message {i} has {len(m.content)} characters; shorten it to at most "
                                 f"{limits.max_message_chars}")
            if "\x00" in m.content:
                raise ValueError(f"message {i} contains a NUL character (\\u0000), which cannot be stored; remove it")
        if v[-1].role != "user":
            raise ValueError("the last message must have role 'user' (the message to answer)")
        return v

    @field_validator("max_tokens", "max_completion_tokens")
    @classmethod
    def _cap(cls, v: int | None, info: ValidationInfo) -> int | None:
        cap = _limits(info).max_tokens_cap
        if v is not None and v > cap:
            raise ValueError(f"{v} exceeds the cap {cap}; ask for at most {cap}")
        return v

    @model_validator(mode="after")
    def _effective_max_tokens(self, info: ValidationInfo) -> "ChatCompletionRequest":
        if self.max_tokens and self.max_completion_tokens and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens differ; give only one")
        self.max_tokens = self.max_tokens or self.max_completion_tokens or _limits(info).default_max_tokens
        return self

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


def parse_chat_request(body: bytes | str | Mapping[str, Any], limits: Limits) -> ChatCompletionRequest:
    """Validate a request body against `limits`; raises pydantic's ValidationError."""
    if isinstance(body, (bytes, str)):
        return ChatCompletionRequest.model_validate_json(body, context={"limits": limits})
    return ChatCompletionRequest.model_validate(body, context={"limits": limits})


# ---------------------------------------------------------------- chat completions: response
class AttuneInfo(BaseModel):
    adapter: str = Field(description="Adapter id that produced the reply (or the base model's id).")
    scores: dict[str, float] = Field(default_factory=dict, description="The reply's six objective scores (1-5).")
    gate: str = Field(description="The safety gate's decision: pass, regenerated, fallback or crisis (off: an "
                      "operator turned the gate off for this request).")
    crisis: bool = Field(default=False, description="True when the crisis protocol ran.")
    session_id: str = Field(description="Session the exchange was stored in; send it back to continue.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Choice(BaseModel):
    index: int = 0
    message: ChatMessage
    logprobs: None = None
    finish_reason: FinishReason | None = "stop"


class ChatCompletionResponse(_Wire):
    _omit_none = frozenset({"attune"})

    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    attune: AttuneInfo | None = None


class DeltaMessage(_Wire):
    _omit_none = frozenset({"role", "content"})

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_Wire):
    """One SSE event; the last one with a choice carries finish_reason and `attune`."""

    _omit_none = frozenset({"attune", "usage"})

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    attune: AttuneInfo | None = None


def sse(obj: BaseModel | Mapping[str, Any]) -> str:
    """One server-sent event in OpenAI's framing."""
    text = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj, ensure_ascii=False)
    return f"data: {text}\n\n"


SSE_DONE = "data: [DONE]\n\n"


# ---------------------------------------------------------------- models
class ModelInfo(_Wire):
    _omit_none = frozenset({"weights"})

    kind: Literal["base", "adapter", "profile"]
    weights: dict[str, float] | None = None


class ModelCard(_Wire):
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
        return _preference(v)


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


class MessageOut(_Wire):
    _omit_none = frozenset({"adapter", "scores", "gate"})

    id: str
    role: Literal["system", "user", "assistant"]
    content: str
    created: int
    adapter: str | None = None
    scores: dict[str, float] | None = None
    gate: str | None = None

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


# ---------------------------------------------------------------- operators and health
class KeyCreate(BaseModel):
    """POST /v1/admin/keys: a new key for a tenant (the tenant is created if new)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    tenant: Printable = Field(min_length=1, max_length=64, description="Tenant id: 1-64 printable characters.",
                              json_schema_extra={"pattern": PRINTABLE})
    role: Role = Field(default="patient-app", description="'operator' keys may use /v1/admin and attune_options.")
    label: Printable = Field(default="", max_length=64, json_schema_extra={"pattern": PRINTABLE},
                             description="A note for the operator, e.g. which app holds the key.")


class KeyCreated(BaseModel):
    object: Literal["api_key"] = "api_key"
    tenant: str
    role: Role
    key: str = Field(description="The secret, shown once; send it as 'Authorization: Bearer <key>'.")


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    engine: str = Field(description="'ok' or why the engine is not ready.")
    scorer: str = Field(description="'ok' or why the scorer is not ready.")
    database: str = Field(description="'ok' or why the database is not ready.")


# ---------------------------------------------------------------- OpenAPI
def request_schemas(models: Sequence[type[BaseModel]], limits: Limits) -> dict[str, dict[str, Any]]:
    """The request bodies' JSON schemas as OpenAPI components (`#/components/schemas/<name>`), with the
    served `limits` written into the chat request's schema so that clients and fuzzers see the real caps."""
    _, top = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    defs = top.get("$defs", {})
    chat = defs.get(ChatCompletionRequest.__name__, {}).get("properties", {})
    for name, bound in (("messages", {"maxItems": limits.max_messages}),
                        ("max_tokens", {"maximum": limits.max_tokens_cap}),
                        ("max_completion_tokens", {"maximum": limits.max_tokens_cap})):
        for branch in chat.get(name, {}).get("anyOf", [chat.get(name, {})]):
            if branch.get("type") in ("array", "integer"):
                branch.update(bound)
    return defs


# ---------------------------------------------------------------- errors
TYPE_ERRORS = frozenset({"float_type", "int_type", "bool_type", "string_type", "list_type", "dict_type"})
"""Pydantic's errors for a value of the wrong JSON type (request models are strict: "1" is not a number)."""
JSON_NAMES = {"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean", "list": "an array",
              "dict": "an object", "NoneType": "null"}


class ErrorBody(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody

    @classmethod
    def of(cls, message: str, type: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> "ErrorResponse":
        return cls(error=ErrorBody(message=message, type=type, param=param, code=code))

    @classmethod
    def from_validation(cls, err: ValidationError) -> "ErrorResponse":
        """One line per problem, each naming the field; `param` is the first field."""
        lines, params = [], []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = "unknown field; remove it (the fields each endpoint takes are listed at /docs)"
            elif e["type"] == "json_invalid":
                msg = (f"the body could not be read as JSON ({e.get('ctx', {}).get('error', msg)}); send one JSON "
                       "object, UTF-8 encoded")
            elif not loc and e["type"] in ("model_type", "dict_type", "model_attributes_type"):
                got = JSON_NAMES.get(type(e["input"]).__name__, "this")
                msg = f"the body must be a JSON object, not {got}; the fields are listed at /docs"
            elif e["type"] in TYPE_ERRORS:
                msg = f"{msg}, not {JSON_NAMES.get(type(e['input']).__name__, 'this')} (values are not converted)"
            params.append(loc or None)
            lines.append(f"{loc}: {msg}" if loc else msg)
        return cls.of("; ".join(lines), param=params[0] if params else None, code="invalid_value")
