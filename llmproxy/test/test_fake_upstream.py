"""
Tests for L{llmproxy.testing.fake_upstream.server} and the command line:
recording, waiting for requests, loopback TCP and the standalone process.

Also the harness the other C{test_fake_upstream_*} modules share: they
drive the fake's L{Site} in memory (a L{StringTransport} and a L{Clock})
and read the raw bytes it wrote, so framing, timing, flow control and
connection handling are all visible.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any, cast

import orjson
import treq
from attrs import frozen
from twisted.internet.address import IPv4Address
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ClientFactory, ProcessProtocol, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers

from llmproxy.testing.fake_upstream import FakeUpstream, ReceivedRequest, fake_text, listen
from llmproxy.testing.fake_upstream.responder import Responder

OPENAI_AUTH = [(b"Authorization", b"Bearer sk-test")]
ANTHROPIC_AUTH = [(b"x-api-key", b"sk-ant-test"), (b"anthropic-version", b"2023-06-01")]
GEMINI_AUTH = [(b"x-goog-api-key", b"AIza-test")]

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 100,
    "messages": [{"role": "user", "content": "hi"}],
}
CONTENTS = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
WEATHER_TOOL_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer"},
        "unit": {"type": "string", "enum": ["c", "f"]},
    },
    "required": ["city"],
}
WEATHER_ARGUMENTS = {"city": "fake", "days": 1, "unit": "c"}


@frozen
class Response:
    """
    A response parsed from raw bytes.

    @ivar chunks: the body as it was framed (chunked) or the whole body.
    @ivar complete: whether the body ended properly (terminating chunk or
        full C{Content-Length}).
    """

    status: int
    headers: list[tuple[bytes, bytes]]
    chunks: list[bytes]
    complete: bool

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def header(self, name: bytes) -> bytes | None:
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def json(self) -> Any:
        return orjson.loads(self.body)


def parse_response(data: bytes) -> Response | None:
    """
    Parse one HTTP/1.1 response, or C{None} if the head is not all there.
    """
    head, separator, rest = data.partition(b"\r\n\r\n")
    if not separator:
        return None
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name, value.strip()))
    response = Response(status, headers, [], False)
    if response.header(b"transfer-encoding") == b"chunked":
        chunks = []
        complete = False
        while True:
            size_line, found, after = rest.partition(b"\r\n")
            if not found:
                break
            size = int(size_line, 16)
            if size == 0:
                complete = after.startswith(b"\r\n")
                break
            if len(after) < size + 2:
                break
            chunks.append(after[:size])
            rest = after[size + 2 :]
        return Response(status, headers, chunks, complete)
    length = int(response.header(b"content-length") or b"0")
    body = rest[:length]
    return Response(status, headers, [body] if body else [], len(rest) >= length)


def sse_events(body: bytes, separator: bytes = b"\n\n") -> list[tuple[str | None, Any]]:
    """
    (event name, parsed data) for each SSE event in C{body}.
    """
    events: list[tuple[str | None, Any]] = []
    for block in body.split(separator):
        if not block.strip():
            continue
        name = None
        data = b""
        for line in block.replace(b"\r\n", b"\n").split(b"\n"):
            if line.startswith(b"event: "):
                name = line[len(b"event: ") :].decode()
            elif line.startswith(b"data: "):
                data = line[len(b"data: ") :]
        events.append((name, data.decode() if data == b"[DONE]" else orjson.loads(data)))
    return events


class SmallBufferTransport(StringTransport):
    """
    A transport that, like a TCP one, pauses its streaming producer when
    more than C{limit} bytes are waiting, and resumes it on L{drain}.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.waiting = 0

    def write(self, data: bytes) -> None:
        super().write(data)
        self.waiting += len(data)
        if self.producer is not None and self.waiting > self.limit:
            self.producer.pauseProducing()

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def drain(self) -> None:
        self.waiting = 0
        if self.producer is not None:
            self.producer.resumeProducing()


def fake_timers(clock: Clock) -> list[DelayedCall]:
    """
    The pending calls on C{clock} scheduled by the fake itself (not the
    HTTP channel's idle timeout).
    """
    return [
        call
        for call in cast(list[DelayedCall], clock.getDelayedCalls())
        if isinstance(getattr(call.func, "__self__", None), Responder)
    ]


