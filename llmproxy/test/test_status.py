"""
Tests for the status page (L{llmproxy.status}): its data after real
requests through the proxy in memory, who may see it, and the page.
"""

from __future__ import annotations

from typing import Any

import orjson
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from llmproxy.budgets.policy import nanos_to_usd, usd_to_nanos
from llmproxy.config import Config, ConfigError
from llmproxy.records import CostRecord
from llmproxy.status.document import MAX_ERRORS
from llmproxy.status.page import CONTENT_SECURITY_POLICY, PAGE
from llmproxy.test.test_budgets_calls import CHAT_PATH, RESERVED, budget_config, chat
from llmproxy.test.test_call import ANTHROPIC, CHAT, CHAT_STREAM, MESSAGES, OPENAI, config
from llmproxy.test.test_call import with_knobs as knobs
from llmproxy.test.test_keys import KEY, OTHER_KEY, bearer, key_entry
from llmproxy.testing.memory import MemoryAgent, MemoryProxy, Received

TOKEN = "s3cret-status-token-0123"


class StatusTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.proxy = MemoryProxy(self.config())

    def config(self) -> Config:
        return config()

    def start(
        self,
        path: bytes,
        headers: dict[bytes, list[bytes]] | None = None,
        body: bytes | None = None,
        method: bytes = b"POST",
    ) -> list[Received]:
        """
        Send a request; its response arrives in the list.
        """
        answers: list[Received] = []
        self.proxy.request(method, path, headers or OPENAI, body).addCallback(answers.append)
        return answers

    def send(
        self,
        path: bytes,
        headers: dict[bytes, list[bytes]] | None = None,
        body: bytes | None = None,
        method: bytes = b"POST",
    ) -> Received:
        """
        Send a request whose response headers come at once.
        """
        answers = self.start(path, headers, body, method)
        self.assertEqual(len(answers), 1, "no response headers yet")
        return answers[0]

    def finish(self, answers: list[Received] | Received, seconds: float = 5.0) -> Received:
        """
        Let C{seconds} pass; the response must then be complete.
        """
        self.proxy.advance(seconds)
        if isinstance(answers, list):
            self.assertEqual(len(answers), 1, "no response headers yet")
            answers = answers[0]
        self.assertTrue(answers.done)
        return answers

    def status(self, query: bytes = b"", headers: dict[bytes, list[bytes]] | None = None) -> Any:
        received = self.send(b"/status.json" + query, headers or {}, method=b"GET")
        self.assertEqual(received.status, 200, bytes(received.body))
        self.assertEqual(received.header(b"content-type"), b"application/json")
        return orjson.loads(bytes(received.body))


