"""A closed-loop HTTP/1.1 load generator that leaves the machine to the server it measures.

``moestream bench serving`` runs its client in the benchmark's own process, on the same two cores as
HAProxy and the replicas, so every CPU-second the client spends is taken from the system under test.
With aiohttp the client used 0.17 of the 2 cores at 560 requests/s (0.30 ms of CPU per request,
``docs/serving.md``). This client writes each request as prepared bytes on a kept-alive connection and
reads the response by its framing (``Content-Length`` or chunked), nothing more: 0.07 cores at 690
requests/s (0.10 ms per request). It does on the wire what aiohttp did: one persistent connection per
worker, every response read to its end, its status checked; what it skips is building headers and
response objects in Python. Load generators meant for measuring servers (wrk, hey) are lean for the same
reason.

The workers run a closed loop: each sends its next request when the previous answer has arrived, so
``concurrency`` requests are in flight at all times and the latency of each is recorded.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

REQUEST_TIMEOUT_S = 30.0
"""A request not answered in this time counts as failed (and its connection is dropped)."""


@dataclass
class Sample:
    latencies_s: list[float]
    """Latency of every successful request sent after the warm-up."""
    seconds: float
    """The measured span (after the warm-up)."""
    errors: int
    """Requests after the warm-up that failed: a status other than 200, a broken connection, a timeout."""

    @property
    def rate(self) -> float:
        return len(self.latencies_s) / self.seconds if self.seconds > 0 else float("nan")


class ProtocolError(ConnectionError):
    """The server's answer is not an HTTP/1.1 response this client can frame."""


class Connection:
    """One kept-alive HTTP/1.1 connection: send prepared request bytes, read the status and whole body."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send ``raw`` (a complete request) and return the response's status and body. Connects first
        if needed; closes afterwards when the server says so."""
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._reader, self._writer
        assert reader is not None
        writer.write(raw)
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head[:-4].split(b"\r\n")
        version, _, rest = status_line.partition(b" ")
        if not version.startswith(b"HTTP/1.") or len(rest) < 3 or not rest[:3].isdigit():
            raise ProtocolError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
        headers = {}
        for line in lines:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        if headers.get(b"transfer-encoding") == b"chunked":
            body = await self._read_chunked(reader)
        elif b"content-length" in headers:
            body = await reader.readexactly(int(headers[b"content-length"]))
        else:  # framed by the end of the connection
            body = await reader.read()
            headers[b"connection"] = b"close"
        if headers.get(b"connection") == b"close" or version == b"HTTP/1.0":
            self.close()
        return int(rest[:3]), body

    @staticmethod
    async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, then the blank line
                    pass
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


def post_requests(url: str, bodies: list[bytes]) -> tuple[str, int, list[bytes]]:
    """Host, port and the complete ``POST`` request for each JSON body."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(f"an http:// URL with a host is needed, got {url!r}")
    port = parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = f"POST {path} HTTP/1.1\r\nHost: {parts.hostname}:{port}\r\nContent-Type: application/json\r\n"
    return parts.hostname, port, [f"{head}Content-Length: {len(b)}\r\n\r\n".encode("ascii") + b for b in bodies]


class Tally:
    """Latencies of the calls that started inside the measured window (after the warm-up), and their failures."""

    def __init__(self, warmup_s: float, seconds: float) -> None:
        start = time.perf_counter()
        self.measure_from, self.stop_at = start + warmup_s, start + warmup_s + seconds
        self.latencies: list[float] = []
        self.errors = 0

    def record(self, started: float, ok: bool) -> None:
        """A call that started at ``started`` (``time.perf_counter``) has just ended, ``ok`` or not."""
        if started >= self.measure_from:
            if ok:
                self.latencies.append(time.perf_counter() - started)
            else:
                self.errors += 1

    def sample(self) -> Sample:
        return Sample(self.latencies, self.stop_at - self.measure_from, self.errors)


async def closed_loop(url: str, payloads: list[bytes], concurrency: int, seconds: float, warmup_s: float) -> Sample:
    """``concurrency`` workers each send one request after the other for ``seconds`` (after a warm-up), cycling
    through ``payloads`` (worker ``k`` starts at ``payloads[k]``)."""
    host, port, requests = post_requests(url, payloads)
    tally = Tally(warmup_s, seconds)

    async def worker(k: int) -> None:
        connection, i = Connection(host, port), k
        try:
            while (now := time.perf_counter()) < tally.stop_at:
                raw = requests[i % len(requests)]
                i += concurrency
                try:
                    async with asyncio.timeout(REQUEST_TIMEOUT_S):
                        status, _ = await connection.request(raw)
                    ok = status == 200
                except (OSError, EOFError, ValueError, asyncio.TimeoutError, asyncio.LimitOverrunError):
                    # (IncompleteReadError is an EOFError; ProtocolError an OSError.) Start afresh.
                    connection.close()
                    ok = False
                tally.record(now, ok)
        finally:
            connection.close()

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return tally.sample()


__all__ = ["Connection", "ProtocolError", "Sample", "Tally", "closed_loop", "post_requests"]
