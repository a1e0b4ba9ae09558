"""
Tests for L{llmproxy.group.health} and L{llmproxy.group.view}: the group's
C{/health} merged from its workers' snapshots, and served in memory by a
worker whose view of the group is a fake master.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.config import Config, ProviderConfig, UpstreamConfig
from llmproxy.group.channel import GROUP, RemoteError
from llmproxy.group.health import health_snapshot, merge_health
from llmproxy.group.view import Gathered, GroupView, MasterFacts, WorkerSnapshot
from llmproxy.testing.memory import MemoryProxy

NOW = 1_000_000.0


def report(requests: int, errors: int, streams: int, status: str = "healthy") -> dict[str, Any]:
    return {
        "status": status,
        "version": "1",
        "uptime_seconds": 5.0,
        "build": {"version": "1"},
        "connections": {"open": streams, "max": 100},
        "providers": {
            "openai": {
                "status": "healthy",
                "base_url": "http://up",
                "streaming_support": True,
                "requests": requests,
                "errors": errors,
                "active_streams": streams,
                "upstreams": {
                    "a": {"status": "healthy", "open_models": [], "in_flight": streams},
                    "b": {"status": "healthy", "open_models": [], "in_flight": 0},
                },
            }
        },
        "features": {"rate_limiting": False, "cost_tracking": False, "metrics": True},
    }


def snapshot(
    requests: int, errors: int, streams: int, recent: Sequence[tuple[float, bool]] = ()
) -> dict[str, Any]:
    return {
        "report": report(requests, errors, streams),
        "recent": {"openai": [list(attempt) for attempt in recent]},
        "received": requests + 1,
        "in_flight": streams,
        "started_at": NOW - 10,
    }


def gathered(*snapshots: dict[str, Any] | None, draining: bool = False) -> Gathered:
    workers = tuple(
        WorkerSnapshot(index, 100 + index, "serving" if s else "starting", s)
        for index, s in enumerate(snapshots)
    )
    return Gathered(MasterFacts(99, NOW - 60, draining, len(snapshots), 777), workers)


class MergeTests(SynchronousTestCase):
    def test_sums(self) -> None:
        """
        Counters (and open connections) are the sum of every worker's; the body keeps the answering
        worker's shape, with the master's uptime and a line per worker.
        """
        body = merge_health(report(1, 0, 0), gathered(snapshot(3, 1, 2), snapshot(4, 0, 1)), NOW)
        openai = body["providers"]["openai"]
        self.assertEqual(
            (openai["requests"], openai["errors"], openai["active_streams"]), (7, 1, 3)
        )
        self.assertEqual(openai["upstreams"]["a"]["in_flight"], 3)
        self.assertEqual(openai["status"], "healthy")
        self.assertEqual(body["status"], "healthy")
        self.assertEqual(body["uptime_seconds"], 60.0)
        self.assertEqual(body["spare_worker"], {"pid": 777})
        # Each worker keeps its own server.max_connections.
        self.assertEqual(body["connections"], {"open": 3, "max": 200})
        self.assertEqual(
            body["workers"],
            [
                {
                    "index": 0,
                    "pid": 100,
                    "status": "serving",
                    "requests": 4,
                    "in_flight": 2,
                    "active_streams": 2,
                    "uptime_seconds": 10.0,
                },
                {
                    "index": 1,
                    "pid": 101,
                    "status": "serving",
                    "requests": 5,
                    "in_flight": 1,
                    "active_streams": 1,
                    "uptime_seconds": 10.0,
                },
            ],
        )

    def test_degraded_over_the_group(self) -> None:
        """
        Five failed attempts in a row across the group make the provider
        degraded, although no worker saw five; a success in between in any
        worker keeps it healthy.
        """
        a = [(NOW - 5, False), (NOW - 3, False), (NOW - 1, False)]
        b = [(NOW - 4, False), (NOW - 2, False)]
        body = merge_health(
            report(0, 0, 0), gathered(snapshot(3, 3, 0, a), snapshot(2, 2, 0, b)), NOW
        )
        self.assertEqual(body["providers"]["openai"]["status"], "degraded")
        b_ok = [(NOW - 4, False), (NOW - 2, True)]
        body = merge_health(
            report(0, 0, 0), gathered(snapshot(3, 3, 0, a), snapshot(2, 1, 0, b_ok)), NOW
        )
        self.assertEqual(body["providers"]["openai"]["status"], "healthy")

    def test_circuits(self) -> None:
        """
        An upstream reports the most severe state any worker has for it and
        the union of open models; the provider is degraded only when no
        worker has a healthy upstream.
        """
        one = snapshot(1, 0, 0)
        two = snapshot(1, 0, 0)
        one["report"]["providers"]["openai"]["upstreams"]["a"].update(
            status="open", open_models=["m1"]
        )
        two["report"]["providers"]["openai"]["upstreams"]["a"]["open_models"] = ["m2"]
        for both in (one, two):
            both["report"]["providers"]["openai"]["upstreams"]["b"]["status"] = "rate_limited"
        body = merge_health(report(0, 0, 0), gathered(one, two), NOW)
        upstreams = body["providers"]["openai"]["upstreams"]
        self.assertEqual(upstreams["a"]["status"], "open")
        self.assertEqual(upstreams["a"]["open_models"], ["m1", "m2"])
        self.assertEqual(upstreams["b"]["status"], "rate_limited")
        self.assertEqual(body["providers"]["openai"]["status"], "healthy")
        two["report"]["providers"]["openai"]["upstreams"]["a"]["status"] = "half_open"
        body = merge_health(report(0, 0, 0), gathered(one, two), NOW)
        self.assertEqual(body["providers"]["openai"]["status"], "degraded")

    def test_draining_and_missing_workers(self) -> None:
        """
        The group drains when the master does; a worker without a snapshot
        (starting, unresponsive) is listed without figures.
        """
        body = merge_health(report(0, 0, 0), gathered(snapshot(1, 0, 0), None, draining=True), NOW)
        self.assertEqual(body["status"], "draining")
        self.assertEqual(body["providers"]["openai"]["requests"], 1)
        self.assertEqual(body["workers"][1]["status"], "starting")
        self.assertIsNone(body["workers"][1]["requests"])


class FakeMaster:
    """
    Stands in for the worker's channel: answers gathers from C{answer}.
    """

    def __init__(self) -> None:
        self.asked: list[tuple[int, Any]] = []
        self.answer: Deferred[Any] = succeed(None)

    def call(self, kind: int, body: Any, timeout: float | None = None) -> Deferred[Any]:
        self.asked.append((kind, body))
        return self.answer

    def tell(self, kind: int, body: Any) -> None:
        self.asked.append((kind, body))


class WorkerHealthTests(SynchronousTestCase):
    """
    C{/health} in a worker, through the real site, in memory.
    """

    def setUp(self) -> None:
        provider = ProviderConfig(
            name="openai",
            kind="openai",
            base_url="http://up",
            upstreams=(UpstreamConfig(name="up", base_url="http://up"),),
        )
        self.proxy = MemoryProxy(Config(providers={"openai": provider}))
        self.master = FakeMaster()
        self.view = GroupView(self.master, 0)
        self.view.provide("health", lambda: health_snapshot(self.proxy.state))
        self.proxy.state.group = self.view

    def get(self) -> tuple[int, Any]:
        answers: list[Any] = []
        self.proxy.request(b"GET", b"/health").addCallback(answers.append)
        self.proxy.flush()
        [received] = answers
        return received.status, orjson.loads(received.body)

    def test_gathers_through_the_master(self) -> None:
        """
        The answering worker asks the master to gather C{"health"} and
        merges the answer, its own snapshot included.
        """
        mine = self.view.snapshot("health")
        other = snapshot(5, 1, 0)
        self.master.answer = succeed(gathered(mine, other).to_json())
        status, body = self.get()
        self.assertEqual(status, 200)
        self.assertEqual(self.master.asked, [(GROUP, ["gather", "health"])])
        self.assertEqual(body["providers"]["openai"]["requests"], 5)
        self.assertEqual([w["pid"] for w in body["workers"]], [100, 101])
        self.assertEqual(body["workers"][0]["requests"], mine["received"])

    def test_master_silent(self) -> None:
        """
        No answer from the master: the worker answers for itself and says so.
        """
        self.master.answer = fail(RemoteError("gone"))
        status, body = self.get()
        self.assertEqual(status, 200)
        self.assertEqual(body["group"], "the master did not answer: worker 0 alone")
        self.assertNotIn("workers", body)
        self.flushLoggedErrors()

    def test_unknown_snapshot(self) -> None:
        self.assertRaises(RemoteError, self.view.snapshot, "status")

    def test_gathered_round_trip(self) -> None:
        value = gathered(snapshot(1, 0, 0), None)
        self.assertEqual(Gathered.from_json(orjson.loads(orjson.dumps(value.to_json()))), value)
