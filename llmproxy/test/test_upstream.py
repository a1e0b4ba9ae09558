"""
Tests for L{llmproxy.upstream}: how upstream connections are made.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import Request, ResponseFailed
from twisted.web.client import URI
from twisted.web.http_headers import Headers

from llmproxy.upstream import (
    MAX_RESPONSE_HEAD,
    BoundedHeadProtocol,
    CachedEndpoints,
    ResponseHeadTooLarge,
    make_pool,
)


class CachedEndpointsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.endpoints = CachedEndpoints(self.reactor, connect_timeout=7.0)

    def test_ipv4_literal_connects_directly(self) -> None:
        """
        An IPv4 upstream gets a plain TCP endpoint (no name resolution in a
        thread per connection), with the configured connect timeout.
        """
        endpoint = self.endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8080/v1"))
        self.assertIsInstance(endpoint, TCP4ClientEndpoint)
        endpoint.connect(None)  # type: ignore[arg-type]
        host, port, _factory, timeout, _bind = self.reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("127.0.0.1", 8080, 7.0))

    def test_ipv6_literal_connects_directly(self) -> None:
        endpoint = self.endpoints.endpointForURI(URI.fromBytes(b"http://[::1]:8080/v1"))
        self.assertIsInstance(endpoint, TCP6ClientEndpoint)

    def test_hostname_is_resolved(self) -> None:
        endpoint = self.endpoints.endpointForURI(URI.fromBytes(b"http://upstream.internal/v1"))
        self.assertIsInstance(endpoint, HostnameEndpoint)

    def test_https_is_wrapped_in_tls(self) -> None:
        endpoint = self.endpoints.endpointForURI(URI.fromBytes(b"https://10.0.0.5/v1"))
        self.assertNotIsInstance(endpoint, TCP4ClientEndpoint)
        self.assertIsInstance(endpoint._wrappedEndpoint, TCP4ClientEndpoint)  # type: ignore[attr-defined]

    def test_built_once_per_host(self) -> None:
        first = self.endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8080/a"))
        again = self.endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8080/b"))
        other = self.endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8081/a"))
        self.assertIs(first, again)
        self.assertIsNot(first, other)


class BoundedHeadTests(SynchronousTestCase):
    """
    L{BoundedHeadProtocol} gives up on a response head past
    L{MAX_RESPONSE_HEAD}, counting only the head.
    """

    def exchange(self, *chunks: bytes) -> tuple[Any, StringTransport]:
        protocol = BoundedHeadProtocol()
        transport = StringTransport()
        protocol.makeConnection(transport)
        answered = protocol.request(Request(b"GET", b"/", Headers({b"host": [b"x"]}), None))
        for chunk in chunks:
            protocol.dataReceived(chunk)
        return answered, transport

    def test_header_flood(self) -> None:
        flood = b"".join(b"X-Flood-%d: %s\r\n" % (n, b"v" * 100) for n in range(2000))
        answered, transport = self.exchange(b"HTTP/1.1 200 OK\r\n", flood[:40000], flood[40000:])
        failure = self.failureResultOf(answered, ResponseFailed)
        self.assertTrue(failure.value.reasons[0].check(ResponseHeadTooLarge))
        self.assertTrue(transport.disconnecting)

    def test_large_body_in_the_same_read(self) -> None:
        """
        A short head followed, in the same read, by a large body is fine.
        """
        body = b"x" * (2 * MAX_RESPONSE_HEAD)
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
        answered, _ = self.exchange(head + body)
        response = self.successResultOf(answered)
        self.assertEqual(response.code, 200)

    def test_pool_builds_bounded_connections(self) -> None:
        pool = make_pool(MemoryReactorClock())
        factory = pool._factory(lambda protocol: None, "x")
        self.assertIsInstance(factory.buildProtocol(None), BoundedHeadProtocol)