class Connection:
    """
    One in-memory client connection to a fake's L{Site}.
    """

    def __init__(self, fake: FakeUpstream, transport: StringTransport | None = None) -> None:
        self.channel: HTTPChannel = fake.site().buildProtocol(IPv4Address("TCP", "127.0.0.1", 4321))
        self.transport = transport or StringTransport()
        self.channel.makeConnection(self.transport)

    def send(
        self,
        method: bytes,
        target: bytes,
        headers: Iterable[tuple[bytes, bytes]] = (),
        body: bytes | Any = b"",
    ) -> None:
        if not isinstance(body, bytes):
            body = orjson.dumps(body)
        lines = [method + b" " + target + b" HTTP/1.1", b"Host: upstream.test"]
        lines += [name + b": " + value for name, value in headers]
        if body or method == b"POST":
            lines.append(b"Content-Length: " + str(len(body)).encode())
        self.channel.dataReceived(b"\r\n".join(lines) + b"\r\n\r\n" + body)

    @property
    def raw(self) -> bytes:
        value: bytes = self.transport.value()
        return value

    def response(self) -> Response:
        parsed = parse_response(self.raw)
        assert parsed is not None, f"no response head in {self.raw!r}"
        return parsed

    def lose(self) -> None:
        self.channel.connectionLost(Failure(ConnectionDone()))


class FakeTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.fake = FakeUpstream(self.clock)

    def exchange(
        self,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]] = (),
        body: bytes | Any = b"",
    ) -> Connection:
        connection = Connection(self.fake)
        connection.send(method, target, headers, body)
        return connection

    def post(
        self, target: bytes, body: Any, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> Response:
        return self.exchange(b"POST", target, headers, body).response()


class RecordingTests(FakeTestCase):
    def test_raw_request_is_recorded(self) -> None:
        """
        The raw target (percent-encoding intact), query, header lines as
        sent (case, order, duplicates) and body are recorded.
        """
        self.exchange(
            b"POST",
            b"/prefix/v1/files/a%2Fb%2e?x=1&y=%20",
            [(b"X-Dup", b"one"), (b"x-other", b"2"), (b"x-dup", b"two")],
            b"payload",
        )
        [received] = self.fake.received
        self.assertEqual(received.method, b"POST")
        self.assertEqual(received.uri, b"/prefix/v1/files/a%2Fb%2e?x=1&y=%20")
        self.assertEqual(received.path, b"/prefix/v1/files/a%2Fb%2e")
        self.assertEqual(received.query, b"x=1&y=%20")
        self.assertEqual(received.body, b"payload")
        self.assertEqual(
            received.headers,
            [
                (b"Host", b"upstream.test"),
                (b"X-Dup", b"one"),
                (b"x-other", b"2"),
                (b"x-dup", b"two"),
                (b"Content-Length", b"7"),
            ],
        )
        self.assertEqual(received.header_values("x-dup"), [b"one", b"two"])
        self.assertEqual(received.header(b"X-OTHER"), b"2")
        self.assertIsNone(received.header("absent"))

    def test_wait_for_request_hands_each_request_out_once(self) -> None:
        """
        Each request goes to exactly one waiter, in arrival order, whether
        the wait started before or after it arrived.
        """
        self.exchange(b"GET", b"/v1/models", OPENAI_AUTH)
        first = self.successResultOf(self.fake.wait_for_request())
        self.assertEqual(first.uri, b"/v1/models")
        waiting = self.fake.wait_for_request()
        self.assertNoResult(waiting)
        self.exchange(b"GET", b"/v1/models/gpt-4o", OPENAI_AUTH)
        self.assertEqual(self.successResultOf(waiting).uri, b"/v1/models/gpt-4o")

    def test_recording_can_be_turned_off(self) -> None:
        self.fake.record_requests = False
        waiting = self.fake.wait_for_request()
        response = self.exchange(b"GET", b"/v1/models", OPENAI_AUTH).response()
        self.assertEqual(response.status, 200)
        self.assertEqual(self.fake.received, [])
        self.assertNoResult(waiting)
        waiting.cancel()
        self.failureResultOf(waiting)

    def test_bare_resource_records_canonical_headers(self) -> None:
        """
        Mounted as a bare resource (here through treq's in-memory client), the
        fake still answers and records headers from Twisted's L{Headers}.
        """
        from treq.testing import StubTreq

        client: Any = StubTreq(self.fake.resource())
        response = self.successResultOf(
            client.post(
                "http://upstream.test/v1/chat/completions",
                data=orjson.dumps(CHAT),
                headers={"authorization": "Bearer sk", "x-fake-chunks": "2"},
            )
        )
        self.assertEqual(response.code, 200)
        body = orjson.loads(self.successResultOf(response.content()))
        self.assertEqual(body["choices"][0]["message"]["content"], fake_text(2))
        [received] = self.fake.received
        self.assertIn((b"Authorization", b"Bearer sk"), received.headers)


class _SlowReader(Protocol):
    """
    Sends one request and then stops reading, like a stalled client.
    """

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.connected_deferred: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)
        self.transport.pauseProducing()  # type: ignore[attr-defined]
        self.connected_deferred.callback(None)


