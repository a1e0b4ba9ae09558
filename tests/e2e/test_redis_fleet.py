"""
Limits shared by a fleet (issue 6): real daemons (C{twistd -n llmproxy})
sharing one private C{redis-server}, the fake upstream in this process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families
from treq.client import HTTPClient
from treq.content import content
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutput
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from llmproxy import identity
from llmproxy.testing.fake_upstream import FakeUpstream
from llmproxy.testing.proxy_process import ProxyProcess
from llmproxy.testing.redis_server import REDIS_SERVER, REDIS_SERVER_MISSING, RedisServer
from tests.e2e.harness import reactor, serve_fake, temp_directory

OPENAI_HEADERS = {"content-type": "application/json", "authorization": "Bearer sk-fleet-1"}
ANTHROPIC_HEADERS = {
    "content-type": "application/json",
    "x-api-key": "sk-ant-fleet",
    "anthropic-version": "2023-06-01",
}
GEMINI_HEADERS = {"content-type": "application/json", "x-goog-api-key": "AIza-fleet"}
CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hi"}]}'
CHAT_STREAM = (
    b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say hi"}]}'
)
MESSAGES = (
    b'{"model":"claude-haiku-4-5","max_tokens":64,"stream":true,'
    b'"messages":[{"role":"user","content":"Say hi, at some length please"}]}'
)
GEMINI = b'{"contents":[{"role":"user","parts":[{"text":"Say hi"}]}]}'
GEMINI_PATH = "/gemini/v1beta/models/gemini-2.5-flash:generateContent"
REDIS_CLI = "/usr/bin/redis-cli"


def metric(text: str, name: str, **labels: str) -> float:
    """
    The value of one sample in a Prometheus exposition (0 if absent).
    """
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


class FleetTestCase(TestCase):
    """
    A private redis-server, the fake upstream on loopback, and a treq client
    with a persistent pool.
    """

    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        if REDIS_SERVER is None:
            raise SkipTest(REDIS_SERVER_MISSING)
        self.redis = RedisServer()
        self.redis.start()
        self.addCleanup(self.redis.cleanup)
        self.fake = FakeUpstream(reactor)
        self.upstream: str = yield serve_fake(self, self.fake)
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 50
        pool.retryAutomatically = False
        self.addCleanup(pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=pool))
        self.directory = temp_directory(self)

    def write_config(
        self,
        name: str,
        *,
        limits: Mapping[str, int],
        fail_mode: str = "open",
        timeout_ms: int | None = None,
        cost_path: str | None = None,
    ) -> str:
        providers = "".join(
            f"  {provider}:\n    base_url: {self.upstream}\n"
            "    timeouts: {connect_seconds: 2, first_byte_seconds: 10, idle_seconds: 10}\n"
            for provider in ("openai", "anthropic", "gemini")
        )
        limit_lines = "".join(f"      {key}: {value}\n" for key, value in limits.items())
        text = (
            f"providers:\n{providers}"
            "features:\n"
            "  rate_limiting:\n"
            "    enabled: true\n"
            "    backend: redis\n"
            f"    fail_mode: {fail_mode}\n"
            f"    redis: {{url: '{self.redis.url()}'"
            + (f", timeout_ms: {timeout_ms}" if timeout_ms is not None else "")
            + "}\n"
            f"    limits:\n{limit_lines}"
        )
        if cost_path is not None:
            text += (
                "  cost_tracking:\n"
                "    enabled: true\n"
                "    flush_interval_seconds: 0.1\n"
                f"    transports: [{{type: file, file: {{path: {cost_path}}}}}]\n"
            )
        path = os.path.join(self.directory, name + ".yml")
        with open(path, "w") as f:
            f.write(text)
        return path

    @inlineCallbacks
    def start(self, *config_paths: str) -> Any:
        """
        Start one daemon per config file, in parallel.
        """
        procs = yield gatherResults(
            [ProxyProcess.start(reactor, [path], timeout=30) for path in config_paths]
        )
        for proc in procs:
            self.addCleanup(proc.stop)
        return procs

    @inlineCallbacks
    def send(
        self,
        proc: ProxyProcess,
        path: str = "/openai/v1/chat/completions",
        body: bytes = CHAT,
        headers: Mapping[str, str] = OPENAI_HEADERS,
    ) -> Any:
        """
        POST and read the whole answer; returns (status, headers, body).
        """
        response = yield self.http.post(
            proc.url + path,
            data=body,
            headers=Headers({k: [v] for k, v in headers.items()}),
        )
        received = yield content(response)
        return response.code, response.headers, received

    @inlineCallbacks
    def redis_hget(self, key: str, field: str) -> Any:
        output = yield getProcessOutput(
            REDIS_CLI, ["-p", str(self.redis.port), "HGET", key, field], env={}, reactor=reactor
        )
        text = output.strip()
        return int(text) if text else None

    @inlineCallbacks
    def scrape(self, proc: ProxyProcess) -> Any:
        response = yield self.http.get(proc.url + "/metrics")
        body = yield content(response)
        return body.decode("utf-8")


class SharedLimitTests(FleetTestCase):
    @inlineCallbacks
    def test_exactly_the_limit_across_two_processes(self) -> Any:
        """
        Two daemons, one Redis, C{requests_per_minute: 100}, the default
        Redis timeout: 300 concurrent requests spread over both give exactly
        100 successes and 200 429s, three bursts in a row (Redis emptied
        between them), however busy the two processes are.
        """
        config = self.write_config("shared", limits={"requests_per_minute": 100})
        first, second = yield self.start(config, config)
        for burst in range(3):
            if burst:
                yield getProcessOutput(
                    REDIS_CLI, ["-p", str(self.redis.port), "FLUSHALL"], env={}, reactor=reactor
                )
            received = len(self.fake.received)
            started = time.monotonic()
            sends = [self.send(first if n % 2 else second) for n in range(300)]
            results = yield gatherResults(sends)
            elapsed = time.monotonic() - started
            statuses = [status for status, _, _ in results]
            self.assertEqual(
                (statuses.count(200), statuses.count(429)),
                (100, 200),
                (burst, sorted(set(statuses))),
            )
            self.assertEqual(len(self.fake.received) - received, 100)
            # Unshared, each daemon would have admitted up to 100 (200 in all).
            self.assertEqual((yield self.redis_hget("llmproxy:rl:minute:global", "r")), 100)
            for _, headers, body in results:
                scope = headers.getRawHeaders(b"x-ratelimit-scope")
                if scope is not None:
                    self.assertEqual(scope, [b"global"], body)
            self.assertLess(elapsed, 30)
        for proc in (first, second):
            text = yield self.scrape(proc)
            self.assertEqual(
                metric(text, "llmproxy_ratelimit_local_decisions_total", backend="redis"), 0
            )


class OutageTests(FleetTestCase):
    @inlineCallbacks
    def test_redis_killed_and_restarted(self) -> Any:
        """
        One daemon fails open, one fails closed, both on one Redis with
        C{requests_per_minute: 5}. Redis killed: the open one serves within
        its local share of the limit (5, then 429s, never unlimited) and
        says it is degraded (C{/health}, metrics, one warning); the closed
        one answers 503 in the provider's error shape. Redis restarted on
        the same port: the outage ends and the shared limit applies again
        within seconds.
        """
        limits = {"requests_per_minute": 5}
        opened, closed = yield self.start(
            self.write_config("open", limits=limits, fail_mode="open", timeout_ms=200),
            self.write_config("closed", limits=limits, fail_mode="closed", timeout_ms=200),
        )
        statuses = []
        for n in range(5):
            status, _, _ = yield self.send(opened if n % 2 else closed)
            statuses.append(status)
        self.assertEqual(statuses, [200] * 5)
        for proc in (opened, closed):
            status, _, _ = yield self.send(proc)
            self.assertEqual(status, 429)

        self.redis.stop()
        during = []
        for _ in range(10):
            status, _, body = yield self.send(opened)
            during.append(status)
        self.assertEqual(during, [200] * 5 + [429] * 5)
        text = yield self.scrape(opened)
        self.assertEqual(metric(text, "llmproxy_ratelimit_degraded", backend="redis"), 1)
        self.assertEqual(
            metric(text, "llmproxy_ratelimit_local_decisions_total", backend="redis"), 10
        )
        health = orjson.loads((yield content((yield self.http.get(opened.url + "/health")))))
        self.assertEqual(health["rate_limiter"]["state"], "degraded")
        self.assertEqual(health["rate_limiter"]["decided_locally"], 10)
        self.assertEqual(opened.output.count(b"rate-limit Redis unreachable"), 1)

        status, headers, body = yield self.send(closed)
        self.assertEqual(status, 503, body)
        self.assertEqual(headers.getRawHeaders(b"x-llm-proxy-error-source"), [b"proxy"])
        error = orjson.loads(body)["error"]
        self.assertIsInstance(error["message"], str)
        status, headers, body = yield self.send(
            closed, "/anthropic/v1/messages", MESSAGES, ANTHROPIC_HEADERS
        )
        self.assertEqual(status, 503, body)
        anthropic_error = orjson.loads(body)
        self.assertEqual(anthropic_error["type"], "error")
        self.assertIsInstance(anthropic_error["error"]["message"], str)
        status, headers, body = yield self.send(closed, GEMINI_PATH, GEMINI, GEMINI_HEADERS)
        self.assertEqual(status, 503, body)
        self.assertEqual(orjson.loads(body)["error"]["code"], 503)
        self.assertEqual(len(self.fake.received), 5 + 5)

        self.redis.start()
        restarted = time.monotonic()
        # The restarted Redis is empty: a fresh window of 5. Keep sending
        # (alternating) until a 429 from Redis shows the shared limit is
        # enforced again.
        states: list[str] = []
        while time.monotonic() - restarted < 15:
            states = []
            for proc in (opened, closed):
                health = orjson.loads((yield content((yield self.http.get(proc.url + "/health")))))
                states.append(health["rate_limiter"]["state"])
            if states == ["ok", "ok"]:
                break
            yield deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(states, ["ok", "ok"])
        recovered: list[int] = []
        while len(recovered) < 20:
            status, _, _ = yield self.send(closed if len(recovered) % 2 else opened)
            recovered.append(status)
            if status == 429:
                break
        took = time.monotonic() - restarted
        self.assertEqual(recovered, [200] * 5 + [429], recovered)
        self.assertLess(took, 12, recovered)
        self.assertEqual((yield self.redis_hget("llmproxy:rl:minute:global", "r")), 5)
        self.assertIn(b"rate-limit Redis answers again", opened.output)
        text = yield self.scrape(opened)
        self.assertEqual(metric(text, "llmproxy_ratelimit_degraded", backend="redis"), 0)


class ReconciliationTests(FleetTestCase):
    @inlineCallbacks
    def test_redis_tokens_match_metered_tokens(self) -> Any:
        """
        A mixed run (OpenAI JSON and SSE, Anthropic SSE with cache tokens,
        Gemini with thoughts, an upstream 500) over two daemons: the token
        counters in Redis equal the sum of C{total_tokens} in the cost
        records, per scope.
        """
        limits = {"tokens_per_minute": 10_000_000, "tokens_per_day": 100_000_000}
        paths = [os.path.join(self.directory, f"cost-{n}.jsonl") for n in (1, 2)]
        procs = yield self.start(
            self.write_config("a", limits=limits, cost_path=paths[0]),
            self.write_config("b", limits=limits, cost_path=paths[1]),
        )
        calls: list[tuple[str, bytes, Mapping[str, str], int]] = []
        for n in range(4):
            calls += [
                (
                    "/openai/v1/chat/completions",
                    CHAT,
                    {
                        **OPENAI_HEADERS,
                        "x-fake-input-tokens": str(100 + n),
                        "x-fake-output-tokens": str(7 * n),
                        "x-fake-reasoning-tokens": str(n),
                    },
                    200,
                ),
                (
                    "/openai/v1/chat/completions",
                    CHAT_STREAM,
                    {
                        **OPENAI_HEADERS,
                        "x-fake-input-tokens": "2500",
                        "x-fake-cached-tokens": "2000",
                    },
                    200,
                ),
                (
                    "/anthropic/v1/messages",
                    MESSAGES,
                    {
                        **ANTHROPIC_HEADERS,
                        "x-fake-input-tokens": "40",
                        "x-fake-cached-tokens": "3000",
                        "x-fake-cache-write-tokens": str(500 * n),
                        "x-fake-output-tokens": "33",
                    },
                    200,
                ),
                (
                    GEMINI_PATH,
                    GEMINI,
                    {
                        **GEMINI_HEADERS,
                        "x-fake-input-tokens": "12",
                        "x-fake-output-tokens": "4",
                        "x-fake-reasoning-tokens": "250",
                    },
                    200,
                ),
                (
                    "/openai/v1/chat/completions",
                    CHAT,
                    {**OPENAI_HEADERS, "x-fake-status": "500"},
                    500,
                ),
            ]
        results = yield gatherResults(
            [
                self.send(procs[index % 2], path, body, headers)
                for index, (path, body, headers, _) in enumerate(calls)
            ]
        )
        self.assertEqual(
            [status for status, _, _ in results], [expected for _, _, _, expected in calls]
        )
        records = yield self.wait_records(paths, len(calls))
        expected = {
            "global": sum(r["total_tokens"] for r in records),
            "provider:openai": sum(r["total_tokens"] for r in records if r["provider"] == "openai"),
            "provider:anthropic": sum(
                r["total_tokens"] for r in records if r["provider"] == "anthropic"
            ),
            "model:claude-haiku-4-5": sum(
                r["total_tokens"] for r in records if r["model"] == "claude-haiku-4-5"
            ),
            f"key:{identity.key_id(b'AIza-fleet')}": sum(
                r["total_tokens"] for r in records if r["provider"] == "gemini"
            ),
        }
        # Tokens every provider reported, so the comparison is not trivial.
        self.assertGreater(expected["provider:anthropic"], 4 * 3000)
        self.assertTrue(all(r["total_tokens"] == 0 for r in records if r["status"] == 500))
        found = yield self.wait_redis(expected)
        self.assertEqual(found, expected)
        day = yield self.redis_hget("llmproxy:rl:day:global", "t")
        self.assertEqual(day, expected["global"])

    @inlineCallbacks
    def wait_records(self, paths: Sequence[str], count: int) -> Any:
        deadline = time.monotonic() + 10
        while True:
            records = []
            for path in paths:
                if os.path.exists(path):
                    with open(path, "rb") as f:
                        records += [orjson.loads(line) for line in f.read().splitlines()]
            if len(records) >= count or time.monotonic() > deadline:
                self.assertEqual(len(records), count)
                return records
            yield deferLater(reactor, 0.05, lambda: None)

    @inlineCallbacks
    def wait_redis(self, expected: Mapping[str, int]) -> Any:
        """
        The minute windows' token totals of C{expected}'s scopes, once they
        match (reconciliations are asynchronous) or after 5 seconds.
        """
        deadline = time.monotonic() + 5
        while True:
            found = {}
            for scope in expected:
                found[scope] = yield self.redis_hget(f"llmproxy:rl:minute:{scope}", "t")
            if found == expected or time.monotonic() > deadline:
                return found
            yield deferLater(reactor, 0.05, lambda: None)
