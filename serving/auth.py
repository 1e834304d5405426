"""Bearer-token authentication of the ranking API, off unless tokens are given.

Tokens come from the replica's environment, never from the YAML config: ``MOESTREAM_API_TOKENS`` holds one or
more (separated by commas or whitespace), and a file named by ``MOESTREAM_API_TOKENS_FILE`` or by
``serving.api_tokens_file`` holds one per line (``#`` starts a comment). The YAML may name the file, not its
contents. With no source set the API is open, as a local development service is; a source that is set but
missing, unreadable or empty stops the replica, because silently serving an open API is the one failure
nobody would notice.

A request is let in when its ``Authorization: Bearer <token>`` matches any configured token. The comparison
takes the same time whatever the token: both sides are hashed to a fixed length and every configured token is
compared with ``hmac.compare_digest``, without stopping at the first match. ``/healthz`` and the documentation
pages stay open (a browser loads them without a header; they reveal nothing a client does not already see).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path

import orjson

log = logging.getLogger(__name__)

API_TOKENS_ENV = "MOESTREAM_API_TOKENS"
API_TOKENS_FILE_ENV = "MOESTREAM_API_TOKENS_FILE"
OPEN_PATHS = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
OPEN_PREFIXES = ("/static-offline-docs/",)
MIN_TOKEN_CHARS = 16
"""Shorter tokens are refused at start-up: a guessable token is worse than none, because it looks like one."""


class TokenError(ValueError):
    """The configured tokens cannot be used; the message names the source, never a token."""


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def _split(text: str) -> list[str]:
    lines = (line.split("#", 1)[0] for line in text.splitlines())
    return [t for line in lines for t in re.split(r"[\s,]+", line) if t]


def _read_file(path: Path, named_by: str) -> list[str]:
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenError(f"cannot read the API token file {path} (named by {named_by}): "
                         f"{exc.strerror if isinstance(exc, OSError) else 'not UTF-8 text'}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("API token file %s can be read by other users (mode %o); chmod 600 it", path, mode & 0o777)
    tokens = _split(text)
    if not tokens:
        raise TokenError(f"the API token file {path} (named by {named_by}) holds no token")
    return tokens


def load_tokens(tokens_file: str | None = None, environ: Mapping[str, str] = os.environ) -> tuple[bytes, ...]:
    """The SHA-256 digests of every configured token; empty when authentication is off.

    ``tokens_file`` is ``serving.api_tokens_file``; the environment adds ``MOESTREAM_API_TOKENS`` and
    ``MOESTREAM_API_TOKENS_FILE``. Every source that is set must yield a token."""
    tokens: list[str] = []
    if API_TOKENS_ENV in environ:
        from_env = _split(environ[API_TOKENS_ENV])
        if not from_env:
            raise TokenError(f"{API_TOKENS_ENV} is set but holds no token; unset it to run without authentication")
        tokens += from_env
    if environ.get(API_TOKENS_FILE_ENV):
        tokens += _read_file(Path(environ[API_TOKENS_FILE_ENV]), API_TOKENS_FILE_ENV)
    if tokens_file:
        tokens += _read_file(Path(tokens_file), "serving.api_tokens_file")
    short = sum(len(t) < MIN_TOKEN_CHARS for t in tokens)
    if short:
        raise TokenError(f"{short} API token(s) shorter than {MIN_TOKEN_CHARS} characters; "
                         "make them with e.g. `openssl rand -hex 32`")
    return tuple(_digest(t.encode()) for t in dict.fromkeys(tokens))


def token_matches(given: bytes, digests: tuple[bytes, ...]) -> bool:
    """Whether ``given`` is one of the tokens, in time independent of which one and of where it differs."""
    candidate = _digest(given)
    found = False
    for digest in digests:  # no early exit: the time does not tell how many tokens were tried
        found |= hmac.compare_digest(candidate, digest)
    return found


class BearerAuth:
    """ASGI middleware: refuse an HTTP request outside the open paths with 401 unless it carries a valid
    bearer token. The response never echoes the token it was sent."""

    def __init__(self, app, digests: tuple[bytes, ...]) -> None:
        self.app = app
        self.digests = digests

    async def __call__(self, scope, receive, send) -> None:
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # under Serve's route prefix the path starts with it
            path = path[len(root):]
        if scope["type"] != "http" or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization")
        scheme, _, token = (header or b"").partition(b" ")
        if header is None or scheme.lower() != b"bearer" or not token.strip():
            await _unauthorized(send, "this API needs a bearer token: send `Authorization: Bearer <token>`",
                                b'Bearer realm="moestream"')
        elif not token_matches(token.strip(), self.digests):
            await _unauthorized(send, "the bearer token is not valid for this API",
                                b'Bearer realm="moestream", error="invalid_token"')
        else:
            await self.app(scope, receive, send)


async def _unauthorized(send, detail: str, challenge: bytes) -> None:
    payload = orjson.dumps({"detail": detail})
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"www-authenticate", challenge)]})
    await send({"type": "http.response.body", "body": payload})


__all__ = ["API_TOKENS_ENV", "API_TOKENS_FILE_ENV", "BearerAuth", "TokenError", "load_tokens", "token_matches"]
