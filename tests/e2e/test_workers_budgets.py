"""
Budgets with a group of workers (C{--workers 2}), the memory backend: the
real master and worker processes on loopback, against the fake upstream in
this process. Spend is the master's, so a budget holds across the workers,
a worker that dies leaves nothing held, and the master rebuilds spend from
the records every worker wrote.
"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path
from typing import Any

import orjson
from treq.content import content
from twisted.internet.defer import DeferredList, gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.web.http_headers import Headers

from llmproxy.testing.proxy_process import ProxyProcess
from tests.e2e.harness import reactor
from tests.e2e.test_keys_e2e import CHAT as PRICED_CHAT
from tests.e2e.test_keys_e2e import COST, PRICE, RESERVED, entry
from tests.e2e.test_redis_fleet import metric
from tests.e2e.test_workers import CHAT_PATH, WorkersTestCase


class BudgetTests(WorkersTestCase):
    """
    Budgets with the memory backend: spend is the master's, so a budget
    holds across workers, and the master rebuilds it from the records
    every worker wrote.
    """

    daily = 10 * RESERVED
    keys = [f"llmp-e2e-workers-{n}-5Hq2Wm8Xr4Tz6Cv1Bn3Lk" for n in range(3)]
    """Three keys, each with a budget of its own (see L{chat})."""

    def budget_config(self, costs: str) -> str:
        data = {
            "providers": {
                "openai": {"base_url": self.upstream, "models": {"gpt-4o-mini": {"pricing": PRICE}}}
            },
            "auth": {
                "mode": "keys",
                "keys": [
                    entry(key, f"team-{n}", budget={"daily_usd": self.daily})
                    for n, key in enumerate(self.keys)
                ],
                "credentials": {"openai": {"Authorization": "Bearer sk-provider-workers"}},
            },
            "features": {
                "cost_tracking": {
                    "enabled": True,
                    "flush_interval_seconds": 0.05,
                    "transports": [{"type": "file", "file": {"path": costs}}],
                }
            },
        }
        path = os.path.join(self.directory, "budgets.yml")
        Path(path).write_text(orjson.dumps(data).decode())
        return path

    @inlineCallbacks
    def chat(
        self, proc: ProxyProcess, body: bytes = PRICED_CHAT, delay_ms: int = 0, key: int = 0
    ) -> Any:
        """
        POST a priced chat request with proxy key C{key}; the response.
        """
        sent = Headers(
            {
                "content-type": ["application/json"],
                "authorization": [f"Bearer {self.keys[key]}"],
                "x-fake-headers-delay-ms": [str(delay_ms)],
            }
        )
        response = yield self.http.post(proc.url + CHAT_PATH, data=body, headers=sent)
        yield content(response)
        return response

    @inlineCallbacks
    def spent(self, proc: ProxyProcess, key: int, expected: float) -> Any:
        """
        Key C{key}'s spend today in C{/metrics}, once it is C{expected} (or
        after 5 s): a worker's gauge learns the group's spend from the
        master's answer to a settlement, a moment after the response.
        """
        for _ in range(100):
            text = yield self.scrape(proc)
            value = metric(text, "llmproxy_budget_spent_usd", key=f"team-{key}", period="day")
            if abs(value - expected) < 1e-9:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        return value

    @inlineCallbacks
    def shown(self, proc: ProxyProcess, key: int, expected: float) -> Any:
        """
        Key C{key}'s day budget as C{/status.json} shows it, once its spend
        is C{expected} (or after 5 s), as C{(spent, limit)}: each worker
        learns the group's spend from the master's answer to its own
        settlements, and the page shows the largest any worker saw.
        """
        wanted = (f"key:team-{key}", "day")
        shown: tuple[float, float | None] = (0.0, None)
        for _ in range(100):
            response = yield self.http.get(proc.url + "/status.json")
            status = orjson.loads((yield content(response)))
            self.assertNotIn("group", status)
            for row in status["budgets"]:
                if (row["scope"], row["period"]) == wanted:
                    shown = (row["spent_usd"], row["limit_usd"])
            if abs(shown[0] - expected) < 1e-9:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        return shown

    @inlineCallbacks
    def test_fifty_against_ten_over_two_workers(self) -> Any:
        """
        50 concurrent requests spread over two workers (the upstream holds
        each answer for a second, so all are in flight together), against a
        budget of 10 worst cases: exactly 10 go upstream and 40 get 402, and
        the spend (in C{/metrics} and in the records) is 10 real costs,
        within the budget. Each worker alone would have admitted 10.

        Which worker accepts a connection is the kernel's choice: a burst
        that one worker took whole (possible on a busy 2-core machine) is
        exact too, but proves nothing about sharing, so the burst is
        repeated, with the next key's budget, until both workers took part.
        """
        costs = os.path.join(self.directory, "costs.jsonl")
        proc = yield self.start(self.budget_config(costs))
        shared = False
        for key in range(len(self.keys)):
            before = yield self.served(proc)
            burst = [self.chat(proc, delay_ms=1000, key=key) for _ in range(50)]
            responses = yield gatherResults(burst)
            codes = [response.code for response in responses]
            self.assertEqual((codes.count(200), codes.count(402)), (10, 40))
            self.assertEqual(len(self.fake.received), 10 * (key + 1))
            spent = yield self.spent(proc, key, 10 * COST)
            self.assertAlmostEqual(spent, 10 * COST)
            shown, limit = yield self.shown(proc, key, 10 * COST)
            self.assertAlmostEqual(shown, 10 * COST)
            self.assertAlmostEqual(limit, self.daily)
            after = yield self.served(proc)
            served = [b - a for a, b in zip(before, after, strict=True)]
            if all(count > 1 for count in served):
                shared = True
                break
        self.assertTrue(shared, "every burst went to one worker")
        self.assertEqual((yield proc.stop()), 0, proc.output[-2000:])
        records = [orjson.loads(line) for line in Path(costs).read_bytes().splitlines()]
        self.assertEqual(len(records), 10 * (key + 1))
        total = sum(record["total_cost"] for record in records if record["key_id"] == f"team-{key}")
        self.assertAlmostEqual(total, 10 * COST)
        self.assertLessEqual(total, self.daily)

    @inlineCallbacks
    def test_a_killed_worker_leaves_nothing_held(self) -> Any:
        """
        A worker killed with SIGKILL while its requests hold budget: the
        master gives back what they held (and, as for a killed process,
        charges nothing), so the budget left is the budget less what the
        requests that completed cost.
        """
        costs = os.path.join(self.directory, "costs.jsonl")
        proc = yield self.start(self.budget_config(costs))
        held = [self.chat(proc, delay_ms=3000) for _ in range(6)]
        while True:
            _, body = yield self.health(proc)
            # The six, and this /health request.
            if sum(worker["in_flight"] for worker in body["workers"]) == 7:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        victim = max(body["workers"], key=lambda worker: worker["in_flight"])
        os.kill(victim["pid"], signal.SIGKILL)
        outcomes = yield DeferredList(held, consumeErrors=True)
        completed = [result for ok, result in outcomes if ok and result.code == 200]
        self.assertGreaterEqual(len(outcomes) - len(completed), 2)
        # The survivors' settlements have reached the master.
        spent = yield self.spent(proc, 0, len(completed) * COST)
        self.assertAlmostEqual(spent, len(completed) * COST)
        greedy = PRICED_CHAT.replace(b'"max_tokens":5', b'"max_tokens":100000')
        refused = yield self.chat(proc, greedy)
        self.assertEqual(refused.code, 402)
        left = self.daily - len(completed) * COST
        self.assertEqual(
            refused.headers.getRawHeaders("x-llm-proxy-budget-remaining-usd"), [f"{left:.6f}"]
        )
        self.assertTrue(b"gave back what they held" in proc.output, proc.output[-2000:])

    @inlineCallbacks
    def test_restart_rebuilds_the_groups_spend(self) -> Any:
        """
        Records written by both workers count after a restart: the master
        rebuilds the day's spend from the file at start, so the budget has
        exactly what they left, whichever worker is asked.
        """
        # Room for up to ten waves: the kernel picks the worker that accepts
        # each connection, and on a busy machine one may take several waves.
        self.daily = 40 * RESERVED
        costs = os.path.join(self.directory, "costs.jsonl")
        path = self.budget_config(costs)
        proc = yield self.start(path)
        # Waves of three until both workers have served some (each wave is
        # well within the budget).
        before = yield self.served(proc)
        sent = 0
        while sent < 30:
            responses = yield gatherResults([self.chat(proc, delay_ms=300) for _ in range(3)])
            self.assertEqual([response.code for response in responses], [200] * 3)
            sent += 3
            after = yield self.served(proc)
            if all(b - a > 1 for a, b in zip(before, after, strict=True)):
                break
        self.assertTrue(all(b - a > 1 for a, b in zip(before, after, strict=True)), after)
        self.assertEqual((yield proc.stop()), 0, proc.output[-2000:])
        self.assertEqual(len(Path(costs).read_bytes().splitlines()), sent)

        again = yield self.start(path)
        left = self.daily - sent * COST
        greedy = PRICED_CHAT.replace(b'"max_tokens":5', b'"max_tokens":100000')
        for _ in range(4):
            refused = yield self.chat(again, greedy)
            self.assertEqual(refused.code, 402)
            self.assertEqual(
                refused.headers.getRawHeaders("x-llm-proxy-budget-remaining-usd"),
                [f"{left:.6f}"],
            )
        # What is left fits this many worst cases, however the workers
        # share a burst.
        fit = math.floor(round(left / RESERVED, 9))
        responses = yield gatherResults([self.chat(again, delay_ms=1000) for _ in range(fit + 3)])
        codes = sorted(response.code for response in responses)
        self.assertEqual(codes, [200] * fit + [402] * 3)
