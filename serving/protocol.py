"""The HTTP API's wire shapes: OpenAI chat completions, operator keys, health and errors (those of models,
sessions and feedback are in serving.sessions_protocol, and re-exported here).

Requests are validated here (limits included); a rejection's message says what to change. Request models are
strict (a JSON value is never converted: "0.5" is not a number, 0 is not false), so the JSON schemas that
/openapi.json publishes for them say exactly what is accepted.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Callable, Literal, Mapping, Sequence

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic.json_schema import SkipJsonSchema, models_json_schema

from serving.config import Limits
from serving.db import Role
from serving.fields import (NOT_A_RECORD_ID, PRINTABLE, RECORD_ID, PreferenceIn, Printable, RecordId, Wire,
                            check_preference, resolve_preference)
from serving.sessions_protocol import (FeedbackIn, FeedbackOut, MessageList, MessageOut, ModelCard, ModelInfo,
                                       ModelList, SessionCreate, SessionDeleted, SessionOut)

__all__ = [
    "BASE_ADAPTER", "IGNORED_OPENAI_PARAMS", "JSON_NAMES", "NOT_A_RECORD_ID", "ONLY_WHEN", "RECORD_ID", "SSE_DONE",
    "TYPE_ERRORS", "UNSUPPORTED", "AttuneInfo", "AttuneOptions", "ChatCompletionChunk", "ChatCompletionRequest",
    "ChatCompletionResponse", "ChatMessage", "Choice", "ChunkChoice", "DeltaMessage", "ErrorBody", "ErrorResponse",
    "FeedbackIn", "FeedbackOut", "FinishReason", "Health", "KeyCreate", "KeyCreated", "MessageList", "MessageOut",
    "ModelCard", "ModelInfo", "ModelList", "SessionCreate", "SessionDeleted", "SessionOut", "Usage",
    "parse_chat_request", "request_schemas", "resolve_preference", "sse"]

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


def _limits(info: ValidationInfo) -> Limits:
    return (info.context or {}).get("limits") or Limits()


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
        return check_preference(v)

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
    gate: str = Field(description="The safety gate's decision: pass, regenerated, fallback, truncated (a stream "
                      "ended at its last safe sentence) or crisis (off: an operator turned the gate off for this "
                      "request).")
    crisis: bool = Field(default=False, description="True when the crisis protocol ran.")
    session_id: str = Field(description="Session the exchange was stored in; send it back to continue.")
    crisis_resources: str | None = Field(default=None, description="The session was flagged for a human by an "
                                         "earlier crisis turn: the crisis resources for its locale, on every later "
                                         "reply, so that they stay in view.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Choice(BaseModel):
    index: int = 0
    message: ChatMessage
    logprobs: None = None
    finish_reason: FinishReason | None = "stop"


class ChatCompletionResponse(Wire):
    _omit_none = frozenset({"attune"})

    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    attune: AttuneInfo | None = None


class DeltaMessage(Wire):
    _omit_none = frozenset({"role", "content"})

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(Wire):
    """One SSE event; the last one with a choice carries finish_reason and `attune`."""

    _omit_none = frozenset({"attune", "usage", "crisis_resources"})

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    attune: AttuneInfo | None = None
    crisis_resources: str | None = Field(default=None, description="On the first chunk of a crisis reply, which "
                                         "opens with them: the crisis resources (a lead line, then one '- name: "
                                         "contact' line each), so that a client can show them at once.")


def sse(obj: BaseModel | Mapping[str, Any]) -> str:
    """One server-sent event in OpenAI's framing."""
    text = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj, ensure_ascii=False)
    return f"data: {text}\n\n"


SSE_DONE = "data: [DONE]\n\n"


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
