"""
Tests for L{llmproxy.budgets.alerts} and L{llmproxy.webhook}: the log line
and the webhook POST of each alert, retries with backoff, and exactly one
alert per fraction crossed on the request path.
"""

from __future__ import annotations

from typing import Any, cast

import orjson
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Site

from llmproxy.budgets import alerts
from llmproxy.budgets.alerts import MAX_ATTEMPTS, Alert, AlertSender
from llmproxy.config import Config
from llmproxy.test.test_budgets_calls import (
    CHAT_PATH,
    COST,
    RESERVED,
    BudgetTestCase,
    budget_config,
    chat,
)
from llmproxy.test.test_keys import KEY, bearer, key_entry
from llmproxy.testing.memory import MemoryAgent, MemoryProxy
from llmproxy.webhook import json_poster

ALERT = Alert("team-a", "alice", "day", 0.8, 1.0, 0.8, "key:team-a")
URL = "http://hooks.example/budget"


class FakeWebhook:
    """
    A webhook that answers each POST with the next of C{statuses} (an
    exception: the connection failed); the last one repeats.
    """

    def __init__(self, *statuses: int | Exception) -> None:
        self.statuses = list(statuses) or [204]
        self.posts: list[tuple[str, Any]] = []

    def __call__(self, url: str, body: bytes) -> Deferred[int]:
        self.posts.append((url, orjson.loads(body)))
        answer = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(answer)


class SenderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.patch(alerts, "log", Logger(observer=cast(ILogObserver, self.events.append)))
        self.clock = Clock()

    def test_delivered(self) -> None:
        webhook = FakeWebhook(200)
        AlertSender(self.clock, webhook).alert(ALERT, URL)
        self.assertEqual(
            webhook.posts,
            [
                (
                    URL,
                    {
                        "key_id": "team-a",
                        "user": "alice",
                        "period": "day",
                        "spent_usd": 0.8,
                        "limit_usd": 1.0,
                        "fraction": 0.8,
                    },
                )
            ],
        )
        [line] = self.events
        self.assertIn("key:team-a reached 80% of its day budget", line["log_format"].format(**line))

    def test_no_webhook(self) -> None:
        webhook = FakeWebhook()
        AlertSender(self.clock, webhook).alert(ALERT, None)
        self.assertEqual(webhook.posts, [])
        self.assertEqual(len(self.events), 1)

    def test_retries_with_backoff(self) -> None:
        webhook = FakeWebhook(500, ConnectionRefusedError(), 429, 202)
        AlertSender(self.clock, webhook).alert(ALERT, URL)
        self.assertEqual(len(webhook.posts), 1)
        for delay, posts in ((1.0, 2), (2.0, 3), (4.0, 4)):
            self.clock.advance(delay - 0.01)
            self.assertEqual(len(webhook.posts), posts - 1)
            self.clock.advance(0.01)
            self.assertEqual(len(webhook.posts), posts)
        self.clock.advance(100)
        self.assertEqual(len(webhook.posts), 4)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_gives_up(self) -> None:
        webhook = FakeWebhook(503)
        AlertSender(self.clock, webhook).alert(ALERT, URL)
        self.clock.pump([1.0] * 100)
        self.assertEqual(len(webhook.posts), MAX_ATTEMPTS)
        self.assertIn("dropped", self.events[-1]["log_format"])

    def test_no_retry_on_client_error(self) -> None:
        webhook = FakeWebhook(404)
        AlertSender(self.clock, webhook).alert(ALERT, URL)
        self.clock.pump([1.0] * 100)
        self.assertEqual(len(webhook.posts), 1)
        self.assertIn("not delivered", self.events[-1]["log_format"])

    def test_stop_cancels_retries(self) -> None:
        webhook = FakeWebhook(500)
        sender = AlertSender(self.clock, webhook)
        sender.startService()
        sender.alert(ALERT, URL)
        sender.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)
        self.assertEqual(len(webhook.posts), 1)


class Receiver(Resource):
    isLeaf = True

    def __init__(self, status: int) -> None:
        super().__init__()
        self.status = status
        self.bodies: list[tuple[bytes | None, bytes]] = []

    def render_POST(self, request: IRequest) -> bytes:
        content = request.content
        assert content is not None
        self.bodies.append((request.getHeader(b"content-type"), content.read()))
        request.setResponseCode(self.status)
        return b"ok"


class PosterTests(SynchronousTestCase):
    def post(self, status: int) -> tuple[Receiver, Deferred[int]]:
        receiver = Receiver(status)
        agent = MemoryAgent(Site(receiver))
        posted = json_poster(agent, Clock())("http://hooks.example/x", b'{"a":1}')
        while agent.pump():
            pass
        return receiver, posted

    def test_post(self) -> None:
        receiver, posted = self.post(201)
        self.assertEqual(self.successResultOf(posted), 201)
        self.assertEqual(receiver.bodies, [(b"application/json", b'{"a":1}')])

    def test_error_status(self) -> None:
        _, posted = self.post(500)
        self.assertEqual(self.successResultOf(posted), 500)


class AlertPathTests(BudgetTestCase):
    """
    Alerts from real requests: exactly one per fraction crossed, and one
    for the first refusal.
    """

    daily = 10 * COST

    def config(self) -> Config:
        budget = {"daily_usd": self.daily, "alert_at": [0.5, 0.8, 1.0]}
        return budget_config(key_entry(budget=budget, user="alice"), webhook=URL)

    def setUp(self) -> None:
        super().setUp()
        self.webhook = FakeWebhook(204)
        self.proxy = MemoryProxy(self.config(), webhook=self.webhook)

    def test_one_post_per_crossing(self) -> None:
        statuses = [self.send(CHAT_PATH, bearer(KEY), chat()).status for _ in range(12)]
        fitted = statuses.count(200)
        self.assertEqual(statuses, [200] * fitted + [402] * (12 - fitted))
        # The worst case (RESERVED) is above the real cost, so the budget
        # refuses before it is all spent: 1.0 is reached by the refusal.
        self.assertLess(fitted * COST, self.daily)
        self.assertGreater(RESERVED, COST)
        posted = [
            (body["fraction"], body["key_id"], body["user"]) for _, body in self.webhook.posts
        ]
        self.assertEqual(
            posted, [(0.5, "team-a", "alice"), (0.8, "team-a", "alice"), (1.0, "team-a", "alice")]
        )
        half = self.webhook.posts[0][1]
        self.assertEqual(half["period"], "day")
        self.assertAlmostEqual(half["limit_usd"], self.daily)
        self.assertAlmostEqual(half["spent_usd"], 5 * COST)

    def test_user_budget_alert(self) -> None:
        self.proxy = MemoryProxy(
            budget_config(
                key_entry(),
                per_user={"bob": {"monthly_usd": 2 * COST, "alert_at": [0.5]}},
                webhook=URL,
            ),
            webhook=self.webhook,
        )
        headers = {**bearer(KEY), b"x-user-id": [b"bob"]}
        self.send(CHAT_PATH, headers, chat())
        self.send(CHAT_PATH, headers, chat())
        [(_, body)] = self.webhook.posts
        self.assertEqual((body["key_id"], body["user"], body["period"]), (None, "bob", "month"))
