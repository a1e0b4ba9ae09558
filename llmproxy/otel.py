# -*- test-case-name: llmproxy.test.test_tracing -*-
"""
Tracing with OpenTelemetry: one server span per proxied request, one
client span per upstream attempt, with the GenAI semantic conventions and
llmproxy's own attributes, and the GenAI client metrics
(C{gen_ai.client.token.usage}, C{gen_ai.client.operation.duration}).

Imported only when C{features.tracing.enabled} is true (the packages are
the optional extra C{llmproxy[otel]}). Spans are ended on the reactor
thread, which only queues them: the SDK's batch processor and periodic
metric reader export from their own threads, so the request path never
waits for a collector.

Contexts are passed explicitly (the client's C{traceparent} in, the
attempt's out), never through OpenTelemetry's implicit current context,
which does not follow Twisted callbacks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.metrics import MeterProvider
from opentelemetry.sdk.metrics import MeterProvider as SDKMeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from zope.interface import implementer

from llmproxy.tracing import IAttemptTrace, IRequestTrace, ITracer

if TYPE_CHECKING:
    from llmproxy.accounting import CallSummary
    from llmproxy.admission import Refused
    from llmproxy.attempt import AttemptResult
    from llmproxy.inspection import CallFacts
    from llmproxy.pricing import Cost
    from llmproxy.upstream import Upstream
    from llmproxy.usage import Usage

log = Logger(namespace="llmproxy.otel")

SYSTEMS = {"openai": "openai", "anthropic": "anthropic", "gemini": "gcp.gemini"}
"""C{gen_ai.system} for each wire format."""

OPERATIONS = {
    "chat.completions": "chat",
    "responses": "chat",
    "messages": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
    "embedContent": "embeddings",
    "generateContent": "generate_content",
    "streamGenerateContent": "generate_content",
}
"""C{gen_ai.operation.name} for each API; any other API is named as it is."""

TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96)
"""The bucket boundaries the GenAI semantic conventions advise."""

_PROPAGATOR = TraceContextTextMapPropagator()


def _carrier(headers: Headers) -> dict[str, str]:
    carrier = {}
    for name in ("traceparent", "tracestate"):
        values = headers.getRawHeaders(name.encode("ascii"))
        if values:
            carrier[name] = values[0].decode("latin-1")
    return carrier


def _usage_attributes(usage: Usage) -> dict[str, Any]:
    if not usage.reported:
        return {}
    attributes: dict[str, Any] = {
        "gen_ai.usage.input_tokens": usage.input_tokens,
        "gen_ai.usage.output_tokens": usage.output_tokens,
        "gen_ai.usage.cache_read.input_tokens": usage.cache_read_tokens,
        "gen_ai.usage.cache_creation.input_tokens": usage.cache_write_tokens,
        "llmproxy.usage.reasoning_tokens": usage.reasoning_tokens,
    }
    if usage.model:
        attributes["gen_ai.response.model"] = usage.model
    if usage.finish_reason:
        attributes["gen_ai.response.finish_reasons"] = (usage.finish_reason,)
    return attributes


@implementer(IAttemptTrace)
class _AttemptTrace:
    __slots__ = ("_span",)

    def __init__(self, span: Span) -> None:
        self._span = span

    def ended(self, result: AttemptResult) -> AttemptResult:
        span = self._span
        attributes = _usage_attributes(result.usage)
        error = None
        if result.failure is not None:
            error = result.failure.kind
            attributes["http.response.status_code"] = result.failure.status
        elif result.status is not None:
            attributes["http.response.status_code"] = result.status
            if result.status >= 400:
                error = str(result.status)
            elif not result.complete and not result.client_gone:
                error = "incomplete_response"
        if result.client_gone:
            attributes["llmproxy.client_gone"] = True
        if error is not None:
            attributes["error.type"] = error
            span.set_status(Status(StatusCode.ERROR, error))
        span.set_attributes(attributes)
        span.end()
        return result


@implementer(IRequestTrace)
class _RequestTrace:
    __slots__ = ("_attempts", "_base", "_span", "_tracer")

    def __init__(self, tracer: OtelTracer, span: Span, base: Mapping[str, Any]) -> None:
        self._tracer = tracer
        self._span = span
        self._base = base
        self._attempts = 0

    def attempt(self, upstream: Upstream, base_url: str, headers: Headers) -> IAttemptTrace:
        self._attempts += 1
        parts = urlsplit(base_url)
        attributes = dict(self._base)
        attributes["server.address"] = parts.hostname or ""
        attributes["server.port"] = parts.port or (443 if parts.scheme == "https" else 80)
        attributes["llmproxy.attempt"] = self._attempts
        span = self._tracer.tracer.start_span(
            self._span.name,  # type: ignore[attr-defined]
            context=trace.set_span_in_context(self._span),
            kind=SpanKind.CLIENT,
            attributes=attributes,
        )
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        for name, value in carrier.items():
            headers.setRawHeaders(name.encode("ascii"), [value.encode("latin-1")])
        return _AttemptTrace(span)

    def end(self, summary: CallSummary, cost: Cost) -> None:
        span = self._span
        usage = summary.usage
        attributes = _usage_attributes(usage)
        status = summary.status
        if status is not None:
            attributes["http.response.status_code"] = status
        if cost.total_cost is not None:
            attributes["llmproxy.cost_usd"] = cost.total_cost
        attributes["llmproxy.complete"] = summary.complete
        attributes["llmproxy.attempts"] = self._attempts
        error = summary.failure
        if error is None and status is not None and status >= 400:
            error = str(status)
        if error is None and status is None:
            error = "client_closed"
        if error is not None:
            attributes["error.type"] = error
            span.set_status(Status(StatusCode.ERROR, error))
        span.set_attributes(attributes)
        span.end()
        self._tracer.record(self._base, usage, summary.ended - summary.started, error)

    def refused(self, refusal: Refused) -> None:
        span = self._span
        kind = f"refused_{refusal.status}"
        span.set_attributes({"http.response.status_code": refusal.status, "error.type": kind})
        span.set_status(Status(StatusCode.ERROR, refusal.message))
        span.end()


@implementer(ITracer)
class OtelTracer:
    """
    Spans and GenAI metrics through the given OpenTelemetry providers.

    @ivar tracer: the OpenTelemetry tracer spans are started with.
    """

    def __init__(
        self,
        tracer_provider: TracerProvider,
        meter_provider: MeterProvider,
        reactor: Any = None,
    ) -> None:
        """
        @param reactor: runs the providers' shutdown (which exports what is
            left, over the network) in its thread pool; L{None} runs it at
            once (tests with in-memory exporters).
        """
        from llmproxy import __version__

        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._reactor = reactor
        self.tracer = tracer_provider.get_tracer("llmproxy", __version__)
        meter = meter_provider.get_meter("llmproxy", __version__)
        self._token_usage = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Input and output tokens per proxied request.",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        )
        self._duration = meter.create_histogram(
            "gen_ai.client.operation.duration",
            unit="s",
            description="Duration of proxied requests, from arrival to the end of the response.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )

    def request(self, facts: CallFacts, upstream: Upstream, headers: Headers) -> IRequestTrace:
        kind = upstream.config.kind
        operation = OPERATIONS.get(facts.request.endpoint, facts.request.endpoint)
        model = facts.request.model
        base: dict[str, Any] = {
            "gen_ai.system": SYSTEMS.get(kind, kind),
            "gen_ai.operation.name": operation,
        }
        if model:
            base["gen_ai.request.model"] = model
        attributes = dict(base)
        attributes["llmproxy.provider"] = facts.provider
        attributes["llmproxy.request_id"] = facts.request_id
        attributes["http.request.method"] = facts.request.method
        attributes["url.path"] = facts.endpoint
        attributes["llmproxy.streaming"] = facts.request.streaming
        if facts.key_id is not None:
            attributes["llmproxy.key_id"] = facts.key_id
        if facts.user is not None:
            attributes["llmproxy.user"] = facts.user
        parent = _PROPAGATOR.extract(_carrier(headers))
        span = self.tracer.start_span(
            f"{operation} {model}" if model else operation,
            context=parent,
            kind=SpanKind.SERVER,
            attributes=attributes,
        )
        return _RequestTrace(self, span, base)

    def record(
        self, base: Mapping[str, Any], usage: Usage, duration: float, error: str | None
    ) -> None:
        """
        The GenAI client metrics of one request.
        """
        attributes = dict(base)
        if usage.model:
            attributes["gen_ai.response.model"] = usage.model
        if error is not None:
            attributes["error.type"] = error
        self._duration.record(duration, attributes)
        if usage.reported:
            self._token_usage.record(
                usage.input_tokens, {**attributes, "gen_ai.token.type": "input"}
            )
            self._token_usage.record(
                usage.output_tokens, {**attributes, "gen_ai.token.type": "output"}
            )

    def shutdown(self) -> Deferred[None]:
        def stop() -> None:
            self._tracer_provider.shutdown()
            shutdown = getattr(self._meter_provider, "shutdown", None)
            if shutdown is not None:
                shutdown()

        if self._reactor is None:
            stop()
            return succeed(None)
        done: Deferred[None] = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), stop)
        return done


def _protocol(signal: str) -> str:
    return (
        os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()


def _span_exporter() -> SpanExporter | None:
    chosen = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if chosen == "none":
        return None
    if chosen == "console":
        return ConsoleSpanExporter()
    if _protocol("TRACES") == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]
                OTLPSpanExporter as GrpcSpanExporter,
            )
        except ImportError:
            log.error(
                "OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs opentelemetry-exporter-otlp-proto-grpc; "
                "exporting spans over http/protobuf instead"
            )
        else:
            grpc: SpanExporter = GrpcSpanExporter()
            return grpc
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def _metric_reader() -> MetricReader | None:
    chosen = os.environ.get("OTEL_METRICS_EXPORTER", "otlp").strip().lower()
    if chosen == "none":
        return None
    if chosen == "console":
        return PeriodicExportingMetricReader(ConsoleMetricExporter())
    if _protocol("METRICS") == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (  # type: ignore[import-not-found]
                OTLPMetricExporter as GrpcMetricExporter,
            )
        except ImportError:
            log.error(
                "OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs opentelemetry-exporter-otlp-proto-grpc; "
                "exporting metrics over http/protobuf instead"
            )
        else:
            return PeriodicExportingMetricReader(GrpcMetricExporter())
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    return PeriodicExportingMetricReader(OTLPMetricExporter())


def tracer_from_environment(reactor: Any) -> ITracer:
    """
    An L{OtelTracer} set up as the standard variables say:
    C{OTEL_SERVICE_NAME} [llmproxy] and C{OTEL_RESOURCE_ATTRIBUTES};
    C{OTEL_EXPORTER_OTLP_ENDPOINT}, C{_HEADERS}, C{_PROTOCOL}
    [http/protobuf] and their C{_TRACES_} / C{_METRICS_} forms (read by
    the exporters); C{OTEL_TRACES_SAMPLER} (read by the SDK);
    C{OTEL_TRACES_EXPORTER} / C{OTEL_METRICS_EXPORTER} (C{otlp}, C{console}
    or C{none}).
    """
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": "llmproxy"}
    resource = Resource.create(attributes)
    tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    exporter = _span_exporter()
    if exporter is not None:
        tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
    reader = _metric_reader()
    meter_provider = SDKMeterProvider(
        resource=resource, metric_readers=[reader] if reader else [], shutdown_on_exit=False
    )
    return OtelTracer(tracer_provider, meter_provider, reactor)
