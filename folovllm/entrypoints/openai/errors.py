"""Errors in OpenAI's body, {"error": {"message", "type", "param", "code"}}, and the guard in
front of the app: 401 without the API key, 413 for a body over the limit."""

from __future__ import annotations

import hmac
import re

from fastapi.responses import JSONResponse

from folovllm.entrypoints.openai import protocol as p

OPEN_PATHS = ("/health", "/metrics")  # answered without the API key
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               413: "invalid_request_error", 500: "internal_server_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | int | None = None) -> dict:
    info = p.ErrorInfo(message=message, type=ERROR_TYPES.get(status, "error"), param=param, code=code)
    return p.ErrorResponse(error=info).model_dump()


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


def bad_value(e: ValueError) -> APIError:
    """The engine's ValueError as a 400, naming the SamplingParams field where it says one."""
    m = re.match(r"SamplingParams\.(\w+)", str(e))
    return APIError(400, str(e), param=m.group(1) if m else None)


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """pydantic's errors as one message and the first field's dotted name."""
    parts, first = [], None
    for err in errors:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        first = first or loc or None
        parts.append(f"{loc or 'body'}: {err.get('msg')}")
    return "invalid request: " + "; ".join(parts), first


class Guard:
    """ASGI middleware: 401 without the API key (except the open paths), 413 for a body over the
    limit (by Content-Length and by what actually arrives), and the body buffered and replayed
    so later reads of the connection (disconnect checks) still work."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            auth = headers.get("authorization", "")
            token = auth[7:] if auth[:7].lower() == "bearer " else None
            if token is None or not hmac.compare_digest(token.encode(), self.api_key.encode()):
                msg = "missing API key" if token is None else "invalid API key"
                return await error_response(401, f"{msg}; send 'Authorization: Bearer <key>'",
                                            code="invalid_api_key")(scope, receive, send)
        too_big = error_response(413, f"the request body is larger than the limit of {self.max_body_bytes} bytes")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await too_big(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await too_big(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
