"""The HTTP routes, kept thin: each admits the caller, reads the body, calls `ChatService` and writes the answer;
every error is OpenAI's error shape. `create_app(service)` builds the FastAPI app that the ingress serves.

Routes read their bodies themselves (size limit first, then the pydantic models of serving.protocol and
serving.sessions_protocol, so every rejection names the field and the fix); `openapi()` documents those bodies,
the answers and the errors.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from serving.chat import ApiError, ChatService, parse_model
from serving.fields import NOT_A_RECORD_ID, RECORD_ID
from serving.protocol import (ChatCompletionRequest, ChatCompletionResponse, ErrorResponse, Health, KeyCreate,
                              KeyCreated, request_schemas)
from serving.proxy_middleware import BODY_SCOPE_KEY
from serving.db import FLAG_STATUSES
from serving.sessions_protocol import (FeedbackIn, FeedbackOut, FlagList, FlagOut, MessageList, ModelList,
                                       SessionCreate, SessionDeleted, SessionOut)

router = APIRouter()
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
BEARER = "bearer"
ERRORS = {400: "The prompt does not fit the model's context.",
          401: "Missing or unknown API key.",
          403: "The key's role may not do this (operator-only endpoint or attune_options).",
          404: "No such session or message for this key (or fault injection is off).",
          410: "The session was erased at the patient's request; its flag record remains.",
          413: "The body is over the size limit.",
          422: "The body or a parameter is invalid; the message names the field and the fix.",
          429: "The key's rate limit is reached; retry after the Retry-After header's seconds.",
          503: "A model part is not ready or failed; retry after the Retry-After header's seconds."}
SessionId = Path(pattern=RECORD_ID, description="A session id from POST /v1/sessions or a chat reply's attune "
                 "extension.")
FlagStatus = Query("open", description="open: flags not yet acknowledged; acknowledged; or all.",
                   json_schema_extra={"enum": list(FLAG_STATUSES)})
FAULTS_BODY = {"type": "object", "additionalProperties": {"type": "object"}, "description": "Test hooks only "
               "(ATTUNE_TEST_HOOKS=1): {part: fault}, e.g. {\"scorer\": {\"safety\": 1.0, \"times\": 1}}; an "
               "empty fault disarms its part (see serving/app.py and serving/faults.py)."}


def doc(answer: type[BaseModel] | None, *errors: int, status: int = 200, body: type[BaseModel] | dict | None = None,
        body_required: bool = True, public: bool = False, responses: dict | None = None) -> dict[str, Any]:
    """Route keywords for the OpenAPI document: the answer's model and status, the errors it may give (401 and
    429 for every keyed route) and, since routes read their bodies themselves, the body's schema (a model of
    serving.protocol or serving.sessions_protocol, registered by `openapi`, or a plain JSON schema)."""
    codes = sorted(set(errors) | (set() if public else {401, 429}))
    extra: dict[str, Any] = {} if public else {"security": [{BEARER: []}]}
    if body is not None:
        schema = body if isinstance(body, dict) else {"$ref": f"#/components/schemas/{body.__name__}"}
        extra["requestBody"] = {"required": body_required, "content": {"application/json": {"schema": schema}}}
    return {"status_code": status, "response_model": answer, "openapi_extra": extra,
            "responses": {**{c: {"model": ErrorResponse, "description": ERRORS[c]} for c in codes},
                          **(responses or {})}}


async def read_body(request: Request) -> bytes:
    """The body, refused with 413 as soon as it passes the limit (Content-Length is checked first)."""
    limit = request.app.state.service.config.limits.max_body_bytes
    too_big = ApiError(413, f"the request body is over {limit} bytes; send fewer or shorter messages (a session "
                       "keeps its history, so only the new message is needed)", code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    inlined = request.scope.get(BODY_SCOPE_KEY)
    if isinstance(inlined, bytes):  # read ahead by Serve's proxy (serving.proxy_middleware)
        if len(inlined) > limit:
            raise too_big
        return inlined
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


async def admitted(request: Request, body: type | None = None, operator: bool = False):
    """(service, principal, parsed body or None) after the key, the rate limit and the body checks."""
    svc: ChatService = request.app.state.service
    principal = await svc.admit(request.headers.get("authorization"), operator=operator)
    return svc, principal, (parse_model(body, await read_body(request)) if body is not None else None)


def _json(model, status: int = 200) -> JSONResponse:
    return JSONResponse(model if isinstance(model, dict) else model.model_dump(mode="json"), status_code=status)


STREAM_DOC = {200: {"description": "The reply; with stream=true, server-sent events.", "content": {
    "text/event-stream": {"schema": {"type": "object", "required": ["data"], "properties": {"data": {
        "type": "string", "description": "One chat.completion.chunk as JSON (the last one with a choice carries "
        "finish_reason and the attune extension), then [DONE]."}}}}}}}


@router.post("/v1/chat/completions", **doc(ChatCompletionResponse, 400, 403, 404, 413, 422, 503,
                                           body=ChatCompletionRequest, responses=STREAM_DOC))
async def chat_completions(request: Request):
    result = await request.app.state.service.chat_completion(request.headers.get("authorization"),
                                                             lambda: read_body(request))
    if isinstance(result, ChatCompletionResponse):
        return _json(result)
    return StreamingResponse(result, media_type="text/event-stream", headers=SSE_HEADERS)


@router.get("/v1/models", **doc(ModelList))
async def models(request: Request):
    svc, _, _ = await admitted(request)
    return _json(await svc.models())


@router.post("/v1/sessions", **doc(SessionOut, 413, 422, status=201, body=SessionCreate, body_required=False))
async def create_session(request: Request):
    svc, who, body = await admitted(request, SessionCreate)
    return _json(await svc.sessions.create(who, body), 201)


@router.get("/v1/sessions/{session_id}", **doc(SessionOut, 404, 422))
async def get_session(request: Request, session_id: str = SessionId):
    svc, who, _ = await admitted(request)
    return _json(await svc.sessions.get(who, session_id))


@router.patch("/v1/sessions/{session_id}", **doc(SessionOut, 404, 413, 422, body=SessionCreate,
                                                  body_required=False))
async def update_session(request: Request, session_id: str = SessionId):
    svc, who, body = await admitted(request, SessionCreate)
    return _json(await svc.sessions.update(who, session_id, body))


@router.get("/v1/sessions/{session_id}/messages", **doc(MessageList, 404, 422))
async def session_messages(request: Request, session_id: str = SessionId):
    svc, who, _ = await admitted(request)
    return _json(await svc.sessions.messages(who, session_id))


@router.delete("/v1/sessions/{session_id}", **doc(SessionDeleted, 404, 422))
async def delete_session(request: Request, session_id: str = SessionId):
    svc, who, _ = await admitted(request)
    return _json(await svc.sessions.delete(who, session_id))


@router.post("/v1/sessions/{session_id}/feedback", **doc(FeedbackOut, 404, 413, 422, status=201, body=FeedbackIn))
async def feedback(request: Request, session_id: str = SessionId):
    svc, who, body = await admitted(request, FeedbackIn)
    return _json(await svc.sessions.feedback(who, session_id, body), 201)


@router.get("/healthz", **doc(Health, public=True, responses={
    503: {"model": Health, "description": "Not ready: each part says why; retry after the Retry-After seconds."}}))
async def healthz(request: Request):
    ready, parts = await request.app.state.service.health()
    return JSONResponse({"status": "ok" if ready else "unavailable", **parts}, status_code=200 if ready else 503,
                        headers={} if ready else {"Retry-After": "5"})


@router.get("/metrics", **doc(None, public=True, responses={
    200: {"description": "Prometheus text format: the series of every live ingress replica, each labelled replica.",
          "content": {"text/plain": {"schema": {"type": "string"}}}}}))
async def metrics(request: Request):
    body, content_type = await request.app.state.service.export.render()
    return Response(body, media_type=content_type)


@router.get("/v1/admin/status", **doc(None, 403, 503))
async def admin_status(request: Request):
    svc, _, _ = await admitted(request, operator=True)
    return _json(await svc.admin_status())


@router.post("/v1/admin/keys", **doc(KeyCreated, 403, 413, 422, status=201, body=KeyCreate))
async def admin_keys(request: Request):
    svc, _, body = await admitted(request, KeyCreate, operator=True)
    return _json(await svc.create_key(body.model_dump()), 201)


@router.post("/v1/admin/faults", **doc(None, 403, 404, 413, 422, body=FAULTS_BODY, body_required=False))
async def admin_faults(request: Request):
    svc, _, body = await admitted(request, dict, operator=True)
    return _json(await svc.inject_faults(body))


@router.get("/v1/admin/flagged", **doc(FlagList, 403, 422))
async def admin_flagged(request: Request, status: str = FlagStatus):
    svc, _, _ = await admitted(request, operator=True)
    unknown = sorted(set(request.query_params) - {"status"})
    if unknown:
        raise ApiError(422, f"unknown query parameter(s) {[u[:40] for u in unknown]}; this endpoint takes only "
                       f"status ({'|'.join(FLAG_STATUSES)})", param=unknown[0][:40], code="invalid_value")
    return _json(await svc.flagged.by_status(status))


@router.post("/v1/admin/flagged/{session_id}/ack", **doc(FlagOut, 403, 404, 422))
async def admin_flag_ack(request: Request, session_id: str = SessionId):
    svc, who, _ = await admitted(request, operator=True)
    return _json(await svc.flagged.acknowledge(who, session_id))


@router.get("/v1/admin/sessions/{session_id}/messages", **doc(MessageList, 403, 404, 410, 422))
async def admin_session_messages(request: Request, session_id: str = SessionId):
    svc, who, _ = await admitted(request, operator=True)
    return _json(await svc.flagged.messages(who, session_id))


def openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus the request bodies' schemas (with the served limits) and the bearer scheme."""
    if app.openapi_schema is None:
        doc_ = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = doc_.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        bodies = request_schemas([ChatCompletionRequest, SessionCreate, FeedbackIn, KeyCreate],
                                 app.state.service.config.limits)
        for name, schema in bodies.items():
            if schemas.setdefault(name, schema) != schema:
                raise RuntimeError(f"two different schemas are named {name!r}; rename one of the models")
        components["securitySchemes"] = {BEARER: {"type": "http", "scheme": "bearer",
                                                  "description": "An API key: 'Authorization: Bearer <key>'."}}
        app.openapi_schema = doc_
    return app.openapi_schema


