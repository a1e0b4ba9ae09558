"""
Tests for L{llmproxy.channel}: the deadlines, the connection cap and the
answers to oversized or malformed request heads, on a memory reactor.
"""

from __future__ import annotations

from typing import Any

import orjson
from attrs import evolve
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import HTTPConnectionPool

from llmproxy import buildinfo
from llmproxy.channel import RESERVE, ProxyChannel
from llmproxy.config import Config, ServerConfig
from llmproxy.health import HealthBoard
from llmproxy.metrics import Metrics
from llmproxy.runtime import ProxyState, build_runtime
from llmproxy.sinks import NullCostSink
from llmproxy.site import ProxySite
from llmproxy.upstream import pooled_agents
from llmproxy.web import gateway_site

SERVER = ServerConfig(
    max_connections=3,
    header_timeout_seconds=10,
    body_timeout_seconds=5,
    min_body_rate_bytes_per_second=100,
)


class ChannelTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        config = evolve(Config(), server=SERVER)
        agent_for = pooled_agents(self.clock, HTTPConnectionPool(self.clock))
        self.metrics = Metrics()
        self.state = ProxyState(
            clock=self.clock,
            runtime=build_runtime(config, agent_for, None),
            metrics=self.metrics,
            health=HealthBoard(self.clock),
            sink=NullCostSink(),
            build=buildinfo.load(),
            started_at=0.0,
        )
        self.site: ProxySite = gateway_site(self.state)

    def connect(self) -> tuple[ProxyChannel, StringTransport]:
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
        assert isinstance(channel, ProxyChannel)
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport

    def status(self, transport: StringTransport) -> int:
        return int(transport.value().split(b" ", 2)[1])

    def dropped(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "llmproxy_client_dropped_total", {"reason": reason}
        )
        return value or 0.0

    def test_head_deadline_from_accept(self) -> None:
        """
        A first request head that is not complete 10 s after the connection
        opened is answered 408, however its bytes are spread.
        """
        channel, transport = self.connect()
        for _ in range(9):
            self.clock.advance(1)
            channel.dataReceived(b"G")
        self.assertEqual(transport.value(), b"")
        self.clock.advance(1)
        self.assertEqual(self.status(transport), 408)
        self.assertIn(b"connection: close", transport.value())
        self.assertEqual(self.dropped("header_timeout"), 1)
        channel.dataReceived(b"ET /health HTTP/1.1\r\n\r\n")  # dropped
        self.assertEqual(transport.value().count(b"HTTP/1.1"), 1)

    def test_head_deadline_from_first_byte_on_keepalive(self) -> None:
        """
        Between requests a keep-alive connection waits (the idle timer's
        business); the next head's deadline starts with its first byte.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(self.status(transport), 200)
        self.assertTrue(channel.idle())
        transport.clear()
        self.clock.advance(30)
        self.assertEqual(transport.value(), b"")
        channel.dataReceived(b"GET /hea")
        self.clock.advance(9.9)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.2)
        self.assertEqual(self.status(transport), 408)

    def test_body_rate(self) -> None:
        """
        A body may take 5 s plus 1 s for every 100 bytes it delivered; one
        that falls below is answered 408 in the provider's shape.
        """
        channel, transport = self.connect()
        channel.dataReceived(
            b"POST /anthropic/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 10000\r\n\r\n"
        )
        channel.dataReceived(b"x" * 300)  # buys 3 s: 8 s in all
        self.clock.advance(7.9)
        self.assertEqual(transport.value(), b"")
        channel.dataReceived(b"x" * 100)  # 9 s
        self.clock.advance(1.0)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.2)
        self.assertEqual(self.status(transport), 408)
        body = orjson.loads(transport.value().partition(b"\r\n\r\n")[2])
        self.assertEqual(body["type"], "error")
        self.assertEqual(self.dropped("body_too_slow"), 1)

    def test_one_read_arms_no_deadline(self) -> None:
        """
        A request whose head and body arrive in one read, as nearly all do,
        arms neither deadline: a cancelled timer would linger in the
        reactor's heap for every open stream.
        """
        channel, transport = self.connect()
        armed: list[str] = []
        schedule = channel.callLater

        def recording(delay: float, f: Any, *args: Any, **kwargs: Any) -> Any:
            armed.append(getattr(f, "__name__", ""))
            return schedule(delay, f, *args, **kwargs)

        self.patch(channel, "callLater", recording)
        request = b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
        channel.dataReceived(request)
        channel.dataReceived(request)
        self.assertEqual(transport.value().count(b"HTTP/1.1 404"), 2)
        self.assertNotIn("_head_expired", armed)
        self.assertNotIn("_body_check", armed)
        # A body split over reads is still timed from its head.
        channel.dataReceived(request[:-1])
        self.assertEqual(armed.count("_body_check"), 1)
        self.clock.advance(5.1)
        self.assertIn(b"408", transport.value())

    def test_local_address_asked_once(self) -> None:
        """
        The local address every request records is the connection's,
        taken from the transport once.
        """
        channel, transport = self.connect()
        asked: list[object] = []
        host = transport.getHost()

        def get_host() -> object:
            asked.append(host)
            return host

        self.patch(transport, "getHost", get_host)
        channel.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
        self.assertEqual(transport.value().count(b"HTTP/1.1 200"), 2)
        self.assertIs(channel.getHost(), host)
        self.assertEqual(len(asked), 1)

    def test_cap_and_reserve(self) -> None:
        """
        Above C{max_connections}, a connection may only ask for C{/health}
        (then it is closed); anything else is 503 with C{Retry-After}.
        Beyond the reserve, connections are reset as they are accepted.
        """
        held = [self.connect() for _ in range(3)]
        self.assertFalse(any(channel.reserve for channel, _ in held))
        health, health_transport = self.connect()
        self.assertTrue(health.reserve)
        health.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(self.status(health_transport), 200)
        self.assertIn(b"Connection: close", health_transport.value())
        other, other_transport = self.connect()
        other.dataReceived(
            b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
        )
        self.assertEqual(self.status(other_transport), 503)
        self.assertIn(b"retry-after: 1", other_transport.value())
        # (The two answered ones are still open: memory transports never close.)
        for _ in range(RESERVE - 2):
            self.assertTrue(self.connect()[0].reserve)
        channel, reset = self.connect()
        self.assertEqual(reset.value(), b"")
        self.assertNotIn(channel, self.site.channels)
        self.assertEqual(self.dropped("over_connection_limit"), 2)

    def test_reserve_head_deadline(self) -> None:
        for _ in range(3):
            self.connect()
        _, transport = self.connect()
        self.clock.advance(2.1)
        self.assertEqual(self.status(transport), 408)

    def test_idle_keepalive_reclaimed(self) -> None:
        """
        At the cap, an idle keep-alive connection is closed to make room,
        and the new connection is served normally.
        """
        keeper, keeper_transport = self.connect()
        keeper.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        self.connect()
        self.connect()
        channel, _ = self.connect()
        self.assertFalse(channel.reserve)
        self.assertTrue(keeper_transport.disconnecting)

    def test_heads_too_large(self) -> None:
        """
        414 for a request line over 16 KiB, 431 for a header section over
        16 KiB, 400 for a malformed head; JSON with the error source.
        """
        for raw, status in [
            (b"GET /" + b"a" * 17000, 414),
            (b"GET /x HTTP/1.1\r\nX-A: " + b"a" * 17000, 431),
            (b"GET /x HTTP/1.1\r\n" + b"X-A: " + b"a" * 10000 + b"\r\nX-B: " + b"b" * 7000, 431),
            (b"GET /x HTTP/1.1\r\nBad header\r\n\r\n", 400),
        ]:
            channel, transport = self.connect()
            channel.dataReceived(raw + b"\r\n")
            self.assertEqual(self.status(transport), status, raw[:40])
            self.assertIn(b"X-LLM-Proxy-Error-Source: proxy", transport.value())
            self.assertIn(b'"error"', transport.value())
