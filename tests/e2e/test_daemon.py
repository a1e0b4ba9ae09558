"""
The real daemon as users run it: C{twistd -n llmproxy} in a child process,
spoken to over loopback sockets.
"""

from __future__ import annotations

import signal
from typing import Any

import orjson
from treq.client import HTTPClient
from treq.content import content
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from llmproxy.testing.fake_upstream import FakeUpstream
from llmproxy.testing.proxy_process import ProxyProcess
from tests.e2e.harness import providers_yaml, reactor, serve_fake, write_config


class DaemonTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=pool))

    @inlineCallbacks
    def start(self, *config_paths: str, **kwargs: Any) -> Any:
        proc = yield ProxyProcess.start(reactor, config_paths, **kwargs)
        self.addCleanup(proc.stop)
        return proc

    @inlineCallbacks
    def test_no_config_serves_health(self) -> Any:
        """
        C{twistd -n llmproxy} with no config serves the built-in defaults.
        """
        proc = yield self.start()
        response = yield self.http.get(proc.url + "/health")
        self.assertEqual(response.code, 200)
        body = orjson.loads((yield content(response)))
        self.assertEqual(body["status"], "healthy")
        self.assertEqual(
            sorted(body["providers"]), ["anthropic", "gemini", "openai"], body["providers"]
        )
        self.assertEqual(body["providers"]["openai"]["base_url"], "https://api.openai.com")
        self.assertEqual(body["features"]["rate_limiting"], False)
        self.assertIn("commit", body["build"])
        exit_code = yield proc.stop()
        self.assertEqual(exit_code, 0, proc.output)

    @inlineCallbacks
    def test_shipped_dev_config(self) -> Any:
        """
        The config C{make run} uses starts and serves.
        """
        proc = yield self.start("configs/dev.yml")
        response = yield self.http.get(proc.url + "/health")
        self.assertEqual(response.code, 200)
        yield content(response)

    @inlineCallbacks
    def test_bad_config_exits_before_listening(self) -> Any:
        """
        A config error ends twistd with status 1 and the message, no traceback.
        """
        path = write_config(
            self, "features:\n  rate_limiting:\n    limits:\n      requests_per_minute: ten\n"
        )
        proc = yield ProxyProcess.start(reactor, [path], wait_for_port=False)
        exit_code = yield proc.wait_exit()
        output = proc.output.decode()
        self.assertEqual(exit_code, 1, output)
        self.assertIn("features.rate_limiting.limits.requests_per_minute", output)
        self.assertIn(path, output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("listening on", output)

    @inlineCallbacks
    def test_bad_listen_description(self) -> Any:
        proc = yield ProxyProcess.start(reactor, [], listen=["nonsense:1234"], wait_for_port=False)
        exit_code = yield proc.wait_exit()
        self.assertEqual(exit_code, 1, proc.output)
        self.assertIn(b"nonsense:1234", proc.output)
        self.assertNotIn(b"Traceback", proc.output)

    @inlineCallbacks
    def test_sigterm_drains(self) -> Any:
        """
        SIGTERM: /health answers 503 during the grace period, then new
        connections are refused while the stream in flight completes; exit 0.
        """
        fake = FakeUpstream(reactor)
        upstream = yield serve_fake(self, fake)
        path = write_config(
            self,
            "server:\n  shutdown_grace_seconds: 1\n  drain_timeout_seconds: 20\n"
            + providers_yaml(upstream, ["openai"]),
        )
        proc = yield self.start(path)
        streaming: Deferred[Any] = self.http.post(
            proc.url + "/openai/v1/chat/completions",
            data=b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}',
            headers=Headers(
                {
                    b"content-type": [b"application/json"],
                    b"authorization": [b"Bearer sk-test"],
                    b"x-fake-chunks": [b"20"],
                    b"x-fake-delay-ms": [b"100"],
                }
            ),
        )
        yield fake.wait_for_request()
        proc.send_signal(signal.SIGTERM)
        yield deferLater(reactor, 0.3, lambda: None)
        health = yield self.http.get(proc.url + "/health")
        self.assertEqual(health.code, 503)
        self.assertEqual(orjson.loads((yield content(health)))["status"], "draining")
        yield deferLater(reactor, 1.2, lambda: None)
        refused = self.http.get(proc.url + "/health")
        yield self.assertFailure(refused, ConnectionRefusedError)
        response = yield streaming
        body = yield content(response)
        self.assertEqual(response.code, 200)
        self.assertTrue(body.rstrip().endswith(b"data: [DONE]"), body[-200:])
        self.assertEqual(body.count(b"\n\ndata: ") + 1, body.count(b"data: "))
        exit_code = yield proc.wait_exit()
        self.assertEqual(exit_code, 0, proc.output)
