"""
Retries, fallback, circuit breakers and the stream gate, in memory on a fake
clock (L{llmproxy.testing.memory}), each upstream a fake of its own.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping
from typing import Any

import orjson
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.call import Call
from llmproxy.config import Config, parse_config
from llmproxy.test.test_call import ANTHROPIC, OPENAI, with_knobs
from llmproxy.testing.memory import MemoryProxy, Received

CHAT = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]})
CHAT_STREAM = orjson.dumps(
    {
        "model": "gpt-4o-mini",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "Hi"}],
    }
)
RESPONSES_STREAM = orjson.dumps({"model": "gpt-4o-mini", "input": "Hi", "stream": True})
MESSAGES_STREAM = orjson.dumps(
    {
        "model": "claude-sonnet-4-5",
        "max_tokens": 50,
        "stream": True,
        "messages": [{"role": "user", "content": "x"}],
    }
)
GEMINI = {b"x-goog-api-key": [b"AIza-test"], b"content-type": [b"application/json"]}
GEMINI_BODY = orjson.dumps({"contents": [{"parts": [{"text": "Hi"}]}]})


def two_upstreams(**provider: Any) -> Config:
    """
    Each built-in provider with upstream C{a} (priority 0) and C{b}
    (priority 1); C{provider} keys merge over each provider's settings.
    """
    providers = {}
    for name in ("openai", "anthropic", "gemini"):
        providers[name] = {
            "upstreams": [
                {"name": "a", "base_url": f"http://a/{name}"},
                {"name": "b", "base_url": f"http://b/{name}", "priority": 1},
            ],
            **provider,
        }
    return parse_config({"providers": providers}, "test")


class ResilienceTestCase(SynchronousTestCase):
    def proxy(self, config: Config) -> MemoryProxy:
        self.memory = MemoryProxy(config, hosts=("a", "b"))
        self.a, self.b = self.memory.fakes["a"], self.memory.fakes["b"]
        return self.memory

    def send(
        self,
        path: bytes,
        headers: Mapping[bytes, list[bytes]] | None = None,
        body: bytes | None = CHAT,
        method: bytes = b"POST",
    ) -> Received:
        answers: list[Received] = []
        self.memory.request(method, path, headers or OPENAI, body).addCallback(answers.append)
        self.memory.advance(1.0)
        self.assertEqual(len(answers), 1, "no response")
        return answers[0]


class RetryTests(ResilienceTestCase):
    def test_first_upstream_fails_three_times(self) -> None:
        """
        Upstream C{a} answers 503 to its first three requests: every client
        request succeeds, and the headers, records and metrics say where.
        """
        proxy = self.proxy(two_upstreams())
        self.a.defaults["x-fake-fail-first"] = "3"
        answers = [self.send(b"/openai/v1/chat/completions") for _ in range(4)]
        self.assertEqual([r.status for r in answers], [200] * 4)
        self.assertEqual(
            [
                (r.header(b"x-llm-proxy-attempts"), r.header(b"x-llm-proxy-upstream"))
                for r in answers
            ],
            [(b"2", b"openai/b")] * 3 + [(b"1", b"openai/a")],
        )
        self.assertEqual(
            [(r.upstream, r.attempts, r.status) for r in proxy.sink.records],
            [("openai/b", 2, 200)] * 3 + [("openai/a", 1, 200)],
        )
        self.assertEqual((len(self.a.received), len(self.b.received)), (4, 3))
        metrics = proxy.state.metrics.render().decode()
        attempts = 'llmproxy_upstream_attempts_total{outcome="status_503",provider="openai"'
        self.assertIn(attempts + ',upstream="a"} 3.0', metrics)
        self.assertIn('llmproxy_retries_total{provider="openai",reason="status_503"} 3.0', metrics)

    def test_client_errors_not_retried(self) -> None:
        self.proxy(two_upstreams())
        for status in ("400", "401", "404", "422"):
            received = self.send(b"/openai/v1/chat/completions", with_knobs(OPENAI, status=status))
            self.assertEqual(received.status, int(status))
            self.assertEqual(received.header(b"x-llm-proxy-attempts"), b"1")
        self.assertEqual(self.b.received, [])

    def test_connection_failure_then_fallback_mount(self) -> None:
        """
        Every upstream of a mount fails: its fallback mount answers.
        """
        config = parse_config(
            {
                "providers": {
                    "openai": {"base_url": "http://nowhere", "fallback": ["backup"]},
                    "backup": {"kind": "openai", "base_url": "http://b/v1"},
                }
            },
            "test",
        )
        proxy = self.proxy(config)
        proxy.fake.defaults["x-fake-reset"] = "1"
        received = self.send(b"/openai/v1/chat/completions")
        self.assertEqual(received.status, 200)
        self.assertEqual(received.header(b"x-llm-proxy-upstream"), b"backup/b")
        [record] = proxy.sink.records
        self.assertEqual(
            (record.provider, record.upstream, record.attempts), ("openai", "backup/b", 2)
        )
        self.assertIn(
            'llmproxy_fallbacks_total{from_provider="openai",to_provider="backup"} 1.0',
            proxy.state.metrics.render().decode(),
        )

    def test_all_attempts_fail(self) -> None:
        """
        When every attempt failed, the client gets the last one's answer.
        """
        self.proxy(two_upstreams())
        received = self.send(b"/openai/v1/chat/completions", with_knobs(OPENAI, status="500"))
        self.assertEqual(received.status, 500)
        self.assertEqual(received.header(b"x-llm-proxy-attempts"), b"3")
        self.assertEqual((len(self.a.received), len(self.b.received)), (2, 1))

    def test_unreachable_everywhere(self) -> None:
        """
        Every upstream drops the connection: after three tries (a backoff
        before the third, to one already tried) the client gets the
        proxy's 502, saying how many tries and which upstream came last;
        one record; the reservation is given back.
        """
        proxy = self.proxy(two_upstreams())
        self.a.defaults["x-fake-reset"] = "1"
        self.b.defaults["x-fake-reset"] = "1"
        received = self.send(b"/openai/v1/chat/completions")
        self.assertEqual(received.status, 502)
        self.assertEqual(received.header(b"x-llm-proxy-error-source"), b"upstream")
        self.assertEqual(received.header(b"x-llm-proxy-attempts"), b"3")
        self.assertIn(received.header(b"x-llm-proxy-upstream"), (b"openai/a", b"openai/b"))
        [record] = proxy.sink.records
        self.assertEqual((record.status, record.attempts), (502, 3))
        self.assertEqual(len(self.a.received) + len(self.b.received), 3)

    def test_burst(self) -> None:
        """
        300 concurrent requests while upstream C{a} fails: every one
        succeeds, one record each, and the records' attempts add up to the
        upstream calls made (the circuit soon spares C{a} the rest).
        """
        proxy = self.proxy(two_upstreams())
        self.a.defaults["x-fake-status"] = "503"
        self.a.defaults["x-fake-headers-delay-ms"] = "50"
        answers: list[Received] = []
        for _ in range(300):
            proxy.request(b"POST", b"/openai/v1/chat/completions", OPENAI, CHAT).addCallback(
                answers.append
            )
        proxy.advance(2.0)
        self.assertEqual([r.status for r in answers], [200] * 300)
        records = proxy.sink.records
        self.assertEqual(len(records), 300)
        self.assertEqual(
            sum(r.attempts for r in records), len(self.a.received) + len(self.b.received)
        )
        self.assertEqual(len(self.b.received), 300)
        self.assertEqual(self.memory.state.circuits.in_flight("openai", "a"), 0)

    def test_retry_after_waited_for(self) -> None:
        """
        A 429 with a short C{Retry-After} is waited for (one upstream); a
        long one is the client's answer at once.
        """
        config = parse_config({"providers": {"openai": {"base_url": "http://a/v1"}}}, "test")
        proxy = self.proxy(config)
        headers = with_knobs(OPENAI, fail_first="1", status="429", retry_after="2")
        answers: list[Received] = []
        proxy.request(b"POST", b"/openai/v1/chat/completions", headers, CHAT).addCallback(
            answers.append
        )
        proxy.advance(1.9)
        self.assertEqual((answers, len(self.a.received)), ([], 1))
        proxy.advance(0.2)
        [received] = answers
        self.assertEqual((received.status, received.header(b"x-llm-proxy-attempts")), (200, b"2"))
        received = self.send(
            b"/openai/v1/chat/completions", with_knobs(OPENAI, status="429", retry_after="60")
        )
        self.assertEqual((received.status, received.header(b"retry-after")), (429, b"60"))

    def test_total_timeout_holds(self) -> None:
        """
        Retries stay within C{timeouts.total_seconds}.
        """
        proxy = self.proxy(two_upstreams(timeouts={"first_byte_seconds": 2, "total_seconds": 3}))
        answers: list[Received] = []
        proxy.request(
            b"POST", b"/openai/v1/chat/completions", with_knobs(OPENAI, hang="headers"), CHAT
        ).addCallback(answers.append)
        proxy.advance(2.9)
        self.assertEqual(answers, [])
        proxy.advance(0.2)
        [received] = answers
        self.assertEqual(received.status, 504)
        self.assertEqual(received.header(b"x-llm-proxy-attempts"), b"2")

    def test_upstream_headers_and_model_renames(self) -> None:
        config = parse_config(
            {
                "providers": {
                    "openai": {
                        "upstreams": [
                            {
                                "name": "a",
                                "base_url": "http://a/v1",
                                "headers": {"Authorization": "Bearer sk-proxy-held"},
                                "models": {"gpt-4o-mini": "mini-deployment"},
                            }
                        ]
                    },
                    "gemini": {
                        "upstreams": [
                            {
                                "base_url": "http://a",
                                "models": {"gemini-2.5-flash": "gemini-2.5-flash-001"},
                            }
                        ]
                    },
                }
            },
            "test",
        )
        self.proxy(config)
        self.send(b"/openai/v1/chat/completions")
        sent = self.a.received[-1]
        self.assertEqual(dict(sent.headers)[b"Authorization"], b"Bearer sk-proxy-held")
        self.assertEqual(orjson.loads(sent.body)["model"], "mini-deployment")
        self.send(b"/gemini/v1beta/models/gemini-2.5-flash:generateContent", GEMINI, GEMINI_BODY)
        self.assertEqual(
            self.a.received[-1].path, b"/v1beta/models/gemini-2.5-flash-001:generateContent"
        )


class StreamGateTests(ResilienceTestCase):
    """
    A stream that fails before its first content event is retried; the
    client sees one clean stream, byte for byte what the upstream that
    answered sent.
    """

    cases = [
        (b"/openai/v1/chat/completions", OPENAI, CHAT_STREAM),
        (b"/openai/v1/responses", OPENAI, RESPONSES_STREAM),
        (b"/anthropic/v1/messages", ANTHROPIC, MESSAGES_STREAM),
        (
            b"/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
            GEMINI,
            GEMINI_BODY,
        ),
    ]

    def check_retried(self, knob: str, value: str) -> None:
        proxy = self.proxy(two_upstreams())
        self.a.defaults[knob] = value
        for path, headers, body in self.cases:
            received = self.send(path, headers, body)
            self.assertTrue(received.complete, path)
            self.assertEqual(received.status, 200)
            self.assertEqual(received.header(b"x-llm-proxy-upstream"), path.split(b"/")[1] + b"/b")
            self.assertEqual(bytes(received.body), self.b.last_body_sent, path)
        self.assertEqual([r.attempts for r in proxy.sink.records], [2] * 4)
        self.assertEqual([r.complete for r in proxy.sink.records], [True] * 4)

    def test_error_event_before_content(self) -> None:
        self.check_retried("x-fake-error-after", "0")

    def test_cut_before_content(self) -> None:
        self.check_retried("x-fake-die-after", "0")

    def test_silence_before_content(self) -> None:
        proxy = self.proxy(two_upstreams(timeouts={"idle_seconds": 0.5}))
        self.a.defaults["x-fake-stall-after"] = "0"
        for path, headers, body in self.cases:
            received = self.send(path, headers, body)
            self.assertTrue(received.complete, path)
            self.assertEqual(bytes(received.body), self.b.last_body_sent, path)
        self.assertEqual([(r.upstream or "").split("/")[-1] for r in proxy.sink.records], ["b"] * 4)

    def test_after_content_not_retried(self) -> None:
        """
        Once content reached the client, a failure ends the stream with the
        provider's error event, as without retries.
        """
        proxy = self.proxy(two_upstreams())
        self.a.defaults["x-fake-chunks"] = "10"
        self.a.defaults["x-fake-die-after"] = "6"
        for path, headers, body in self.cases:
            received = self.send(path, headers, body)
            self.assertTrue(received.done)
            self.assertIn(b"error", bytes(received.body)[-300:], path)
        self.assertEqual(self.b.received, [])
        self.assertEqual([r.complete for r in proxy.sink.records], [False] * 4)

    def test_first_content_not_delayed(self) -> None:
        """
        The gate holds only the opening events: content flows as it comes.
        """
        self.proxy(two_upstreams())
        headers = with_knobs(OPENAI, chunks="5", delay_ms="200")
        answers: list[Received] = []
        self.memory.request(
            b"POST", b"/openai/v1/chat/completions", headers, CHAT_STREAM
        ).addCallback(answers.append)
        self.memory.flush()
        # The first chunk (the role, no text) is held back...
        self.assertEqual(answers, [])
        # ...until the first text arrives, 200 ms later: then both go at once.
        self.memory.clock.advance(0.2)
        self.memory.flush()
        [received] = answers
        self.assertEqual(bytes(received.body), self.a.last_body_sent)
        self.assertIn(b'"content":"', bytes(received.body))
        self.assertFalse(received.done)

    def test_body_kept_until_committed(self) -> None:
        """
        A stream's request body is kept for another attempt until the first
        content is relayed (the retry sends all of it), then let go of: a
        long stream does not hold a large prompt for as long as it runs.
        """
        self.proxy(two_upstreams())
        self.a.defaults["x-fake-error-after"] = "0"
        body = orjson.dumps(
            {
                "model": "gpt-4o-mini",
                "stream": True,
                "messages": [{"role": "user", "content": "x" * 200_000}],
            }
        )
        answers: list[Received] = []
        self.memory.request(
            b"POST",
            b"/openai/v1/chat/completions",
            with_knobs(OPENAI, chunks="20", delay_ms="200"),
            body,
        ).addCallback(answers.append)
        self.memory.flush()
        self.memory.clock.advance(0.2)
        self.memory.flush()
        [received] = answers
        self.assertFalse(received.done)
        [first], [second] = self.a.received, self.b.received
        self.assertGreater(len(first.body), 200_000)
        self.assertEqual(second.body, first.body)
        request_id = received.header(b"x-llm-proxy-request-id")
        [call] = [
            o
            for o in gc.get_objects()
            if type(o) is Call
            and o._facts is not None
            and o._facts.request_id.encode() == request_id
        ]
        self.assertEqual(call._body, b"")


class CircuitTests(ResilienceTestCase):
    def test_opens_skips_and_probes_once(self) -> None:
        """
        Five failures open C{a}'s circuit: later requests skip it (no call
        to it) until the cooldown; then, of 50 concurrent requests, exactly
        one probes it, and its success closes the circuit.
        """
        proxy = self.proxy(two_upstreams())
        self.a.defaults["x-fake-status"] = "500"
        for _ in range(5):
            self.assertEqual(self.send(b"/openai/v1/chat/completions").status, 200)
        self.assertEqual(len(self.a.received), 5)
        self.send(b"/openai/v1/chat/completions")
        self.assertEqual(len(self.a.received), 5)
        health = self.health()
        self.assertEqual(health["upstreams"]["a"]["open_models"], ["gpt-4o-mini"])
        self.assertIn('model="gpt-4o-mini",provider="openai",upstream="a"} 1.0', self.metrics())
        proxy.clock.advance(30)
        del self.a.defaults["x-fake-status"]
        self.a.defaults["x-fake-headers-delay-ms"] = "100"
        answers: list[Received] = []
        for _ in range(50):
            proxy.request(b"POST", b"/openai/v1/chat/completions", OPENAI, CHAT).addCallback(
                answers.append
            )
        proxy.advance(1.0)
        self.assertEqual(len(answers), 50)
        self.assertEqual(len(self.a.received), 6)
        self.assertEqual(self.health()["upstreams"]["a"]["open_models"], [])
        self.send(b"/openai/v1/chat/completions")
        self.assertEqual(len(self.a.received), 7)

    def test_nothing_available(self) -> None:
        """
        Every circuit open before any attempt: 503 with Retry-After, no
        record, and the provider is degraded.
        """
        config = parse_config(
            {
                "providers": {
                    "openai": {
                        "base_url": "http://a/v1",
                        "retry": {"max_attempts": 1},
                        "circuit_breaker": {"failures": 2, "cooldown_seconds": 20},
                    }
                }
            },
            "test",
        )
        proxy = self.proxy(config)
        self.a.defaults["x-fake-reset"] = "1"
        for _ in range(2):
            self.assertEqual(self.send(b"/openai/v1/chat/completions").status, 502)
        received = self.send(b"/openai/v1/chat/completions")
        self.assertEqual(received.status, 503)
        self.assertEqual(received.header(b"x-llm-proxy-error-source"), b"proxy")
        self.assertEqual(received.header(b"retry-after"), b"19")
        self.assertEqual(len(proxy.sink.records), 2)
        health = self.health()
        self.assertEqual(health["status"], "degraded")
        self.assertEqual(health["upstreams"]["a"]["status"], "open")

    def test_provider_rate_limit_headers_pause(self) -> None:
        """
        An upstream whose own rate-limit headers say zero is left alone
        until their reset, without counting as a failure.
        """
        self.proxy(two_upstreams())
        headers = with_knobs(OPENAI, header="x-ratelimit-remaining-requests: 0")
        headers[b"x-fake-header"].append(b"x-ratelimit-reset-requests: 5s")
        self.assertEqual(self.send(b"/openai/v1/chat/completions", headers).status, 200)
        self.assertEqual(self.health()["upstreams"]["a"]["status"], "rate_limited")
        self.send(b"/openai/v1/chat/completions")
        self.assertEqual((len(self.a.received), len(self.b.received)), (1, 1))
        self.memory.advance(5)
        self.send(b"/openai/v1/chat/completions")
        self.assertEqual(len(self.a.received), 2)

    def health(self) -> Any:
        received = self.send(b"/health", method=b"GET", body=None)
        return orjson.loads(bytes(received.body))["providers"]["openai"]

    def metrics(self) -> str:
        return self.memory.state.metrics.render().decode()
