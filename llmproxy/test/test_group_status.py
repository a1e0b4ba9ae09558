"""
Tests for L{llmproxy.group.status}: the group's C{/status.json} composed
from its workers' parts, here the parts of whole proxies in memory (one
per "worker", each with its own traffic), and served in memory by a worker
whose view of the group is a fake master.
"""

from __future__ import annotations

from typing import Any

import orjson
from twisted.internet.defer import fail, succeed
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.budgets import MemorySpendStore, nanos_to_usd
from llmproxy.circuits import ANY_MODEL
from llmproxy.group.channel import GROUP, RemoteError
from llmproxy.group.status import merge_status, status_snapshot
from llmproxy.group.view import Gathered, GroupView, MasterFacts, WorkerSnapshot
from llmproxy.status.document import MAX_ERRORS
from llmproxy.test.test_budgets_calls import budget_config, chat
from llmproxy.test.test_call import CHAT, CHAT_STREAM, OPENAI, config, with_knobs
from llmproxy.test.test_group_health import FakeMaster
from llmproxy.test.test_keys import KEY, bearer, key_entry
from llmproxy.test.test_status import charged
from llmproxy.testing.memory import MemoryProxy, Received

CHAT_PATH = b"/openai/v1/chat/completions"


def gathered(*parts: dict[str, Any] | None, started_at: float = -60.0) -> Gathered:
    """
    What the master answers a gather of C{"status"} with, C{parts} as each
    worker's snapshot (through JSON, as over the channel).
    """
    workers = tuple(
        WorkerSnapshot(
            index,
            100 + index,
            "serving" if part is not None else "unresponsive",
            orjson.loads(orjson.dumps(part)),
        )
        for index, part in enumerate(parts)
    )
    return Gathered(MasterFacts(99, started_at, False, len(parts), None), workers)


class MergeTests(SynchronousTestCase):
    """
    Two proxies in memory stand for two workers: each serves its own
    requests, and the page composed from both parts counts them all.
    """

    def setUp(self) -> None:
        self.workers = [MemoryProxy(config()), MemoryProxy(config())]

    def send(self, worker: int, count: int, **knobs: str) -> None:
        proxy = self.workers[worker]
        answers: list[Received] = []
        for _ in range(count):
            headers = with_knobs(OPENAI, **knobs)
            proxy.request(b"POST", CHAT_PATH, headers, CHAT).addCallback(answers.append)
        proxy.advance(0.5)
        self.assertEqual(len(answers), count)

    def advance(self, seconds: float) -> None:
        for proxy in self.workers:
            proxy.advance(seconds, step=1.0)

    def compose(self, asking: int = 0) -> dict[str, Any]:
        first = self.workers[0]
        parts = [status_snapshot(proxy.state) for proxy in self.workers]
        return merge_status(first.state, gathered(*parts), asking)

    def test_counts_add_up(self) -> None:
        """
        Requests, errors, tokens and cost of both workers add up, in the
        day's tables, the rate, the charts and the providers' counters;
        TTFB quantiles are read from both workers' samples.
        """
        self.send(0, 30, headers_delay_ms="100")
        self.send(1, 20, headers_delay_ms="300", status="500")
        self.advance(2)
        data = self.compose()
        totals = data["today"]["totals"]
        self.assertEqual((totals["requests"], totals["errors"]), (50, 20))
        alone = self.workers[0].state.status.snapshot(self.workers[0].state)
        self.assertEqual(totals["input_tokens"], alone["today"]["totals"]["input_tokens"])
        self.assertAlmostEqual(totals["cost_usd"], alone["today"]["totals"]["cost_usd"])
        self.assertEqual(data["totals"]["requests_per_second"], round(50 / 60, 3))
        self.assertEqual(data["totals"]["error_rate"], 0.4)
        self.assertEqual(round(sum(data["timeline"]["requests_per_second"]) * 5), 50)
        openai = data["providers"]["openai"]
        self.assertEqual((openai["requests"], openai["errors"]), (50, 20))
        self.assertEqual(data["totals"]["ttfb_ms"]["samples"], 50)
        # 30 samples near 100 ms, 20 near 300 ms: the median is the first
        # kind, p95 the second, which neither worker alone shows.
        self.assertTrue(95 <= data["totals"]["ttfb_ms"]["p50"] <= 110, data["totals"])
        self.assertTrue(290 <= data["totals"]["ttfb_ms"]["p95"] <= 320, data["totals"])
        self.assertEqual(data["uptime_seconds"], round(self.workers[0].clock.seconds() + 60, 3))
        self.assertEqual(
            data["workers"],
            [
                {"index": 0, "pid": 100, "status": "serving"},
                {"index": 1, "pid": 101, "status": "serving"},
            ],
        )

    def test_errors_are_the_newest_of_all(self) -> None:
        """
        The errors list is the union of both workers', newest first, cut
        to L{MAX_ERRORS}.
        """
        self.send(0, 30, status="404")
        self.advance(1)
        self.send(1, 30, status="400")
        data = self.compose()
        statuses = [error["status"] for error in data["errors"]]
        self.assertEqual(statuses, [400] * 30 + [404] * (MAX_ERRORS - 30))
        self.assertEqual(data["today"]["totals"]["errors"], 60)

    def test_live_counters(self) -> None:
        """
        Requests in flight and streams are summed (less the asking
        request); an upstream shows the most severe circuit any worker
        has for it, and the models open in any.
        """
        streams = with_knobs(OPENAI, chunks="5", delay_ms="300")
        for proxy in self.workers:
            proxy.request(b"POST", CHAT_PATH, streams, CHAT_STREAM)
            proxy.advance(0.5)
        state = self.workers[1].state
        [upstream] = state.runtime.upstreams["openai"].config.upstreams
        state.circuits.adopt(("openai", upstream.name, ANY_MODEL), state.clock.seconds() + 30)
        state.circuits.adopt(("openai", upstream.name, "gpt-4o"), state.clock.seconds() + 30)
        data = self.compose(asking=1)
        self.assertEqual(data["totals"]["active_streams"], 2)
        self.assertEqual(data["totals"]["in_flight"], 1)
        entry = data["providers"]["openai"]["upstreams"][upstream.name]
        self.assertEqual(
            (entry["status"], entry["open_models"], entry["in_flight"]), ("open", ["gpt-4o"], 2)
        )
        self.assertEqual(entry["base_url"], upstream.base_url)
        alone = self.workers[0].state.status.snapshot(self.workers[0].state)
        self.assertEqual(
            alone["providers"]["openai"]["upstreams"][upstream.name]["status"], "healthy"
        )

    def test_a_worker_without_a_snapshot(self) -> None:
        """
        A worker that did not answer in time is listed, and counts for
        nothing.
        """
        self.send(0, 3)
        part = status_snapshot(self.workers[0].state)
        data = merge_status(self.workers[0].state, gathered(part, None))
        self.assertEqual(data["today"]["totals"]["requests"], 3)
        self.assertEqual([w["status"] for w in data["workers"]], ["serving", "unresponsive"])


