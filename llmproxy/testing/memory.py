# -*- test-case-name: llmproxy.test.test_call -*-
"""
The whole proxy in memory: its Site, the four phases of the request path
and the fake upstream, joined by in-memory connections and run on one
fake clock, for L{SynchronousTestCase}s with no socket and no sleep.

    proxy = MemoryProxy(config)                       # a Config
    response = proxy.request(b"POST", b"/openai/v1/chat/completions",
                             {b"authorization": [b"Bearer sk-test"]}, body)
    proxy.advance(0.5)                                # time passes, bytes flow
    received = proxy.received(response)               # status, headers, body so far

The client side is a real L{Agent} speaking HTTP/1.1 to the proxy's real
L{ProxySite}; the proxy's upstream agent speaks HTTP/1.1 to the fake
upstream's Site. Both connections are L{twisted.test.iosim} pumps that
L{MemoryProxy.flush} drives until nothing moves. Every timer (the proxy's
timeouts, the fake's delays) is on L{MemoryProxy.clock}.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from attrs import define, field
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web.client import URI, Agent, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from llmproxy.attempt import BytesProducer
from llmproxy.budgets import AlertSender, ISpendStore, spend_store_for
from llmproxy.budgets.alerts import Post
from llmproxy.buildinfo import BuildInfo
from llmproxy.config import Config, ProviderConfig
from llmproxy.health import HealthBoard
from llmproxy.metrics import Metrics
from llmproxy.ratelimit import IRateLimiter, limiter_for, rate_limits_for
from llmproxy.records import CostRecord
from llmproxy.runtime import ProxyState, build_runtime
from llmproxy.sinks import ICostSink
from llmproxy.status import StatusBoard
from llmproxy.testing.fake_upstream import FakeUpstream
from llmproxy.web import gateway_site

_T = TypeVar("_T")

BUILD = BuildInfo(version="0.0.0", commit=None, built_at=None, python="3", twisted="0")
"""Build information for proxies in memory (nothing is read from disk)."""


@implementer(IAgentEndpointFactory)
class _MemoryEndpoints:
    """
    Endpoints whose connections the memory reactor only records; the
    L{MemoryAgent} joins each one to its server.
    """

    def __init__(self, reactor: MemoryReactorClock) -> None:
        self._reactor = reactor

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return TCP4ClientEndpoint(self._reactor, "127.0.0.1", uri.port)


@implementer(IAgent)
class MemoryAgent:
    """
    An HTTP/1.1 client whose every connection goes, in memory, to one
    server factory (a Site).
    """

    def __init__(
        self, server: Factory[Any], peer_port: int = 40000, peer_host: str = "127.0.0.1"
    ) -> None:
        """
        @param peer_port: the client port the server sees (one per agent,
            so the proxy's logs can tell its two sides apart).
        @param peer_host: the client address the server sees.
        """
        self._reactor = MemoryReactorClock()
        self._agent = Agent.usingEndpointFactory(self._reactor, _MemoryEndpoints(self._reactor))
        self._server = server
        self._peer_port = peer_port
        self._peer_host = peer_host
        self.pumps: list[iosim.IOPump] = []

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        answer: Deferred[IResponse] = self._agent.request(method, uri, headers, bodyProducer)
        if not self._reactor.tcpClients:
            return answer
        _host, port, factory, _timeout, _bind = self._reactor.tcpClients.pop()
        server_address = IPv4Address("TCP", "127.0.0.1", port)
        client_address = IPv4Address("TCP", self._peer_host, self._peer_port)
        server = self._server.buildProtocol(client_address)
        client = factory.buildProtocol(server_address)
        server_io = iosim.FakeTransport(
            server, isServer=True, hostAddress=server_address, peerAddress=client_address
        )
        client_io = iosim.FakeTransport(
            client, isServer=False, hostAddress=client_address, peerAddress=server_address
        )
        self.pumps.append(iosim.connect(server, server_io, client, client_io, greet=True))
        return answer

    def pump(self) -> bool:
        """
        Move what is waiting on every connection, once; whether anything moved.
        """
        moved = False
        for pump in list(self.pumps):
            if pump.pump():
                moved = True
            if pump.clientIO.disconnected and pump.serverIO.disconnected:
                self.pumps.remove(pump)
        return moved


@implementer(IAgent)
class _ByHost:
    """
    Sends each request to the agent of its URI's host, or to a default one.
    """

    def __init__(self, agents: Mapping[bytes, MemoryAgent], default: MemoryAgent) -> None:
        self._agents = agents
        self._default = default

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        agent = self._agents.get(URI.fromBytes(uri).host, self._default)
        return agent.request(method, uri, headers, bodyProducer)


@implementer(ICostSink)
class RecordingCostSink:
    """
    A cost sink that keeps every record it is given.
    """

    wants_records = True

    def __init__(self) -> None:
        self.records: list[CostRecord] = []

    def write(self, record: CostRecord) -> None:
        self.records.append(record)


@define
class Received:
    """
    What the client has received of one response so far.

    @ivar done: the body ended; C{reason} says how.
    """

    response: IResponse
    body: bytearray = field(factory=bytearray)
    done: bool = False
    reason: Failure | None = None
    protocol: Protocol | None = None

    @property
    def status(self) -> int:
        code: int = self.response.code
        return code

    def header(self, name: bytes) -> bytes | None:
        values = self.response.headers.getRawHeaders(name)
        return values[0] if values else None

    @property
    def complete(self) -> bool:
        return self.done and self.reason is not None and self.reason.check(ResponseDone) is not None


class _Collector(Protocol):
    def __init__(self, received: Received) -> None:
        self._received = received

    def dataReceived(self, data: bytes) -> None:
        self._received.body += data

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        self._received.done = True
        self._received.reason = reason


def _at_once(work: Callable[[], _T]) -> Deferred[_T]:
    """
    Runs "in a thread" at once: in memory, the cost-record rebuild is done
    before the proxy answers its first request.
    """
    return succeed(work())


class MemoryProxy:
    """
    A proxy for one configuration, its fake upstream, and a client, all in
    memory on L{clock}.

    Every provider's C{base_url} is served by the one L{fake} (it answers
    each provider's paths under any prefix).

    @ivar clock: the one clock of the proxy and the fake.
    @ivar fake: the fake upstream.
    @ivar state: the proxy's process state (metrics, health, sink).
    @ivar sink: the cost records written.
    """

    def __init__(
        self,
        config: Config,
        limiter: IRateLimiter | None = None,
        upstream_agent: IAgent | None = None,
        hosts: Sequence[str] = (),
        *,
        spend: ISpendStore | None = None,
        webhook: Post | None = None,
        start: float = 0.0,
    ) -> None:
        """
        @param limiter: the rate limiter; by default the one C{config} asks
            for (a memory limiter on L{clock}, or none).
        @param upstream_agent: how the proxy reaches its upstreams; by
            default in-memory connections to the fakes.
        @param hosts: upstream host names that get a fake of their own (in
            L{fakes}), for tests with several upstreams; every other host is
            served by L{fake}.
        @param spend: the budgets' spend store; by default the one C{config}
            asks for (in memory, rebuilt from its cost-record file at once).
        @param webhook: how budget alerts are POSTed (see L{alerts}).
        @param start: the clock's time to begin at (POSIX seconds).
        """
        self.clock = MemoryReactorClock()
        self.clock.advance(start)
        self.fake = FakeUpstream(self.clock)
        self.fakes = {host: FakeUpstream(self.clock) for host in hosts}
        self.upstream_links = {
            host.encode("ascii"): MemoryAgent(fake.site(), peer_port=40002 + index)
            for index, (host, fake) in enumerate(self.fakes.items())
        }
        self.upstream_link = MemoryAgent(self.fake.site(), peer_port=40001)
        self.upstream_agent: IAgent = upstream_agent or _ByHost(
            self.upstream_links, self.upstream_link
        )
        if limiter is None:
            limiter = limiter_for(rate_limits_for(config), self.clock)
        metrics = Metrics()
        if spend is None:
            spend = spend_store_for(config, self.clock, _at_once)
        self.spend = spend
        self.alerts = AlertSender(self.clock, webhook)
        status = StatusBoard(self.clock)
        runtime = build_runtime(
            config,
            self._agent_for,
            limiter,
            spend=spend,
            alerts=self.alerts,
            metrics=metrics,
            watch=status.budget_spent,
        )
        self.sink = RecordingCostSink()
        self.state = ProxyState(
            clock=self.clock,
            runtime=runtime,
            metrics=metrics,
            health=HealthBoard(self.clock),
            sink=self.sink,
            build=BUILD,
            started_at=self.clock.seconds(),
            status=status,
        )
        self.site = gateway_site(self.state)
        self.client = MemoryAgent(self.site, peer_port=40000)

    def _agent_for(self, provider: ProviderConfig) -> IAgent:
        return self.upstream_agent

    def reload(self, config: Config) -> None:
        """
        What SIGHUP does: a new runtime for C{config}, over the same
        limiter and spend store, for requests that arrive from now on.
        """
        runtime = self.state.runtime
        self.state.runtime = build_runtime(
            config,
            self._agent_for,
            runtime.limiter,
            spend=self.spend,
            alerts=self.alerts,
            metrics=self.state.metrics,
            watch=self.state.status.budget_spent,
        )
        self.state.status.configure(config)

    def request(
        self,
        method: bytes,
        path: bytes,
        headers: Mapping[bytes, Sequence[bytes]] | None = None,
        body: bytes | None = None,
    ) -> Deferred[Received]:
        """
        Send a request to the proxy; the result fires with a L{Received}
        once the response headers are in (the body keeps arriving as the
        test flushes and advances).
        """
        producer = BytesProducer(body) if body is not None else None
        sent = self.client.request(
            method, b"http://proxy" + path, Headers(dict(headers or {})), producer
        )

        def collect(response: IResponse) -> Received:
            received = Received(response)
            received.protocol = _Collector(received)
            response.deliverBody(received.protocol)
            return received

        answer = sent.addCallback(collect)
        self.flush()
        return answer

    def flush(self) -> None:
        """
        Move bytes between the client, the proxy and the fake until nothing
        moves and no timer is due (timers due now fire in between, as the
        reactor's do between its passes over the sockets).
        """
        for _ in range(10_000):
            self.clock.advance(0)
            moved = self.client.pump()
            moved = self.upstream_link.pump() or moved
            for link in self.upstream_links.values():
                moved = link.pump() or moved
            if not moved and not self._due():
                return
        raise RuntimeError("the in-memory network never settled")

    def _due(self) -> bool:
        now = self.clock.seconds()
        return any(call.getTime() <= now for call in self.clock.getDelayedCalls())

    def advance(self, seconds: float, step: float = 0.05) -> None:
        """
        Let C{seconds} pass on the clock in steps of at most C{step},
        flushing after each.
        """
        remaining = seconds
        while remaining > 1e-9:
            now = min(step, remaining)
            self.clock.advance(now)
            remaining -= now
            self.flush()

    def disconnect(self, received: Received) -> None:
        """
        The client gives up on a response whose headers it has.
        """
        protocol = received.protocol
        assert protocol is not None and protocol.transport is not None
        protocol.transport.stopProducing()  # type: ignore[attr-defined]
        self.flush()


__all__ = ["BUILD", "MemoryAgent", "MemoryProxy", "Received", "RecordingCostSink"]