class DataTests(StatusTestCase):
    def test_empty(self) -> None:
        """
        Before any traffic, every provider is listed with its one upstream,
        and the charts hold 15 minutes of zeros.
        """
        data = self.status()
        self.assertEqual(sorted(data["providers"]), ["anthropic", "gemini", "openai"])
        openai = data["providers"]["openai"]
        self.assertEqual(openai["status"], "healthy")
        self.assertEqual(
            openai["upstreams"],
            {
                "fake-openai": {
                    "status": "healthy",
                    "base_url": "http://fake-openai",
                    "open_models": [],
                    "in_flight": 0,
                }
            },
        )
        timeline = data["timeline"]
        self.assertEqual(timeline["step_seconds"] * len(timeline["requests_per_second"]), 900)
        self.assertEqual(set(timeline["requests_per_second"]), {0})
        self.assertEqual(data["errors"], [])
        self.assertEqual(data["today"]["by_model"], [])
        self.assertEqual(data["totals"]["ttfb_ms"]["p50"], None)
        self.assertEqual(data["budgets"], [])

    def test_traffic(self) -> None:
        """
        Requests show in the rate, the charts, TTFB, today's tables (by
        provider, model, key and user) and the prompt-cache ratios.
        """
        headers = knobs(OPENAI, input_tokens="100", cached_tokens="40", headers_delay_ms="200")
        for _ in range(3):
            self.finish(self.start(b"/meta/alice/openai/v1/chat/completions", headers, CHAT), 0.5)
        self.finish(self.send(b"/anthropic/v1/messages", ANTHROPIC, MESSAGES), 0.5)
        self.proxy.advance(2)
        data = self.status()
        self.assertEqual(data["totals"]["requests_per_second"], round(4 / 60, 3))
        self.assertEqual(data["totals"]["error_rate"], 0.0)
        self.assertEqual(sum(data["timeline"]["requests_per_second"]) * 5, 4)
        self.assertEqual(data["totals"]["ttfb_ms"]["samples"], 4)
        p95 = data["providers"]["openai"]["ttfb_ms"]["p95"]
        self.assertTrue(195 <= p95 <= 210, p95)
        today = data["today"]
        self.assertEqual(today["totals"]["requests"], 4)
        by_model = {row["name"]: row for row in today["by_model"]}
        gpt = by_model["gpt-4o-mini"]
        self.assertEqual(
            (gpt["requests"], gpt["input_tokens"], gpt["cache_read_tokens"]), (3, 300, 120)
        )
        self.assertAlmostEqual(gpt["cost_usd"], 3 * (60 * 0.15 + 40 * 0.15 + 3 * 0.6) / 1e6)
        users = {row["name"]: row["requests"] for row in today["by_user"]}
        self.assertEqual(users, {"alice": 3, "(none)": 1})
        self.assertEqual(len(today["by_key"]), 2)
        self.assertEqual(
            {row["name"]: row["requests"] for row in today["by_provider"]},
            {"openai": 3, "anthropic": 1},
        )
        cache = {row["name"]: row["hit_ratio"] for row in data["cache"]["by_model"]}
        self.assertEqual(cache["gpt-4o-mini"], 0.4)
        self.assertEqual(cache["claude-sonnet-4-5"], 0.0)

    def test_burst(self) -> None:
        """
        A burst of 300 concurrent streams is counted exactly: requests,
        tokens and cost agree with the cost records.
        """
        headers = knobs(OPENAI, chunks="3", delay_ms="10", cached_tokens="3")
        pending = [
            self.start(b"/openai/v1/chat/completions", headers, CHAT_STREAM) for _ in range(300)
        ]
        self.proxy.advance(2)
        self.assertTrue(all(answers and answers[0].complete for answers in pending))
        records = self.proxy.sink.records
        self.assertEqual(len(records), 300)
        data = self.status()
        totals = data["today"]["totals"]
        self.assertEqual(totals["requests"], 300)
        self.assertEqual(totals["input_tokens"], sum(r.input_tokens for r in records))
        self.assertEqual(totals["output_tokens"], sum(r.output_tokens for r in records))
        self.assertEqual(totals["cache_read_tokens"], 900)
        self.assertAlmostEqual(totals["cost_usd"], sum(r.total_cost or 0 for r in records))
        self.assertEqual(round(sum(data["timeline"]["requests_per_second"]) * 5), 300)
        self.assertEqual(data["totals"]["ttfb_ms"]["samples"], 300)
        self.assertEqual(data["totals"]["active_streams"], 0)

    def test_charts_move(self) -> None:
        """
        The charts end with the last whole second: a request shows in the
        next poll, and leaves after 15 minutes.
        """
        self.finish(self.send(b"/openai/v1/chat/completions", body=CHAT), 1.5)
        first = self.status()["timeline"]["requests_per_second"]
        self.assertEqual(first[-1], 0.2)
        self.proxy.advance(6)
        second = self.status()["timeline"]["requests_per_second"]
        self.assertEqual(second[-2:], [0.2, 0])
        self.proxy.advance(900)
        self.assertEqual(set(self.status()["timeline"]["requests_per_second"]), {0})

    def test_active_streams(self) -> None:
        headers = knobs(OPENAI, chunks="5", delay_ms="300")
        received = self.send(b"/openai/v1/chat/completions", headers, CHAT_STREAM)
        self.proxy.advance(1)
        data = self.status()
        self.assertEqual(data["totals"]["active_streams"], 1)
        self.assertEqual(data["totals"]["in_flight"], 1)
        self.assertEqual(data["providers"]["openai"]["active_streams"], 1)
        self.finish(received)
        self.assertEqual(self.status()["totals"]["active_streams"], 0)

    def test_upstream_errors(self) -> None:
        """
        A 5xx from the upstream and an unreachable upstream are errors,
        listed newest first, with no header or body of the request.
        """
        secret = b"sk-very-secret-credential"
        headers = knobs(
            {b"authorization": [b"Bearer " + secret]}, status="500", error_message="boom"
        )
        self.finish(self.send(b"/openai/v1/chat/completions", headers, CHAT), 0.5)
        self.proxy.fake.defaults["x-fake-hang"] = "headers"
        slow = self.start(b"/gemini/v1beta/models/gemini-2.5-flash:generateContent", {}, b"{}")
        self.finish(slow, 601)
        data = self.status()
        [timeout, failed] = data["errors"][:2]
        self.assertEqual((failed["status"], failed["kind"]), (500, "status_500"))
        self.assertEqual(failed["provider"], "openai")
        self.assertEqual(failed["source"], "upstream")
        self.assertEqual(failed["model"], "gpt-4o-mini")
        self.assertEqual((timeout["status"], timeout["kind"]), (504, "first_byte_timeout"))
        self.assertTrue(failed["time"].endswith("Z"))
        text = orjson.dumps(data)
        self.assertNotIn(secret, text)
        self.assertNotIn(b"boom", text)
        self.assertEqual(failed["message"], "The upstream answered 500.")
        self.assertEqual(
            timeout["message"], "No response headers within timeouts.first_byte_seconds."
        )
        self.assertNotIn(b"Hi", text)

    def test_refusals(self) -> None:
        """
        A request the proxy refuses itself is an error too, with the
        proxy's own message.
        """
        bad = self.send(b"/openai/v1/%2e%2e/x", body=CHAT)
        self.assertEqual(bad.status, 400)
        data = self.status()
        [dot] = [e for e in data["errors"] if e["kind"] == "bad_request"]
        self.assertEqual(dot["source"], "proxy")
        self.assertIn("dot-segment", dot["message"])
        self.assertEqual(data["today"]["totals"]["errors"], 1)

    def test_error_list_bounded(self) -> None:
        headers = knobs(OPENAI, status="503")
        for _ in range(MAX_ERRORS + 5):
            self.finish(self.send(b"/openai/v1/chat/completions", headers, CHAT), 0.01)
        data = self.status()
        self.assertEqual(len(data["errors"]), MAX_ERRORS)
        self.assertEqual(data["today"]["totals"]["errors"], MAX_ERRORS + 5)

    def test_new_day(self) -> None:
        self.finish(self.send(b"/openai/v1/chat/completions", body=CHAT), 0.1)
        self.assertEqual(self.status()["today"]["totals"]["requests"], 1)
        self.proxy.advance(86400, step=3600)
        data = self.status()
        self.assertEqual(data["today"]["totals"]["requests"], 0)
        self.assertEqual(data["today"]["date"], "1970-01-02")


