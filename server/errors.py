"""Errors in OpenAI's shape for every outcome, and the guard around the whole application.

Every error a client can get — bad input, auth, unknown route or method, body too large,
overload, engine down, and our own bugs — is `{"error": {"message", "type", "param", "code"}}`
with its status. The guard catches whatever escapes the routes, answers it with a 500 in that
shape (the keep-alive connection survives, unlike uvicorn's plain-text 500), and counts every
response in `alignd_requests_total` by its final outcome, including a stream that failed after
its 200 was sent and a client that went away (499).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from alignd.server import metrics
from alignd.server.schemas import OFF_WHEN_NULL, ErrorBody

log = logging.getLogger("alignd.server")

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    503: "service_unavailable",
}


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def error_json(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    body = ErrorBody(message=message, type=TYPES.get(status, "server_error"), param=param, code=status)
    return {"error": body.model_dump()}


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_json(status, message, param), status_code=status, headers=headers)


# Parts of a pydantic error location that name a union member, not a field ("constrained-str",
# "list[int]", "function-after[...]", "str").
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MEMBERS = {"str", "int", "float", "bool", "list", "dict", "none"}


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One line for the first problem of a pydantic validation: (message, param). For a value
    that matches no member of a union, the member it came closest to speaks (not "wrong type")."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('msg', '')}".rstrip(": "), None
    first = next((e for e in errors if not str(e.get("type", "")).endswith(("_type", "_parsing"))), first)
    where = ".".join(str(p) for p in first.get("loc", ())
                     if p != "body" and (isinstance(p, int) or (_FIELD.match(p) and p not in _MEMBERS)))
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        name = where.rsplit(".", 1)[-1]
        msg = (f"alignd does not implement {name!r}: leave it out or send null" if name in OFF_WHEN_NULL
               else "unknown field (the README's API section lists every field alignd reads)")
    return (f"{where}: {msg}" if where else msg), where or None


def install(app: FastAPI, max_request_bytes: int) -> None:
    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _routing(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return error_response(exc.status_code, message.get(exc.status_code, str(exc.detail)), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, *validation_message(list(exc.errors())))

    app.add_middleware(Guard, max_request_bytes=max_request_bytes)


ENDPOINTS = {
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat",
    "/v1/models": "models",
    "/v1/rewards": "rewards",
    "/health": "health",
    "/ready": "ready",
    "/metrics": "metrics",
    "/version": "version",
    "/tokenize": "tokenize",
    "/detokenize": "detokenize",
}


class Guard:
    """Pure ASGI middleware (it must see the response, so it cannot be a BaseHTTPMiddleware)."""

    def __init__(self, app: ASGIApp, max_request_bytes: int) -> None:
        self.app, self.max_request_bytes = app, max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        status: int | None = None

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.max_request_bytes:
                await error_response(413, f"request body over {self.max_request_bytes} bytes")(scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        except Exception as e:  # noqa: BLE001 - the last line: every error leaves in OpenAI's shape
            log.exception("alignd: unhandled error in %s %s", scope.get("method"), scope.get("path"))
            state.setdefault("outcome", "500")
            if status is None:
                await error_response(500, f"internal error ({type(e).__name__}); the server goes on")(
                    scope, receive, sending)
        finally:
            endpoint = ENDPOINTS.get(scope.get("path", ""), "other")
            outcome = state.get("outcome") or str(status or 499)
            metrics.REQUESTS.labels(endpoint, state.get("decoder", "none"), outcome).inc()
