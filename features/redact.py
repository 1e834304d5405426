"""Credentials out of connection strings before they are shown or logged (``config show``, the W&B run config).

One function for every place that prints a connection: Feast's Redis form (``host:port,password=...,ssl=true``)
and URLs with a password in their user part (``redis://user:secret@host:6379/0``).
"""

from __future__ import annotations

import re

MASK = "***"
_KEY_VALUE = re.compile(r"(?i)((?:^|[,;&?\s])(?:password|passwd|pwd)=)[^,;&\s]*")
_URL_USERINFO = re.compile(r"(?i)([a-z][a-z0-9+.-]*://[^/@:\s]*:)[^@/\s]*(@)")


def redact_connection(text: str) -> str:
    """``text`` with every password it carries replaced by ``***``; the rest (hosts, ports, options) kept."""
    text = _KEY_VALUE.sub(rf"\g<1>{MASK}", text)
    return _URL_USERINFO.sub(rf"\g<1>{MASK}\g<2>", text)


__all__ = ["MASK", "redact_connection"]
