"""The HTTP routes, kept thin: each admits the caller, reads the body, calls `ChatService` and writes the answer;
every error is OpenAI's error shape. `create_app(service)` builds the FastAPI app that the ingress serves.
"""
from __future__ import annotations

import logging

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from serving.chat import ApiError, ChatService, parse_model
from serving.protocol import ChatCompletionResponse, ErrorResponse, FeedbackIn, SessionCreate

router = APIRouter()
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def read_body(request: Request) -> bytes:
    """The body, refused with 413 as soon as it passes the limit (Content-Length is checked first)."""
    limit = request.app.state.service.config.limits.max_body_bytes
    too_big = ApiError(413, f"the request body is over {limit} bytes; send fewer or shorter messages (a session "
                       "keeps its history, so only the new message is needed)", code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
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


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    result = await request.app.state.service.chat_completion(request.headers.get("authorization"),
                                                             lambda: read_body(request))
    if isinstance(result, ChatCompletionResponse):
        return _json(result)
    return StreamingResponse(result, media_type="text/event-stream", headers=SSE_HEADERS)


@router.get("/v1/models")
async def models(request: Request):
    svc, _, _ = await admitted(request)
    return _json(await svc.models())


@router.post("/v1/sessions")
async def create_session(request: Request):
    svc, who, body = await admitted(request, SessionCreate)
    return _json(await svc.create_session(who, body), 201)


@router.get("/v1/sessions/{session_id}")
async def get_session(session_id: str, request: Request):
    svc, who, _ = await admitted(request)
    return _json(await svc.get_session(who, session_id))


@router.patch("/v1/sessions/{session_id}")
async def update_session(session_id: str, request: Request):
    svc, who, body = await admitted(request, SessionCreate)
    return _json(await svc.update_session(who, session_id, body))


@router.get("/v1/sessions/{session_id}/messages")
async def session_messages(session_id: str, request: Request):
    svc, who, _ = await admitted(request)
    return _json(await svc.messages(who, session_id))


@router.delete("/v1/sessions/{session_id}")
async def delete_session(session_id: str, request: Request):
    svc, who, _ = await admitted(request)
    return _json(await svc.delete_session(who, session_id))


@router.post("/v1/sessions/{session_id}/feedback")
async def feedback(session_id: str, request: Request):
    svc, who, body = await admitted(request, FeedbackIn)
    return _json(await svc.feedback(who, session_id, body), 201)


@router.get("/healthz")
async def healthz(request: Request):
    ready, parts = await request.app.state.service.health()
    return JSONResponse({"status": "ok" if ready else "unavailable", **parts}, status_code=200 if ready else 503,
                        headers={} if ready else {"Retry-After": "5"})


@router.get("/metrics")
async def metrics(request: Request):
    body, content_type = request.app.state.service.metrics.render()
    return Response(body, media_type=content_type)


@router.get("/v1/admin/status")
async def admin_status(request: Request):
    svc, _, _ = await admitted(request, operator=True)
    return _json(await svc.admin_status())


@router.post("/v1/admin/keys")
async def admin_keys(request: Request):
    svc, _, body = await admitted(request, dict, operator=True)
    return _json(await svc.create_key(body), 201)


@router.post("/v1/admin/faults")
async def admin_faults(request: Request):
    svc, _, body = await admitted(request, dict, operator=True)
    return _json(await svc.inject_faults(body))


def _error(status: int, message: str, **kw) -> JSONResponse:
    return JSONResponse(ErrorResponse.of(message, **kw).model_dump(), status_code=status)


def _internal(request: Request, exc: Exception) -> JSONResponse:
    logging.getLogger("attune.api").error("%s %s failed: %s", request.method, request.url.path, type(exc).__name__)
    return _error(500, "internal error; retry, and tell the operator if it persists", type="server_error",
                  code="internal_error")


def create_app(service: ChatService) -> FastAPI:
    app = FastAPI(title="Attune", description="Preference-steerable therapeutic chat (OpenAI-compatible).")
    app.state.service = service
    app.include_router(router)
    app.add_exception_handler(ApiError, lambda _, e: JSONResponse(e.body(), status_code=e.status, headers=e.headers))
    app.add_exception_handler(RequestValidationError, lambda _, e: _error(
        422, "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()), code="invalid_value"))
    app.add_exception_handler(HTTPException, lambda r, e: _error(
        e.status_code, f"{r.method} {r.url.path}: {e.detail}; the routes are listed at /docs",
        code="not_found" if e.status_code == 404 else None))
    app.add_exception_handler(Exception, _internal)
    return app
