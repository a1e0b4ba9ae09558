# -*- test-case-name: llmproxy.test.test_upstream -*-
"""
How the proxy reaches a provider: one L{Upstream} per mounted provider,
each with its own agent over one shared connection pool.
"""

from __future__ import annotations

from collections.abc import Callable
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, cast

from attrs import frozen
from treq.client import HTTPClient
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.web._newclient import HEADER, STATUS, HTTP11ClientProtocol
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
)
from twisted.web.iweb import IAgent, IAgentEndpointFactory
from zope.interface import implementer

from llmproxy.cloudauth import with_proxy_credentials
from llmproxy.config import ProviderConfig
from llmproxy.decoding import GunzipAgent
from llmproxy.providers import ProviderFormat, provider_format

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


MAX_RESPONSE_HEAD = 64 << 10
"""
Largest upstream status line and header section read: beyond it the
response is given up as invalid (an upstream could otherwise send headers
without end until the first-byte timeout).
"""


class ResponseHeadTooLarge(Exception):  # noqa: N818 - reads as what happened
    """
    The upstream's response head exceeded L{MAX_RESPONSE_HEAD}.
    """


class BoundedHeadProtocol(HTTP11ClientProtocol):
    """
    Twisted's HTTP/1.1 client connection, giving up on a response whose
    head grows past L{MAX_RESPONSE_HEAD} (Twisted caps each line at 16 KiB
    but not their number).

    It reads the parser's state, which Twisted does not make public; the
    tests of L{llmproxy.upstream} would notice a change.
    """

    _counted: object = None
    _head = 0

    def dataReceived(self, bytes: bytes) -> None:
        parser = self._parser
        in_head = parser is not None and getattr(parser, "state", None) in (STATUS, HEADER)
        super().dataReceived(bytes)
        if not in_head or self._parser is not parser:
            return
        if getattr(parser, "state", None) not in (STATUS, HEADER):
            return
        if parser is not self._counted:
            self._counted, self._head = parser, 0
        self._head += len(bytes)
        if self._head > MAX_RESPONSE_HEAD:
            self._giveUp(
                Failure(ResponseHeadTooLarge(f"response head over {MAX_RESPONSE_HEAD} bytes"))
            )


class _BoundedFactory(_HTTP11ClientFactory):
    def buildProtocol(self, addr: object) -> HTTP11ClientProtocol:
        return BoundedHeadProtocol(self._quiescentCallback)


class BoundedPool(HTTPConnectionPool):
    """
    A connection pool whose connections are L{BoundedHeadProtocol}s.
    """

    _factory = _BoundedFactory


def make_pool(reactor: object) -> HTTPConnectionPool:
    """
    The one connection pool every upstream client shares; the pool keys idle
    connections by (scheme, host, port), so sharing it costs nothing.
    """
    pool = BoundedPool(reactor, persistent=True)
    pool.maxPersistentPerHost = POOL_IDLE_PER_HOST
    pool.cachedConnectionTimeout = POOL_IDLE_SECONDS
    pool.retryAutomatically = False
    return pool


class NoCookies(CookieJar):
    """
    A cookie jar that stores nothing and adds nothing: a shared jar would
    replay one user's upstream cookies on another user's request. treq
    consults its jar on every request and response; a jar that refuses
    every domain still builds and scans the stdlib's view of each (about
    2% of a request's CPU), so this one answers at once.

    A client's own C{Cookie} header is forwarded as it came, and an
    upstream's C{Set-Cookie} reaches the client; the proxy keeps neither.
    """

    def __init__(self) -> None:
        super().__init__(DefaultCookiePolicy(allowed_domains=[]))

    def add_cookie_header(self, request: Any) -> None:
        return None

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None

    def set_cookie(self, cookie: Any) -> None:
        return None


def no_cookies() -> CookieJar:
    """
    The jar for an upstream client: L{NoCookies}.
    """
    return NoCookies()


@frozen
class Upstream:
    """
    One mounted provider: its configuration, its wire format and the agent
    that reaches it.
    """

    config: ProviderConfig
    format: ProviderFormat
    client: HTTPClient


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


def pooled_agents(reactor: Any, pool: HTTPConnectionPool) -> AgentFactory:
    """
    Build one L{Agent} per provider over the shared pool, so each provider
    has its own connect timeout; a provider that uses the proxy's own cloud
    credentials gets it wrapped (L{with_proxy_credentials}), resolving them
    in the reactor's thread pool.
    """

    def make(provider: ProviderConfig) -> IAgent:
        endpoints = CachedEndpoints(reactor, provider.timeouts.connect_seconds)
        agent: IAgent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
        # Gunzip below treq's own decoding, which then finds it already
        # undone; the credentials (a signature) go on the request above.
        decoded = GunzipAgent(agent, cast(Any, reactor))
        return with_proxy_credentials(provider, decoded, reactor, in_thread)

    def in_thread(work: Callable[[], Any]) -> Deferred[Any]:
        result: Deferred[Any] = deferToThreadPool(reactor, reactor.getThreadPool(), work)
        return result

    return make


def build_upstream(provider: ProviderConfig, agent_for: AgentFactory) -> Upstream:
    """
    The L{Upstream} for one provider's configuration.
    """
    return Upstream(
        config=provider,
        format=provider_format(provider),
        client=HTTPClient(agent_for(provider), cookiejar=cast(Any, no_cookies())),
    )
