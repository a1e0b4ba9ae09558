"""
Tests for L{llmproxy.call}: the request path's four phases, driven in
memory (L{llmproxy.testing.memory}) on a fake clock, through the real Site,
Klein routing and the fake upstream.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import orjson
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.logger import ILogObserver, Logger
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from llmproxy import accesslog, identity
from llmproxy.config import Config, parse_config
from llmproxy.ratelimit import (
    BackendUnavailable,
    Decision,
    IRateLimiter,
    LimitRequest,
    Reservation,
)
from llmproxy.testing.memory import MemoryProxy, Received

OPENAI_KEY = b"sk-test-1"
OPENAI = {b"authorization": [b"Bearer " + OPENAI_KEY], b"content-type": [b"application/json"]}
ANTHROPIC = {
    b"x-api-key": [b"sk-ant-test"],
    b"anthropic-version": [b"2023-06-01"],
    b"content-type": [b"application/json"],
}
CHAT = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]})
CHAT_STREAM = orjson.dumps(
    {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
)
MESSAGES = orjson.dumps(
    {"model": "claude-sonnet-4-5", "max_tokens": 50, "messages": [{"role": "user", "content": "x"}]}
)


def config(**sections: Any) -> Config:
    """
    The three providers (each served by the fake in memory, one attempt per
    request: retries are tested on their own) and prices for the models
    these tests use, with C{sections} merged over them. (Records
    go to the memory proxy's own sink whatever cost tracking says.)
    """
    once = {"max_attempts": 1}
    data: dict[str, Any] = {
        "providers": {
            "openai": {
                "base_url": "http://fake-openai",
                "models": {"gpt-4o-mini": {"pricing": {"input": 0.15, "output": 0.6}}},
                "retry": once,
            },
            "anthropic": {"base_url": "http://fake-anthropic/", "retry": once},
            "gemini": {"base_url": "http://fake-gemini", "retry": once},
        },
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(name), dict):
            data[name] = {**data[name], **value}
        else:
            data[name] = value
    return parse_config(data, "test")


def with_knobs(headers: Mapping[bytes, list[bytes]], **knobs: str) -> dict[bytes, list[bytes]]:
    """
    C{headers} plus fake-upstream knobs: C{delay_ms="10"} is
    C{x-fake-delay-ms: 10}.
    """
    out = dict(headers)
    for name, value in knobs.items():
        out[b"x-fake-" + name.replace("_", "-").encode()] = [value.encode()]
    return out


class CallTestCase(SynchronousTestCase):
    """
    A proxy in memory, and the access lines it writes.
    """

    def setUp(self) -> None:
        self.access: list[dict[str, Any]] = []
        self.patch(accesslog, "log", Logger(observer=cast(ILogObserver, self.access.append)))
        self.proxy = MemoryProxy(self.config())

    def config(self) -> Config:
        return config()

    def send(
        self,
        path: bytes,
        headers: Mapping[bytes, list[bytes]] | None = None,
        body: bytes | None = None,
        method: bytes = b"POST",
    ) -> Received:
        """
        Send a request; its response, whose headers must already be in.
        """
        answers: list[Received] = []
        self.proxy.request(method, path, headers or OPENAI, body).addCallback(answers.append)
        self.assertEqual(len(answers), 1, "no response headers yet")
        return answers[0]

    def json(self, received: Received) -> Any:
        self.assertTrue(received.done)
        return orjson.loads(bytes(received.body))


class ForwardingTests(CallTestCase):
    """
    A request goes through inspect, admit, attempt and account.
    """

    def test_json(self) -> None:
        """
        A JSON chat completion comes back as the upstream sent it, with a
        request id, one cost record and one access line with tokens and cost.
        """
        received = self.send(b"/openai/v1/chat/completions", body=CHAT)
        self.assertEqual(received.status, 200)
        self.assertTrue(received.complete)
        self.assertEqual(bytes(received.body), self.proxy.fake.last_body_sent)
        request_id = received.header(b"x-llm-proxy-request-id")
        assert request_id is not None
        [record] = self.proxy.sink.records
        self.assertEqual(record.request_id, request_id.decode())
        self.assertEqual(record.endpoint, "/openai/v1/chat/completions")
        self.assertEqual(record.key_id, identity.key_id(OPENAI_KEY))
        self.assertEqual((record.status, record.complete), (200, True))
        self.assertEqual((record.input_tokens, record.output_tokens), (10, 3))
        self.assertAlmostEqual(record.total_cost or 0, (10 * 0.15 + 3 * 0.6) / 1e6)
        [line] = self.access
        self.assertEqual(line["request_id"], request_id.decode())
        self.assertEqual(
            (line["status"], line["input_tokens"], line["output_tokens"]), (200, 10, 3)
        )
        self.assertEqual(line["cost"], record.total_cost)
        self.assertEqual(line["provider"], "openai")
        self.assertTrue(line["complete"])

    def test_stream_is_incremental(self) -> None:
        """
        Stream chunks reach the client as the upstream sends them, and the
        record is written when the stream ends, with the usage the proxy
        asked for and removed again.
        """
        headers = with_knobs(OPENAI, chunks="4", delay_ms="100")
        received = self.send(b"/openai/v1/chat/completions", headers, CHAT_STREAM)
        self.assertTrue((received.header(b"content-type") or b"").startswith(b"text/event-stream"))
        self.assertEqual(received.header(b"cache-control"), b"no-cache")
        first = bytes(received.body)
        self.assertIn(b"data: ", first)
        self.assertFalse(received.done)
        self.assertEqual(self.proxy.sink.records, [])
        self.assertEqual(self.proxy.state.health.provider("openai").active_streams, 1)
        self.proxy.advance(0.1)
        self.assertGreater(len(received.body), len(first))
        self.proxy.advance(1.0)
        self.assertTrue(received.complete)
        self.assertTrue(bytes(received.body).endswith(b"data: [DONE]\n\n"))
        self.assertNotIn(b'"choices":[]', bytes(received.body))
        [record] = self.proxy.sink.records
        self.assertEqual(
            (record.is_streaming, record.complete, record.output_tokens), (True, True, 4)
        )
        self.assertEqual(record.ttfb_ms, 0.0)
        self.assertEqual(self.proxy.state.health.provider("openai").active_streams, 0)
        sent = orjson.loads(self.proxy.fake.received[-1].body)
        self.assertEqual(sent["stream_options"], {"include_usage": True})

    def test_upstream_error_status_passes_through(self) -> None:
        """
        An upstream 500 reaches the client untouched and counts against the
        provider's health.
        """
        received = self.send(b"/openai/v1/chat/completions", with_knobs(OPENAI, status="500"), CHAT)
        self.assertEqual(received.status, 500)
        self.assertIsNone(received.header(b"x-llm-proxy-error-source"))
        self.assertEqual(self.json(received)["error"]["type"], "server_error")
        self.assertEqual(self.proxy.state.health.provider("openai").errors, 1)
        [record] = self.proxy.sink.records
        self.assertEqual(record.status, 500)

    def test_meta_user(self) -> None:
        """
        C{/meta/<user>/} names the user and is cut from the forwarded path;
        a C{%2F} in the user does not move the request to another mount.
        """
        self.send(b"/meta/alice/openai/v1/chat/completions", body=CHAT)
        self.send(b"/meta/x%2Fevil/openai/v1/chat/completions", body=CHAT)
        users = [record.user_id for record in self.proxy.sink.records]
        self.assertEqual(users, ["alice", "x/evil"])
        self.assertEqual(
            [received.uri for received in self.proxy.fake.received],
            [b"/v1/chat/completions", b"/v1/chat/completions"],
        )

    def test_raw_path_and_query_forwarded(self) -> None:
        """
        The path after the mount stays percent-encoded, the query goes along.
        """
        self.send(b"/openai/v1/files/a%2Fb?limit=2", method=b"GET")
        self.assertEqual(self.proxy.fake.received[-1].uri, b"/v1/files/a%2Fb?limit=2")

    def test_runtime_kept_across_reload(self) -> None:
        """
        A stream keeps the configuration it started with when a reload swaps
        the runtime; the next request gets the new one.
        """
        headers = with_knobs(OPENAI, chunks="3", delay_ms="100")
        received = self.send(b"/openai/v1/chat/completions", headers, CHAT_STREAM)
        fresh = MemoryProxy(config())
        old_runtime = self.proxy.state.runtime
        self.proxy.state.runtime = fresh.state.runtime
        self.proxy.advance(1.0)
        self.assertTrue(received.complete)
        [record] = self.proxy.sink.records
        self.assertIsNotNone(record.total_cost)
        self.assertIsNot(old_runtime, self.proxy.state.runtime)

    def test_answer_before_accounting(self) -> None:
        """
        The client has the whole response before the request is accounted:
        the accounting waits for the reactor's next pass over the sockets,
        then writes the record and the access line as before.
        """
        answers: list[Received] = []
        self.proxy.request(
            b"POST",
            b"/openai/v1/chat/completions",
            with_knobs(OPENAI, headers_delay_ms="100"),
            CHAT,
        ).addCallback(answers.append)
        self.assertEqual(answers, [])
        # The fake answers after 100 ms; the bytes then move without any
        # timed call running.
        self.proxy.clock.advance(0.1)
        while self.proxy.upstream_link.pump() | self.proxy.client.pump():
            pass
        [received] = answers
        self.assertTrue(received.done)
        self.assertEqual(self.proxy.sink.records, [])
        self.assertEqual(self.proxy.state.accounting, 1)
        self.proxy.flush()
        [record] = self.proxy.sink.records
        self.assertEqual(record.status, 200)
        self.assertEqual(self.proxy.state.accounting, 0)
        self.assertEqual(len(self.access), 1)

    def test_cookies_pass_and_stay_theirs(self) -> None:
        """
        An upstream's C{Set-Cookie} reaches its client and is never sent on
        another request; a client's own C{Cookie} goes upstream as it came.
        """
        first = self.send(
            b"/openai/v1/chat/completions", with_knobs(OPENAI, set_cookie="session=alice"), CHAT
        )
        self.assertEqual(first.response.headers.getRawHeaders(b"set-cookie"), [b"session=alice"])
        self.send(b"/openai/v1/chat/completions", OPENAI, CHAT)
        self.assertIsNone(self.proxy.fake.received[-1].header(b"cookie"))
        self.send(b"/openai/v1/chat/completions", {**OPENAI, b"cookie": [b"mine=1"]}, CHAT)
        self.assertEqual(self.proxy.fake.received[-1].header(b"cookie"), b"mine=1")


class RefusalTests(CallTestCase):
    """
    What the proxy answers itself: 400, 404, 405, 413, CORS.
    """

    def test_dot_segment(self) -> None:
        received = self.send(b"/anthropic/v1/%2e%2E/messages", ANTHROPIC, MESSAGES)
        self.assertEqual(received.status, 400)
        self.assertEqual(received.header(b"x-llm-proxy-error-source"), b"proxy")
        self.assertEqual(self.json(received)["type"], "error")
        self.assertEqual(self.proxy.fake.received, [])
        self.assertEqual(self.proxy.sink.records, [])

    def test_unknown_route(self) -> None:
        for path in (b"/nope/v1/x", b"/meta/u", b"/meta//openai/x", b"//openai/x"):
            received = self.send(path, method=b"GET")
            self.assertEqual(received.status, 404, path)
            self.assertIn("error", self.json(received))
            self.assertEqual(received.header(b"x-llm-proxy-error-source"), b"proxy")
        self.assertEqual(self.proxy.fake.received, [])

    def test_health_methods(self) -> None:
        self.assertEqual(self.send(b"/health", method=b"GET").status, 200)
        received = self.send(b"/health", method=b"POST")
        self.assertEqual(received.status, 405)
        self.assertEqual(received.header(b"allow"), b"GET, HEAD")

    def test_body_too_large(self) -> None:
        """
        A declared length over C{server.max_body_bytes} gets a 413 in the
        format of the provider the path names, before the body is read.
        """
        self.proxy = MemoryProxy(config(server={"max_body_bytes": 100}))
        received = self.send(b"/anthropic/v1/messages", ANTHROPIC, b"x" * 101)
        self.assertEqual(received.status, 413)
        self.assertEqual(self.json(received)["error"]["type"], "request_too_large")
        self.assertEqual(received.header(b"x-llm-proxy-error-source"), b"proxy")
        self.assertEqual(received.header(b"access-control-allow-origin"), b"*")
        self.assertEqual(self.proxy.fake.received, [])

    def test_cors(self) -> None:
        """
        Preflights are answered here; every answer carries CORS headers.
        """
        received = self.send(
            b"/openai/v1/chat/completions",
            {b"origin": [b"https://app"], b"access-control-request-headers": [b"x-a"]},
            method=b"OPTIONS",
        )
        self.assertEqual(received.status, 204)
        self.assertEqual(received.header(b"access-control-allow-headers"), b"x-a")
        self.assertEqual(self.proxy.fake.received, [])
        for path in (b"/openai/v1/chat/completions", b"/missing"):
            received = self.send(path, body=CHAT)
            self.assertEqual(received.header(b"access-control-allow-origin"), b"*")


class TimeoutTests(CallTestCase):
    """
    First-byte, idle and total timeouts, on the fake clock.
    """

    def config(self) -> Config:
        timeouts = {"first_byte_seconds": 2, "idle_seconds": 1, "total_seconds": 5}
        data = config()
        providers = {
            name: {
                "base_url": provider.base_url,
                "timeouts": timeouts,
                "retry": {"max_attempts": 1},
            }
            for name, provider in data.providers.items()
        }
        return config(providers=providers)

    def test_first_byte(self) -> None:
        answers: list[Received] = []
        self.proxy.request(
            b"POST", b"/openai/v1/chat/completions", with_knobs(OPENAI, hang="headers"), CHAT
        ).addCallback(answers.append)
        self.proxy.advance(1.9)
        self.assertEqual(answers, [])
        self.proxy.advance(0.2)
        [received] = answers
        self.assertEqual(received.status, 504)
        self.assertEqual(received.header(b"x-llm-proxy-error-source"), b"upstream")
        self.assertIn("no response headers", self.json(received)["error"]["message"])
        [record] = self.proxy.sink.records
        self.assertEqual((record.status, record.complete), (504, False))
        self.assertEqual(self.proxy.state.health.provider("openai").errors, 1)

    def test_idle_stream(self) -> None:
        """
        A stream silent for C{idle_seconds} ends with the provider's error
        event, never a fake end.
        """
        headers = with_knobs(ANTHROPIC, stall_after="1")
        body = orjson.dumps({**orjson.loads(MESSAGES), "stream": True})
        received = self.send(b"/anthropic/v1/messages", headers, body)
        self.proxy.advance(1.1)
        self.assertTrue(received.done)
        tail = bytes(received.body).rsplit(b"\n\n", 2)[-2]
        self.assertTrue(tail.startswith(b"event: error\ndata: "), tail)
        self.assertEqual(
            orjson.loads(tail.split(b"data: ", 1)[1])["error"]["type"], "timeout_error"
        )
        [record] = self.proxy.sink.records
        self.assertEqual((record.status, record.complete), (200, False))
        self.assertEqual(record.input_tokens, 10)

    def test_total(self) -> None:
        """
        The total budget cuts a stream that keeps talking.
        """
        headers = with_knobs(OPENAI, chunks="100", delay_ms="500")
        received = self.send(b"/openai/v1/chat/completions", headers, CHAT_STREAM)
        self.proxy.advance(5.1)
        self.assertTrue(received.done)
        self.assertIn(b"total time budget", bytes(received.body))
        [record] = self.proxy.sink.records
        self.assertFalse(record.complete)

    def test_total_before_headers(self) -> None:
        """
        A total budget shorter than the first-byte timeout ends the wait.
        """
        self.proxy = MemoryProxy(
            config(
                providers={
                    "openai": {
                        "base_url": "http://fake",
                        "timeouts": {"first_byte_seconds": 10, "total_seconds": 1},
                        "retry": {"max_attempts": 1},
                    }
                }
            )
        )
        answers: list[Received] = []
        self.proxy.request(
            b"POST", b"/openai/v1/chat/completions", with_knobs(OPENAI, hang="headers"), CHAT
        ).addCallback(answers.append)
        self.proxy.advance(1.1)
        [received] = answers
        self.assertEqual(received.status, 504)
        self.assertIn("total time budget", self.json(received)["error"]["message"])


class DisconnectTests(CallTestCase):
    """
    A client that leaves: the upstream is let go, usage so far is metered.
    """

    def test_before_headers(self) -> None:
        sent = self.proxy.request(
            b"POST", b"/openai/v1/chat/completions", with_knobs(OPENAI, hang="headers"), CHAT
        )
        self.proxy.advance(0.1)
        self.assertEqual(len(self.proxy.fake.received), 1)
        sent.cancel()
        self.proxy.flush()
        self.failureResultOf(sent)
        [record] = self.proxy.sink.records
        self.assertEqual((record.status, record.complete), (499, False))
        self.assertEqual(len(self.proxy.fake.connection_lost_events), 1)
        [line] = self.access
        self.assertFalse(line["complete"])

    def test_mid_stream(self) -> None:
        headers = with_knobs(OPENAI, chunks="10", delay_ms="100")
        received = self.send(b"/openai/v1/chat/completions", headers, CHAT_STREAM)
        self.proxy.advance(0.25)
        self.proxy.disconnect(received)
        self.proxy.advance(0.1)
        self.assertEqual(len(self.proxy.fake.connection_lost_events), 1)
        [record] = self.proxy.sink.records
        self.assertEqual((record.status, record.complete), (200, False))
        self.assertEqual(self.proxy.state.health.provider("openai").active_streams, 0)
        self.assertEqual(self.proxy.state.health.provider("openai").errors, 0)
        [line] = self.access
        self.assertEqual(line["request_id"], record.request_id)


@implementer(IAgent)
class RefusingAgent:
    """An upstream agent whose every connection is refused."""

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        return fail(ConnectionRefusedError("refused"))


class UnreachableTests(CallTestCase):
    def test_refused(self) -> None:
        """
        An unreachable upstream is a 502 from the upstream, with a record
        and a health failure; the rate-limit reservation is given back.
        """
        proxy = self.proxy = MemoryProxy(config(), upstream_agent=RefusingAgent())
        received = self.send(b"/openai/v1/chat/completions", body=CHAT)
        self.assertEqual(received.status, 502)
        self.assertEqual(received.header(b"x-llm-proxy-error-source"), b"upstream")
        self.assertIn("unreachable (connect)", self.json(received)["error"]["message"])
        [record] = proxy.sink.records
        self.assertEqual(record.status, 502)
        self.assertEqual(proxy.state.health.provider("openai").errors, 1)


class LimitTests(CallTestCase):
    """
    Admission: the rate limiter's answers.
    """

    def config(self) -> Config:
        return config(
            features={"rate_limiting": {"enabled": True, "limits": {"requests_per_minute": 1}}}
        )

    def test_limited(self) -> None:
        first = self.send(b"/openai/v1/chat/completions", body=CHAT)
        self.assertEqual(first.status, 200)
        self.assertEqual(first.header(b"x-ratelimit-remaining"), b"0")
        second = self.send(b"/openai/v1/chat/completions", body=CHAT)
        self.assertEqual(second.status, 429)
        self.assertEqual(second.header(b"x-ratelimit-scope"), b"global")
        self.assertIsNotNone(second.header(b"retry-after"))
        self.assertEqual(second.header(b"x-llm-proxy-error-source"), b"proxy")
        self.assertEqual(self.json(second)["error"]["type"], "rate_limit_error")
        self.assertEqual(len(self.proxy.sink.records), 1)
        self.assertEqual(len(self.proxy.fake.received), 1)
        self.assertEqual(len(self.access), 2)

    def test_backend_unavailable(self) -> None:
        """
        A limiter that cannot be reached (and fails closed) gives 503; one
        that fails otherwise lets the request through.
        """
        self.proxy = MemoryProxy(self.config(), limiter=FailingLimiter(BackendUnavailable()))
        received = self.send(b"/openai/v1/chat/completions", body=CHAT)
        self.assertEqual(received.status, 503)
        self.assertEqual(self.proxy.fake.received, [])
        self.proxy = MemoryProxy(self.config(), limiter=FailingLimiter(ValueError("bug")))
        received = self.send(b"/openai/v1/chat/completions", body=CHAT)
        self.assertEqual(received.status, 200)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_gone_while_admitting(self) -> None:
        """
        A client that leaves while the limiter decides gets a record and
        its reservation back, and nothing goes upstream.
        """
        limiter = SlowLimiter()
        self.proxy = MemoryProxy(self.config(), limiter=limiter)
        sent = self.proxy.request(b"POST", b"/openai/v1/chat/completions", OPENAI, CHAT)
        sent.cancel()
        self.proxy.flush()
        self.failureResultOf(sent)
        limiter.pending.callback(
            Decision(allowed=True, reservation=RESERVATION, denial=None, limit=1, remaining=0)
        )
        self.proxy.flush()  # accounting runs after the reactor's next I/O
        self.assertEqual(self.proxy.fake.received, [])
        [record] = self.proxy.sink.records
        self.assertEqual(record.status, 499)
        self.assertEqual(limiter.released, [RESERVATION])


RESERVATION = Reservation(at=0.0, tokens=1, entries=())


@implementer(IRateLimiter)
class FailingLimiter:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def reserve(self, request: LimitRequest) -> Deferred[Decision]:
        return fail(self.error)

    def reconcile(self, reservation: Reservation, actual_tokens: int) -> Deferred[None]:
        return succeed(None)

    def release(self, reservation: Reservation) -> Deferred[None]:
        return succeed(None)


class SlowLimiter(FailingLimiter):
    def __init__(self) -> None:
        self.pending: Deferred[Decision] = Deferred()
        self.released: list[Reservation] = []

    def reserve(self, request: LimitRequest) -> Deferred[Decision]:
        return self.pending

    def release(self, reservation: Reservation) -> Deferred[None]:
        self.released.append(reservation)
        return succeed(None)
