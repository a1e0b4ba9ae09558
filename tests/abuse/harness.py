"""
What the abuse suites share: a real daemon (C{twistd -n llmproxy}) started
from YAML text, the fake upstream and scripted hostile upstreams on
loopback in this process, raw-socket clients, and the daemon's memory,
open files and log lines read from outside.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from treq.client import HTTPClient
from treq.content import content
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from llmproxy.testing.fake_upstream import FakeUpstream, listen
from llmproxy.testing.proxy_process import ProxyProcess
from tests.e2e.harness import reactor

CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hi"}]}'
CHAT_STREAM = (
    b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say hi"}]}'
)
OPENAI_HEADERS = {"content-type": "application/json", "authorization": "Bearer sk-abuse-test-1"}


def proc_status(pid: int, field: str) -> int:
    """
    A C{kB} figure (C{VmRSS}, C{VmHWM}) from C{/proc/<pid>/status}.
    """
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def read_records(path: str) -> list[dict[str, Any]]:
    """
    The cost records written so far (none if the file is not there yet).
    """
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        return [orjson.loads(line) for line in f]


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


class AbuseCase(TestCase):
    """
    A fake upstream on loopback, a treq client without keep-alive, and a
    way to start daemons from YAML text.
    """

    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        self.fake = FakeUpstream(reactor)
        port = yield listen(self.fake, reactor)
        self.addCleanup(port.stopListening)
        self.upstream = f"http://127.0.0.1:{port.getHost().port}"
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=pool))
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def config(self, extra: str = "", upstream: str | None = None, idle: float = 10) -> str:
        """
        YAML for the three providers at C{upstream} (the fake by default),
        JSON logs, and C{extra} appended (top-level sections). One attempt
        per request: what each hostile upstream does is seen once, not
        multiplied by retries (llmproxy.test.test_resilience covers those).
        """
        base = upstream or self.upstream
        providers = "".join(
            f"  {name}:\n    base_url: {base}\n"
            f"    timeouts: {{connect_seconds: 2, first_byte_seconds: 10, idle_seconds: {idle}}}\n"
            "    retry: {max_attempts: 1}\n"
            for name in ("openai", "anthropic", "gemini")
        )
        return f"logging: {{format: json}}\nproviders:\n{providers}{extra}"

    def write(self, text: str, name: str = "config.yml") -> str:
        path = os.path.join(self.directory, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    @inlineCallbacks
    def start_proxy(self, text: str, name: str = "config.yml") -> Any:
        proc = yield ProxyProcess.start(reactor, [self.write(text, name)], timeout=30)
        self.addCleanup(proc.stop)
        return proc

    @inlineCallbacks
    def post(
        self,
        proc: ProxyProcess,
        path: str = "/openai/v1/chat/completions",
        body: bytes = CHAT,
        headers: Mapping[str, str] = OPENAI_HEADERS,
    ) -> Any:
        """
        POST and read the whole answer: (status, headers, body).
        """
        response = yield self.http.post(
            proc.url + path, data=body, headers=Headers({k: [v] for k, v in headers.items()})
        )
        received = yield content(response)
        return response.code, response.headers, received

    @inlineCallbacks
    def get(self, proc: ProxyProcess, path: str = "/health") -> Any:
        response = yield self.http.get(proc.url + path)
        received = yield content(response)
        return response.code, response.headers, received

    def log_events(self, proc: ProxyProcess) -> list[dict[str, Any]]:
        """
        Every JSON log line the daemon printed.
        """
        events = []
        for line in proc.output.splitlines():
            if line.startswith(b"{"):
                try:
                    events.append(orjson.loads(line))
                except orjson.JSONDecodeError:
                    continue
        return events

    def access_lines(self, proc: ProxyProcess) -> list[dict[str, Any]]:
        return [e for e in self.log_events(proc) if e.get("namespace") == "llmproxy.access"]

    @inlineCallbacks
    def access_line(self, proc: ProxyProcess, request_id: str) -> Any:
        """
        The access line of one request, once it is written.
        """

        def found() -> list[dict[str, Any]]:
            return [a for a in self.access_lines(proc) if a.get("request_id") == request_id]

        yield self.wait_for(lambda: bool(found()))
        return found()[0]

    @inlineCallbacks
    def wait_for(self, check: Callable[[], bool], seconds: float = 10, step: float = 0.05) -> Any:
        """
        Poll C{check} until it holds; fail after C{seconds}.
        """
        waited = 0.0
        while not check():
            if waited > seconds:
                self.fail(f"still not true after {seconds} s: {check}")
            yield sleep(step)
            waited += step


class Dribbler(Protocol):
    """
    A client that sends its bytes a few at a time, and notices when the
    server answers or closes.
    """

    def __init__(self, stop_reading_at: int | None = None) -> None:
        """
        @param stop_reading_at: stop reading (pause the transport) as soon
            as this many bytes have arrived, within the same read.
        """
        self._received = bytearray()
        self.closed: Deferred[bytes] = Deferred()
        self.connected = False
        self.stop_reading_at = stop_reading_at

    @property
    def received(self) -> bytes:
        return bytes(self._received)

    @property
    def size(self) -> int:
        return len(self._received)

    def connectionMade(self) -> None:
        self.connected = True

    def dataReceived(self, data: bytes) -> None:
        self._received += data
        if self.stop_reading_at is not None and len(self._received) >= self.stop_reading_at:
            self.stop_reading_at = None
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.connected = False
        self.closed.callback(self.received)

    def send(self, data: bytes) -> None:
        if self.connected and self.transport is not None:
            self.transport.write(data)

    def small_buffer(self, size: int = 64 << 10) -> None:
        """
        Cap this socket's receive buffer (Linux grows it to tens of
        megabytes on loopback): a client that stops reading then fills it,
        and the server sees its socket full, as across a network.
        """
        handle: Any = self.transport.getHandle()  # type: ignore[union-attr]
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def connect(port: int, protocol: Protocol) -> Deferred[Any]:
    connected: Deferred[Any] = connectProtocol(
        TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol
    )
    return connected


Responder = Callable[["ScriptedConnection", bytes, bytes], None]
"""Given the connection, a request's head and its body: answer it."""


