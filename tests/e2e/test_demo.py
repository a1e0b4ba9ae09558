"""
C{make demo} (L{llmproxy.testing.demo}): the command a newcomer runs first
serves the status page with live traffic and no provider key.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import orjson
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from llmproxy.testing.demo import scenarios
from llmproxy.testing.proxy_process import REPO_ROOT
from tests.e2e.harness import reactor

_STATUS_LINE = re.compile(rb"status page\s+(http://\S+)/status")


class _Demo(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.url: Deferred[str] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def outReceived(self, data: bytes) -> None:
        self.output += data
        match = _STATUS_LINE.search(self.output)
        if match is not None and not self.url.called:
            self.url.callback(match.group(1).decode())

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        if not self.url.called:
            self.url.errback(RuntimeError(self.output.decode("utf-8", "replace")))
        self.reason = reason
        self.ended.callback(None)


class DemoTests(TestCase):
    timeout = 90

    def setUp(self) -> None:
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=pool))

    @inlineCallbacks
    def get_json(self, url: str) -> Any:
        response = yield self.http.get(url)
        body = yield response.content()
        self.assertEqual(response.code, 200, body)
        return orjson.loads(body)

    @inlineCallbacks
    def test_demo(self) -> Any:
        """
        The demo command starts the daemon on the fake upstream, prints the
        status page's address, and the page's data moves as its traffic
        flows through every provider; metrics and cost records fill up.
        """
        workdir = Path(self.mktemp()).resolve()
        demo = _Demo()
        process = reactor.spawnProcess(
            demo,
            sys.executable,
            [
                sys.executable,
                "-m",
                "llmproxy.testing.demo",
                "--port",
                "0",
                "--seconds",
                "9",
                "--rate",
                "8",
                "--workdir",
                str(workdir),
            ],
            env=None,
            path=str(REPO_ROOT),
        )
        self.addCleanup(lambda: demo.ended if demo.ended.called else _stop(process, demo))
        url = yield demo.url
        first = yield self.get_json(url + "/status.json")
        yield deferLater(reactor, 3, lambda: None)
        second = yield self.get_json(url + "/status.json")
        self.assertGreater(
            second["today"]["totals"]["requests"], first["today"]["totals"]["requests"]
        )
        self.assertGreater(
            sum(second["timeline"]["requests_per_second"]),
            sum(first["timeline"]["requests_per_second"]),
        )
        providers = {row["name"]: row["requests"] for row in second["today"]["by_provider"]}
        self.assertEqual(sorted(providers), ["anthropic", "gemini", "openai"])
        self.assertGreater(second["today"]["totals"]["cost_usd"], 0)
        self.assertTrue(any(row["hit_ratio"] > 0 for row in second["cache"]["by_model"]))
        response = yield self.http.get(url + "/metrics")
        metrics = yield response.content()
        self.assertIn(b'llmproxy_requests_total{model="claude-sonnet-4-5"', metrics)
        yield demo.ended
        assert demo.reason is not None
        self.assertTrue(demo.reason.check(ProcessDone), demo.output)
        records = [
            orjson.loads(line)
            for line in (workdir / "cost-records.jsonl").read_bytes().splitlines()
        ]
        self.assertEqual({r["provider"] for r in records}, {"openai", "anthropic", "gemini"})
        self.assertIn(b"sent ", demo.output)

    def test_traffic_mix(self) -> None:
        """
        Each round of the traffic speaks every dialect, streams, hits the
        prompt cache, and makes the upstream fail now and then.
        """
        sent = [next(iter_) for iter_ in [scenarios()] for _ in range(60)]
        paths = b" ".join(request.path for request in sent)
        for part in (b"/openai/", b"/anthropic/", b"/gemini/", b"alt=sse", b"/meta/dave/"):
            self.assertIn(part, paths)
        self.assertTrue(any(b'"stream": true' in request.body for request in sent))
        failing = [r for r in sent if b"x-fake-status" in r.headers]
        self.assertEqual(len(failing), 4)


def _stop(process: Any, demo: _Demo) -> Deferred[None]:
    process.signalProcess("TERM")
    return demo.ended