def _real_reactor() -> Any:
    """
    The global reactor, imported late: trial has installed it by the time a
    test runs.
    """
    from twisted.internet import reactor

    return reactor


class LoopbackTests(TestCase):
    """
    The fake over real TCP on the global reactor.
    """

    timeout = 30

    def setUp(self) -> None:
        self.reactor = _real_reactor()

    @inlineCallbacks
    def listen(self, fake: FakeUpstream) -> Any:
        port: IListeningPort = yield listen(fake, self.reactor)
        self.addCleanup(port.stopListening)
        return port.getHost().port  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_slow_client_pauses_the_fake(self) -> Any:
        """
        A client that stops reading makes the transport pause the fake's
        writes: C{paused_count} goes up and far less than the body is sent.
        """
        fake = FakeUpstream(self.reactor)
        port = yield self.listen(fake)
        body = orjson.dumps({**CHAT, "stream": True})
        request = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
            b"x-fake-bytes: 52428800\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        reader = _SlowReader(request)
        factory = ClientFactory.forProtocol(lambda: reader)
        connector = self.reactor.connectTCP("127.0.0.1", port, factory)
        self.addCleanup(connector.disconnect)
        yield reader.connected_deferred
        while fake.paused_count == 0:
            yield deferLater(self.reactor, 0.01, lambda: None)
        self.assertLess(fake.bytes_sent, 52428800 // 4)
        connector.disconnect()
        lost_at = yield fake.wait_for_disconnect()
        self.assertGreater(lost_at, 0)

    @inlineCallbacks
    def test_treq_round_trip_and_clean_shutdown(self) -> Any:
        """
        A real HTTP client streams from the fake; C{stopListening} also drops
        a connection left open by a hanging response.
        """
        fake = FakeUpstream(self.reactor)
        port = yield self.listen(fake)
        pool = HTTPConnectionPool(self.reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        client = treq.client.HTTPClient(Agent(self.reactor, pool=pool))
        response = yield client.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=orjson.dumps({**CHAT, "stream": True}),
            headers=Headers({b"Authorization": [b"Bearer k"], b"x-fake-delay-ms": [b"5"]}),
        )
        body = yield response.content()
        self.assertEqual(sse_events(body)[-1][1], "[DONE]")
        hanging = client.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=orjson.dumps(CHAT),
            headers=Headers({b"Authorization": [b"Bearer k"], b"x-fake-hang": [b"headers"]}),
        )
        hanging.addErrback(lambda failure: None)
        received: ReceivedRequest = yield fake.wait_for_request()
        received = yield fake.wait_for_request()
        self.assertEqual(received.header(b"x-fake-hang"), b"headers")
        self.assertEqual(fake.active_responses, 1)


class _LineCatcher(ProcessProtocol):
    def __init__(self) -> None:
        self.first_line: Deferred[bytes] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.buffer = b""

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\n" in self.buffer and not self.first_line.called:
            self.first_line.callback(self.buffer.split(b"\n", 1)[0])

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


def _source_root() -> str:
    """
    The directory holding the C{llmproxy} package, for a child's
    C{PYTHONPATH} (trial runs tests from C{_trial_temp}).
    """
    import llmproxy

    return os.path.dirname(os.path.dirname(os.path.abspath(llmproxy.__file__)))


class StandaloneTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_standalone_prints_port_and_serves(self) -> Any:
        """
        C{python -m llmproxy.testing.fake_upstream --port 0} prints the port
        it bound and serves there, with C{--default} knobs applied.
        """
        reactor = _real_reactor()
        catcher = _LineCatcher()
        process = reactor.spawnProcess(
            catcher,
            sys.executable,
            [
                sys.executable,
                "-m",
                "llmproxy.testing.fake_upstream",
                "--port",
                "0",
                "--default",
                "x-fake-chunks=2",
                "--no-auth",
            ],
            env={**os.environ, "PYTHONPATH": _source_root()},
        )

        def stop() -> Deferred[None]:
            if process.pid is not None:
                process.signalProcess("TERM")
            return catcher.ended

        self.addCleanup(stop)
        line = yield catcher.first_line
        port = int(line)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        client = treq.client.HTTPClient(Agent(reactor, pool=pool))
        response = yield client.post(
            f"http://127.0.0.1:{port}/v1/chat/completions", data=orjson.dumps(CHAT)
        )
        body = yield response.json()
        self.assertEqual(body["choices"][0]["message"]["content"], fake_text(2))
