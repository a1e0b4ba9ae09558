# -*- test-case-name: llmproxy.test.test_runtime -*-
"""
What a request needs while it runs, split by lifetime:

  - L{Runtime} is everything derived from one configuration (upstream
    clients, prices, limits). A reload builds a new one and swaps it in; a
    request keeps the one it started with.
  - L{ProxyState} lives as long as the process: metrics, health counters,
    the cost sink, the drain flag and the in-flight count.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, cast

from attrs import define, field, frozen
from treq.client import HTTPClient
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
)
from twisted.web.iweb import IAgent, IAgentEndpointFactory
from zope.interface import implementer

from llmproxy.buildinfo import BuildInfo
from llmproxy.config import Config, ProviderConfig
from llmproxy.health import HealthBoard
from llmproxy.metering import PriceBook, UnpricedWarnings
from llmproxy.metrics import Metrics
from llmproxy.providers import format_for
from llmproxy.providers.base import ProviderFormat
from llmproxy.ratelimit import IRateLimiter
from llmproxy.sinks import ICostSink

POOL_IDLE_PER_HOST = 64
"""
Idle keep-alive connections kept per upstream host. It is not a cap on
concurrency (extra requests open extra connections); it is how many warm
connections survive a burst, so a busy provider does not pay a TLS handshake
per request.
"""

POOL_IDLE_SECONDS = 50
"""Idle connections are closed after this long: below the 60-120 s keep-alive
timeouts of the providers' front ends, so we never write into a connection the
server is closing."""


def make_pool(reactor: object) -> HTTPConnectionPool:
    """
    The one connection pool every upstream client shares; the pool keys idle
    connections by (scheme, host, port), so sharing it costs nothing.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = POOL_IDLE_PER_HOST
    pool.cachedConnectionTimeout = POOL_IDLE_SECONDS
    pool.retryAutomatically = False
    return pool


def no_cookies() -> CookieJar:
    """
    A cookie jar that stores nothing: a shared jar would replay one user's
    upstream cookies on another user's request.
    """
    return CookieJar(DefaultCookiePolicy(allowed_domains=[]))


@frozen
class Upstream:
    """
    One mounted provider: its configuration, its wire format and the agent
    that reaches it.
    """

    config: ProviderConfig
    format: ProviderFormat
    client: HTTPClient


@frozen
class Runtime:
    """
    Everything derived from one configuration.
    """

    config: Config
    upstreams: Mapping[str, Upstream]
    prices: PriceBook
    limiter: IRateLimiter | None


AgentFactory = Callable[[ProviderConfig], IAgent]


@implementer(IAgentEndpointFactory)
class CachedEndpoints:
    """
    Endpoints by (scheme, host, port), built once.

    The standard factory builds a new endpoint, IDNA-encoding the host, for
    every request; an upstream is one host, so that work is done once here.
    The pool still decides whether a request reuses a connection.
    """

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._tls = BrowserLikePolicyForHTTPS()
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def _plain_endpoint(self, host: bytes, port: int) -> IStreamClientEndpoint:
        """
        A TCP endpoint for C{host}. An address literal (a local model
        server, a sidecar) is connected to directly: L{HostnameEndpoint}
        would still ask C{getaddrinfo} in a thread for every new connection.
        """
        text = host.decode("ascii")
        if isIPAddress(text):
            return TCP4ClientEndpoint(self._reactor, text, port, timeout=self._timeout)
        if isIPv6Address(text):
            return TCP6ClientEndpoint(self._reactor, text, port, timeout=self._timeout)
        return HostnameEndpoint(self._reactor, host, port, timeout=self._timeout)

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = self._plain_endpoint(uri.host, uri.port)
            if uri.scheme == b"https":
                creator = self._tls.creatorForNetloc(uri.host, uri.port)
                endpoint = wrapClientTLS(creator, endpoint)
            self._endpoints[key] = endpoint
        return endpoint


def pooled_agents(reactor: object, pool: HTTPConnectionPool) -> AgentFactory:
    """
    Build one L{Agent} per provider over the shared pool, so each provider
    has its own connect timeout.
    """

    def make(provider: ProviderConfig) -> IAgent:
        endpoints = CachedEndpoints(reactor, provider.timeouts.connect_seconds)
        agent: IAgent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
        return agent

    return make


def build_runtime(config: Config, agent_for: AgentFactory, limiter: IRateLimiter | None) -> Runtime:
    """
    Derive a L{Runtime} from C{config}. Disabled providers are not mounted.
    """
    upstreams = {
        name: Upstream(
            config=provider,
            format=format_for(provider.kind),
            client=HTTPClient(agent_for(provider), cookiejar=cast(Any, no_cookies())),
        )
        for name, provider in config.providers.items()
        if provider.enabled
    }
    return Runtime(
        config=config,
        upstreams=upstreams,
        prices=PriceBook.from_config(config),
        limiter=limiter,
    )


@define
class ProxyState:
    """
    Process-wide state shared by the web layer and the forwarder.

    @ivar runtime: the current configuration's runtime; replaced on reload.
    @ivar draining: set once shutdown begins; C{/health} then answers 503.
    @ivar inflight: requests received and not yet finished.
    """

    clock: IReactorTime
    runtime: Runtime
    metrics: Metrics
    health: HealthBoard
    sink: ICostSink
    build: BuildInfo
    started_at: float
    unpriced: UnpricedWarnings = field(factory=UnpricedWarnings)
    draining: bool = False
    inflight: int = 0
    _idle_waiters: list[Deferred[None]] = field(factory=list)

    def request_started(self) -> None:
        self.inflight += 1

    def request_finished(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def wait_idle(self) -> Deferred[None]:
        """
        A Deferred that fires once no request is in flight.
        """
        waiter: Deferred[None] = Deferred()
        if self.inflight == 0:
            waiter.callback(None)
        else:
            self._idle_waiters.append(waiter)
        return waiter
