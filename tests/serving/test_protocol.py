"""The API's wire shapes: rejections name the problem, and the official `openai` client round-trips them."""
from __future__ import annotations

import json
import math

import httpx
import pytest
from pydantic import ValidationError

from alignment.objectives import OBJECTIVES, PreferenceError
from serving.config import Limits
from serving.fields import resolve_preference
from serving.protocol import (SSE_DONE, AttuneInfo, ChatCompletionChunk, ChatCompletionResponse, ChatMessage,
                              ChunkChoice, Choice, DeltaMessage, ErrorResponse, Usage, parse_chat_request, sse)
from serving.sessions_protocol import FeedbackIn, ModelCard, ModelInfo, SessionCreate

USER = [{"role": "user", "content": "I can't sleep before exams."}]
BALANCED = {o: 1 / 6 for o in OBJECTIVES}


def error_of(body: dict, limits: Limits | None = None) -> str:
    with pytest.raises(ValidationError) as exc:
        parse_chat_request(body, limits or Limits())
    return ErrorResponse.from_validation(exc.value).error.message


def test_n_other_than_one_is_rejected_with_the_fix():
    with pytest.raises(ValidationError) as exc:
        parse_chat_request({"messages": USER, "n": 2}, Limits())
    err = ErrorResponse.from_validation(exc.value).error
    assert "n must be 1" in err.message and err.param == "n"
    assert parse_chat_request({"messages": USER, "n": 1}, Limits()).n == 1


def test_logprobs_true_is_rejected_false_is_fine():
    assert "logprobs is not supported" in error_of({"messages": USER, "logprobs": True})
    assert parse_chat_request({"messages": USER, "logprobs": False}, Limits()).logprobs is False


@pytest.mark.parametrize("weights, needle", [
    ({**BALANCED, "empathy": -0.1, "safety": 1 / 6 + 0.1 + 1 / 6}, "'empathy' is -0.1"),
    ({**BALANCED, "trust_rapport": math.nan}, "must be finite"),
    ({o: 0.5 for o in OBJECTIVES}, "sum to 3.0000"),
    ({**BALANCED, "humour": 0.0}, "unknown objective(s) ['humour']"),
    ({**BALANCED, "safety": "lots"}, "['safety'] must be numbers"),
])
def test_bad_preference_weights_are_rejected_naming_the_problem(weights, needle):
    message = error_of({"messages": USER, "preference": weights})
    assert needle in message and message.startswith("preference:")


def test_preference_as_weights_or_profile_name():
    req = parse_chat_request({"messages": USER, "preference": BALANCED}, Limits())
    assert req.preference == pytest.approx(BALANCED)
    assert parse_chat_request({"messages": USER, "preference": "warm"}, Limits()).preference == "warm"
    assert "not valid" in error_of({"messages": USER, "preference": "../etc"})
    profiles = {"warm": {"empathy": 0.5, "safety": 0.5}}
    assert resolve_preference("warm", profiles)["empathy"] == 0.5
    with pytest.raises(PreferenceError, match=r"unknown profile 'cold'; known profiles: \['warm'\]"):
        resolve_preference("cold", profiles)


def test_unknown_and_unhonourable_fields_are_rejected_harmless_ones_ignored():
    assert "presence: unknown field; remove it" in error_of({"messages": USER, "presence": 1})
    assert "tool calling is not supported" in error_of(
        {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]})
    assert "response_format: only plain-text replies are supported" in error_of(
        {"messages": USER, "response_format": {"type": "json_object"}})
    req = parse_chat_request({"messages": USER, "seed": 7, "presence_penalty": 0.5, "store": False,
                              "metadata": {"a": "b"}, "tools": [], "tool_choice": "none"}, Limits())
    assert req.ignored == {"seed": 7, "presence_penalty": 0.5, "store": False, "metadata": {"a": "b"}}