class RateLimitScopeTests(StatusTestCase):
    def config(self) -> Config:
        return config(
            features={
                "rate_limiting": {
                    "enabled": True,
                    "limits": {"requests_per_minute": 3},
                    "overrides": {"per_user": {"bob": {"requests_per_minute": 2}}},
                }
            }
        )

    def test_busiest(self) -> None:
        """
        The scopes nearest their limits come first; refusals are counted on
        the scope that refused.
        """
        for _ in range(3):
            self.finish(self.send(b"/meta/bob/openai/v1/chat/completions", body=CHAT), 0.1)
        data = self.status()
        scopes = {row["scope"]: row for row in data["rate_limits"]["scopes"]}
        self.assertTrue(data["rate_limits"]["enabled"])
        self.assertEqual(data["rate_limits"]["scopes"][0]["scope"], "user:bob")
        bob = scopes["user:bob"]
        self.assertEqual((bob["requests_this_minute"], bob["requests_per_minute_limit"]), (2, 2))
        self.assertEqual(bob["use"], 1.0)
        self.assertEqual(bob["denied_today"], 1)
        self.assertEqual(scopes["global"]["requests_this_minute"], 2)
        [refused] = data["errors"]
        self.assertEqual((refused["status"], refused["kind"]), (429, "rate_limited"))


def charged(records: list[CostRecord]) -> float:
    """
    What the records' costs add up to in a budget: each counted to the
    nano-USD, as the spend store counts it.
    """
    return nanos_to_usd(sum(usd_to_nanos(record.total_cost or 0.0) for record in records))


