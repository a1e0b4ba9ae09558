"""
Circuit breakers shared through Redis: two proxies on one private
redis-server count failures together, both skip the upstream the fleet
opened, and after the cooldown exactly one request of the fleet probes it.
"""

from __future__ import annotations

from typing import Any

import orjson
from treq.client import HTTPClient
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from llmproxy.config import parse_config
from llmproxy.service import ProxyService
from llmproxy.tap import build_service
from llmproxy.testing.fake_upstream import FakeUpstream
from llmproxy.testing.redis_server import REDIS_SERVER, REDIS_SERVER_MISSING, RedisServer
from tests.e2e.harness import OPENAI_HEADERS, reactor, serve_fake

COOLDOWN = 1.5
BODY = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})


class SharedCircuitTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        if REDIS_SERVER is None:
            raise SkipTest(REDIS_SERVER_MISSING)
        self.redis = RedisServer()
        self.redis.start()
        self.addCleanup(self.redis.cleanup)
        self.flaky = FakeUpstream(reactor)
        self.flaky.defaults["x-fake-status"] = "500"
        self.good = FakeUpstream(reactor)
        flaky_url = yield serve_fake(self, self.flaky)
        good_url = yield serve_fake(self, self.good)
        config = parse_config(
            {
                "providers": {
                    "openai": {
                        "upstreams": [
                            {"name": "flaky", "base_url": flaky_url},
                            {"name": "good", "base_url": good_url, "priority": 1},
                        ],
                        "retry": {"max_attempts": 2},
                        "circuit_breaker": {"failures": 5, "cooldown_seconds": COOLDOWN},
                    }
                },
                "features": {
                    "rate_limiting": {
                        "enabled": True,
                        "backend": "redis",
                        "redis": {"url": self.redis.url()},
                        "limits": {"requests_per_minute": 100_000},
                    }
                },
            },
            "test",
        )
        self.ports = [self.start_proxy(config) for _ in range(2)]
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=pool))
        # Let both connect to Redis and sync once.
        yield deferLater(reactor, 0.6, lambda: None)

    def start_proxy(self, config: Any) -> int:
        service: ProxyService = build_service(reactor, config, [], ["tcp:0:interface=127.0.0.1"])
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        address: Any = service.ports[0].getHost()
        port: int = address.port
        return port

    @inlineCallbacks
    def post(self, port: int) -> Any:
        response = yield self.http.post(
            f"http://127.0.0.1:{port}/openai/v1/chat/completions",
            data=BODY,
            headers=Headers({name: [value] for name, value in OPENAI_HEADERS.items()}),
        )
        yield response.content()
        return response.code

    @inlineCallbacks
    def test_fleet_opens_and_probes_once(self) -> Any:
        # Three failures through one proxy and two through the other: five for
        # the fleet. Every client request still succeeds (via "good").
        for port in (self.ports[0], self.ports[1], self.ports[0], self.ports[1], self.ports[0]):
            status = yield self.post(port)
            self.assertEqual(status, 200)
        self.assertEqual((len(self.flaky.received), len(self.good.received)), (5, 5))
        yield deferLater(reactor, 0.7, lambda: None)
        # Both proxies now skip the open circuit: no call reaches it.
        for port in self.ports * 3:
            status = yield self.post(port)
            self.assertEqual(status, 200)
        self.assertEqual(len(self.flaky.received), 5)
        # After the cooldown, 40 concurrent requests over both proxies: one
        # probe for the whole fleet, which succeeds and closes the circuit.
        # The probe is slow (3 s): every other request of the burst is over
        # (answered by "good") while it is in flight.
        del self.flaky.defaults["x-fake-status"]
        self.flaky.defaults["x-fake-headers-delay-ms"] = "3000"
        yield deferLater(reactor, COOLDOWN, lambda: None)
        burst = [self.post(self.ports[i % 2]) for i in range(40)]
        yield deferLater(reactor, 1.5, lambda: None)
        self.assertEqual(len(self.flaky.received), 6)
        statuses = yield gatherResults(burst)
        self.assertEqual(statuses, [200] * 40)
        self.assertEqual(len(self.flaky.received), 6)
        del self.flaky.defaults["x-fake-headers-delay-ms"]
        yield deferLater(reactor, 0.7, lambda: None)
        for port in self.ports:
            yield self.post(port)
        self.assertEqual(len(self.flaky.received), 8)
