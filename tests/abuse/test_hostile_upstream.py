"""
Item: hostile upstreams. A compression bomb is inflated with bounded
memory; a flood of response headers is cut off; an invalid status line is
reported as such, and the credential an upstream echoes into it never
reaches a log line.
"""

from __future__ import annotations

import gzip
import re
from typing import Any

import orjson
from twisted.internet.defer import gatherResults, inlineCallbacks

from tests.abuse.harness import (
    CHAT,
    AbuseCase,
    Dribbler,
    ScriptedConnection,
    connect,
    proc_status,
    serve_script,
    sleep,
)
from tests.abuse.test_names import metric
from tests.e2e.harness import split_response

BOMB_SIZE = 100_000_000
BOMB = gzip.compress(b"\0" * BOMB_SIZE)


def bomb(connection: ScriptedConnection, head: bytes, body: bytes) -> None:
    connection.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
        b"content-encoding: gzip\r\ncontent-length: %d\r\n\r\n" % len(BOMB) + BOMB
    )


def request(path: bytes = b"/openai/v1/files/f1/content", token: bytes = b"sk-abuse") -> bytes:
    return (
        b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Authorization: Bearer " + token + b"\r\n\r\n"
    )


class CompressionBombTests(AbuseCase):
    @inlineCallbacks
    def test_stalled_bombs_bounded(self) -> Any:
        """
        Eight clients that stop reading a 100 MB gzip bomb (100 KB on the
        wire) raise the daemon's peak memory by a few megabytes, not by the
        inflated size; a client that reads it all gets every byte.
        """
        self.assertLess(len(BOMB), 200_000)
        _, base = yield serve_script(self, bomb)
        proc = yield self.start_proxy(self.config(upstream=base))
        status, _, _ = yield self.get(proc)
        before = proc_status(proc.pid, "VmHWM")
        stalled = [Dribbler(stop_reading_at=100_000) for _ in range(8)]
        yield gatherResults([connect(proc.port, s) for s in stalled])
        for client in stalled:
            client.small_buffer()
            client.send(request())
        yield self.wait_for(lambda: all(s.size >= 100_000 for s in stalled))
        yield sleep(1.0)
        growth_kb = proc_status(proc.pid, "VmHWM") - before
        self.assertLess(growth_kb, 60_000, f"peak grew {growth_kb} kB")
        reader = Dribbler()
        yield connect(proc.port, reader)
        reader.send(request())
        yield reader.closed
        status, _, received = split_response(reader.received)
        self.assertEqual((status, len(received)), (200, BOMB_SIZE))
        self.assertEqual(received.count(b"\0"), BOMB_SIZE)
        for client in stalled:
            client.transport.abortConnection()  # type: ignore[union-attr]
        growth_kb = proc_status(proc.pid, "VmHWM") - before
        self.assertLess(growth_kb, 60_000, f"peak grew {growth_kb} kB")


class ResponseHeadTests(AbuseCase):
    @inlineCallbacks
    def test_header_flood(self) -> Any:
        """
        A response head of a megabyte of headers is given up as an invalid
        response (502, source upstream, kind C{bad_response}); three
        hundred headers within the head limit are relayed, cut to 100.
        """
        flood = [b"X-Flood-%d: %s\r\n" % (n, b"v" * 90) for n in range(10_000)]

        def answer(connection: ScriptedConnection, head: bytes, body: bytes) -> None:
            count = 300 if b"few" in head.split(b"\r\n")[0] else 10_000
            connection.write(
                b"HTTP/1.1 200 OK\r\n"
                + b"".join(flood[:count])
                + b"content-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
            )

        _, base = yield serve_script(self, answer)
        proc = yield self.start_proxy(self.config(upstream=base))
        status, headers, body = yield self.post(proc, "/openai/v1/many")
        self.assertEqual(status, 502, body)
        self.assertEqual(headers.getRawHeaders(b"x-llm-proxy-error-source"), [b"upstream"])
        self.assertIn("invalid HTTP response", orjson.loads(body)["error"]["message"])
        status, headers, body = yield self.post(proc, "/openai/v1/few")
        self.assertEqual(status, 200)
        flooded = [name for name, _ in headers.getAllRawHeaders() if name.startswith(b"X-Flood")]
        self.assertEqual(len(flooded), 100)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
        _, _, exposition = yield self.get(proc, "/metrics")
        self.assertIn('kind="bad_response"', exposition.decode())


class StatusLineTests(AbuseCase):
    @inlineCallbacks
    def test_invalid_status_line_echoing_the_token(self) -> Any:
        """
        An upstream that echoes the client's bearer token (with characters
        outside the usual set) into an invalid status line: the client gets
        502 "invalid HTTP response" (not "unreachable"), and no log line has
        any part of the token.
        """
        token = "t0k\u20acn!#~secret-part".encode()

        def echo(connection: ScriptedConnection, head: bytes, body: bytes) -> None:
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"authorization:"):
                    connection.write(b"HTTP/1.1 2OO " + line.split(b":", 1)[1] + b"\r\n\r\n")
            connection.close()

        _, base = yield serve_script(self, echo)
        proc = yield self.start_proxy(self.config(upstream=base))
        status, _, body = yield self.post(
            proc, body=CHAT, headers={"authorization": "Bearer " + token.decode()}
        )
        self.assertEqual(status, 502, body)
        message = orjson.loads(body)["error"]["message"]
        self.assertIn("invalid HTTP response", message)
        self.assertNotIn("unreachable", message)
        yield self.wait_for(
            lambda: re.search(rb"upstream openai/\S+ failed", proc.output) is not None
        )
        for part in (b"t0k", b"secret-part", "\u20ac".encode(), b"\\xe2\\x82\\xac"):
            self.assertNotIn(part, proc.output)
        _, _, exposition = yield self.get(proc, "/metrics")
        self.assertEqual(
            metric(exposition.decode(), "llmproxy_upstream_errors_total"), 1.0, exposition
        )
