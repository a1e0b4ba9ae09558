"""
Metering, cost records and metrics end to end (issue 4): real loopback
sockets, the fake upstream's usage knobs, the shipped price table
(C{configs/base.yml}), and the JSON Lines file the cost sink writes.

Every expected cost below is worked out by hand from base.yml's prices
(USD per 1M tokens) and the cost formula of docs/cost-tracking.md, not
computed by the code under test.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families
from treq.client import HTTPClient
from treq.content import collect, content
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from llmproxy import identity
from llmproxy.config import Config, load_config
from llmproxy.test.test_metering import FIELDS
from llmproxy.testing.fake_upstream import FakeUpstream
from llmproxy.testing.proxy_process import ProxyProcess
from tests.e2e.harness import (
    ANTHROPIC_HEADERS,
    CHAT_PATH,
    GEMINI_BODY,
    GEMINI_HEADERS,
    OPENAI_HEADERS,
    OPENAI_KEY,
    ProxyTestCase,
    RawClient,
    providers_yaml,
    raw_request,
    reactor,
    serve_fake,
    temp_directory,
    write_config,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
BASE_YML = REPO_ROOT / "configs" / "base.yml"

RECORD_FIELDS = FIELDS
"""The cost record's fields, in their documented order."""

TOTAL = 10_000
CONCURRENCY = 50

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")

MESSAGES_PATH = b"/anthropic/v1/messages"
GEMINI_SSE_PATH = b"/gemini/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse"


def chat(model: str, stream: bool = False, include_usage: bool = True) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "Say hi"}]}
    if stream:
        body["stream"] = True
        if include_usage:
            body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


def messages(model: str, stream: bool = True) -> bytes:
    return orjson.dumps(
        {
            "model": model,
            "max_tokens": 256,
            "stream": stream,
            "messages": [{"role": "user", "content": "Say hi"}],
        }
    )


def knobs(**values: int | str) -> dict[bytes, bytes]:
    """
    Fake-upstream knob headers: C{knobs(input_tokens=5)} is
    C{{b"x-fake-input-tokens": b"5"}}.
    """
    return {
        b"x-fake-" + name.replace("_", "-").encode(): str(value).encode()
        for name, value in values.items()
    }


