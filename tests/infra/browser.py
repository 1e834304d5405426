"""Headless Chromium (Debian's ``chromium``, installed when missing) driven over the DevTools protocol: load a
page, then read what a person would see (a screenshot), what the page said (console errors, uncaught
exceptions, failed loads) and what it asked for (every request), and evaluate expressions in it."""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx
from websockets.sync.client import connect

from infra.packages import ensure_installed

START_TIMEOUT_S = 60.0
LOAD_TIMEOUT_S = 60.0


@dataclass
class LoadedPage:
    screenshot: bytes
    """PNG of the viewport."""
    errors: list[str] = field(default_factory=list)
    """Console errors, uncaught exceptions and error log entries (a resource that failed to load)."""
    requests: list[str] = field(default_factory=list)
    """Every URL the page requested, itself included."""
    values: dict[str, Any] = field(default_factory=dict)
    """What each expression passed to :func:`load` evaluated to, once the page had loaded."""


def load(url: str, expressions: dict[str, str] | None = None, size: tuple[int, int] = (1280, 2400)) -> LoadedPage:
    with _browser(size) as port:
        target = next(t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page")
        with connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=START_TIMEOUT_S) as ws:
            session = _Session(ws)
            for domain in ("Page", "Runtime", "Log", "Network"):
                session.call(f"{domain}.enable")
            session.call("Page.navigate", url=url)
            session.wait_for("Page.loadEventFired", LOAD_TIMEOUT_S)
            values = {name: session.call("Runtime.evaluate", expression=expression, returnByValue=True)
                      ["result"].get("value") for name, expression in (expressions or {}).items()}
            shot = base64.b64decode(session.call("Page.captureScreenshot", format="png")["data"])
            return LoadedPage(shot, session.errors, session.requests, values)


@contextmanager
def _browser(size: tuple[int, int]) -> Iterator[int]:
    """A headless Chromium with a fresh profile; the DevTools port it chose."""
    binary = ensure_installed("chromium", "chromium")
    profile = Path(tempfile.mkdtemp(prefix="moestream-chromium-"))
    process = subprocess.Popen(
        [binary, "--headless=new", "--disable-gpu", "--no-sandbox", "--no-first-run", "--remote-debugging-port=0",
         f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        active = profile / "DevToolsActivePort"
        while not (active.exists() and active.read_text().count("\n") >= 1):
            assert process.poll() is None, f"chromium exited with {process.returncode}"
            assert time.monotonic() < deadline, f"chromium opened no DevTools port in {START_TIMEOUT_S:.0f}s"
            time.sleep(0.05)
        yield int(active.read_text().splitlines()[0])
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(profile, ignore_errors=True)


class _Session:
    """Commands and the events that arrive between their answers."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.events: list[str] = []
        self.errors: list[str] = []
        self.requests: list[str] = []

    def call(self, method: str, **params) -> dict:
        sent = next(self.ids)
        self.ws.send(json.dumps({"id": sent, "method": method, "params": params}))
        while True:
            message = self._receive(LOAD_TIMEOUT_S)
            if message.get("id") == sent:
                assert "error" not in message, f"{method}: {message['error']}"
                return message["result"]

    def wait_for(self, event: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while event not in self.events:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {event} in {timeout_s:.0f}s"
            self._receive(remaining)

    def _receive(self, timeout_s: float) -> dict:
        message = json.loads(self.ws.recv(timeout=timeout_s))
        method, params = message.get("method"), message.get("params", {})
        if method is None:
            return message
        self.events.append(method)
        if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            self.errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(details.get("exception", {}).get("description") or details.get("text", "exception"))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.errors.append(f"{params['entry']['text']} ({params['entry'].get('url', '')})")
        elif method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
        return message
