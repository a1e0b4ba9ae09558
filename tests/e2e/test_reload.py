"""
SIGHUP reload of the real daemon (docs/configuration.md, "Reloading"): a
valid change applies to the next request, an invalid file changes nothing and
is logged with its key path, and a stream open across the reload completes on
the configuration it started with.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import orjson
from treq.client import HTTPClient
from treq.content import content
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from llmproxy.testing.fake_upstream import FakeUpstream, fake_text
from llmproxy.testing.proxy_process import ProxyProcess
from llmproxy.testing.redis_server import REDIS_SERVER, REDIS_SERVER_MISSING, RedisServer
from tests.e2e.harness import reactor, serve_fake, temp_directory

CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
STREAM = b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}'


def headers(**fake: str) -> Headers:
    """
    Request headers, with C{x-fake-*} knobs. The upstream answers gzip:
    Twisted 26.10's C{ContentDecoderAgent} gives a response that had no
    C{Content-Encoding} an empty one, which the forwarder takes for an
    encoding it cannot meter; gzip is decoded and metered.
    """
    result = Headers(
        {
            b"content-type": [b"application/json"],
            b"authorization": [b"Bearer sk-test"],
            b"x-fake-gzip": [b"1"],
        }
    )
    for name, value in fake.items():
        result.setRawHeaders(name.replace("_", "-").encode(), [value.encode()])
    return result


def streamed_text(body: bytes) -> str:
    """
    The text of an OpenAI chat stream: every delta's content, in order.
    """
    text = ""
    for line in body.splitlines():
        if line.startswith(b"data: {"):
            for choice in orjson.loads(line[6:]).get("choices", []):
                text += choice.get("delta", {}).get("content") or ""
    return text


class ReloadTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        self.fake = FakeUpstream(reactor)
        self.upstream: str = yield serve_fake(self, self.fake)
        directory = temp_directory(self)
        self.config_path = os.path.join(directory, "config.yml")
        self.costs = os.path.join(directory, "costs.jsonl")
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=pool))

    def write_config(
        self,
        input_price: float = 1.0,
        limits: str = "",
        base_url: str | None = None,
        server: str = "",
    ) -> None:
        """
        Write the config file: one priced model, cost records flushed every
        0.1 s, and the rate-limiting block C{limits} (YAML under
        C{features.rate_limiting}, off when empty).
        """
        rate_limiting = limits or "enabled: false"
        text = (
            "providers:\n  openai:\n"
            f"    base_url: {base_url or self.upstream}\n"
            "    models:\n      gpt-4o-mini:\n"
            f"        pricing: {{input: {input_price}, output: 2.0}}\n"
            "features:\n"
            "  cost_tracking:\n    enabled: true\n    flush_interval_seconds: 0.1\n"
            f"    transports:\n      - type: file\n        file: {{path: {self.costs}}}\n"
            "  rate_limiting:\n" + "".join(f"    {line}\n" for line in rate_limiting.splitlines())
        )
        if server:
            text += "server:\n" + "".join(f"  {line}\n" for line in server.splitlines())
        Path(self.config_path).write_text(text)

    @inlineCallbacks
    def start(self) -> Any:
        proc = yield ProxyProcess.start(reactor, [self.config_path])
        self.addCleanup(proc.stop)
        self.proc = proc
        return proc

    @inlineCallbacks
    def sighup(self, outcome: bytes = b"configuration reloaded") -> Any:
        """
        Send SIGHUP and wait until the daemon has logged C{outcome} once more.
        """
        before = self.proc.output.count(outcome)
        self.proc.send_signal(signal.SIGHUP)
        for _ in range(200):
            if self.proc.output.count(outcome) > before:
                return
            yield deferLater(reactor, 0.05, lambda: None)
        self.fail(f"no {outcome!r} after SIGHUP:\n" + self.proc.output.decode())

    @inlineCallbacks
    def chat(self, **fake: str) -> Any:
        response = yield self.http.post(
            self.proc.url + "/openai/v1/chat/completions", data=CHAT, headers=headers(**fake)
        )
        body = yield content(response)
        return response, body

    @inlineCallbacks
    def records(self, count: int) -> Any:
        """
        The cost records, once there are C{count} of them.
        """
        lines: list[bytes] = []
        for _ in range(100):
            if os.path.exists(self.costs):
                lines = Path(self.costs).read_bytes().splitlines()
                if len(lines) >= count:
                    break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(lines), count)
        return [orjson.loads(line) for line in lines]

    @inlineCallbacks
    def test_new_price(self) -> Any:
        """
        A new price applies to the next request's cost record.
        """
        self.write_config(input_price=1.0)
        yield self.start()
        response, _ = yield self.chat()
        self.assertEqual(response.code, 200)
        self.write_config(input_price=100.0)
        yield self.sighup()
        response, _ = yield self.chat()
        self.assertEqual(response.code, 200)
        before, after = yield self.records(2)
        # 10 input tokens (the fake's default) at $1 then $100 per 1M.
        self.assertAlmostEqual(before["input_cost"], 10 * 1.0 / 1e6)
        self.assertAlmostEqual(after["input_cost"], 10 * 100.0 / 1e6)
        self.assertAlmostEqual(after["output_cost"], before["output_cost"])

    @inlineCallbacks
    def test_new_limit(self) -> Any:
        """
        Turning rate limiting on applies to the next request; lowering a
        limit applies to the next request too and keeps the requests
        already counted in the window.
        """
        self.write_config()
        yield self.start()
        for _ in range(3):
            response, _ = yield self.chat()
            self.assertEqual(response.code, 200)

        self.write_config(limits="enabled: true\nlimits: {requests_per_minute: 2}")
        yield self.sighup()
        codes = []
        for _ in range(3):
            response, _ = yield self.chat()
            codes.append(response.code)
        self.assertEqual(codes, [200, 200, 429])
        self.assertEqual(response.headers.getRawHeaders(b"x-ratelimit-scope"), [b"global"])

        self.write_config(limits="enabled: true\nlimits: {requests_per_minute: 3}")
        yield self.sighup()
        codes = []
        for _ in range(2):
            response, _ = yield self.chat()
            codes.append(response.code)
        self.assertEqual(codes, [200, 429])

    @inlineCallbacks
    def test_status_page(self) -> Any:
        """
        A token set for the status page, and the page turned off, apply to
        the next request.
        """
        self.write_config()
        yield self.start()
        yield self.chat()
        url = self.proc.url + "/status.json"
        response = yield self.http.get(url)
        data = orjson.loads((yield content(response)))
        self.assertEqual(data["today"]["totals"]["requests"], 1)
        token = "reloaded-status-token-42"
        self.write_config(server=f"status: {{token: {token}}}")
        yield self.sighup()
        response = yield self.http.get(url)
        yield content(response)
        self.assertEqual(response.code, 401)
        response = yield self.http.get(
            url, headers=Headers({b"authorization": [f"Bearer {token}".encode()]})
        )
        yield content(response)
        self.assertEqual(response.code, 200)
        self.write_config(server="status: {enabled: false}")
        yield self.sighup()
        for path in ("/status", "/status.json"):
            response = yield self.http.get(self.proc.url + path)
            yield content(response)
            self.assertEqual(response.code, 404)

    @inlineCallbacks
    def test_switch_to_redis(self) -> Any:
        """
        A reload that switches the limiter to Redis starts the new backend's
        connection: with C{fail_mode: closed}, a limiter that was never
        started would answer 503 to everything.
        """
        if REDIS_SERVER is None:
            raise self.skipTest(REDIS_SERVER_MISSING)
        redis = RedisServer()
        self.addCleanup(redis.cleanup)
        redis.start()
        self.write_config(limits="enabled: true\nlimits: {requests_per_minute: 100}")
        yield self.start()
        response, _ = yield self.chat()
        self.assertEqual(response.code, 200)
        self.write_config(
            limits="enabled: true\nbackend: redis\nfail_mode: closed\n"
            f"redis: {{url: '{redis.url()}'}}\nlimits: {{requests_per_minute: 2}}"
        )
        yield self.sighup()
        codes = []
        for _ in range(3):
            response, body = yield self.chat()
            codes.append(response.code)
        self.assertEqual(codes, [200, 200, 429], body)

    @inlineCallbacks
    def test_invalid_file_changes_nothing(self) -> Any:
        """
        A file that does not validate leaves the running configuration in
        force, and the log names the file and the key path; the process
        keeps serving.
        """
        self.write_config(input_price=1.0)
        yield self.start()
        Path(self.config_path).write_text(
            Path(self.config_path)
            .read_text()
            .replace("input: 1.0", "input: 100.0")
            .replace("enabled: false", "enabled: true\n    limits: {requests_per_minute: ten}")
        )
        yield self.sighup(b"configuration reload failed")
        output = self.proc.output.decode()
        self.assertIn("features.rate_limiting.limits.requests_per_minute", output)
        self.assertIn(self.config_path, output)
        self.assertNotIn("Traceback", output)
        for _ in range(3):
            response, _ = yield self.chat()
            self.assertEqual(response.code, 200)
        records = yield self.records(3)
        self.assertEqual({record["input_cost"] for record in records}, {10 * 1.0 / 1e6})

    @inlineCallbacks
    def test_stream_across_reload(self) -> Any:
        """
        A stream open across a reload runs to its end on the configuration
        it started with (its upstream, its price), while the next request
        uses the new one.
        """
        self.write_config(input_price=1.0)
        yield self.start()
        streaming = self.http.post(
            self.proc.url + "/openai/v1/chat/completions",
            data=STREAM,
            headers=headers(x_fake_chunks="15", x_fake_delay_ms="100"),
        )
        yield self.fake.wait_for_request()
        # A base URL nothing listens on, and a new price.
        self.write_config(input_price=100.0, base_url="http://127.0.0.1:9")
        yield self.sighup()
        response, _ = yield self.chat()
        self.assertEqual(response.code, 502)
        stream = yield streaming
        body = yield content(stream)
        self.assertEqual(stream.code, 200)
        self.assertTrue(body.rstrip().endswith(b"data: [DONE]"), body[-200:])
        self.assertEqual(streamed_text(body), fake_text(15))
        records = yield self.records(2)
        [streamed] = [record for record in records if record["is_streaming"]]
        self.assertEqual(streamed["status"], 200)
        self.assertTrue(streamed["complete"])
        self.assertAlmostEqual(streamed["input_cost"], 10 * 1.0 / 1e6)