class BudgetTests(StatusTestCase):
    """
    The capped budgets the settlements touched, busiest first, with the
    spend the budgets' store answered.
    """

    def config(self) -> Config:
        return budget_config(
            key_entry(budget={"daily_usd": 300 * RESERVED, "monthly_usd": 1000 * RESERVED}),
            key_entry(OTHER_KEY, "team-b"),
            per_user={"alice": {"daily_usd": 250 * RESERVED}},
        )

    def budgets(self) -> list[tuple[str, str, float, float]]:
        return [
            (row["scope"], row["period"], row["spent_usd"], row["limit_usd"])
            for row in self.status()["budgets"]
        ]

    def test_settled_request(self) -> None:
        """
        One request with a key that has a budget: its day and month show
        what its cost record says it cost, against the key's limits. A key
        without a budget is counted, but has nothing to show.
        """
        self.assertEqual(self.status()["budgets"], [])
        self.finish(self.send(CHAT_PATH, bearer(KEY), chat()), 0.1)
        self.finish(self.send(CHAT_PATH, bearer(OTHER_KEY), chat()), 0.1)
        [record, _] = self.proxy.sink.records
        self.assertEqual(record.key_id, "team-a")
        self.assertGreater(record.total_cost or 0, 0)
        self.assertEqual(
            self.budgets(),
            [
                ("key:team-a", "day", charged([record]), 300 * RESERVED),
                ("key:team-a", "month", charged([record]), 1000 * RESERVED),
            ],
        )

    def test_burst(self) -> None:
        """
        A burst of 200 concurrent requests of one key and user: the spend
        shown is the sum of their records' costs, busiest budget first.
        """
        answers: list[Received] = []
        headers = knobs(bearer(KEY), headers_delay_ms="1000")
        for _ in range(200):
            sent = self.proxy.request(b"POST", b"/meta/alice" + CHAT_PATH, headers, chat())
            sent.addCallback(answers.append)
        self.proxy.advance(1.5)
        self.assertEqual([answer.status for answer in answers], [200] * 200)
        records = self.proxy.sink.records
        self.assertEqual(len(records), 200)
        spent = charged(records)
        self.assertAlmostEqual(spent, sum(record.total_cost or 0 for record in records))
        self.assertEqual(
            self.budgets(),
            [
                ("user:alice", "day", spent, 250 * RESERVED),
                ("key:team-a", "day", spent, 300 * RESERVED),
                ("key:team-a", "month", spent, 1000 * RESERVED),
            ],
        )
        self.assertEqual(
            [row["use"] for row in self.status()["budgets"]],
            [round(spent / (n * RESERVED), 4) for n in (250, 300, 1000)],
        )

    def test_reload(self) -> None:
        """
        A reload's caps apply at once: a new limit is shown before the next
        settlement, and a budget no longer capped leaves the page.
        """
        self.finish(self.send(CHAT_PATH, bearer(KEY), chat()), 0.1)
        self.proxy.reload(budget_config(key_entry(budget={"daily_usd": 2.5})))
        records = self.proxy.sink.records
        self.assertEqual(self.budgets(), [("key:team-a", "day", charged(records), 2.5)])
        self.finish(self.send(CHAT_PATH, bearer(KEY), chat()), 0.1)
        self.assertEqual(len(records), 2)
        self.assertEqual(self.budgets(), [("key:team-a", "day", charged(records), 2.5)])

    def test_new_day(self) -> None:
        """
        At midnight UTC the day's budgets leave the page (they start again
        from zero) and the month's stay; the next settlement brings the
        day back with the new day's spend alone.
        """
        self.finish(self.send(CHAT_PATH, bearer(KEY), chat()), 0.1)
        [first] = self.proxy.sink.records
        self.proxy.advance(86400, step=3600)
        self.assertEqual(
            self.budgets(), [("key:team-a", "month", charged([first]), 1000 * RESERVED)]
        )
        self.finish(self.send(CHAT_PATH, bearer(KEY), chat()), 0.1)
        [_, second] = self.proxy.sink.records
        self.assertEqual(
            self.budgets(),
            [
                ("key:team-a", "day", charged([second]), 300 * RESERVED),
                ("key:team-a", "month", charged([first, second]), 1000 * RESERVED),
            ],
        )


