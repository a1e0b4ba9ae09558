"""
Tests for L{llmproxy.upstream}: how upstream connections are made.
"""

from __future__ import annotations

from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI

from llmproxy.upstream import CachedEndpoints


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
