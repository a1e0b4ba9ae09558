"""
Proxy keys and budgets as the official SDKs (C{openai}, C{anthropic},
C{google-genai}) see them: a proxy on loopback with C{auth.mode: keys},
the fake upstream behind it recording every header it receives.

  - each SDK works with a proxy key, and the upstream sees the provider
    credential of C{auth.credentials}, never the proxy key;
  - a wrong, expired or revoked key is the SDK's authentication error, a
    model outside the key's globs its permission error;
  - 50 concurrent SDK calls against a budget that fits about 10 worst
    cases: spend stays within the budget, the others get 402 with the
    budget headers, and the SDK raises its status error without retrying.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any

import anthropic
import openai
import yaml
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types
from treq.content import text_content
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread

from llmproxy.config import Config, load_config, parse_config
from llmproxy.testing.fake_upstream import fake_text
from tests.compat.scenarios import ANTHROPIC_MODEL, GEMINI_MODEL, SDK_TIMEOUT
from tests.e2e.harness import ProxyTestCase, write_config
from tests.e2e.test_keys_e2e import entry
from tests.e2e.test_redis_fleet import metric

KEY = "llmp-sdk-team-a-4Wc8Rz1Qn5Tv7Yb2Mx6Kd"
EXPIRED = "llmp-sdk-expired-9Hs3Lp0Gf2Jk4Zx6Cv8B"
RESTRICTED = "llmp-sdk-restricted-7Ua5Ie3Oq1Wy9Rt7Ep"
BUDGETED = "llmp-sdk-budgeted-2Nm4Bv6Cx8Zl0Kj2Hg4"
UNKNOWN = "llmp-sdk-unknown-1Aa1Aa1Aa1Aa1Aa1Aa1Aa"
PROXY_KEYS = (KEY, EXPIRED, RESTRICTED, BUDGETED, UNKNOWN)

CREDENTIALS = {
    "openai": {"Authorization": "Bearer sk-provider-openai-0001"},
    "anthropic": {"x-api-key": "sk-ant-provider-0001"},
    "gemini": {"x-goog-api-key": "AIza-provider-gemini-0001"},
}

OPENAI_MODEL = "gpt-4o"
PRICE = {"input": 1000.0, "output": 2000.0}
"""$0.001 per input token, $0.002 per output token."""

PROMPT: Any = [{"role": "user", "content": "x" * 40}]
"""Ten estimated input tokens; the fake reports 10 input and 3 output."""

MAX_TOKENS = 5
RESERVED = (10 * PRICE["input"] + MAX_TOKENS * PRICE["output"]) / 1e6
COST = (10 * PRICE["input"] + 3 * PRICE["output"]) / 1e6
BUDGET = 10 * RESERVED


class KeysThroughProxy(ProxyTestCase):
    timeout = 120

    def config(self, upstream_base: str) -> Config:
        return parse_config(self.config_data(upstream_base), "test")

    def config_data(self, upstream_base: str) -> dict[str, Any]:
        providers: dict[str, Any] = {
            name: {
                "base_url": upstream_base,
                "timeouts": {"connect_seconds": 2, "first_byte_seconds": 10, "idle_seconds": 10},
            }
            for name in ("openai", "anthropic", "gemini")
        }
        providers["openai"]["models"] = {OPENAI_MODEL: {"pricing": PRICE}}
        keys = [
            entry(KEY, "team-a"),
            entry(EXPIRED, "old", expires_at="2020-01-01T00:00:00Z"),
            entry(
                RESTRICTED, "restricted", models=["gpt-4o-mini", "claude-haiku-*", "gemini-*-lite"]
            ),
            entry(BUDGETED, "budgeted", providers=["openai"], budget={"daily_usd": BUDGET}),
        ]
        auth = {"mode": "keys", "keys": keys, "credentials": CREDENTIALS}
        return {"providers": providers, "auth": auth}

    def start_from_file(self, data: dict[str, Any]) -> str:
        """
        Start another proxy (C{self.proxy_url} points at it) from a YAML
        file holding C{data}, so that a reload re-reads it as SIGHUP does.

        @return: the file's path.
        """
        path = write_config(self, yaml.safe_dump(data))
        self.start_proxy(load_config([path], {}), [path])
        return path

    def in_thread(self, function: Callable[[], Any]) -> Deferred[Any]:
        return deferToThread(function)

    def openai_client(self, key: str, retries: int = 0, **headers: str) -> openai.OpenAI:
        return openai.OpenAI(
            api_key=key,
            base_url=f"{self.proxy_url}/openai/v1",
            max_retries=retries,
            timeout=SDK_TIMEOUT,
            default_headers=headers or None,
        )

    def anthropic_client(self, key: str) -> anthropic.Anthropic:
        return anthropic.Anthropic(
            api_key=key, base_url=f"{self.proxy_url}/anthropic", max_retries=0, timeout=SDK_TIMEOUT
        )

    def gemini_client(self, key: str) -> genai.Client:
        options = genai_types.HttpOptions(
            base_url=f"{self.proxy_url}/gemini",
            api_version="v1beta",
            retry_options=None,
            timeout=int(SDK_TIMEOUT * 1000),
        )
        return genai.Client(api_key=key, http_options=options)

    def assert_no_proxy_key_upstream(self) -> None:
        """
        No request the upstream received carries a proxy key, anywhere.
        """
        for received in self.fake.received:
            seen = received.uri + b"".join(name + value for name, value in received.headers)
            for key in PROXY_KEYS:
                self.assertNotIn(key.encode(), seen)


class SwapTests(KeysThroughProxy):
    def test_each_sdk_with_a_proxy_key(self) -> Deferred[None]:
        def call() -> None:
            with self.openai_client(KEY) as client:
                completion = client.chat.completions.create(model=OPENAI_MODEL, messages=PROMPT)
                self.assertEqual(completion.choices[0].message.content, fake_text())
                chunks = list(
                    client.chat.completions.create(model=OPENAI_MODEL, messages=PROMPT, stream=True)
                )
                self.assertTrue(chunks)
            with self.anthropic_client(KEY) as client:
                message = client.messages.create(
                    model=ANTHROPIC_MODEL, max_tokens=10, messages=PROMPT
                )
                self.assertEqual(message.content[0].text, fake_text())  # type: ignore[union-attr]
            with self.gemini_client(KEY) as client:
                response = client.models.generate_content(model=GEMINI_MODEL, contents="hi")
                self.assertEqual(response.text, fake_text())

        def check(ignored: None) -> None:
            chat, stream, messages, generate = self.fake.received
            for received in (chat, stream):
                self.assertEqual(
                    received.header_values("authorization"), [b"Bearer sk-provider-openai-0001"]
                )
            self.assertEqual(messages.header_values("x-api-key"), [b"sk-ant-provider-0001"])
            self.assertEqual(messages.header_values("authorization"), [])
            self.assertEqual(
                generate.header_values("x-goog-api-key"), [b"AIza-provider-gemini-0001"]
            )
            self.assert_no_proxy_key_upstream()

        return self.in_thread(call).addCallback(check)


class RefusalTests(KeysThroughProxy):
    def test_wrong_expired_revoked_keys(self) -> Deferred[None]:
        """
        A wrong or expired key is each SDK's authentication error; so is a
        key revoked by a reload, on the very next request.
        """

        def refused(key: str) -> None:
            with (
                self.openai_client(key) as client,
                self.assertRaises(openai.AuthenticationError) as caught,
            ):
                client.chat.completions.create(model=OPENAI_MODEL, messages=PROMPT)
            self.assertEqual(caught.exception.response.headers["x-llm-proxy-error-source"], "proxy")
            with (
                self.anthropic_client(key) as client,
                self.assertRaises(anthropic.AuthenticationError),
            ):
                client.messages.create(model=ANTHROPIC_MODEL, max_tokens=10, messages=PROMPT)
            with (
                self.gemini_client(key) as client,
                self.assertRaises(genai_errors.ClientError) as error,
            ):
                client.models.generate_content(model=GEMINI_MODEL, contents="hi")
            self.assertEqual(
                (error.exception.code, error.exception.status), (401, "UNAUTHENTICATED")
            )

        def before() -> None:
            refused(UNKNOWN)
            refused(EXPIRED)
            with self.openai_client(KEY) as client:
                client.chat.completions.create(model=OPENAI_MODEL, messages=PROMPT)

        @inlineCallbacks
        def revoke(ignored: None) -> Any:
            self.assertEqual(len(self.fake.received), 1)
            data["auth"]["keys"] = [k for k in data["auth"]["keys"] if k["id"] != "team-a"]
            with open(path, "w") as stream:
                stream.write(yaml.safe_dump(data))
            reloaded = yield self.service.reload()
            self.assertIsNotNone(reloaded)
            yield self.in_thread(lambda: refused(KEY))
            self.assertEqual(len(self.fake.received), 1)

        data = self.config_data(self.upstream_url)
        path = self.start_from_file(data)
        return self.in_thread(before).addCallback(revoke)

    def test_model_outside_globs(self) -> Deferred[None]:
        def call() -> None:
            with self.openai_client(RESTRICTED) as client:
                with self.assertRaises(openai.PermissionDeniedError) as caught:
                    client.chat.completions.create(model=OPENAI_MODEL, messages=PROMPT)
                self.assertIn("may not use model", caught.exception.message)
                client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT)
            with self.anthropic_client(RESTRICTED) as client:
                with self.assertRaises(anthropic.PermissionDeniedError):
                    client.messages.create(model=ANTHROPIC_MODEL, max_tokens=10, messages=PROMPT)
                client.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=PROMPT)
            with self.gemini_client(RESTRICTED) as client:
                with self.assertRaises(genai_errors.ClientError) as error:
                    client.models.generate_content(model=GEMINI_MODEL, contents="hi")
                self.assertEqual(
                    (error.exception.code, error.exception.status), (403, "PERMISSION_DENIED")
                )
                client.models.generate_content(model="gemini-2.0-flash-lite", contents="hi")

        def check(ignored: None) -> None:
            self.assertEqual(len(self.fake.received), 3)
            self.assert_no_proxy_key_upstream()

        return self.in_thread(call).addCallback(check)


class BudgetTests(KeysThroughProxy):
    @inlineCallbacks
    def test_fifty_concurrent_against_ten(self) -> Any:
        """
        50 SDK calls at once against a budget of 10 worst cases: spend stays
        within the budget (each real cost is below its reservation), every
        other call gets a 402 with the budget headers, which the SDK raises
        as its status error and does not retry.
        """

        def one() -> tuple[int, Any]:
            # Retries allowed: a 402 must not be retried (a 429 would be).
            with self.openai_client(
                BUDGETED, retries=2, **{"x-fake-headers-delay-ms": "1500"}
            ) as client:
                try:
                    client.chat.completions.create(
                        model=OPENAI_MODEL, messages=PROMPT, max_tokens=MAX_TOKENS
                    )
                except openai.APIStatusError as error:
                    self.assertNotIsInstance(error, openai.RateLimitError)
                    return error.status_code, error.response.headers
                return 200, None

        def burst() -> list[tuple[int, Any]]:
            with concurrent.futures.ThreadPoolExecutor(50) as pool:
                return list(pool.map(lambda _: one(), range(50)))

        results = yield deferToThread(burst)
        statuses = [status for status, _ in results]
        admitted = statuses.count(200)
        self.assertEqual(statuses.count(402), 50 - admitted)
        self.assertGreaterEqual(admitted, 10)
        self.assertGreater(statuses.count(402), 0)
        for status, headers in results:
            if status == 402:
                self.assertEqual(headers["x-llm-proxy-budget-scope"], "key:budgeted")
                self.assertEqual(headers["x-llm-proxy-budget-period"], "day")
                self.assertEqual(headers["x-llm-proxy-budget-limit-usd"], f"{BUDGET:.6f}")
                self.assertIn("x-llm-proxy-budget-remaining-usd", headers)
                self.assertTrue(headers["x-llm-proxy-budget-reset"].isdigit())
                self.assertEqual(headers["x-llm-proxy-error-source"], "proxy")
        # No call was retried: the upstream saw each admitted one once.
        self.assertEqual(len(self.fake.received), admitted)
        response = yield self.http.get(self.proxy_url + "/metrics")
        text = yield text_content(response)
        spent = metric(text, "llmproxy_budget_spent_usd", key="budgeted", period="day")
        self.assertAlmostEqual(spent, admitted * COST)
        self.assertLessEqual(spent, BUDGET)
        self.assertEqual(
            metric(text, "llmproxy_budget_denied_total", key="budgeted"), 50 - admitted
        )

    def test_each_sdk_raises_its_status_error(self) -> Deferred[None]:
        """
        Once spent, the budget's 402 is each SDK's own status error.
        """
        self.restart_with_spent_budget()

        def call() -> None:
            with (
                self.openai_client(BUDGETED) as client,
                self.assertRaises(openai.APIStatusError) as caught,
            ):
                client.chat.completions.create(model=OPENAI_MODEL, messages=PROMPT)
            self.assertEqual(caught.exception.status_code, 402)
            with (
                self.anthropic_client(BUDGETED) as client,
                self.assertRaises(anthropic.APIStatusError) as error,
            ):
                client.messages.create(model=ANTHROPIC_MODEL, max_tokens=10, messages=PROMPT)
            self.assertEqual(error.exception.status_code, 402)
            body: Any = error.exception.body
            self.assertEqual(body["error"]["type"], "billing_error")
            with (
                self.gemini_client(BUDGETED) as client,
                self.assertRaises(genai_errors.ClientError) as failed,
            ):
                client.models.generate_content(model=GEMINI_MODEL, contents="hi")
            self.assertEqual(failed.exception.code, 402)

        return self.in_thread(call)

    def restart_with_spent_budget(self) -> None:
        """
        A proxy whose budgeted key has a budget of 0 on every provider (all
        priced).
        """
        priced = {
            name: {"base_url": self.upstream_url, "models": {model: {"pricing": PRICE}}}
            for name, model in (
                ("openai", OPENAI_MODEL),
                ("anthropic", ANTHROPIC_MODEL),
                ("gemini", GEMINI_MODEL),
            )
        }
        keys = [entry(BUDGETED, "budgeted", budget={"daily_usd": 0})]
        auth = {"mode": "keys", "keys": keys, "credentials": CREDENTIALS}
        self.start_proxy(parse_config({"providers": priced, "auth": auth}, "test"))
