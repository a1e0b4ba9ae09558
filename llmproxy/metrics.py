# -*- test-case-name: llmproxy.test.test_metrics -*-
# twisted.web's Resource and IRequest are unannotated; calling them is fine.
# mypy: disallow-untyped-calls=False
"""
The Prometheus metrics registry and the C{/metrics} resource.

Call sites stay one line: the forwarder reports an event (a request
finished, a stream opened, an upstream failed) and L{Metrics} turns it into
the series listed in docs/operations.md ("Metrics").

Label values are bounded so a scrape stays small whatever clients send:
model names come from responses and are capped per provider, rate-limit
scopes are reported by kind (C{key}, never the key id).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from llmproxy.pricing import Cost
from llmproxy.usage import Usage

DURATION_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
"""
Seconds. LLM calls range from a few milliseconds (a cached embedding, a
refused request) to many minutes (long reasoning streams), so the buckets
span 5 ms to 10 min.
"""

MAX_MODELS_PER_PROVIDER = 500
"""Distinct model label values kept per provider before folding into C{other}."""

MAX_MODEL_LABEL_LENGTH = 128
"""Longer model names are cut to this many characters in labels."""

UNKNOWN_MODEL = "unknown"
OTHER_MODEL = "other"

TOKEN_TYPES = ("input", "output", "cache_read", "cache_write", "reasoning")

SCOPE_KINDS = frozenset({"global", "provider", "model", "key", "user"})


class Metrics:
    """
    Every llmproxy series, in one registry.

    @ivar registry: the registry to expose; a fresh one (with the process,
        platform and GC collectors) unless one is given, never the
        prometheus_client global.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        max_models_per_provider: int = MAX_MODELS_PER_PROVIDER,
    ) -> None:
        if registry is None:
            registry = CollectorRegistry(auto_describe=True)
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.registry = registry
        self._max_models = max_models_per_provider
        self._models: dict[str, set[str]] = {}
        self._children: dict[tuple[object, ...], Any] = {}

        self.requests = Counter(
            "llmproxy_requests",
            "Forwarded requests, by the status sent to the client.",
            ["provider", "model", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "llmproxy_request_duration_seconds",
            "Time from a request's arrival to the end of its response.",
            ["provider"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.time_to_first_byte = Histogram(
            "llmproxy_time_to_first_byte_seconds",
            "Time from a request's arrival to the upstream's first body byte.",
            ["provider"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "llmproxy_tokens",
            "Tokens reported by upstreams; cache_read and cache_write are parts of input, "
            "reasoning is part of output.",
            ["provider", "model", "type"],
            registry=registry,
        )
        self.cost = Counter(
            "llmproxy_cost_usd",
            "Cost of priced requests, in USD.",
            ["provider", "model"],
            registry=registry,
        )
        self.unpriced = Counter(
            "llmproxy_unpriced_requests",
            "Requests that reported usage for a model without a price.",
            ["provider", "model"],
            registry=registry,
        )
        self.rate_limited_requests = Counter(
            "llmproxy_rate_limited",
            "Requests denied by the rate limiter, by the first exhausted scope kind.",
            ["scope", "metric", "window"],
            registry=registry,
        )
        self.active_streams = Gauge(
            "llmproxy_active_streams",
            "Streaming responses being relayed right now.",
            ["provider"],
            registry=registry,
        )
        self.upstream_errors = Counter(
            "llmproxy_upstream_errors",
            "Upstream failures: connect, tls, timeout, first_byte_timeout, idle_timeout, "
            "broken_stream, status_5xx, ...",
            ["provider", "kind"],
            registry=registry,
        )
        self.cost_records_dropped = Counter(
            "llmproxy_cost_records_dropped",
            "Cost records lost: the sink's queue was full, or a final write failed.",
            registry=registry,
        )
        self.unmetered_responses = Counter(
            "llmproxy_unmetered_responses",
            "Responses whose usage could not be read (e.g. an unknown Content-Encoding).",
            ["provider", "reason"],
            registry=registry,
        )
        self.client_connections = Gauge(
            "llmproxy_client_connections",
            "Client connections open right now.",
            registry=registry,
        )
        self.client_dropped_total = Counter(
            "llmproxy_client_dropped",
            "Client connections refused or cut for what the client did: over_connection_limit, "
            "header_timeout, body_too_slow, body_too_large, uri_too_long, headers_too_large, "
            "bad_request, stalled_reading.",
            ["reason"],
            registry=registry,
        )
        self.ratelimit_degraded_state = Gauge(
            "llmproxy_ratelimit_degraded",
            "1 while the shared rate-limit backend is in an outage and requests are decided "
            "without it.",
            ["backend"],
            registry=registry,
        )
        self.ratelimit_local_decisions = Counter(
            "llmproxy_ratelimit_local_decisions",
            "Requests decided without the shared rate-limit backend (during an outage, or a "
            "call that failed).",
            ["backend"],
            registry=registry,
        )
        self.ratelimit_tracked_scopes = Gauge(
            "llmproxy_ratelimit_tracked_scopes",
            "Scope-windows the memory rate limiter holds counters for.",
            registry=registry,
        )
        self.ratelimit_scope_overflow_total = Counter(
            "llmproxy_ratelimit_scope_overflow",
            "Requests the memory limiter counted in a shared overflow scope because "
            "max_tracked_scopes counters were held.",
            registry=registry,
        )
        self.ratelimit_backend_errors = Counter(
            "llmproxy_ratelimit_backend_errors",
            "Rate-limit backend calls that failed or timed out (fail_mode decided).",
            ["backend"],
            registry=registry,
        )

    def model_label(self, provider: str, model: str | None) -> str:
        """
        The label value for C{model}: C{unknown} for none, the name itself
        for the first L{MAX_MODELS_PER_PROVIDER} distinct names of a
        provider, C{other} after that.
        """
        if not model:
            return UNKNOWN_MODEL
        model = model[:MAX_MODEL_LABEL_LENGTH]
        seen = self._models.get(provider)
        if seen is None:
            seen = self._models[provider] = set()
        if model in seen:
            return model
        if len(seen) >= self._max_models:
            return OTHER_MODEL
        seen.add(model)
        return model

    def request_finished(
        self,
        provider: str,
        model: str | None,
        status: int,
        duration_s: float,
        ttfb_s: float | None,
        usage: Usage,
        cost: Cost,
    ) -> None:
        """
        One forwarded request is over (completed, failed or abandoned).

        A request that reported usage for a model without a price counts in
        C{llmproxy_unpriced_requests_total}; one that reported nothing (an
        unreachable upstream) has no model to price and counts in neither.
        """
        label = self.model_label(provider, model)
        child = self._child
        child(self.requests, provider, label, str(status)).inc()
        child(self.request_duration, provider).observe(duration_s)
        if ttfb_s is not None:
            child(self.time_to_first_byte, provider).observe(ttfb_s)
        if usage.reported:
            counts = (
                usage.input_tokens,
                usage.output_tokens,
                usage.cache_read_tokens,
                usage.cache_write_tokens,
                usage.reasoning_tokens,
            )
            for kind, count in zip(TOKEN_TYPES, counts, strict=True):
                child(self.tokens, provider, label, kind).inc(max(count, 0))
        if cost.total_cost is not None:
            child(self.cost, provider, label).inc(max(cost.total_cost, 0.0))
        elif usage.reported:
            child(self.unpriced, provider, label).inc()

    def _child(self, metric: Any, *labels: str) -> Any:
        """
        C{metric.labels(*labels)}, remembered: C{labels()} takes a lock and
        builds its key on every call, and a finished request reports to up
        to nine series. Label values are bounded (see L{model_label}), so
        the cache is too.
        """
        key = (metric, *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def stream_opened(self, provider: str) -> None:
        self._child(self.active_streams, provider).inc()

    def stream_closed(self, provider: str) -> None:
        self._child(self.active_streams, provider).dec()

    def upstream_error(self, provider: str, kind: str) -> None:
        self.upstream_errors.labels(provider, kind).inc()

    def rate_limited(self, scope_kind: str, metric: str, window: str) -> None:
        """
        A request was denied. C{scope_kind} is C{global}, C{provider},
        C{model}, C{key} or C{user}; a full scope name (C{key:3f2a...}) is
        cut to its kind so no id ever becomes a label.
        """
        kind = scope_kind.partition(":")[0]
        if kind not in SCOPE_KINDS:
            kind = "other"
        self.rate_limited_requests.labels(kind, metric, window).inc()

    def unmetered(self, provider: str, reason: str) -> None:
        """
        A response was relayed but its usage could not be read.
        """
        self.unmetered_responses.labels(provider, reason).inc()

    def cost_record_dropped(self, n: int = 1) -> None:
        self.cost_records_dropped.inc(n)

    def client_dropped(self, reason: str) -> None:
        self._child(self.client_dropped_total, reason).inc()

    def ratelimit_scope_overflow(self) -> None:
        self.ratelimit_scope_overflow_total.inc()

    def ratelimit_degraded(self, backend: str, degraded: bool) -> None:
        self.ratelimit_degraded_state.labels(backend).set(1 if degraded else 0)

    def ratelimit_local_decision(self, backend: str) -> None:
        self._child(self.ratelimit_local_decisions, backend).inc()

    def ratelimit_backend_error(self, backend: str) -> None:
        self.ratelimit_backend_errors.labels(backend).inc()

    def render(self) -> bytes:
        """
        The text exposition of every series.
        """
        return generate_latest(self.registry)


class MetricsResource(Resource):
    """
    C{GET /metrics}: rendered synchronously in the reactor thread (a scrape
    of a few hundred series takes about a millisecond), so no thread pool
    and no global reactor are involved.
    """

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return self._metrics.render()


def metrics_resource(metrics: Metrics) -> MetricsResource:
    """
    The resource to mount at C{/metrics}.
    """
    return MetricsResource(metrics)
