"""
Budgets on the request path, in memory (L{llmproxy.testing.memory}): the
402 and its headers, what a request is charged however it ends, user
budgets, unpriced models, the interplay with rate limits, the bound on
overshoot under concurrency, and spend remembered across a restart.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from functools import partial
from typing import Any

import attrs
import orjson

from llmproxy.budgets import Hold, MemorySpendStore
from llmproxy.budgets.policy import NANOS_PER_USD, usd_to_nanos
from llmproxy.config import Config, Estimation, RetryConfig
from llmproxy.ratelimit import estimate_tokens
from llmproxy.test.test_budgets import record_line
from llmproxy.test.test_call import ANTHROPIC, RefusingAgent, config, with_knobs
from llmproxy.test.test_keys import (
    CREDENTIALS,
    GEMINI_CHAT,
    GEMINI_PATH,
    KEY,
    OTHER_KEY,
    KeysTestCase,
    bearer,
    key_entry,
)
from llmproxy.testing.memory import MemoryProxy, Received

INPUT_PRICE, OUTPUT_PRICE = 1000.0, 2000.0
"""USD per 1M tokens: $0.001 per input token, $0.002 per output token."""

PROMPT = "x" * 40
"""Ten estimated input tokens at four characters a token."""

MAX_TOKENS = 5

CHAT_PATH = b"/openai/v1/chat/completions"


def chat(
    max_tokens: int | None = MAX_TOKENS, stream: bool = False, model: str = "gpt-4o-mini"
) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": PROMPT}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


ESTIMATE = estimate_tokens(
    text_chars=len(PROMPT), body_bytes=0, provider="openai", estimation=Estimation()
)
RESERVED = (ESTIMATE * INPUT_PRICE + MAX_TOKENS * OUTPUT_PRICE) / 1e6
"""What one request reserves: its worst case."""

COST = (10 * INPUT_PRICE + 3 * OUTPUT_PRICE) / 1e6
"""What one request costs: the fake reports 10 input and 3 output tokens."""


def budget_config(
    *keys: dict[str, Any],
    per_user: Mapping[str, Any] | None = None,
    mode: str = "keys",
    webhook: str | None = None,
    **sections: Any,
) -> Config:
    def priced(*models: str) -> dict[str, Any]:
        price = {"input": INPUT_PRICE, "output": OUTPUT_PRICE}
        return {model: {"pricing": price} for model in models}

    once = {"max_attempts": 1}
    providers = {
        "openai": {
            "base_url": "http://fake-openai",
            "models": priced("gpt-4o-mini", "gpt-4o"),
            "retry": once,
        },
        "anthropic": {
            "base_url": "http://fake-anthropic",
            "models": priced("claude-sonnet-4-5"),
            "retry": once,
        },
        "gemini": {
            "base_url": "http://fake-gemini",
            "models": priced("gemini-2.0-flash"),
            "retry": once,
        },
    }
    auth: dict[str, Any] = {"mode": mode, "keys": list(keys), "credentials": CREDENTIALS}
    if per_user:
        auth["budgets"] = {"per_user": dict(per_user)}
    if webhook:
        auth["alerts"] = {"webhook_url": webhook}
    return config(providers=providers, auth=auth, **sections)


class BudgetTestCase(KeysTestCase):
    daily = 10 * RESERVED

    def config(self) -> Config:
        return budget_config(key_entry(budget={"daily_usd": self.daily}))

    def store(self) -> MemorySpendStore:
        store: object = self.proxy.spend  # (mypy-zope: an implementer is never "in" the union)
        assert isinstance(store, MemorySpendStore)
        return store

    def spent(self, key: str = "team-a", period: str = "day") -> float:
        value = self.proxy.state.metrics.registry.get_sample_value(
            "llmproxy_budget_spent_usd", {"key": key, "period": period}
        )
        return value or 0.0

    def burst(self, count: int, *senders: Mapping[bytes, list[bytes]]) -> list[Received]:
        """
        Send C{count} requests at once with each of the C{senders}' headers
        (interleaved); the fake holds each answer for a second, so all are
        in flight together; return them, in the order sent, once answered.
        """
        answers: dict[int, Received] = {}
        for number in range(count * len(senders)):
            knobs = with_knobs(senders[number % len(senders)], headers_delay_ms="1000")
            sent = self.proxy.request(b"POST", CHAT_PATH, knobs, chat())
            sent.addCallback(partial(answers.__setitem__, number))
        self.proxy.advance(1.5)
        self.assertEqual(len(answers), count * len(senders))
        return [answers[index] for index in sorted(answers)]


class RefusalTests(BudgetTestCase):
    def test_402(self) -> None:
        """
        A request that does not fit gets a 402 in the provider's shape from
        the proxy, with the budget headers, and no cost record.
        """
        for _ in range(10):
            self.assertEqual(self.send(CHAT_PATH, bearer(KEY), chat()).status, 200)
        self.assertEqual(len(self.proxy.sink.records), 10)
        # Ten requests spent 10 x COST; what is left fits fewer reservations.
        left = 10 * RESERVED - 10 * COST
        fit = math.floor(left / RESERVED)
        statuses = [self.send(CHAT_PATH, bearer(KEY), chat()).status for _ in range(fit + 1)]
        self.assertEqual(statuses, [200] * fit + [402])
        refused = self.send(CHAT_PATH, bearer(KEY), chat())
        self.assertEqual(refused.status, 402)
        self.assertEqual(refused.header(b"x-llm-proxy-error-source"), b"proxy")
        self.assertEqual(refused.header(b"x-llm-proxy-budget-scope"), b"key:team-a")
        self.assertEqual(refused.header(b"x-llm-proxy-budget-period"), b"day")
        self.assertEqual(refused.header(b"x-llm-proxy-budget-limit-usd"), b"%.6f" % self.daily)
        remaining = 10 * RESERVED - (10 + fit) * COST
        self.assertEqual(refused.header(b"x-llm-proxy-budget-remaining-usd"), b"%.6f" % remaining)
        self.assertEqual(refused.header(b"x-llm-proxy-budget-reset"), b"86400")
        self.assertIn(
            b"X-LLM-Proxy-Budget-Remaining-USD",
            refused.header(b"access-control-expose-headers") or b"",
        )
        body = self.json(refused)
        self.assertEqual(body["error"]["type"], "insufficient_quota")
        self.assertIn("Budget exceeded: key:team-a", body["error"]["message"])
        self.assertEqual(len(self.proxy.sink.records), 10 + fit)
        self.assertEqual(len(self.proxy.fake.received), 10 + fit)
        self.assertAlmostEqual(self.spent(), (10 + fit) * COST)
        denied = self.proxy.state.metrics.registry.get_sample_value(
            "llmproxy_budget_denied_total", {"key": "team-a"}
        )
        self.assertEqual(denied, 2)

    def test_402_each_provider(self) -> None:
        """
        Each SDK reads the 402 as its own: OpenAI's quota error, Anthropic's
        billing error, Gemini's failed precondition.
        """
        self.proxy = MemoryProxy(budget_config(key_entry(budget={"daily_usd": 0})))
        refused = self.send(CHAT_PATH, bearer(KEY), chat())
        self.assertEqual(refused.status, 402)
        self.assertEqual(refused.header(b"x-llm-proxy-budget-remaining-usd"), b"0.000000")
        self.assertEqual(self.json(refused)["error"]["code"], "budget_exceeded")
        messages = orjson.dumps(
            {
                "model": "claude-sonnet-4-5",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "x"}],
            }
        )
        refused = self.send(b"/anthropic/v1/messages", {**ANTHROPIC, b"x-api-key": [KEY]}, messages)
        self.assertEqual(refused.status, 402)
        self.assertEqual(self.json(refused)["error"]["type"], "billing_error")
        refused = self.send(GEMINI_PATH, {b"x-goog-api-key": [KEY]}, GEMINI_CHAT)
        self.assertEqual(refused.status, 402)
        self.assertEqual(self.json(refused)["error"]["code"], 402)
        self.assertEqual(self.proxy.fake.received, [])

    def test_zero_budget_admits_free_requests(self) -> None:
        """
        A budget of 0 allows no spend, but a request that names no model
        (a model list) reserves nothing and passes.
        """
        self.proxy = MemoryProxy(budget_config(key_entry(budget={"daily_usd": 0})))
        self.assertEqual(self.send(CHAT_PATH, bearer(KEY), chat()).status, 402)
        self.assertEqual(self.send(b"/openai/v1/models", bearer(KEY), method=b"GET").status, 200)

    def test_monthly(self) -> None:
        self.proxy = MemoryProxy(
            budget_config(key_entry(budget={"daily_usd": 100, "monthly_usd": RESERVED}))
        )
        self.assertEqual(self.send(CHAT_PATH, bearer(KEY), chat()).status, 200)
        refused = self.send(CHAT_PATH, bearer(KEY), chat())
        self.assertEqual(refused.status, 402)
        self.assertEqual(refused.header(b"x-llm-proxy-budget-period"), b"month")
        # The clock starts at the epoch: January has 31 days.
        self.assertEqual(refused.header(b"x-llm-proxy-budget-reset"), b"%d" % (31 * 86400))

    def test_without_max_tokens(self) -> None:
        """
        A request that names no maximum reserves C{reserve_output_tokens}.
        """
        budget = {
            "daily_usd": (ESTIMATE * INPUT_PRICE + 100 * OUTPUT_PRICE) / 1e6,
            "reserve_output_tokens": 101,
        }
        self.proxy = MemoryProxy(budget_config(key_entry(budget=budget)))
        self.assertEqual(self.send(CHAT_PATH, bearer(KEY), chat(max_tokens=None)).status, 402)
        self.assertEqual(self.send(CHAT_PATH, bearer(KEY), chat(max_tokens=100)).status, 200)


class ChargeTests(BudgetTestCase):
    """
    What a request is charged, however it ends.
    """

    daily = 1.0

    def test_real_cost(self) -> None:
        self.send(CHAT_PATH, bearer(KEY), chat())
        self.assertAlmostEqual(self.spent(), COST)
        self.assertAlmostEqual(self.spent(period="month"), COST)
        [record] = self.proxy.sink.records
        self.assertAlmostEqual(record.total_cost or 0, COST)

    def test_upstream_error(self) -> None:
        """
        An error answer is not billed: its reservation is given back.
        """
        received = self.send(CHAT_PATH, with_knobs(bearer(KEY), status="500"), chat())
        self.assertEqual(received.status, 500)
        self.assertEqual(self.spent(), 0.0)
        self.assertEqual(self.store().spent("key:team-a", "day", 0.0), 0)

    def test_retried_once_reserved(self) -> None:
        """
        A request retried upstream reserves its worst case once, and
        failing on every attempt is charged nothing.
        """
        retrying = budget_config(key_entry(budget={"daily_usd": RESERVED}))
        openai = attrs.evolve(retrying.providers["openai"], retry=RetryConfig(max_attempts=3))
        self.proxy = MemoryProxy(
            attrs.evolve(retrying, providers={**retrying.providers, "openai": openai})
        )
        answers: list[Received] = []
        self.proxy.request(
            b"POST", CHAT_PATH, with_knobs(bearer(KEY), status="500"), chat()
        ).addCallback(answers.append)
        self.proxy.advance(30)
        [received] = answers
        self.assertEqual(received.status, 500)
        self.assertEqual(len(self.proxy.fake.received), 3)
        self.assertEqual(self.store().spent("key:team-a", "day", 30.0), 0)
        self.assertEqual(self.send(CHAT_PATH, bearer(KEY), chat()).status, 200)

    def test_unreachable(self) -> None:
        """
        A request the upstream never received is charged nothing, and holds
        nothing any more.
        """
        self.proxy = MemoryProxy(self.config(), upstream_agent=RefusingAgent())
        self.assertEqual(self.send(CHAT_PATH, bearer(KEY), chat()).status, 502)
        store = self.store()
        self.assertEqual(store.spent("key:team-a", "day", 0.0), 0)
        whole = usd_to_nanos(self.daily)
        everything = Hold("key:team-a", "day", whole, whole)
        self.assertIsNone(store.reserve_now([everything], 0.0).shortfall)

    def test_disconnect_before_usage(self) -> None:
        """
        A stream cut before its usage arrived keeps its worst case: the
        upstream may bill everything it generated.
        """
        received = self.send(
            CHAT_PATH, with_knobs(bearer(KEY), chunks="10", delay_ms="100"), chat(stream=True)
        )
        self.proxy.advance(0.25)
        self.proxy.disconnect(received)
        self.proxy.advance(0.1)
        [record] = self.proxy.sink.records
        self.assertEqual((record.complete, record.output_tokens), (False, 0))
        self.assertEqual(
            self.store().spent("key:team-a", "day", 1.0), math.ceil(RESERVED * NANOS_PER_USD)
        )

    def test_disconnect_before_answer(self) -> None:
        """
        A client that leaves before the upstream answered: the upstream had
        the request and may bill it, so the worst case stays.
        """
        sent = self.proxy.request(
            b"POST", CHAT_PATH, with_knobs(bearer(KEY), headers_delay_ms="1000"), chat()
        )
        self.proxy.advance(0.1)
        sent.cancel()
        self.proxy.advance(1.0)
        self.failureResultOf(sent)
        [record] = self.proxy.sink.records
        self.assertEqual((record.status, record.output_tokens), (499, 0))
        self.assertEqual(
            self.store().spent("key:team-a", "day", 1.0), math.ceil(RESERVED * NANOS_PER_USD)
        )


class UserBudgetTests(BudgetTestCase):
    def config(self) -> Config:
        return budget_config(
            key_entry(),
            key_entry(OTHER_KEY, id="team-b", user="bob"),
            per_user={"bob": {"daily_usd": RESERVED}},
        )

    def test_user_budget_across_keys(self) -> None:
        """
        A user's budget counts every request of that user, whichever key
        sent it (a key's C{user}, or C{X-User-ID}).
        """
        self.assertEqual(self.send(CHAT_PATH, bearer(OTHER_KEY), chat()).status, 200)
        refused = self.send(CHAT_PATH, {**bearer(KEY), b"x-user-id": [b"bob"]}, chat())
        self.assertEqual(refused.status, 402)
        self.assertEqual(refused.header(b"x-llm-proxy-budget-scope"), b"user:bob")
        self.assertEqual(self.send(CHAT_PATH, bearer(KEY), chat()).status, 200)
        denied = self.proxy.state.metrics.registry.get_sample_value(
            "llmproxy_budget_denied_total", {"key": "team-a"}
        )
        self.assertEqual(denied, 1)

    def test_passthrough_user_budget(self) -> None:
        """
        User budgets hold without proxy keys too.
        """
        self.proxy = MemoryProxy(
            budget_config(per_user={"bob": {"daily_usd": RESERVED}}, mode="passthrough")
        )
        client = bearer(b"sk-client-own")
        self.assertEqual(
            self.send(CHAT_PATH, {**client, b"x-user-id": [b"bob"]}, chat()).status, 200
        )
        refused = self.send(b"/meta/bob" + CHAT_PATH, client, chat())
        self.assertEqual(refused.status, 402)
        self.assertEqual(refused.header(b"x-llm-proxy-budget-scope"), b"user:bob")
        self.assertEqual(
            self.send(CHAT_PATH, {**client, b"x-user-id": [b"alice"]}, chat()).status, 200
        )
        self.assertEqual(
            self.proxy.fake.received[0].header("authorization"), b"Bearer sk-client-own"
        )
        denied = self.proxy.state.metrics.registry.get_sample_value(
            "llmproxy_budget_denied_total", {"key": "none"}
        )
        self.assertEqual(denied, 1)


class UnpricedTests(BudgetTestCase):
    def test_unpriced_refused(self) -> None:
        received = self.send(CHAT_PATH, bearer(KEY), chat(model="gpt-unpriced"))
        self.assertEqual(received.status, 403)
        self.assertIn("has no price", self.json(received)["error"]["message"])
        self.assertEqual(self.proxy.fake.received, [])
        self.assertEqual(self.auth_failures("unpriced_model"), 1)

    def test_unpriced_allowed(self) -> None:
        self.proxy = MemoryProxy(
            budget_config(key_entry(budget={"daily_usd": 0.000001, "unpriced": "allow"}))
        )
        for _ in range(3):
            self.assertEqual(
                self.send(CHAT_PATH, bearer(KEY), chat(model="gpt-unpriced")).status, 200
            )
        self.assertEqual(self.store().spent("key:team-a", "day", 1.0), 0)

    def test_key_without_budget(self) -> None:
        """
        A key without a budget forwards unpriced models, and its spend is
        still counted (for its metric).
        """
        self.proxy = MemoryProxy(budget_config(key_entry()))
        self.assertEqual(self.send(CHAT_PATH, bearer(KEY), chat(model="gpt-unpriced")).status, 200)
        self.assertEqual(self.send(CHAT_PATH, bearer(KEY), chat()).status, 200)
        self.assertAlmostEqual(self.spent(), COST)


class RateLimitTests(BudgetTestCase):
    def config(self) -> Config:
        rates = {"rate_limiting": {"enabled": True, "limits": {"requests_per_minute": 3}}}
        return budget_config(key_entry(budget={"daily_usd": 2 * RESERVED}), features=rates)

    def test_budget_refusal_gives_back_tokens(self) -> None:
        """
        A request the budget refuses gives its rate-limit reservation back;
        one the rate limiter refuses reserves no budget.
        """
        statuses = [self.send(CHAT_PATH, bearer(KEY), chat()).status for _ in range(6)]
        # 2 fit the budget; the 402s gave their requests back, so the rate
        # limit (3 a minute) never refused.
        self.assertEqual(statuses[:2], [200, 200])
        self.assertEqual(set(statuses[2:]), {402})
        self.proxy = MemoryProxy(
            budget_config(
                key_entry(budget={"daily_usd": 100.0}),
                features={"rate_limiting": {"enabled": True, "limits": {"requests_per_minute": 1}}},
            )
        )
        self.assertEqual(self.send(CHAT_PATH, bearer(KEY), chat()).status, 200)
        self.assertEqual(self.send(CHAT_PATH, bearer(KEY), chat()).status, 429)
        whole = usd_to_nanos(100.0) - usd_to_nanos(COST)
        everything = Hold("key:team-a", "day", usd_to_nanos(100.0), whole)
        self.assertIsNone(self.store().reserve_now([everything], 0.0).shortfall)


class ConcurrencyTests(BudgetTestCase):
    """
    The overshoot bound of docs/keys-and-budgets.md: admitted reservations
    never exceed the budget, so spend exceeds it only by what real costs
    exceed their reservations.
    """

    def test_fifty_against_ten(self) -> None:
        """
        50 requests in flight together against a budget for 10 worst
        cases: exactly 10 go upstream, 40 get 402, and spend stays within
        the budget (each real cost is below its reservation).
        """
        answers = self.burst(50, bearer(KEY))
        statuses = [received.status for received in answers]
        self.assertEqual(statuses.count(200), 10)
        self.assertEqual(statuses.count(402), 40)
        for received in answers:
            if received.status == 402:
                self.assertEqual(received.header(b"x-llm-proxy-budget-scope"), b"key:team-a")
                self.assertIsNotNone(received.header(b"x-llm-proxy-budget-remaining-usd"))
        self.assertEqual(len(self.proxy.fake.received), 10)
        self.assertLessEqual(COST, RESERVED)
        self.assertAlmostEqual(self.spent(), 10 * COST)
        self.assertLessEqual(self.spent(), self.daily)

    def test_three_hundred_across_key_and_user_budgets(self) -> None:
        """
        300 requests at once from two keys, one of them bound to a user with
        a budget of its own: each budget admits exactly the worst cases it
        holds, whichever runs out first.
        """
        self.proxy = MemoryProxy(
            budget_config(
                key_entry(budget={"daily_usd": 40 * RESERVED}),
                key_entry(OTHER_KEY, id="team-b", user="bob", budget={"monthly_usd": 100.0}),
                per_user={"bob": {"daily_usd": 25 * RESERVED}},
            )
        )
        answers = self.burst(150, bearer(KEY), bearer(OTHER_KEY))
        first, second = answers[0::2], answers[1::2]
        self.assertEqual([r.status for r in first].count(200), 40)
        self.assertEqual([r.status for r in second].count(200), 25)
        scopes = {r.header(b"x-llm-proxy-budget-scope") for r in second if r.status == 402}
        self.assertEqual(scopes, {b"user:bob"})
        self.assertEqual(len(self.proxy.fake.received), 65)
        self.assertLessEqual(self.spent(), 40 * RESERVED)
        self.assertAlmostEqual(self.spent("team-b"), 25 * COST)

    def test_fifty_with_underestimated_input(self) -> None:
        """
        When the real input is larger than the estimate, spend may pass the
        budget, by at most the sum over the requests in flight of (real
        cost - reservation).
        """
        knobs = with_knobs(bearer(KEY), input_tokens="200")
        answers = self.burst(50, knobs)
        admitted = [received for received in answers if received.status == 200]
        self.assertEqual(len(admitted), 10)
        real = (200 * INPUT_PRICE + 3 * OUTPUT_PRICE) / 1e6
        bound = self.daily + len(admitted) * max(0.0, real - RESERVED)
        self.assertGreater(self.spent(), self.daily)
        self.assertLessEqual(self.spent(), bound + 1e-9)
        # Nothing more fits now.
        self.assertEqual(self.send(CHAT_PATH, bearer(KEY), chat()).status, 402)

    def test_reservations_return(self) -> None:
        """
        Once the first burst is settled, what it did not spend admits more.
        """
        self.burst(50, bearer(KEY))
        more = self.burst(50, bearer(KEY))
        expected = math.floor(round((self.daily - 10 * COST) / RESERVED, 9))
        self.assertEqual([r.status for r in more].count(200), expected)
        self.assertLessEqual(self.spent(), self.daily)


class RestartTests(BudgetTestCase):
    def test_spend_rebuilt_from_records(self) -> None:
        """
        The memory store starts from the spend of today's cost records, so
        a restart does not hand the key a fresh budget.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "costs.jsonl")
        with open(path, "wb") as stream:
            for _ in range(9):
                stream.write(record_line(1.0, "team-a", None, RESERVED))
            stream.write(record_line(1.0, "team-b", None, 100.0))
        tracking = {
            "cost_tracking": {
                "enabled": True,
                "transports": [{"type": "file", "file": {"path": path}}],
            }
        }
        self.proxy = MemoryProxy(
            budget_config(key_entry(budget={"daily_usd": self.daily}), features=tracking),
            start=10.0,
        )
        self.assertEqual(self.send(CHAT_PATH, bearer(KEY), chat()).status, 200)
        self.assertEqual(self.send(CHAT_PATH, bearer(KEY), chat()).status, 402)
        self.assertAlmostEqual(self.spent(), 9 * RESERVED + COST)

    def test_reload_keeps_spend(self) -> None:
        for _ in range(5):
            self.send(CHAT_PATH, bearer(KEY), chat())
        self.proxy.reload(budget_config(key_entry(budget={"daily_usd": 5 * COST})))
        self.assertEqual(self.send(CHAT_PATH, bearer(KEY), chat()).status, 402)
        self.proxy.reload(budget_config(key_entry(budget={"daily_usd": 5 * COST + RESERVED})))
        self.assertEqual(self.send(CHAT_PATH, bearer(KEY), chat()).status, 200)


class MetricTests(BudgetTestCase):
    def test_limits_follow_reloads(self) -> None:
        registry = self.proxy.state.metrics.registry
        self.assertAlmostEqual(
            registry.get_sample_value(
                "llmproxy_budget_limit_usd", {"key": "team-a", "period": "day"}
            )
            or 0,
            self.daily,
        )
        self.send(CHAT_PATH, bearer(KEY), chat())
        self.assertAlmostEqual(self.spent(), COST)
        self.proxy.reload(
            budget_config(key_entry(OTHER_KEY, id="team-b", budget={"monthly_usd": 3}))
        )
        self.assertIsNone(
            registry.get_sample_value(
                "llmproxy_budget_limit_usd", {"key": "team-a", "period": "day"}
            )
        )
        self.assertIsNone(
            registry.get_sample_value(
                "llmproxy_budget_spent_usd", {"key": "team-a", "period": "day"}
            )
        )
        self.assertEqual(
            registry.get_sample_value(
                "llmproxy_budget_limit_usd", {"key": "team-b", "period": "month"}
            ),
            3.0,
        )