class BudgetMergeTests(SynchronousTestCase):
    """
    Two proxies in memory over one spend store stand for two workers over
    the master's: each learns the group's spend at its own settlements.
    """

    def test_largest_spend(self) -> None:
        """
        The page shows the spend of the worker that settled last: the
        largest, which is the group's.
        """
        store = MemorySpendStore()
        daily = 1.0
        workers = [
            MemoryProxy(budget_config(key_entry(budget={"daily_usd": daily})), spend=store)
            for _ in range(2)
        ]
        for proxy, count in zip(workers, (3, 2), strict=True):
            answers: list[Received] = []
            for _ in range(count):
                sent = proxy.request(b"POST", CHAT_PATH, bearer(KEY), chat())
                sent.addCallback(answers.append)
            proxy.advance(0.5)
            self.assertEqual([answer.status for answer in answers], [200] * count)
        records = [record for proxy in workers for record in proxy.sink.records]
        parts = [status_snapshot(proxy.state) for proxy in workers]
        # The first worker last settled when the group had spent its three.
        [first] = [row for row in parts[0]["budgets"]["rows"] if row[1] == "day"]
        self.assertEqual(nanos_to_usd(first[2]), charged(records[:3]))
        data = merge_status(workers[0].state, gathered(*parts))
        day = [row for row in data["budgets"] if row["period"] == "day"]
        self.assertEqual(
            [(row["scope"], row["spent_usd"], row["limit_usd"]) for row in day],
            [("key:team-a", charged(records), daily)],
        )


class WorkerStatusTests(SynchronousTestCase):
    """
    C{/status.json} in a worker, through the real site, in memory.
    """

    def setUp(self) -> None:
        self.proxy = MemoryProxy(config())
        self.master = FakeMaster()
        self.view = GroupView(self.master, 0)
        self.view.provide("status", lambda: status_snapshot(self.proxy.state))
        self.proxy.state.group = self.view

    def get(self) -> Any:
        answers: list[Received] = []
        self.proxy.request(b"GET", b"/status.json").addCallback(answers.append)
        self.proxy.flush()
        [received] = answers
        self.assertEqual(received.status, 200)
        return orjson.loads(bytes(received.body))

    def test_gathers_through_the_master(self) -> None:
        """
        The answering worker asks the master to gather C{"status"} and
        composes the answer from every part, its own included.
        """
        other = MemoryProxy(config())
        other.request(b"POST", CHAT_PATH, OPENAI, CHAT)
        other.advance(0.5)
        mine = self.view.snapshot("status")
        self.master.answer = succeed(gathered(mine, status_snapshot(other.state)).to_json())
        data = self.get()
        self.assertEqual(self.master.asked, [(GROUP, ["gather", "status"])])
        self.assertEqual(data["today"]["totals"]["requests"], 1)
        self.assertEqual(len(data["workers"]), 2)
        self.assertNotIn("group", data)

    def test_master_silent(self) -> None:
        """
        No answer from the master: the worker answers for itself and says so.
        """
        self.master.answer = fail(RemoteError("gone"))
        data = self.get()
        self.assertEqual(data["group"], "the master did not answer: worker 0 alone")
        self.assertNotIn("workers", data)
        self.assertEqual(data["totals"]["in_flight"], 0)