def _error(status: int, message: str, **kw) -> JSONResponse:
    return JSONResponse(ErrorResponse.of(message, **kw).model_dump(), status_code=status)


def _internal(request: Request, exc: Exception) -> JSONResponse:
    logging.getLogger("attune.api").error("%s %s failed: %s", request.method, request.url.path, type(exc).__name__)
    return _error(500, "internal error; retry, and tell the operator if it persists", type="server_error",
                  code="internal_error")


def _invalid_parameter(_: Request, exc: RequestValidationError) -> JSONResponse:
    """A path parameter FastAPI refused (the bodies are validated by the routes): today only a malformed id."""
    problems = [(str(x["loc"][-1]), f"{str(x['input'])[:80]!r} {NOT_A_RECORD_ID}"
                 if x["type"] == "string_pattern_mismatch" else x["msg"]) for x in exc.errors()]
    return _error(422, "; ".join(f"{name}: {msg}" for name, msg in problems),
                  param=problems[0][0] if problems else None, code="invalid_value")


def create_app(service: ChatService) -> FastAPI:
    app = FastAPI(title="Attune", description="Preference-steerable therapeutic chat (OpenAI-compatible).")
    app.state.service = service
    app.include_router(router)
    app.openapi = lambda: openapi(app)
    app.add_exception_handler(ApiError, lambda _, e: JSONResponse(e.body(), status_code=e.status, headers=e.headers))
    app.add_exception_handler(RequestValidationError, _invalid_parameter)
    app.add_exception_handler(HTTPException, lambda r, e: _error(
        e.status_code, f"{r.method} {r.url.path}: {e.detail}; the routes are listed at /docs",
        code="not_found" if e.status_code == 404 else None))
    app.add_exception_handler(Exception, _internal)
    return app