def test_limits_are_enforced_with_what_to_change():
    limits = Limits(max_messages=2, max_message_chars=40, max_tokens_cap=64, default_max_tokens=32)
    many = [{"role": "user", "content": "hi"}] * 3
    assert "send at most 2" in error_of({"messages": many}, limits)
    assert "shorten it to at most 40" in error_of({"messages": [{"role": "user", "content": "x" * 41}]}, limits)
    assert "max_tokens: 65 exceeds the cap 64; ask for at most 64" in error_of({"messages": USER, "max_tokens": 65}, limits)
    assert "ask for at most 64" in error_of({"messages": USER, "max_completion_tokens": 65}, limits)
    assert parse_chat_request({"messages": USER}, limits).max_tokens == 32
    assert parse_chat_request({"messages": USER, "max_completion_tokens": 10}, limits).max_tokens == 10
    assert "role 'user'" in error_of({"messages": USER + [{"role": "assistant", "content": "ok"}]})
    assert "at least 1 item" in error_of({"messages": []})


def test_message_shapes_the_openai_client_may_send():
    m = ChatMessage.model_validate({"role": "developer", "name": "x",
                                    "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "kind."}]})
    assert (m.role, m.content) == ("system", "Be kind.")
    with pytest.raises(ValidationError, match="only text content parts"):
        ChatMessage.model_validate({"role": "user", "content": [{"type": "image_url", "image_url": {}}]})


def _response() -> ChatCompletionResponse:
    return ChatCompletionResponse(
        id="chatcmpl-1", created=1700000000, model="attune",
        choices=[Choice(message=ChatMessage(role="assistant", content="That sounds exhausting."))],
        usage=Usage(prompt_tokens=12, completion_tokens=5, total_tokens=17),
        attune=AttuneInfo(adapter="warm-r8", scores={"safety": 4.5}, gate="pass", session_id="s-1"))


def _chunks() -> list[ChatCompletionChunk]:
    base = {"id": "chatcmpl-1", "created": 1700000000, "model": "attune"}
    return [
        ChatCompletionChunk(**base, choices=[ChunkChoice(delta=DeltaMessage(role="assistant", content=""))]),
        ChatCompletionChunk(**base, choices=[ChunkChoice(delta=DeltaMessage(content="That sounds "))]),
        ChatCompletionChunk(**base, choices=[ChunkChoice(delta=DeltaMessage(content="exhausting."))]),
        ChatCompletionChunk(**base, choices=[ChunkChoice(delta=DeltaMessage(), finish_reason="stop")],
                            attune=AttuneInfo(adapter="warm-r8", gate="regenerated", session_id="s-1")),
    ]


def test_response_and_chunk_json_use_openai_field_names():
    body = json.loads(_response().model_dump_json())
    assert list(body) == ["id", "object", "created", "model", "choices", "usage", "attune"]
    assert body["object"] == "chat.completion"
    assert body["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": "That sounds exhausting."},
                                  "logprobs": None, "finish_reason": "stop"}
    first, middle, *_, last = [json.loads(sse(c)[len("data: "):]) for c in _chunks()]
    assert middle == {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000,
                      "model": "attune", "choices": [{"index": 0, "delta": {"content": "That sounds "},
                                                      "logprobs": None, "finish_reason": None}]}
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert last["choices"][0]["delta"] == {} and last["attune"]["gate"] == "regenerated"
    assert sse(_chunks()[1]).startswith("data: {") and sse(_chunks()[1]).endswith("}\n\n")
    assert SSE_DONE == "data: [DONE]\n\n"
    card = ModelCard(id="warm-r8", created=1, attune=ModelInfo(kind="adapter", weights=BALANCED)).model_dump()
    assert card["object"] == "model" and card["owned_by"] == "attune"
    assert "weights" not in ModelCard(id="base", attune=ModelInfo(kind="base")).model_dump()["attune"]


def test_the_official_openai_client_round_trips_requests_and_replies():
    openai = pytest.importorskip("openai")
    sent: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        sent.append(body)
        if body.get("stream"):
            text = "".join(sse(c) for c in _chunks()) + SSE_DONE
            return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=_response().model_dump(mode="json"))

    client = openai.OpenAI(api_key="att-test", base_url="http://attune.test/v1",
                           http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    reply = client.chat.completions.create(
        model="attune", messages=[{"role": "system", "content": "Be brief."}, *USER], max_tokens=64,
        temperature=0.7, top_p=0.9, seed=1, user="patient-7", stop=["\n\n"],
        extra_body={"preference": "warm", "session_id": "s-1"})
    assert reply.choices[0].message.content == "That sounds exhausting."
    assert reply.usage.total_tokens == 17 and reply.model_extra["attune"]["adapter"] == "warm-r8"

    stream = client.chat.completions.create(model="attune", messages=USER, stream=True,
                                            stream_options={"include_usage": False})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "That sounds exhausting."
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].model_extra["attune"]["gate"] == "regenerated"

    first = parse_chat_request(json.dumps(sent[0]), Limits())
    assert (first.preference, first.session_id, first.max_tokens, first.stop) == ("warm", "s-1", 64, ["\n\n"])
    assert first.ignored == {"seed": 1}
    assert parse_chat_request(json.dumps(sent[1]), Limits()).stream is True