def priced_config(directory: str, upstream: str, extra: str = "") -> Config:
    """
    The shipped price table (C{configs/base.yml}) with every provider
    pointed at the fake upstream, cost records going to
    C{directory/cost.jsonl} every 0.1 s, plus C{extra} YAML under
    C{features:}.
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "config.yml")
    cost_path = os.path.join(directory, "cost.jsonl")
    timeouts = "{connect_seconds: 2, first_byte_seconds: 5, idle_seconds: 5}"
    providers = "".join(
        f"  {name}:\n    base_url: {upstream}\n    timeouts: {timeouts}\n"
        for name in ("openai", "anthropic", "gemini")
    )
    text = (
        f"extends: {BASE_YML}\n"
        f"providers:\n{providers}"
        "features:\n"
        "  cost_tracking:\n"
        "    enabled: true\n"
        "    flush_interval_seconds: 0.1\n"
        f"    transports: [{{type: file, file: {{path: {cost_path}}}}}]\n" + extra
    )
    with open(path, "w") as f:
        f.write(text)
    return load_config([path], {})


@inlineCallbacks
def wait_for_lines(path: str, count: int, timeout: float = 10.0) -> Any:
    """
    Poll C{path} until it holds at least C{count} complete lines; returns
    them parsed. Fails after C{timeout} seconds.
    """
    waited = 0.0
    step = 0.02
    while True:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        lines = data.splitlines()
        if len(lines) >= count and data.endswith(b"\n"):
            return [orjson.loads(line) for line in lines]
        if waited >= timeout:
            raise AssertionError(f"{path}: {len(lines)} lines after {timeout}s, wanted {count}")
        yield deferLater(reactor, step, lambda: None)
        waited += step


def events(body: bytes) -> list[bytes]:
    """
    Split an SSE body into its events (each with its blank-line terminator).
    """
    separator = b"\r\n\r\n" if b"\r\n\r\n" in body else b"\n\n"
    parts = body.split(separator)
    return [part + separator for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def data_events(body: bytes) -> list[bytes]:
    return [event for event in events(body) if b"data: {" in event]


class MeteringTestCase(ProxyTestCase):
    """
    The proxy with base.yml's prices and a cost file in a temp directory.
    """

    extra_features = ""

    def config(self, upstream_base: str) -> Config:
        self.directory = os.path.abspath(self.mktemp())
        self.cost_path = os.path.join(self.directory, "cost.jsonl")
        return priced_config(self.directory, upstream_base, self.extra_features)

    def assert_record(self, record: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
        """
        C{record} has exactly the documented fields in order, with the right
        types, and the values in C{expected} (costs to 1e-9 USD).
        """
        self.assertEqual(list(record), RECORD_FIELDS)
        self.assertRegex(record["timestamp"], RFC3339)
        self.assertRegex(record["request_id"], r"^[0-9a-f]{32}$")
        for name in ("provider", "endpoint"):
            self.assertIsInstance(record[name], str, name)
        for name in ("model", "matched_model", "user_id", "key_id", "finish_reason"):
            self.assertIsInstance(record[name], (str, type(None)), name)
        for name in ("is_streaming", "complete"):
            self.assertIsInstance(record[name], bool, name)
        for name in [*RECORD_FIELDS[12:18], "status"]:
            self.assertIs(type(record[name]), int, name)
        for name in ("input_cost", "output_cost", "total_cost", "ttfb_ms"):
            self.assertIsInstance(record[name], (float, int, type(None)), name)
        self.assertIsInstance(record["duration_ms"], (float, int))
        self.assertGreater(record["duration_ms"], 0)
        if record["ttfb_ms"] is not None:
            self.assertGreaterEqual(record["ttfb_ms"], 0)
            self.assertLessEqual(record["ttfb_ms"], record["duration_ms"])
        self.assertEqual(record["total_tokens"], record["input_tokens"] + record["output_tokens"])
        for name, value in expected.items():
            if name.endswith("_cost") and value is not None:
                self.assertIsNotNone(record[name], name)
                self.assertAlmostEqual(record[name], value, delta=1e-9, msg=name)
            else:
                self.assertEqual(record[name], value, name)
        if expected.get("total_cost") is not None:
            self.assertAlmostEqual(
                record["total_cost"], record["input_cost"] + record["output_cost"], delta=1e-12
            )


def usd(*terms: tuple[int, float]) -> float:
    """
    Sum of tokens x price-per-1M, in USD.
    """
    return sum(tokens * price for tokens, price in terms) / 1_000_000


class RecordTests(MeteringTestCase):
    timeout = 30

    @inlineCallbacks
    def test_one_record_per_request_with_every_field(self) -> Any:
        """
        OpenAI chat JSON and SSE, Anthropic messages SSE (tiered price) and
        Gemini SSE (tiered, thoughts): one record each, every documented field,
        exact tokens and costs from base.yml's prices.
        """
        key_id = identity.key_id(OPENAI_KEY)
        cases: list[tuple[bytes, dict[bytes, bytes], bytes, dict[str, Any]]] = []

        # gpt-4o-mini: input 0.15, cache_read 0.075, output 0.60 (reasoning = output).
        # The response names the dated alias: priced as gpt-4o-mini.
        cases.append(
            (
                CHAT_PATH,
                {
                    **OPENAI_HEADERS,
                    b"x-user-id": b"alice",
                    **knobs(
                        input_tokens=1200,
                        cached_tokens=200,
                        output_tokens=50,
                        reasoning_tokens=30,
                        model="gpt-4o-mini-2024-07-18",
                    ),
                },
                chat("gpt-4o-mini"),
                {
                    "provider": "openai",
                    "model": "gpt-4o-mini-2024-07-18",
                    "matched_model": "gpt-4o-mini",
                    "endpoint": "/openai/v1/chat/completions",
                    "user_id": "alice",
                    "key_id": key_id,
                    "is_streaming": False,
                    "status": 200,
                    "complete": True,
                    "finish_reason": "stop",
                    "input_tokens": 1200,
                    "output_tokens": 80,
                    "cache_read_tokens": 200,
                    "cache_write_tokens": 0,
                    "reasoning_tokens": 30,
                    "total_tokens": 1280,
                    "input_cost": usd((1000, 0.15), (200, 0.075)),
                    "output_cost": usd((50, 0.60), (30, 0.60)),
                    "total_cost": usd((1000, 0.15), (200, 0.075), (80, 0.60)),
                },
            )
        )
        # o4-mini: input 1.10, cache_read 0.275, output 4.40.
        cases.append(
            (
                CHAT_PATH,
                {
                    **OPENAI_HEADERS,
                    **knobs(
                        chunks=5,
                        input_tokens=3000,
                        cached_tokens=1024,
                        output_tokens=5,
                        reasoning_tokens=640,
                    ),
                },
                chat("o4-mini", stream=True),
                {
                    "provider": "openai",
                    "model": "o4-mini",
                    "matched_model": "o4-mini",
                    "user_id": None,
                    "key_id": key_id,
                    "is_streaming": True,
                    "status": 200,
                    "complete": True,
                    "finish_reason": "stop",
                    "input_tokens": 3000,
                    "output_tokens": 645,
                    "cache_read_tokens": 1024,
                    "cache_write_tokens": 0,
                    "reasoning_tokens": 640,
                    "input_cost": usd((1976, 1.10), (1024, 0.275)),
                    "output_cost": usd((645, 4.40)),
                    "total_cost": usd((1976, 1.10), (1024, 0.275), (645, 4.40)),
                },
            )
        )
        # claude-sonnet-4-5 with 150000 + 60000 + 1000 = 211000 input tokens: over
        # the 200000 threshold, so the catch-all tier applies: input 6.00,
        # cache_write 7.50, cache_read 0.60, output 22.50.
        cases.append(
            (
                MESSAGES_PATH,
                {
                    **ANTHROPIC_HEADERS,
                    **knobs(
                        input_tokens=150000,
                        cached_tokens=60000,
                        cache_write_tokens=1000,
                        output_tokens=400,
                    ),
                },
                messages("claude-sonnet-4-5-20250929"),
                {
                    "provider": "anthropic",
                    "model": "claude-sonnet-4-5-20250929",
                    "matched_model": "claude-sonnet-4-5",
                    "endpoint": "/anthropic/v1/messages",
                    "key_id": identity.key_id(b"sk-ant-test"),
                    "is_streaming": True,
                    "status": 200,
                    "complete": True,
                    "finish_reason": "end_turn",
                    "input_tokens": 211000,
                    "output_tokens": 400,
                    "cache_read_tokens": 60000,
                    "cache_write_tokens": 1000,
                    "reasoning_tokens": 0,
                    "total_tokens": 211400,
                    "input_cost": usd((150000, 6.00), (60000, 0.60), (1000, 7.50)),
                    "output_cost": usd((400, 22.50)),
                    "total_cost": usd((150000, 6.00), (60000, 0.60), (1000, 7.50), (400, 22.50)),
                },
            )
        )
        # gemini-2.5-pro, first tier (<= 200000): input 1.25, cache_read 0.31,
        # output 10.00 (thoughts at the output price).
        cases.append(
            (
                GEMINI_SSE_PATH,
                {
                    **GEMINI_HEADERS,
                    **knobs(
                        chunks=4,
                        input_tokens=5000,
                        cached_tokens=4000,
                        output_tokens=70,
                        reasoning_tokens=900,
                    ),
                },
                GEMINI_BODY,
                {
                    "provider": "gemini",
                    "model": "gemini-2.5-pro",
                    "matched_model": "gemini-2.5-pro",
                    "endpoint": "/gemini/v1beta/models/gemini-2.5-pro:streamGenerateContent",
                    "key_id": identity.key_id(b"AIza-test"),
                    "is_streaming": True,
                    "status": 200,
                    "complete": True,
                    "finish_reason": "STOP",
                    "input_tokens": 5000,
                    "output_tokens": 970,
                    "cache_read_tokens": 4000,
                    "cache_write_tokens": 0,
                    "reasoning_tokens": 900,
                    "input_cost": usd((1000, 1.25), (4000, 0.31)),
                    "output_cost": usd((70, 10.00), (900, 10.00)),
                    "total_cost": usd((1000, 1.25), (4000, 0.31), (970, 10.00)),
                },
            )
        )
        request_ids = []
        for path, headers, body, _ in cases:
            status, response_headers, _received = yield self.post(path, headers, body)
            self.assertEqual(status, 200, _received[:300])
            # No encoding was used: none may be announced (an empty one included).
            self.assertNotIn(b"content-encoding", response_headers)
            request_ids.append(response_headers[b"x-llm-proxy-request-id"][0].decode())
        records = yield wait_for_lines(self.cost_path, len(cases))
        self.assertEqual(len(records), len(cases), records)
        for record, request_id, (_, _, _, expected) in zip(
            records, request_ids, cases, strict=True
        ):
            self.assert_record(record, {"request_id": request_id, **expected})

    @inlineCallbacks
    def test_unpriced_model_has_null_costs(self) -> Any:
        """
        A model the price table does not know: tokens recorded, costs null
        (never $0), matched_model null.
        """
        status, _, body = yield self.post(
            CHAT_PATH,
            {**OPENAI_HEADERS, **knobs(input_tokens=7, output_tokens=3)},
            chat("mystery-model-1"),
        )
        self.assertEqual(status, 200, body)
        (record,) = yield wait_for_lines(self.cost_path, 1)
        self.assert_record(
            record,
            {
                "model": "mystery-model-1",
                "matched_model": None,
                "input_tokens": 7,
                "output_tokens": 3,
                "input_cost": None,
                "output_cost": None,
                "total_cost": None,
            },
        )


class PartialStreamTests(MeteringTestCase):
    timeout = 30

    @inlineCallbacks
    def abandon_after(self, path: bytes, headers: Mapping[bytes, bytes], body: bytes) -> Any:
        """
        Open a slow stream, read two data events, then drop the connection.
        """
        client = RawClient(raw_request(b"POST", path, headers, body))
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy_port), client)
        while client.received.count(b"data: {") < 2:
            yield client.next_data()
        transport: Any = client.transport
        transport.abortConnection()
        yield client.done
        return client

    @inlineCallbacks
    def test_client_abandons_after_two_chunks(self) -> Any:
        """
        An Anthropic stream (input usage comes in C{message_start}) and a
        Gemini one (each chunk carries the prompt count) abandoned after two
        data events: a record each, C{complete: false}, status 200, the
        input tokens already known, and priced.
        """
        slow = knobs(chunks=50, delay_ms=50)
        yield self.abandon_after(
            MESSAGES_PATH,
            {
                **ANTHROPIC_HEADERS,
                **slow,
                **knobs(input_tokens=900, cached_tokens=100, output_tokens=50),
            },
            messages("claude-haiku-4-5"),
        )
        yield self.fake.wait_for_disconnect()
        yield self.abandon_after(
            GEMINI_SSE_PATH.replace(b"gemini-2.5-pro", b"gemini-2.5-flash"),
            {**GEMINI_HEADERS, **slow, **knobs(input_tokens=321, output_tokens=50)},
            GEMINI_BODY,
        )
        yield self.fake.wait_for_disconnect()
        anthropic, gemini = yield wait_for_lines(self.cost_path, 2)
        # Anthropic's message_start says output_tokens: 1 before any text.
        # claude-haiku-4-5: input 1.00, cache_read 0.10, output 5.00.
        self.assert_record(
            anthropic,
            {
                "provider": "anthropic",
                "status": 200,
                "complete": False,
                "is_streaming": True,
                "finish_reason": None,
                "input_tokens": 1000,
                "cache_read_tokens": 100,
                "output_tokens": 1,
                "input_cost": usd((900, 1.00), (100, 0.10)),
                "output_cost": usd((1, 5.00)),
            },
        )
        # gemini-2.5-flash: input 0.30, output 2.50; no output count yet.
        self.assert_record(
            gemini,
            {
                "provider": "gemini",
                "status": 200,
                "complete": False,
                "is_streaming": True,
                "input_tokens": 321,
                "output_tokens": 0,
                "input_cost": usd((321, 0.30)),
                "output_cost": 0.0,
            },
        )

    @inlineCallbacks
    def test_upstream_dies_mid_stream(self) -> Any:
        """
        The upstream closes the connection after 2 chunks: the client gets
        an error event, the record says C{complete: false}, status 200, with
        the input tokens known.
        """
        status, _, body = yield self.post(
            MESSAGES_PATH,
            {
                **ANTHROPIC_HEADERS,
                **knobs(chunks=10, die_after=2, input_tokens=42, output_tokens=10),
            },
            messages("claude-haiku-4-5"),
        )
        self.assertEqual(status, 200)
        self.assertIn(b"event: error", body)
        (record,) = yield wait_for_lines(self.cost_path, 1)
        self.assert_record(
            record,
            {
                "status": 200,
                "complete": False,
                "input_tokens": 42,
                "input_cost": usd((42, 1.00)),
            },
        )


class InjectedUsageTests(MeteringTestCase):
    timeout = 30

    @inlineCallbacks
    def test_stream_without_include_usage(self) -> Any:
        """
        An OpenAI stream requested without C{stream_options.include_usage}:
        the upstream is asked for usage, the record carries it, and the
        client's bytes are the upstream's minus exactly the usage-only chunk.
        """
        status, headers, received = yield self.post(
            CHAT_PATH,
            {**OPENAI_HEADERS, **knobs(chunks=6, input_tokens=77, output_tokens=6)},
            chat("gpt-4o-mini", stream=True, include_usage=False),
        )
        self.assertEqual(status, 200, received)
        self.assertNotIn(b"content-encoding", headers)
        sent_upstream = self.fake.received[-1].json()
        self.assertEqual(sent_upstream["stream_options"], {"include_usage": True})
        upstream = self.fake.last_body_sent
        usage_only = [
            event
            for event in events(upstream)
            if event.startswith(b"data: {")
            and orjson.loads(event[len(b"data: ") :]).get("choices") == []
        ]
        self.assertEqual(len(usage_only), 1, upstream)
        self.assertIn(b'"usage":{', usage_only[0])
        self.assertEqual(upstream.count(usage_only[0]), 1)
        self.assertEqual(received, upstream.replace(usage_only[0], b""))
        self.assertTrue(received.rstrip().endswith(b"data: [DONE]"), received[-200:])
        (record,) = yield wait_for_lines(self.cost_path, 1)
        self.assert_record(
            record,
            {
                "complete": True,
                "input_tokens": 77,
                "output_tokens": 6,
                "total_cost": usd((77, 0.15), (6, 0.60)),
            },
        )


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """
    Every sample of a Prometheus exposition, by name and labels.
    """
    found: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


class MetricsTests(MeteringTestCase):
    timeout = 30

    @inlineCallbacks
    def scrape(self) -> Any:
        response = yield self.http.get(self.proxy_url + "/metrics")
        self.assertEqual(response.code, 200)
        body = yield content(response)
        return samples(body.decode("utf-8"))

    def delta(
        self,
        before: Mapping[tuple[str, frozenset[tuple[str, str]]], float],
        after: Mapping[tuple[str, frozenset[tuple[str, str]]], float],
        name: str,
        **labels: str,
    ) -> float:
        key = (name, frozenset(labels.items()))
        self.assertIn(key, after, sorted(k for k in after if k[0] == name))
        return after[key] - before.get(key, 0.0)

    @inlineCallbacks
    def test_counters_move(self) -> Any:
        """
        C{/metrics} parses with prometheus_client's parser, and requests,
        tokens, cost, active streams, upstream errors and unpriced requests
        move as requests pass.
        """
        before = yield self.scrape()
        openai = {"provider": "openai", "model": "gpt-4o-mini"}
        status, _, _ = yield self.post(
            CHAT_PATH,
            {
                **OPENAI_HEADERS,
                **knobs(input_tokens=1000, cached_tokens=400, output_tokens=20, reasoning_tokens=5),
            },
            chat("gpt-4o-mini"),
        )
        self.assertEqual(status, 200)
        # A slow stream is open: the gauge shows it.
        streaming: Deferred[Any] = self.post(
            MESSAGES_PATH,
            {**ANTHROPIC_HEADERS, **knobs(chunks=4, delay_ms=300, cache_write_tokens=9)},
            messages("claude-haiku-4-5"),
        )
        yield self.fake.wait_for_request()
        yield self.fake.wait_for_request()
        gauge = ("llmproxy_active_streams", frozenset({("provider", "anthropic")}))
        for _ in range(50):
            during = yield self.scrape()
            if during.get(gauge) == 1.0:
                break
            yield deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(during.get(gauge), 1.0)
        self.assertFalse(streaming.called, "the stream was still open")
        yield streaming
        # An upstream that dies mid-stream, and an unpriced model.
        yield self.post(
            CHAT_PATH,
            {**OPENAI_HEADERS, **knobs(chunks=5, die_after=1)},
            chat("gpt-4o-mini", stream=True),
        )
        yield self.post(CHAT_PATH, {**OPENAI_HEADERS}, chat("mystery-model-2"))
        yield wait_for_lines(self.cost_path, 4)
        after = yield self.scrape()

        self.assertEqual(
            self.delta(before, after, "llmproxy_requests_total", status="200", **openai), 2.0
        )
        for kind, tokens in [
            ("input", 1000),
            ("cache_read", 400),
            ("output", 25),
            ("reasoning", 5),
            ("cache_write", 0),
        ]:
            self.assertEqual(
                self.delta(before, after, "llmproxy_tokens_total", type=kind, **openai),
                tokens,
                kind,
            )
        self.assertEqual(
            self.delta(
                before,
                after,
                "llmproxy_tokens_total",
                type="cache_write",
                provider="anthropic",
                model="claude-haiku-4-5",
            ),
            9,
        )
        self.assertAlmostEqual(
            self.delta(before, after, "llmproxy_cost_usd_total", **openai),
            usd((600, 0.15), (400, 0.075), (25, 0.60)),
            delta=1e-9,
        )
        self.assertEqual(
            after[("llmproxy_active_streams", frozenset({("provider", "anthropic")}))], 0.0
        )
        self.assertEqual(
            self.delta(
                before,
                after,
                "llmproxy_upstream_errors_total",
                provider="openai",
                kind="broken_stream",
            ),
            1.0,
        )
        self.assertEqual(
            self.delta(
                before,
                after,
                "llmproxy_unpriced_requests_total",
                provider="openai",
                model="mystery-model-2",
            ),
            1.0,
        )


class SigtermFlushTests(TestCase):
    """
    The real daemon, 10,000 requests at concurrency 50, then SIGTERM: every
    record is in the file, once.

    That the file is written off the reactor thread, in batches, is shown by
    C{llmproxy.test.test_sinks}; here the flush interval outlasts the run,
    so the records are still queued when the signal arrives.
    """

    timeout = 120

    @inlineCallbacks
    def test_ten_thousand_records_survive_sigterm(self) -> Any:
        fake = FakeUpstream(reactor)
        fake.record_requests = False
        fake.record_bodies = False
        upstream = yield serve_fake(self, fake)
        cost_path = os.path.join(temp_directory(self), "cost.jsonl")
        config_path = write_config(
            self,
            providers_yaml(upstream, ["openai"]) + "features:\n"
            "  cost_tracking:\n"
            "    enabled: true\n"
            # Longer than the run: the records wait in the sink's queue
            # until SIGTERM flushes them.
            "    flush_interval_seconds: 60\n"
            f"    transports: [{{type: file, file: {{path: {cost_path}}}}}]\n",
        )
        proc = yield ProxyProcess.start(reactor, [config_path], timeout=30)
        self.addCleanup(proc.stop)
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = CONCURRENCY
        pool.retryAutomatically = False
        self.addCleanup(pool.closeCachedConnections)
        http = HTTPClient(Agent(reactor, pool=pool))
        url = proc.url + "/openai/v1/chat/completions"
        headers = Headers({k: [v] for k, v in OPENAI_HEADERS.items()})
        body = chat("gpt-4o-mini")
        statuses: list[int] = []

        @inlineCallbacks
        def worker(count: int) -> Any:
            for _ in range(count):
                response = yield http.post(url, data=body, headers=headers)
                yield content(response)
                statuses.append(response.code)

        started = time.monotonic()
        yield gatherResults([worker(TOTAL // CONCURRENCY) for _ in range(CONCURRENCY)])
        sent = time.monotonic() - started
        self.assertEqual(statuses, [200] * TOTAL)
        yield pool.closeCachedConnections()
        path = Path(cost_path)
        before = len(path.read_bytes().splitlines()) if path.exists() else 0
        self.assertLess(before, TOTAL)
        proc.send_signal(signal.SIGTERM)
        exit_code = yield proc.wait_exit()
        self.assertEqual(exit_code, 0, proc.output[-2000:])
        lines = path.read_bytes().splitlines()
        self.assertEqual(len(lines), TOTAL)
        ids = {orjson.loads(line)["request_id"] for line in lines}
        self.assertEqual(len(ids), TOTAL)
        self.assertLess(sent, 90)


def vm_kib(pid: int, field: str) -> int:
    """
    A C{Vm*} line of C{/proc/<pid>/status}, in KiB.
    """
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


class StreamMemoryTests(TestCase):
    """
    Metering a 200 MB stream keeps the daemon's memory flat.
    """

    timeout = 60

    @inlineCallbacks
    def test_200_mb_stream_keeps_rss_flat(self) -> Any:
        """
        The real daemon relays and meters a 200 MiB OpenAI stream to a
        client that reads as fast as it can: its RSS, sampled every 50 ms,
        and its high-water mark after the stream stay within 30 MB of the
        RSS before it, and the record has the stream's usage (so the bytes
        really went through the meter).
        """
        fake = FakeUpstream(reactor)
        fake.record_bodies = False
        upstream = yield serve_fake(self, fake)
        directory = os.path.abspath(self.mktemp())
        cost_path = os.path.join(directory, "cost.jsonl")
        config = priced_config(directory, upstream)
        del config  # the file it wrote is what the daemon reads
        proc = yield ProxyProcess.start(
            reactor, [os.path.join(directory, "config.yml")], timeout=30
        )
        self.addCleanup(proc.stop)
        pid: int = proc._transport.pid
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        http = HTTPClient(Agent(reactor, pool=pool))
        before = vm_kib(pid, "VmRSS")
        peak = before

        def sample() -> None:
            nonlocal peak
            peak = max(peak, vm_kib(pid, "VmRSS"))

        sampler = LoopingCall(sample)
        sampler.start(0.05)
        size = 200 * 1024 * 1024
        response = yield http.post(
            proc.url + "/openai/v1/chat/completions",
            data=chat("gpt-4o-mini", stream=True),
            headers=Headers(
                {
                    **{k: [v] for k, v in OPENAI_HEADERS.items()},
                    b"x-fake-bytes": [b"%d" % size],
                }
            ),
        )
        received = 0

        def discard(data: bytes) -> None:
            nonlocal received
            received += len(data)

        yield collect(response, discard)
        sampler.stop()
        sample()
        high_water = vm_kib(pid, "VmHWM")
        self.assertGreater(received, size)
        self.assertLess((peak - before) / 1024, 30, (before, peak))
        self.assertLess((high_water - before) / 1024, 30, (before, high_water))
        (record,) = yield wait_for_lines(cost_path, 1)
        self.assertEqual(record["complete"], True)
        self.assertEqual(record["output_tokens"], size // 8192)
