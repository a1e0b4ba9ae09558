"""
What the proxy answers itself: /health, 404, 405, CORS, preflight, and the
logs it writes about requests.
"""

from __future__ import annotations

from typing import Any

import attrs
import orjson
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from llmproxy.config import CorsConfig, ServerConfig
from llmproxy.testing.fake_upstream import FakeUpstream
from llmproxy.testing.proxy_process import ProxyProcess
from tests.e2e.harness import (
    ProxyTestCase,
    providers_yaml,
    raw_exchange,
    raw_request,
    reactor,
    serve_fake,
    split_response,
    write_config,
)

ORIGIN = {b"Origin": b"https://app.example"}
CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'


class HealthTests(ProxyTestCase):
    @inlineCallbacks
    def test_health_shape(self) -> Any:
        client = yield raw_exchange(self.proxy_port, raw_request(b"GET", b"/health"))
        status, headers, body = split_response(client.received)
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"content-type"], [b"application/json"])
        health = orjson.loads(body)
        self.assertEqual(health["status"], "healthy")
        self.assertIsInstance(health["version"], str)
        self.assertIsInstance(health["uptime_seconds"], float | int)
        self.assertEqual(
            set(health["build"]), {"version", "commit", "built_at", "python", "twisted"}
        )
        self.assertEqual(sorted(health["providers"]), ["anthropic", "gemini", "openai", "vllm"])
        for provider in health["providers"].values():
            self.assertEqual(
                set(provider),
                {
                    "status",
                    "base_url",
                    "streaming_support",
                    "requests",
                    "errors",
                    "active_streams",
                    "upstreams",
                },
            )
            self.assertEqual(provider["status"], "healthy")
            [upstream] = provider["upstreams"].values()
            self.assertEqual(upstream, {"status": "healthy", "open_models": [], "in_flight": 0})
        self.assertEqual(health["features"]["rate_limiting"], False)
        self.assertEqual(health["features"]["cost_tracking"], False)
        self.assertEqual(len(self.fake.received), 0, "health never calls an upstream")

    @inlineCallbacks
    def test_degraded_after_failures_and_counters(self) -> Any:
        headers = {b"authorization": b"Bearer k", b"x-fake-status": b"500"}
        for _ in range(5):
            yield self.post(b"/openai/v1/chat/completions", headers, b"{}")
        client = yield raw_exchange(self.proxy_port, raw_request(b"GET", b"/health"))
        openai = orjson.loads(split_response(client.received)[2])["providers"]["openai"]
        self.assertEqual(openai["status"], "degraded")
        self.assertEqual((openai["requests"], openai["errors"]), (5, 5))


class CorsTests(ProxyTestCase):
    @inlineCallbacks
    def test_cors_on_every_answer(self) -> Any:
        cases = [
            (b"GET", b"/health", {}, 200),
            (b"GET", b"/no/such/route", {}, 404),
            (b"GET", b"/nope", {}, 404),
            (b"POST", b"/health", {}, 405),
            (b"POST", b"/openai/v1/chat/completions", {b"authorization": b"Bearer k"}, 200),
        ]
        for method, path, extra, expected in cases:
            client = yield raw_exchange(
                self.proxy_port,
                raw_request(method, path, {**ORIGIN, **extra}, CHAT if method == b"POST" else b""),
            )
            status, headers, body = split_response(client.received)
            self.assertEqual(status, expected, (path, body))
            self.assertEqual(headers[b"access-control-allow-origin"], [b"*"], path)
            if status >= 400:
                self.assertEqual(headers[b"x-llm-proxy-error-source"], [b"proxy"], path)
                self.assertIn("message", orjson.loads(body)["error"], path)

    @inlineCallbacks
    def test_preflight_answered_locally(self) -> Any:
        headers = {
            **ORIGIN,
            b"Access-Control-Request-Method": b"POST",
            b"Access-Control-Request-Headers": b"authorization, x-stainless-os",
        }
        client = yield raw_exchange(
            self.proxy_port, raw_request(b"OPTIONS", b"/anthropic/v1/messages", headers)
        )
        status, resp, _ = split_response(client.received)
        self.assertEqual(status, 204)
        self.assertEqual(resp[b"access-control-allow-origin"], [b"*"])
        self.assertIn(b"POST", resp[b"access-control-allow-methods"][0])
        self.assertEqual(resp[b"access-control-allow-headers"], [b"authorization, x-stainless-os"])
        self.assertEqual(len(self.fake.received), 0, "preflight is never forwarded")


