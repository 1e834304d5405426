"""Reading request bodies: a size limit before anything is read, JSON only, and parse errors that say what is wrong.

Every route of the API is a :class:`JsonRoute`. A body whose ``Content-Type`` is not JSON is refused with 415
before it is parsed (FastAPI would hand its bytes to the schema, which calls them "not a valid dictionary").
Bodies are parsed by orjson, which refuses what RFC 8259 refuses; only a body it refuses is parsed again,
by the standard library with hooks, to tell the client precisely why:

- nesting deeper than orjson's 1024 levels is named as such (the standard parser would overflow the stack);
- ``NaN``, ``Infinity`` and numbers too large for a double (``1e400``) are parsed into :class:`NonFinite`,
  which keeps the text, so the schema refuses them at their field: ``user_id: must be a finite number, got
  1e400 (overflows)``;
- a body that is not UTF-8 text is a 400 that gives the position of the first bad byte;
- anything else is the standard parser's error, with its position.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

MAX_JSON_DEPTH = 1024
"""orjson's fixed limit on nested arrays and objects."""
TOO_DEEP = f"nests deeper than {MAX_JSON_DEPTH} levels of arrays and objects"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class NonFinite(float):
    """A number a JSON body held that is not finite (``NaN``, ``Infinity``) or overflows a double (``1e400``),
    with its text, so the field that refuses it can quote what the client sent."""

    text: str

    def __new__(cls, value: float, text: str) -> NonFinite:
        number = super().__new__(cls, value)
        number.text = text
        return number

    def describe(self) -> str:
        overflows = self.text not in ("NaN", "Infinity", "-Infinity")
        return f"{self.text[:40]} (overflows)" if overflows else self.text


def describe_non_finite(value: float) -> str:
    """How to name a non-finite number in a message: its text if it came from a body, else Python's repr."""
    return value.describe() if isinstance(value, NonFinite) else repr(value)


def _parse_float(text: str) -> float:
    value = float(text)
    return value if math.isfinite(value) else NonFinite(value, text)


def _parse_constant(text: str) -> float:
    return NonFinite(float(text), text)


def parse_json(body: bytes) -> Any:
    """The body's JSON value; raises ``json.JSONDecodeError`` (FastAPI answers 422) or a 400 for non-UTF-8."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "depth" in exc.msg or "recursion" in exc.msg.lower():
            raise json.JSONDecodeError(TOO_DEEP, body.decode("utf-8", "replace"), exc.pos) from None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HTTPException(400, f"body is not UTF-8 text (invalid byte at position {exc.start})") from None
    try:
        return json.loads(text, parse_float=_parse_float, parse_constant=_parse_constant)
    except RecursionError:
        raise json.JSONDecodeError("nests too deeply to parse", text, 0) from None


class JsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


def media_type_refusal(content_type: str | None) -> str | None:
    """Why a body with this ``Content-Type`` is refused, or None for JSON (``application/json``, ``*+json``)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return None
    return f"Content-Type must be application/json, got {media[:100] or 'none'}"


class JsonRoute(APIRoute):
    """A route whose body must be JSON (415 otherwise) and is read by :func:`parse_json`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handle_json(request: Request) -> Response:
            if request.method in BODY_METHODS:
                refusal = media_type_refusal(request.headers.get("content-type"))
                if refusal is not None:
                    return JSONResponse({"detail": refusal}, status_code=415)
            return await handle(JsonRequest(request.scope, request.receive))

        return handle_json


class BodyLimit:
    """ASGI middleware: read the request body up to ``max_bytes`` and refuse a larger one with 413, whether
    it declares its length or streams in chunks; a declared length that is not a number is a 400."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await refuse(send, 400, "Content-Length is not a number")
                return
            if length > self.max_bytes:
                await refuse(send, 413, f"request body of {length} bytes exceeds the limit of {self.max_bytes}")
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await refuse(send, 413, f"request body exceeds the limit of {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for the disconnect, as the server would
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def refuse(send, status: int, detail: str) -> None:
    payload = orjson.dumps({"detail": detail})
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


__all__ = ["BodyLimit", "JsonRoute", "NonFinite", "describe_non_finite", "media_type_refusal", "parse_json"]