class AccessTests(StatusTestCase):
    def get_from(self, host: str, path: bytes, headers: dict[bytes, list[bytes]]) -> Received:
        """
        GET C{path} from a client at C{host}.
        """
        agent = MemoryAgent(self.proxy.site, peer_port=40007, peer_host=host)
        answers: list[Received] = []

        def collect(response: Any) -> None:
            received = Received(response)
            from llmproxy.testing.memory import _Collector

            received.protocol = _Collector(received)
            response.deliverBody(received.protocol)
            answers.append(received)

        agent.request(b"GET", b"http://proxy" + path, Headers(headers)).addCallback(collect)
        for _ in range(20):
            self.proxy.clock.advance(0)
            agent.pump()
        self.assertEqual(len(answers), 1)
        return answers[0]

    def test_loopback_only(self) -> None:
        """
        Without a token, a client on another address is refused (403),
        and so is a local request relayed by a front proxy.
        """
        for path in (b"/status", b"/status.json"):
            remote = self.get_from("192.0.2.10", path, {})
            self.assertEqual(remote.status, 403)
            self.assertEqual(remote.header(b"x-llm-proxy-error-source"), b"proxy")
            local = self.get_from("127.0.0.1", path, {})
            self.assertEqual(local.status, 200)
            relayed = self.get_from("127.0.0.1", path, {b"x-forwarded-for": [b"192.0.2.10"]})
            self.assertEqual(relayed.status, 403)
            self.assertEqual(self.get_from("::1", path, {}).status, 200)

    def test_token(self) -> None:
        """
        With a token, only the right one is accepted, from anywhere, as a
        bearer credential or a query parameter.
        """
        self.proxy = MemoryProxy(config(server={"status": {"token": TOKEN}}))
        good = {b"authorization": [b"Bearer " + TOKEN.encode()]}
        for host in ("192.0.2.10", "127.0.0.1"):
            self.assertEqual(self.get_from(host, b"/status.json", good).status, 200)
            query = b"/status?token=" + TOKEN.encode()
            self.assertEqual(self.get_from(host, query, {}).status, 200)
            missing = self.get_from(host, b"/status.json", {})
            self.assertEqual(missing.status, 401)
            self.assertEqual(missing.header(b"www-authenticate"), b'Bearer realm="llmproxy status"')
            for wrong in (TOKEN[:-1], TOKEN + "x", "", TOKEN.upper()):
                bad = {b"authorization": [b"Bearer " + wrong.encode()]}
                self.assertEqual(self.get_from(host, b"/status.json", bad).status, 401, wrong)
                self.assertEqual(
                    self.get_from(host, b"/status.json?token=" + wrong.encode(), {}).status, 401
                )
            basic = {b"authorization": [b"Basic " + TOKEN.encode()]}
            self.assertEqual(self.get_from(host, b"/status.json", basic).status, 401)

    def test_disabled(self) -> None:
        """
        C{server.status.enabled: false}: no page, and nothing recorded.
        """
        self.proxy = MemoryProxy(config(server={"status": {"enabled": False}}))
        self.finish(self.send(b"/openai/v1/chat/completions", body=CHAT), 0.1)
        for path in (b"/status", b"/status.json"):
            self.assertEqual(self.send(path, {}, method=b"GET").status, 404)
        self.proxy.state.status.enabled = True
        self.assertEqual(self.proxy.state.status.snapshot(self.proxy.state)["errors"], [])

    def test_methods(self) -> None:
        received = self.send(b"/status.json", {}, b"{}", method=b"POST")
        self.assertEqual(received.status, 405)


class PageTests(StatusTestCase):
    def test_page(self) -> None:
        """
        The page is one HTML document with no external asset, served with
        a policy that allows only its own inline script.
        """
        received = self.send(b"/status", {}, method=b"GET")
        self.assertEqual(received.status, 200)
        self.assertEqual(received.header(b"content-type"), b"text/html; charset=utf-8")
        self.assertEqual(received.header(b"content-security-policy"), CONTENT_SECURITY_POLICY)
        self.assertEqual(bytes(received.body), PAGE)
        self.assertNotIn(b"http://", PAGE.replace(b"http://www.w3.org/2000/svg", b""))
        self.assertNotIn(b"https://", PAGE)
        self.assertNotIn(b"src=", PAGE)
        self.assertNotIn(b".innerHTML", PAGE)
        self.assertIn(b"'sha256-", CONTENT_SECURITY_POLICY)
        self.assertEqual(self.send(b"/status/", {}, method=b"GET").status, 200)


class ConfigTests(SynchronousTestCase):
    def test_status_keys(self) -> None:
        parsed = config(server={"status": {"enabled": False, "token": TOKEN}})
        self.assertEqual((parsed.server.status.enabled, parsed.server.status.token), (False, TOKEN))
        self.assertIsNone(config().server.status.token)
        self.assertIsNone(config(server={"status": {"token": None}}).server.status.token)

    def test_bad_status_keys(self) -> None:
        for value, expected in (
            ({"enabled": "yes"}, "server.status.enabled: expected true or false"),
            ({"token": "short"}, "server.status.token: expected a secret of at least 16"),
            ({"token": 1234567890123456789}, "got a non-string"),
            ({"token": "has a space in it, see"}, "server.status.token: expected a secret"),
            ({"tokn": TOKEN}, "server.status.tokn"),
            ("on", "server.status: expected a mapping"),
        ):
            with self.assertRaises(ConfigError) as caught:
                config(server={"status": value})
            self.assertIn(expected, str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            config(server={"status": {"token": "short-secret"}})
        self.assertNotIn("short-secret", str(caught.exception))

    def test_reserved_name(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            config(providers={"status": {"kind": "openai", "base_url": "http://x"}})
        self.assertIn(
            "providers.status: expected a provider name other than", str(caught.exception)
        )