class ScriptedConnection(Protocol):
    """
    One connection to a L{ScriptedUpstream}: reads a request (head and a
    C{Content-Length} body), then lets the script answer with any bytes.
    """

    factory: ScriptedUpstream

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._head: bytes | None = None
        self._length = 0
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if self._head is None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self._head = bytes(self._buffer[:end])
            del self._buffer[: end + 4]
            self._length = 0
            for line in self._head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    self._length = int(value.strip())
        if len(self._buffer) < self._length:
            return
        head, body = self._head, bytes(self._buffer[: self._length])
        del self._buffer[: self._length]
        self._head = None
        self.factory.requests.append(head)
        self.factory.respond(self, head, body)

    def write(self, data: bytes) -> None:
        if not self.lost and self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = True
        self.factory.connections.discard(self)


class ScriptedUpstream(Factory):
    """
    An upstream that answers whatever bytes its script writes: malformed
    status lines, header floods, compression bombs.
    """

    def __init__(self, respond: Responder) -> None:
        self.respond = respond
        self.requests: list[bytes] = []
        self.connections: set[ScriptedConnection] = set()

    def buildProtocol(self, addr: Any) -> ScriptedConnection:  # type: ignore[override]
        connection = ScriptedConnection()
        connection.factory = self
        self.connections.add(connection)
        return connection


@inlineCallbacks
def serve_script(case: TestCase, respond: Responder) -> Any:
    """
    Start a L{ScriptedUpstream} on loopback; returns (factory, base URL).
    """
    upstream = ScriptedUpstream(respond)
    port: IListeningPort = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        upstream
    )

    def stop() -> Deferred[None]:
        for connection in list(upstream.connections):
            transport: Any = connection.transport
            if transport is not None:
                transport.abortConnection()
        stopped: Deferred[None] = port.stopListening()  # type: ignore[assignment]
        return stopped

    case.addCleanup(stop)
    address: Any = port.getHost()
    return upstream, f"http://127.0.0.1:{address.port}"
