"""
Tests for tracing (L{llmproxy.tracing}, L{llmproxy.otel}): requests through
the proxy in memory, spans and metrics caught by OpenTelemetry's in-memory
exporter and reader.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer
from zope.interface.verify import verifyObject

from llmproxy.config import ConfigError, TracingConfig
from llmproxy.config import validate as validate_module
from llmproxy.test.test_call import ANTHROPIC, CHAT, MESSAGES, OPENAI, config, with_knobs
from llmproxy.testing.memory import MemoryProxy, Received
from llmproxy.tracing import NO_TRACER, ITracer, otel_available, tracer_for

if otel_available():
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind, StatusCode

    from llmproxy.otel import OtelTracer, tracer_from_environment

    NO_OTEL = None
else:
    NO_OTEL = "the OpenTelemetry packages (llmproxy[otel], part of dev) are not installed"

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01".encode()


@implementer(IAgent)
class RefusingAgent:
    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        return fail(ConnectionRefusedError("refused"))


class TracingTestCase(SynchronousTestCase):
    skip = NO_OTEL

    def setUp(self) -> None:
        self.spans = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.metrics = InMemoryMetricReader()
        self.tracer = OtelTracer(tracer_provider, MeterProvider(metric_readers=[self.metrics]))
        self.proxy = self.make_proxy()

    def make_proxy(self, **kwargs: Any) -> MemoryProxy:
        proxy = MemoryProxy(config(**kwargs.pop("sections", {})), **kwargs)
        proxy.state.tracer = self.tracer
        return proxy

    def send(self, path: bytes, headers: dict[bytes, list[bytes]], body: bytes) -> Received:
        answers: list[Received] = []
        self.proxy.request(b"POST", path, headers, body).addCallback(answers.append)
        self.proxy.advance(2)
        [received] = answers
        self.assertTrue(received.done)
        return received

    def finished(self) -> tuple[ReadableSpan, list[ReadableSpan]]:
        """
        The one request span and its attempt spans.
        """
        spans = self.spans.get_finished_spans()
        [server] = [span for span in spans if span.kind == SpanKind.SERVER]
        attempts = [span for span in spans if span.kind == SpanKind.CLIENT]
        self.assertEqual(len(spans), 1 + len(attempts))
        return server, attempts

    def metric_points(self, name: str) -> list[Any]:
        data = self.metrics.get_metrics_data()
        assert data is not None
        return [
            point
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == name
            for point in metric.data.data_points
        ]


class SpanTests(TracingTestCase):
    def test_streamed_request(self) -> None:
        """
        A streamed request gives one server span, continuing the client's
        trace, with the GenAI attributes and the exact token counts; one
        client span per attempt, its child; and the upstream receives the
        same trace in C{traceparent}, with the attempt as parent.
        """
        headers = with_knobs(
            OPENAI,
            chunks="4",
            delay_ms="100",
            input_tokens="123",
            cached_tokens="23",
            output_tokens="45",
        )
        headers[b"traceparent"] = [TRACEPARENT]
        body = b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Hi"}]}'
        received = self.send(b"/meta/alice/openai/v1/chat/completions", headers, body)
        self.assertEqual(received.status, 200)
        server, [attempt] = self.finished()
        context = server.get_span_context()
        assert context is not None and server.parent is not None
        self.assertEqual(format(context.trace_id, "032x"), CLIENT_TRACE)
        self.assertEqual(format(server.parent.span_id, "016x"), CLIENT_SPAN)
        self.assertEqual(server.name, "chat gpt-4o-mini")
        attributes = dict(server.attributes or {})
        expected = {
            "gen_ai.system": "openai",
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": "gpt-4o-mini",
            "gen_ai.response.model": "gpt-4o-mini",
            "gen_ai.usage.input_tokens": 123,
            "gen_ai.usage.output_tokens": 45,
            "gen_ai.usage.cache_read.input_tokens": 23,
            "gen_ai.response.finish_reasons": ("stop",),
            "llmproxy.user": "alice",
            "llmproxy.streaming": True,
            "http.response.status_code": 200,
        }
        self.assertEqual({key: attributes.get(key) for key in expected}, expected)
        self.assertAlmostEqual(
            attributes["llmproxy.cost_usd"], ((123 - 23) * 0.15 + 23 * 0.15 + 45 * 0.6) / 1e6
        )
        self.assertEqual(len(str(attributes["llmproxy.key_id"])), len(received_key_id(self)))
        self.assertNotIn("error.type", attributes)
        assert attempt.parent is not None
        self.assertEqual(attempt.parent.span_id, context.span_id)
        attempt_attributes = dict(attempt.attributes or {})
        self.assertEqual(attempt_attributes["server.address"], "fake-openai")
        self.assertEqual(attempt_attributes["gen_ai.usage.output_tokens"], 45)
        [upstream] = self.proxy.fake.received
        sent = upstream.header("traceparent")
        attempt_context = attempt.get_span_context()
        assert sent is not None and attempt_context is not None
        self.assertEqual(
            sent.decode(),
            f"00-{CLIENT_TRACE}-{format(attempt_context.span_id, '016x')}-01",
        )
        tokens = {
            point.attributes["gen_ai.token.type"]: point.sum
            for point in self.metric_points("gen_ai.client.token.usage")
        }
        self.assertEqual(tokens, {"input": 123, "output": 45})
        [duration] = self.metric_points("gen_ai.client.operation.duration")
        self.assertEqual(duration.count, 1)
        self.assertEqual(duration.attributes["gen_ai.operation.name"], "chat")

    def test_new_trace(self) -> None:
        """
        Without a client C{traceparent}, the request span starts a trace,
        which the upstream continues.
        """
        self.send(b"/anthropic/v1/messages", ANTHROPIC, MESSAGES)
        server, [attempt] = self.finished()
        self.assertIsNone(server.parent)
        self.assertEqual(dict(server.attributes or {})["gen_ai.system"], "anthropic")
        context = server.get_span_context()
        assert context is not None
        sent = self.proxy.fake.received[0].header("traceparent")
        attempt_context = attempt.get_span_context()
        assert sent is not None and attempt_context is not None
        _, trace_id, parent_id, _ = sent.decode().split("-")
        self.assertEqual(trace_id, format(context.trace_id, "032x"))
        self.assertEqual(parent_id, format(attempt_context.span_id, "016x"))

    def test_upstream_error(self) -> None:
        self.send(b"/openai/v1/chat/completions", with_knobs(OPENAI, status="503"), CHAT)
        server, [attempt] = self.finished()
        self.assertEqual(dict(server.attributes or {})["error.type"], "503")
        self.assertEqual(server.status.status_code, StatusCode.ERROR)
        self.assertEqual(dict(attempt.attributes or {})["error.type"], "503")

    def test_unreachable(self) -> None:
        self.proxy = self.make_proxy(upstream_agent=RefusingAgent())
        self.send(b"/openai/v1/chat/completions", OPENAI, CHAT)
        server, [attempt] = self.finished()
        self.assertEqual(dict(server.attributes or {})["error.type"], "connect")
        self.assertEqual(dict(attempt.attributes or {})["error.type"], "connect")
        self.assertEqual(dict(attempt.attributes or {})["http.response.status_code"], 502)

    def test_refused(self) -> None:
        """
        A request the rate limiter refuses ends its span with no attempt.
        """
        self.proxy = self.make_proxy(
            sections={
                "features": {
                    "rate_limiting": {"enabled": True, "limits": {"requests_per_minute": 1}}
                }
            }
        )
        self.send(b"/openai/v1/chat/completions", OPENAI, CHAT)
        self.spans.clear()
        self.send(b"/openai/v1/chat/completions", OPENAI, CHAT)
        server, attempts = self.finished()
        self.assertEqual(attempts, [])
        self.assertEqual(dict(server.attributes or {})["error.type"], "refused_429")

    def test_off(self) -> None:
        """
        Tracing off: nothing is traced, and a client's C{traceparent}
        reaches the upstream unchanged.
        """
        self.proxy = MemoryProxy(config())
        headers = dict(OPENAI)
        headers[b"traceparent"] = [TRACEPARENT]
        self.send(b"/openai/v1/chat/completions", headers, CHAT)
        self.assertEqual(self.spans.get_finished_spans(), ())
        self.assertEqual(self.proxy.fake.received[0].header("traceparent"), TRACEPARENT)


def _restore(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def received_key_id(test: TracingTestCase) -> str:
    """
    The key id of the test's OpenAI key, as records show it.
    """
    from llmproxy import identity

    key_id = identity.key_id(b"sk-test-1")
    assert key_id is not None
    return key_id


class FactoryTests(SynchronousTestCase):
    def test_off(self) -> None:
        self.assertIs(tracer_for(TracingConfig(enabled=False), None), NO_TRACER)
        verifyObject(ITracer, NO_TRACER)

    def test_from_environment(self) -> None:
        if NO_OTEL:
            raise SkipTest(NO_OTEL)
        """
        With the extra installed, an OTLP tracer is built from the standard
        variables (here: export nowhere, so the test sends nothing).
        """
        for name in ("OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER"):
            self.addCleanup(_restore, name, os.environ.get(name))
            os.environ[name] = "none"
        tracer = tracer_from_environment(None)
        verifyObject(ITracer, tracer)
        done: list[object] = []
        tracer.shutdown().addCallback(done.append)
        self.assertEqual(done, [None])

    def test_config_error_without_extra(self) -> None:
        """
        C{enabled: true} without the OpenTelemetry packages is a
        configuration error that says how to install them.
        """
        if otel_available():
            config(features={"tracing": {"enabled": True}})
        self.patch(validate_module, "otel_installed", lambda: False)
        config(features={"tracing": {"enabled": False}})
        with self.assertRaises(ConfigError) as caught:
            config(features={"tracing": {"enabled": True}})
        message = str(caught.exception)
        self.assertIn("features.tracing.enabled: tracing needs the OpenTelemetry packages", message)
        self.assertIn("pip install 'llmproxy[otel]'", message)

    def test_bad_values(self) -> None:
        for value in ("yes", 1, None):
            with self.assertRaises(ConfigError) as caught:
                config(features={"tracing": {"enabled": value}})
            self.assertIn("features.tracing.enabled: expected true or false", str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            config(features={"tracing": {"endpoint": "http://x"}})
        self.assertIn("features.tracing.endpoint", str(caught.exception))
