"""
Keys and budgets in the real daemon (C{twistd -n llmproxy}), the fake
upstream in this process:

  - a restart mid-period remembers spend (memory backend, rebuilt from the
    cost records);
  - two daemons on one Redis share one budget exactly;
  - SIGHUP: a key added works on the next request, a revoked one is refused
    on the next request while its stream in flight completes;
  - a webhook receiver gets exactly one POST per threshold crossing.
"""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import yaml
from treq.client import HTTPClient
from treq.content import content, text_content
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Site

from llmproxy.testing.fake_upstream import FakeUpstream, fake_text
from llmproxy.testing.proxy_process import ProxyProcess
from llmproxy.testing.redis_server import REDIS_SERVER, REDIS_SERVER_MISSING, RedisServer
from tests.e2e.harness import reactor, serve_fake, temp_directory
from tests.e2e.test_redis_fleet import metric
from tests.e2e.test_reload import streamed_text

KEY_A = "llmp-e2e-team-a-5Hq2Wm8Xr4Tz6Cv1Bn3Lk"
KEY_B = "llmp-e2e-team-b-8Dj1Fg5Hk7Lm9Qw2Er4Ty"
PROVIDER_CREDENTIAL = "Bearer sk-provider-e2e-0001"
PRICE = {"input": 1000.0, "output": 2000.0}
CHAT = orjson.dumps(
    {"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "x" * 40}]}
)
STREAM = orjson.dumps(
    {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
)
RESERVED = (10 * PRICE["input"] + 5 * PRICE["output"]) / 1e6
"""A request's worst case: 10 estimated input tokens, at most 5 output."""
COST = (10 * PRICE["input"] + 3 * PRICE["output"]) / 1e6
"""What the fake's answer costs: 10 input tokens, 3 output."""


def entry(key: str, id: str, **fields: Any) -> dict[str, Any]:
    """
    The C{auth.keys} entry of proxy key C{key}.
    """
    return {"id": id, "hash": "sha256:" + hashlib.sha256(key.encode()).hexdigest(), **fields}


class Hooks(Resource):
    """
    A webhook receiver: records every POSTed JSON body.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.posts: list[Any] = []

    def render_POST(self, request: IRequest) -> bytes:
        assert request.content is not None
        self.posts.append(orjson.loads(request.content.read()))
        request.setResponseCode(204)
        return b""


class DaemonTestCase(TestCase):
    timeout = 90

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        self.fake = FakeUpstream(reactor)
        self.upstream: str = yield serve_fake(self, self.fake)
        self.directory = temp_directory(self)
        self.costs = os.path.join(self.directory, "costs.jsonl")
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=pool))

    def write_config(
        self,
        name: str,
        keys: Sequence[dict[str, Any]],
        *,
        redis_url: str | None = None,
        webhook: str | None = None,
        cost_tracking: bool = True,
    ) -> str:
        data: dict[str, Any] = {
            "providers": {
                "openai": {
                    "base_url": self.upstream,
                    "models": {"gpt-4o-mini": {"pricing": PRICE}},
                    "timeouts": {
                        "connect_seconds": 2,
                        "first_byte_seconds": 10,
                        "idle_seconds": 10,
                    },
                }
            },
            "auth": {
                "mode": "keys",
                "keys": list(keys),
                "credentials": {"openai": {"Authorization": "${PROVIDER_CREDENTIAL}"}},
            },
            "features": {},
        }
        if webhook is not None:
            data["auth"]["alerts"] = {"webhook_url": webhook}
        if cost_tracking:
            data["features"]["cost_tracking"] = {
                "enabled": True,
                "flush_interval_seconds": 0.1,
                "transports": [{"type": "file", "file": {"path": self.costs}}],
            }
        if redis_url is not None:
            data["features"]["rate_limiting"] = {
                "backend": "redis",
                "fail_mode": "closed",
                "redis": {"url": redis_url, "timeout_ms": 2000},
            }
        path = os.path.join(self.directory, name + ".yml")
        Path(path).write_text(yaml.safe_dump(data))
        return path

    @inlineCallbacks
    def start(self, *paths: str) -> Any:
        procs = yield gatherResults(
            [
                ProxyProcess.start(
                    reactor, [path], env={"PROVIDER_CREDENTIAL": PROVIDER_CREDENTIAL}
                )
                for path in paths
            ]
        )
        for proc in procs:
            self.addCleanup(proc.stop)
        return procs

    @inlineCallbacks
    def chat(self, proc: ProxyProcess, key: str, body: bytes = CHAT, **fake: str) -> Any:
        headers = Headers(
            {b"content-type": [b"application/json"], b"authorization": [b"Bearer " + key.encode()]}
        )
        for name, value in fake.items():
            headers.setRawHeaders(b"x-fake-" + name.replace("_", "-").encode(), [value.encode()])
        response = yield self.http.post(
            proc.url + "/openai/v1/chat/completions", data=body, headers=headers
        )
        body = yield content(response)
        return response, body

    @inlineCallbacks
    def metrics(self, proc: ProxyProcess) -> Any:
        response = yield self.http.get(proc.url + "/metrics")
        text = yield text_content(response)
        return text

    def assert_provider_credential_only(self) -> None:
        for received in self.fake.received:
            self.assertEqual(
                received.header_values("authorization"), [PROVIDER_CREDENTIAL.encode()]
            )
            seen = b"".join(value for _, value in received.headers) + received.uri
            self.assertNotIn(b"llmp-", seen)


class RestartTests(DaemonTestCase):
    @inlineCallbacks
    def test_restart_remembers_spend(self) -> Any:
        """
        Spend before a restart counts after it: the memory backend rebuilds
        the day's spend from the cost records.
        """
        path = self.write_config(
            "config", [entry(KEY_A, "team-a", budget={"daily_usd": 4 * RESERVED})]
        )
        [proc] = yield self.start(path)
        for _ in range(3):
            response, _ = yield self.chat(proc, KEY_A)
            self.assertEqual(response.code, 200)
        self.assertEqual((yield proc.stop()), 0)
        self.assertEqual(len(Path(self.costs).read_bytes().splitlines()), 3)
        [again] = yield self.start(path)
        # 4 worst cases minus 3 real costs leaves room for one more.
        codes = []
        for _ in range(2):
            response, _ = yield self.chat(again, KEY_A)
            codes.append(response.code)
        self.assertEqual(codes, [200, 402])
        self.assertEqual(
            response.headers.getRawHeaders(b"x-llm-proxy-budget-scope"), [b"key:team-a"]
        )
        text = yield self.metrics(again)
        self.assertAlmostEqual(
            metric(text, "llmproxy_budget_spent_usd", key="team-a", period="day"), 4 * COST
        )
        self.assert_provider_credential_only()


class RedisTests(DaemonTestCase):
    @inlineCallbacks
    def test_two_daemons_share_one_budget(self) -> Any:
        """
        Two daemons on one Redis: a burst split between them admits exactly
        the worst cases that fit, and each then sees the other's spend.
        """
        if REDIS_SERVER is None:
            raise SkipTest(REDIS_SERVER_MISSING)
        redis = RedisServer()
        redis.start()
        self.addCleanup(redis.cleanup)
        keys = [entry(KEY_A, "team-a", budget={"daily_usd": 10 * RESERVED})]
        first, second = yield self.start(
            self.write_config("one", keys, redis_url=redis.url(), cost_tracking=False),
            self.write_config("two", keys, redis_url=redis.url(), cost_tracking=False),
        )
        answers = yield gatherResults(
            [self.chat(proc, KEY_A, headers_delay_ms="2000") for proc in (first, second) * 12]
        )
        codes = [response.code for response, _ in answers]
        self.assertEqual(codes.count(200), 10)
        self.assertEqual(codes.count(402), 14)
        # 10 real costs spent; two more worst cases fit, whichever daemon asks.
        codes = []
        for proc in (first, second, first):
            response, _ = yield self.chat(proc, KEY_A)
            codes.append(response.code)
        self.assertEqual(codes, [200, 200, 402])
        text = yield self.metrics(second)
        self.assertAlmostEqual(
            metric(text, "llmproxy_budget_spent_usd", key="team-a", period="day"), 12 * COST
        )
        self.assertEqual(len(self.fake.received), 12)


class ReloadTests(DaemonTestCase):
    @inlineCallbacks
    def sighup(self, proc: ProxyProcess) -> Any:
        before = proc.output.count(b"configuration reloaded")
        proc.send_signal(signal.SIGHUP)
        for _ in range(200):
            if proc.output.count(b"configuration reloaded") > before:
                return
            yield deferLater(reactor, 0.05, lambda: None)
        self.fail("no reload:\n" + proc.output.decode())

    @inlineCallbacks
    def test_add_and_revoke(self) -> Any:
        path = self.write_config("config", [entry(KEY_A, "team-a")])
        [proc] = yield self.start(path)
        response, _ = yield self.chat(proc, KEY_B)
        self.assertEqual(response.code, 401)
        streaming: Deferred[Any] = self.chat(proc, KEY_A, STREAM, chunks="10", delay_ms="200")
        yield deferLater(reactor, 0.5, lambda: None)
        self.write_config("config", [entry(KEY_B, "team-b")])
        yield self.sighup(proc)
        response, _ = yield self.chat(proc, KEY_A)
        self.assertEqual(response.code, 401)
        response, _ = yield self.chat(proc, KEY_B)
        self.assertEqual(response.code, 200)
        self.assertFalse(streaming.called, "the stream should still be running")
        response, body = yield streaming
        self.assertEqual(response.code, 200)
        self.assertTrue(body.endswith(b"data: [DONE]\n\n"))
        self.assertEqual(streamed_text(body), fake_text(10))
        self.assert_provider_credential_only()
        self.assertNotIn(KEY_A.encode(), proc.output)
        self.assertNotIn(KEY_B.encode(), proc.output)
        self.assertNotIn(b"sk-provider-e2e-0001", proc.output)


class WebhookTests(DaemonTestCase):
    @inlineCallbacks
    def test_one_post_per_crossing(self) -> Any:
        hooks = Hooks()
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(hooks))
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}/budget"
        budget = {"daily_usd": 10 * COST, "alert_at": [0.5, 1.0]}
        path = self.write_config(
            "config", [entry(KEY_A, "team-a", user="alice", budget=budget)], webhook=url
        )
        [proc] = yield self.start(path)
        codes = []
        for _ in range(12):
            response, _ = yield self.chat(proc, KEY_A)
            codes.append(response.code)
        admitted = codes.count(200)
        self.assertEqual(codes, [200] * admitted + [402] * (12 - admitted))
        for _ in range(100):
            if len(hooks.posts) >= 2:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        yield deferLater(reactor, 0.3, lambda: None)
        self.assertEqual([post["fraction"] for post in hooks.posts], [0.5, 1.0])
        half, full = hooks.posts
        self.assertEqual(
            set(half), {"key_id", "user", "period", "spent_usd", "limit_usd", "fraction"}
        )
        self.assertEqual((half["key_id"], half["user"], half["period"]), ("team-a", "alice", "day"))
        self.assertAlmostEqual(half["spent_usd"], 5 * COST)
        self.assertAlmostEqual(full["limit_usd"], 10 * COST)
        self.assertEqual(proc.output.count(b"budget alert: key:team-a reached"), 2)
