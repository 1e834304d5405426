"""The serving benchmark's load generator against a small asyncio HTTP/1.1 server on loopback: every framing
a server may use is read to its end, failures are counted and never crash the loop, connections recover."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from benchmarks.http_load import Connection, closed_loop, post_requests


class Server:
    """Answers each ``POST`` as its JSON body asks: ``{"framing": "length"|"chunked"|"close"|"eof",
    "status": int, "echo": ...}``; ``"drop"`` closes the connection without an answer."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.connections = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                body = await reader.readexactly(length)
                self.bodies.append(body)
                ask = orjson.loads(body)
                if ask["framing"] == "drop":
                    return
                payload, status = orjson.dumps(ask["echo"]), ask.get("status", 200)
                start = f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n".encode()
                if ask["framing"] == "chunked":
                    half = len(payload) // 2
                    chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (payload[:half], payload[half:]) if c)
                    writer.write(start + b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")
                elif ask["framing"] == "eof":
                    writer.write(start + b"\r\n" + payload)
                    await writer.drain()
                    return
                else:
                    close = b"Connection: close\r\n" if ask["framing"] == "close" else b""
                    writer.write(start + b"Content-Length: %d\r\n%s\r\n" % (len(payload), close) + payload)
                    if close:
                        await writer.drain()
                        return
                await writer.drain()
        finally:
            writer.close()


def ask(framing: str, status: int = 200, echo=None) -> bytes:
    return orjson.dumps({"framing": framing, "status": status, "echo": echo if echo is not None else {"n": list(range(50))}})


def test_requests_are_complete_and_every_framing_is_read_to_its_end() -> None:
    async def scenario():
        server = Server()
        port = await server.start()
        host, _, raws = post_requests(f"http://127.0.0.1:{port}/v1/rank", [
            ask("length", echo={"a": 1}), ask("chunked", echo={"b": [1, 2, 3]}), ask("length", echo="x" * 70_000),
            ask("close", echo={"c": 3}), ask("eof", echo={"d": 4}), ask("length", 422, {"e": 5}),
        ])
        connection, got = Connection(host, port), []
        for raw in raws:
            got.append(await connection.request(raw))
        connection.close()
        server.server.close()
        return server, got

    server, got = asyncio.run(scenario())
    assert [(status, orjson.loads(body)) for status, body in got] == [
        (200, {"a": 1}), (200, {"b": [1, 2, 3]}), (200, "x" * 70_000), (200, {"c": 3}), (200, {"d": 4}), (422, {"e": 5}),
    ]
    assert len(server.bodies) == 6 and orjson.loads(server.bodies[1])["framing"] == "chunked"
    assert server.connections == 3  # kept alive, then reopened after "Connection: close" and after the EOF-framed one


def test_failures_are_counted_and_the_loop_recovers() -> None:
    async def scenario():
        server = Server()
        port = await server.start()
        payloads = [ask("length"), ask("length", 503), ask("drop"), ask("chunked")]
        sample = await closed_loop(f"http://127.0.0.1:{port}/v1/rank", payloads, concurrency=2, seconds=0.3, warmup_s=0.0)
        server.server.close()
        return server, sample

    server, sample = asyncio.run(scenario())
    answered = [orjson.loads(b) for b in server.bodies]
    assert len(answered) >= 8  # the loop went on past the failures, round after round
    ok = sum(1 for a in answered if a["framing"] in ("length", "chunked") and a["status"] == 200)
    failed = len(answered) - ok
    # With no warm-up, each request the server saw is counted exactly once: as a latency or as an error.
    assert len(sample.latencies_s) == ok and sample.errors == failed
    assert sample.errors > 0 and sample.latencies_s and all(t > 0 for t in sample.latencies_s)
    assert server.connections > 2  # every dropped connection was replaced


def test_only_plain_http_urls_are_taken() -> None:
    with pytest.raises(ValueError, match="http:// URL"):
        post_requests("https://127.0.0.1:1/v1/rank", [b"{}"])