def test_feedback_is_one_of_two_forms():
    assert FeedbackIn(message_id="m", rating="up").kind == "rating"
    assert FeedbackIn(chosen_message_id="a", rejected_message_id="b").kind == "choice"
    for bad, needle in [({}, "give either"), ({"message_id": "m"}, "needs both message_id and rating"),
                        ({"message_id": "m", "rating": "up", "chosen_message_id": "a"}, "give either"),
                        ({"chosen_message_id": "a", "rejected_message_id": "a"}, "two different"),
                        ({"message_id": "m", "rating": "meh"}, "'up' or 'down'")]:
        with pytest.raises(ValidationError, match=needle):
            FeedbackIn.model_validate(bad)
    assert SessionCreate(preference="warm", locale="en-GB").locale == "en-GB"
    with pytest.raises(ValidationError, match="sum to"):
        SessionCreate(preference={"empathy": 0.5})


def test_limits_come_from_a_described_serve_config(tmp_path):
    from serving.config import ConfigError, ServeConfig

    (tmp_path / "serve.yaml").write_text("limits: {max_tokens_cap: 64, default_max_tokens: 32}\n"
                                         "default_locale: en\nmerge_policy: true\n")
    cfg = ServeConfig.from_env({"ATTUNE_SERVE_CONFIG": str(tmp_path / "serve.yaml"), "ATTUNE_DATA_DIR": str(tmp_path),
                                "ATTUNE_REQUESTS_PER_MINUTE": "5"})
    assert (cfg.limits.max_tokens_cap, cfg.limits.requests_per_minute, cfg.merge_policy) == (64, 5, True)
    assert cfg.database_url == f"sqlite:///{tmp_path / 'attune.db'}" and cfg.reward_dir == cfg.store_dir / "reward"
    assert "ask for at most 64" in error_of({"messages": USER, "max_tokens": 100}, cfg.limits)
    assert cfg.resources_for("en_gb") is cfg.crisis_resources["en-GB"] and "116 123" in str(cfg.resources_for("en-GB"))
    assert cfg.resources_for("en-ZA") is cfg.resources_for("xx") is cfg.crisis_resources["en"]
    assert all(f.description for f in ServeConfig.model_fields.values())
    (tmp_path / "bad.yaml").write_text("default_locale: de\nsafety_threshold: 7\nmax_regenerations: 2\ncolour: red\n")
    with pytest.raises(ConfigError) as exc:
        ServeConfig.from_yaml(tmp_path / "bad.yaml")
    assert "colour: Extra inputs" in str(exc.value) and "null to use the calibrated one" in str(exc.value)
    with pytest.raises(ConfigError, match="default_locale 'de' has no crisis_resources"):
        ServeConfig.from_mapping({"default_locale": "de"})
