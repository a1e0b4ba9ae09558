"""
Shared pieces of the end-to-end suites: a proxy and a fake upstream, both on
real loopback sockets in this process, clients that can see chunks, timing
and raw bytes, the requests the suites send, and configuration files for
the real daemon.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from treq.client import HTTPClient
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from llmproxy.config import (
    CircuitBreakerConfig,
    Config,
    ProviderConfig,
    RetryConfig,
    ServerConfig,
    Timeouts,
)
from llmproxy.service import ProxyService
from llmproxy.tap import build_service
from llmproxy.testing.fake_upstream import FakeUpstream, listen

reactor: Any = _reactor

OPENAI_KEY = b"sk-test-1"
OPENAI_HEADERS = {b"content-type": b"application/json", b"authorization": b"Bearer " + OPENAI_KEY}
ANTHROPIC_HEADERS = {
    b"content-type": b"application/json",
    b"x-api-key": b"sk-ant-test",
    b"anthropic-version": b"2023-06-01",
}
GEMINI_HEADERS = {b"content-type": b"application/json", b"x-goog-api-key": b"AIza-test"}

CHAT_PATH = b"/openai/v1/chat/completions"
CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hi"}]}'
GEMINI_BODY = b'{"contents":[{"role":"user","parts":[{"text":"Say hi"}]}]}'

RawHeaders = Mapping[bytes, bytes] | Sequence[tuple[bytes, bytes]]
"""Request headers for L{raw_request}: a mapping, or pairs to repeat a name."""


def provider_configs(base: str, timeouts: Timeouts | None = None) -> dict[str, ProviderConfig]:
    """
    The three providers plus an OpenAI-compatible one mounted at C{/vllm/}
    whose base URL has a path prefix.

    One attempt per request and no circuit breaking: these suites check
    what passes through, so an upstream error must reach the client as it
    is, however many a test provokes (resilience has suites of its own).
    """
    timeouts = timeouts or Timeouts(connect_seconds=2, first_byte_seconds=5, idle_seconds=5)

    def provider(name: str, kind: str, url: str) -> ProviderConfig:
        return ProviderConfig(
            name=name,
            kind=kind,
            base_url=url,
            timeouts=timeouts,
            retry=RetryConfig(max_attempts=1),
            circuit_breaker=CircuitBreakerConfig(failures=1_000_000),
        )

    return {
        "openai": provider("openai", "openai", base),
        "anthropic": provider("anthropic", "anthropic", base),
        "gemini": provider("gemini", "gemini", base),
        "vllm": provider("vllm", "openai", base + "/prefix"),
    }


@inlineCallbacks
def serve_fake(test: TestCase, fake: FakeUpstream) -> Any:
    """
    Serve C{fake} on a free loopback port until C{test} ends.

    @return: a Deferred that fires with the fake's base URL,
        C{http://127.0.0.1:<port>}.
    """
    port = yield listen(fake, reactor)
    test.addCleanup(port.stopListening)
    return f"http://127.0.0.1:{port.getHost().port}"


class ProxyTestCase(TestCase):
    """
    A trial TestCase with a fake upstream and a proxy running in-process on
    loopback. C{self.proxy_url}, C{self.upstream_url}, C{self.fake},
    C{self.http} (treq over a non-persistent pool).
    """

    timeouts: Timeouts | None = None

    def config(self, upstream_base: str) -> Config:
        return Config(
            server=ServerConfig(max_body_bytes=16 * 1024 * 1024),
            providers=provider_configs(upstream_base, self.timeouts),
        )

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        self.fake = FakeUpstream(reactor)
        self.upstream_url: str = yield serve_fake(self, self.fake)
        self.upstream_port = int(self.upstream_url.rpartition(":")[2])
        yield self.start_proxy(self.config(self.upstream_url))
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=pool))

    def start_proxy(self, config: Config, config_paths: Sequence[str] = ()) -> Deferred[None]:
        """
        Start a proxy for C{config}; C{self.proxy_url} points at it.

        @param config_paths: the files C{config} came from, which a reload
            re-reads.
        """
        self.service: ProxyService = build_service(
            reactor, config, config_paths, ["tcp:0:interface=127.0.0.1"]
        )
        self.service.privilegedStartService()
        self.service.startService()
        self.addCleanup(self.service.stopService)
        address: Any = self.service.ports[0].getHost()
        self.proxy_port = address.port
        self.proxy_url = f"http://127.0.0.1:{self.proxy_port}"
        done: Deferred[None] = Deferred()
        done.callback(None)
        return done

    def with_config(self, **changes: Any) -> Config:
        return attrs.evolve(self.config(self.upstream_url), **changes)

    @inlineCallbacks
    def post(self, path: bytes, headers: RawHeaders, body: bytes) -> Any:
        """
        POST C{body} to the proxy on a connection of its own.

        @return: a Deferred that fires with the status, the headers and the
            (de-chunked) body, as L{split_response} gives them.
        """
        client = yield raw_exchange(self.proxy_port, raw_request(b"POST", path, headers, body))
        return split_response(client.received)


@attrs.define
class Chunk:
    at: float
    data: bytes


class RawClient(Protocol):
    """
    Sends raw request bytes, records every chunk of the answer with its
    arrival time, and fires C{done} when the server closes.
    """

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.chunks: list[Chunk] = []
        self.done: Deferred[bytes] = Deferred()
        self.got_data: Deferred[None] | None = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(Chunk(reactor.seconds(), data))
        waiter, self.got_data = self.got_data, None
        if waiter is not None:
            waiter.callback(None)

    def next_data(self) -> Deferred[None]:
        self.got_data = Deferred()
        return self.got_data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.done.callback(self.received)

    @property
    def received(self) -> bytes:
        return b"".join(chunk.data for chunk in self.chunks)


def raw_request(
    method: bytes,
    target: bytes,
    headers: RawHeaders | None = None,
    body: bytes = b"",
    host: bytes = b"localhost",
) -> bytes:
    """
    Build an HTTP/1.1 request with C{Connection: close}.
    """
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: " + host, b"Connection: close"]
    pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers or [])
    for name, value in pairs:
        lines.append(name + b": " + value)
    if body or method in (b"POST", b"PUT", b"PATCH"):
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@inlineCallbacks
def raw_exchange(port: int, request: bytes) -> Any:
    """
    Send C{request} on a new connection; returns the L{RawClient} once the
    server closed the connection.
    """
    client = RawClient(request)
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    yield client.done
    return client


def split_response(raw: bytes) -> tuple[int, dict[bytes, list[bytes]], bytes]:
    """
    Parse a raw HTTP/1.1 response: status, lower-cased headers, body
    (de-chunked when chunked).
    """
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    if headers.get(b"transfer-encoding") == [b"chunked"]:
        body = dechunk(body)
    return status, headers, body


def dechunk(data: bytes) -> bytes:
    """
    Decode a chunked body (linear time: bodies here reach 50 MB).
    """
    parts: list[bytes] = []
    position = 0
    while position < len(data):
        line_end = data.index(b"\r\n", position)
        size = int(data[position:line_end].split(b";")[0], 16)
        if size == 0:
            break
        start = line_end + 2
        parts.append(data[start : start + size])
        position = start + size + 2
    return b"".join(parts)


def temp_directory(test: TestCase) -> str:
    """
    A new, empty directory of C{test}'s, as an absolute path.
    """
    directory: str = os.path.abspath(test.mktemp())
    os.makedirs(directory)
    return directory


def write_config(test: TestCase, text: str) -> str:
    """
    Write C{text} to C{config.yml} in a new directory of C{test}'s.

    @return: the file's absolute path.
    """
    path = os.path.join(temp_directory(test), "config.yml")
    with open(path, "w") as f:
        f.write(text)
    return path


def providers_yaml(base_url: str, names: Sequence[str] = ("openai", "anthropic", "gemini")) -> str:
    """
    The C{providers:} section of a configuration that sends each provider
    in C{names} to C{base_url}.
    """
    return "providers:\n" + "".join(f"  {name}:\n    base_url: {base_url}\n" for name in names)
