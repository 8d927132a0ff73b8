"""The OpenAPI document describes every request body (with the served limits), every answer and the error shape,
and the request models refuse what it says they refuse: wrong JSON types, NUL characters, weights no float can
hold, undecodable or non-object bodies, each with a message that names the field and the fix."""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from alignment.objectives import OBJECTIVES
from serving.api_router import create_app
from serving.config import Limits, ServeConfig
from serving.protocol import ChatCompletionRequest, ErrorResponse, KeyCreate, parse_chat_request
from serving.sessions_protocol import FeedbackIn, SessionCreate

USER = [{"role": "user", "content": "I feel low."}]
LIMITS = {"max_tokens_cap": 64, "default_max_tokens": 24, "max_messages": 7}
BODIES = {("post", "/v1/chat/completions"): "ChatCompletionRequest", ("post", "/v1/sessions"): "SessionCreate",
          ("patch", "/v1/sessions/{session_id}"): "SessionCreate",
          ("post", "/v1/sessions/{session_id}/feedback"): "FeedbackIn", ("post", "/v1/admin/keys"): "KeyCreate"}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The routes and the document need only the service's config (nothing below is admitted)."""
    return create_app(SimpleNamespace(config=ServeConfig(data_dir=tmp_path_factory.mktemp("data"), limits=LIMITS)))


@pytest.fixture(scope="module")
def document(app) -> dict:
    return app.openapi()


def resolve(document: dict, ref: str) -> dict:
    node = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_every_body_is_described_by_its_model(document):
    for (method, path), model in BODIES.items():
        body = document["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}, (method, path)
        assert resolve(document, body["$ref"])["additionalProperties"] is False
    faults = document["paths"]["/v1/admin/faults"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert faults["type"] == "object" and "scorer" in faults["description"]
    refs = {m.group(0) for m in re.finditer(r"#/components/schemas/[A-Za-z]+", json.dumps(document))}
    assert all(resolve(document, r) for r in refs), "every $ref resolves"


def test_the_chat_schema_carries_the_served_limits_and_hides_internal_fields(document):
    chat = document["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert chat["messages"]["maxItems"] == 7
    for name in ("max_tokens", "max_completion_tokens"):
        assert {"type": "integer", "minimum": 1, "maximum": 64}.items() <= chat[name]["anyOf"][0].items()
    assert "ignored" not in chat
    weights = chat["preference"]["anyOf"][0]
    assert set(weights["properties"]) == set(OBJECTIVES) and weights["additionalProperties"] is False


def test_every_keyed_operation_documents_its_errors_in_openai_shape(document):
    for path, operations in document["paths"].items():
        for method, op in operations.items():
            public = path in ("/healthz", "/metrics")
            assert ("security" in op) != public, (method, path)
            errors = {int(c): r for c, r in op["responses"].items() if int(c) >= 400}
            if not public:
                assert {401, 429} <= set(errors), (method, path)
                assert all(r["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
                           for r in errors.values()), (method, path)
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    assert {"400", "403", "404", "413", "422", "503"} <= set(chat)
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def error_of(model, body: bytes | dict) -> str:
    with pytest.raises(ValidationError) as exc:
        if isinstance(body, bytes):
            model.model_validate_json(body)
        else:
            model.model_validate(body)
    return ErrorResponse.from_validation(exc.value).error.message


@pytest.mark.parametrize("body, needles", [
    ({"messages": USER, "temperature": "0.5"}, ["temperature", "valid number, not a string"]),
    ({"messages": USER, "stream": "yes"}, ["stream", "valid boolean"]),
    ({"messages": USER, "max_tokens": 8.0}, ["max_tokens", "valid integer"]),
    ({"messages": USER, "attune_options": {"gate": 0}}, ["attune_options.gate", "valid boolean"]),
    ({"messages": [{"role": "user", "content": "a\x00b"}]}, ["messages", "message 0 contains a NUL character"]),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, ["'text' as a string"]),
    ({"messages": USER, "preference": {"empathy": 10 ** 400}}, ["preference", "outside [0, 1]"]),
    ({"messages": USER, "preference": {"empathy": -10 ** 400}}, ["outside [0, 1]"]),
    ({"messages": USER, "preference": {"empathy": 0.5}}, ["sum to 0.5000, not 1", "left out counts as 0",
                                                          "divide each by 0.5"]),
    ({"messages": USER, "session_id": "../../x"}, ["session_id", "'../../x' is not an id this service issues"]),
])
def test_chat_requests_are_strict_and_refusals_say_what_to_change(body, needles):
    message = error_of(ChatCompletionRequest, body)
    assert all(n in message for n in needles) and "preference: preference" not in message, message


def test_a_json_typed_chat_request_still_parses():
    req = parse_chat_request({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                              "temperature": 0, "max_tokens": 8, "stream": False,
                              "preference": {"empathy": 0.5, "safety": 0.5}}, Limits())
    assert (req.messages[0].content, req.temperature, req.preference["safety"]) == ("hi", 0.0, 0.5)


@pytest.mark.parametrize("model, body, needles", [
    (ChatCompletionRequest, b'{"messages": [{"role": "user", "content": "\xff"}]}',
     ["could not be read as JSON", "UTF-8"]),
    (SessionCreate, b"[" * 300 + b"]" * 300, ["could not be read as JSON", "recursion limit"]),
    (SessionCreate, b"[]", ["must be a JSON object, not an array"]),
    (FeedbackIn, b'{"message_id": "a\\u0000", "rating": "up"}', ["message_id", "is not an id"]),
    (KeyCreate, b'{"tenant": "t", "role": "root"}', ["role", "'patient-app' or 'operator'"]),
    (KeyCreate, b'{"tenant": "t", "label": "' + b"x" * 65 + b'"}', ["label", "at most 64"]),
    (KeyCreate, b'{"tenant": "t", "scopes": []}', ["scopes", "unknown field"]),
])
def test_other_bodies_are_refused_naming_the_problem(model, body, needles):
    message = error_of(model, body)
    assert all(n in message for n in needles), message


def test_a_malformed_session_id_in_the_path_is_refused_before_anything_is_looked_up(app):
    r = TestClient(app).get("/v1/sessions/not%20an%20id!")
    assert r.status_code == 422 and r.json()["error"]["param"] == "session_id"
    assert "'not an id!' is not an id this service issues" in r.json()["error"]["message"]
