"""Rejections in OpenAI's error shape: `ApiError`, and `db_call`, which turns a database that cannot be reached
into a retryable 503. Shared by the chat logic and the sessions it keeps.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from pydantic import ValidationError
from sqlalchemy import exc as sa_exc

from serving.protocol import ErrorResponse

log = logging.getLogger("attune.chat")
RETRY_AFTER_S = 5


class ApiError(Exception):
    """A rejection with an HTTP status and an OpenAI-shaped body whose message says what to change."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, dict(headers or {})
        self.error = ErrorResponse.of(message, type=type, param=param, code=code)

    @classmethod
    def from_validation(cls, err: ValidationError) -> "ApiError":
        e = cls(422, "invalid request")
        e.error = ErrorResponse.from_validation(err)
        return e

    def body(self) -> dict[str, Any]:
        return self.error.model_dump()


async def db_call(fn: Callable, *args, **kwargs):
    """A Repository call in a worker thread; a database that cannot be reached (or is locked or full) is a 503."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except (sa_exc.OperationalError, sa_exc.TimeoutError) as e:
        log.error("database call %s failed: %s", getattr(fn, "__name__", "?"), type(getattr(e, "orig", e)).__name__)
        raise ApiError(503, f"the database is unavailable, so the request was not completed; retry after "
                       f"{RETRY_AFTER_S} s (a message already saved is not saved twice)", type="server_error",
                       code="database_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