class RestrictedCorsTests(ProxyTestCase):
    def config(self, upstream_base: str) -> Any:
        config = super().config(upstream_base)
        server = attrs.evolve(
            config.server, cors=CorsConfig(allow_origins=("https://app.example",))
        )
        return attrs.evolve(config, server=server)

    @inlineCallbacks
    def test_listed_origin_echoed_others_not(self) -> Any:
        client = yield raw_exchange(self.proxy_port, raw_request(b"GET", b"/health", ORIGIN))
        headers = split_response(client.received)[1]
        self.assertEqual(headers[b"access-control-allow-origin"], [b"https://app.example"])
        self.assertIn(b"Origin", headers[b"vary"])
        other = {b"Origin": b"https://evil.example"}
        client = yield raw_exchange(self.proxy_port, raw_request(b"GET", b"/health", other))
        self.assertNotIn(b"access-control-allow-origin", split_response(client.received)[1])
        self.assertIsInstance(ServerConfig(), ServerConfig)


class LogTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_no_credential_in_any_log_line(self) -> Any:
        """
        The real daemon with JSON logs: after requests carrying credentials in
        every form (and an upstream error), no credential appears in its output,
        and each request has one access line.
        """
        upstream = yield serve_fake(self, FakeUpstream(reactor))
        path = write_config(
            self, "logging:\n  format: json\n  level: debug\n" + providers_yaml(upstream)
        )
        proc = yield ProxyProcess.start(reactor, [path])
        secrets = [
            b"sk-proj-SECRET1abcdefghijklmnop",
            b"sk-ant-SECRET2abcdefgh",
            b"AIzaSECRET3abcdefghijklmnop",
        ]
        requests = [
            raw_request(
                b"POST",
                b"/openai/v1/chat/completions",
                {b"authorization": b"Bearer " + secrets[0]},
                b'{"model":"gpt-4o-mini","messages":[]}',
            ),
            raw_request(
                b"POST",
                b"/anthropic/v1/messages",
                {b"x-api-key": secrets[1], b"anthropic-version": b"2023-06-01"},
                b'{"model":"claude-sonnet-4-5","max_tokens":5,"messages":[]}',
            ),
            raw_request(
                b"POST",
                b"/gemini/v1beta/models/gemini-2.5-flash:generateContent?key=" + secrets[2],
                {},
                b'{"contents":[]}',
            ),
            raw_request(
                b"POST",
                b"/openai/v1/chat/completions",
                {b"authorization": b"Bearer " + secrets[0], b"x-fake-status": b"500"},
                b"{}",
            ),
        ]
        for request in requests:
            yield raw_exchange(proc.port, request)
        exit_code = yield proc.stop()
        self.assertEqual(exit_code, 0)
        output = proc.output
        for secret in secrets:
            self.assertNotIn(secret, output)
            self.assertNotIn(secret[-10:], output)
        access = [
            orjson.loads(line)
            for line in output.splitlines()
            if line.startswith(b"{") and b'"llmproxy.access"' in line
        ]
        self.assertEqual(len(access), 4, output)
        self.assertEqual([a["status"] for a in access], [200, 200, 200, 500])
        for line in access:
            for field in ("request_id", "provider", "model", "streaming", "duration_ms", "bytes"):
                self.assertIn(field, line)
            # The message reads "<method> <path> <status> <duration>ms" and
            # agrees with the fields beside it.
            self.assertEqual(
                line["message"],
                f"{line['method']} {line['endpoint']} {line['status']} {line['duration_ms']:.1f}ms",
            )
            self.assertTrue(line["endpoint"].startswith("/"), line)
