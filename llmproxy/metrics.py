# -*- test-case-name: llmproxy.test.test_metrics -*-
# twisted.web's Resource and IRequest are unannotated; calling them is fine.
# mypy: disallow-untyped-calls=False
"""
The Prometheus metrics registry and the C{/metrics} resource.

Call sites stay one line: the forwarder reports an event (a request
finished, a stream opened, an upstream failed) and L{Metrics} turns it into
the series listed in docs/operations.md ("Metrics").

Label values are bounded so a scrape stays small whatever clients send:
model names come from responses and are capped per provider, key ids (short
one-way hashes, or the ids of proxy keys) are capped in number, rate-limit
scopes are reported by kind (C{key}, never the key id).

Workers
=======

In a group of workers (C{server.workers} above 1) every worker counts in
prometheus_client's multiprocess mode: its values live in files of the
group's metrics directory, and C{/metrics}, whichever worker answers, adds
up the files of every worker (L{Metrics.for_group}). Counters and
histograms are summed, and a worker that died still counts, so a counter
never goes back when a worker is replaced. Each gauge names how workers
combine (C{multiprocess_mode}): a gauge added here must too, or it is
exported once per worker with a C{pid} label. The process, platform and
GC collectors describe one process, so a group does not export them.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    values,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
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

MAX_KEYS = 200
"""Distinct key ids kept as label values before folding into C{other}."""

NO_KEY = "none"
"""The key label of requests that sent no credential."""

KEY_TOKEN_TYPES = ("input", "output", "cache_read", "cache_write")
"""The token types of C{llmproxy_key_tokens_total}, in L{TOKEN_TYPES} order."""

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
        max_keys: int = MAX_KEYS,
        *,
        group_directory: str | None = None,
    ) -> None:
        series: CollectorRegistry | None
        if group_directory is not None:
            # The series are not registered anywhere: what they count goes
            # to files, and the registry exposes every worker's files.
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=group_directory)
            series = None
        elif registry is None:
            registry = series = CollectorRegistry(auto_describe=True)
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        else:
            series = registry
        self.registry = registry
        self._max_models = max_models_per_provider
        self._models: dict[str, set[str]] = {}
        self._max_keys = max_keys
        self._keys: set[str] = set()
        self._children: dict[tuple[object, ...], Any] = {}

        self.requests = Counter(
            "llmproxy_requests",
            "Forwarded requests, by the status sent to the client.",
            ["provider", "model", "status"],
            registry=series,
        )
        self.request_duration = Histogram(
            "llmproxy_request_duration_seconds",
            "Time from a request's arrival to the end of its response.",
            ["provider"],
            buckets=DURATION_BUCKETS,
            registry=series,
        )
        self.time_to_first_byte = Histogram(
            "llmproxy_time_to_first_byte_seconds",
            "Time from a request's arrival to the upstream's first body byte.",
            ["provider"],
            buckets=DURATION_BUCKETS,
            registry=series,
        )
        self.tokens = Counter(
            "llmproxy_tokens",
            "Tokens reported by upstreams; cache_read and cache_write are parts of input, "
            "reasoning is part of output.",
            ["provider", "model", "type"],
            registry=series,
        )
        self.key_tokens = Counter(
            "llmproxy_key_tokens",
            "Tokens by client key id: input, and its cache_read and cache_write parts (the "
            "prompt-cache hit ratio is cache_read / input), and output.",
            ["key", "type"],
            registry=series,
        )
        self.cost = Counter(
            "llmproxy_cost_usd",
            "Cost of priced requests, in USD.",
            ["provider", "model"],
            registry=series,
        )
        self.unpriced = Counter(
            "llmproxy_unpriced_requests",
            "Requests that reported usage for a model without a price.",
            ["provider", "model"],
            registry=series,
        )
        self.rate_limited_requests = Counter(
            "llmproxy_rate_limited",
            "Requests denied by the rate limiter, by the first exhausted scope kind.",
            ["scope", "metric", "window"],
            registry=series,
        )
        self.active_streams = Gauge(
            "llmproxy_active_streams",
            "Streaming responses being relayed right now.",
            ["provider"],
            registry=series,
            multiprocess_mode="livesum",
        )
        self.upstream_errors = Counter(
            "llmproxy_upstream_errors",
            "Upstream failures: connect, tls, timeout, first_byte_timeout, idle_timeout, "
            "broken_stream, status_5xx, ...",
            ["provider", "kind"],
            registry=series,
        )
        self.cost_records_dropped = Counter(
            "llmproxy_cost_records_dropped",
            "Cost records lost: the sink's queue was full, or a final write failed.",
            registry=series,
        )
        self.unmetered_responses = Counter(
            "llmproxy_unmetered_responses",
            "Responses whose usage could not be read (e.g. an unknown Content-Encoding).",
            ["provider", "reason"],
            registry=series,
        )
        self.upstream_attempts = Counter(
            "llmproxy_upstream_attempts",
            "Upstream tries, by upstream and outcome (success, connect, status_503, "
            "stream_error, client_gone, ...).",
            ["provider", "upstream", "outcome"],
            registry=series,
        )
        self.retries = Counter(
            "llmproxy_retries",
            "Upstream tries made after a failed one, by the reason the previous failed.",
            ["provider", "reason"],
            registry=series,
        )
        self.fallbacks = Counter(
            "llmproxy_fallbacks",
            "Requests that moved on to a fallback provider.",
            ["from_provider", "to_provider"],
            registry=series,
        )
        self.circuit_states = Gauge(
            "llmproxy_circuit_state",
            "Circuit breaker state per upstream and model: 0 closed, 1 open, 2 half-open "
            "(model empty: the upstream's own circuit, for connection failures).",
            ["provider", "upstream", "model"],
            registry=series,
            # Each worker has its own circuits: the group reports the
            # least closed of its live workers' (0 only when all are closed).
            multiprocess_mode="livemax",
        )
        self.client_connections = Gauge(
            "llmproxy_client_connections",
            "Client connections open right now.",
            registry=series,
            multiprocess_mode="livesum",
        )
        self.client_dropped_total = Counter(
            "llmproxy_client_dropped",
            "Client connections refused or cut for what the client did: over_connection_limit, "
            "header_timeout, body_too_slow, body_too_large, uri_too_long, headers_too_large, "
            "bad_request, stalled_reading.",
            ["reason"],
            registry=series,
        )
        self.ratelimit_degraded_state = Gauge(
            "llmproxy_ratelimit_degraded",
            "1 while the shared rate-limit backend is in an outage and requests are decided "
            "without it.",
            ["backend"],
            registry=series,
            multiprocess_mode="livemax",
        )
        self.ratelimit_local_decisions = Counter(
            "llmproxy_ratelimit_local_decisions",
            "Requests decided without the shared rate-limit backend (during an outage, or a "
            "call that failed).",
            ["backend"],
            registry=series,
        )
        self.ratelimit_tracked_scopes = Gauge(
            "llmproxy_ratelimit_tracked_scopes",
            "Scope-windows the memory rate limiter holds counters for.",
            registry=series,
            # With workers, the memory limiter lives in the master: its
            # count is the one that matters (the workers' stay at zero).
            multiprocess_mode="livemax",
        )
        self.ratelimit_scope_overflow_total = Counter(
            "llmproxy_ratelimit_scope_overflow",
            "Requests the memory limiter counted in a shared overflow scope because "
            "max_tracked_scopes counters were held.",
            registry=series,
        )
        self.ratelimit_backend_errors = Counter(
            "llmproxy_ratelimit_backend_errors",
            "Rate-limit and budget backend calls that failed or timed out (fail_mode decided).",
            ["backend"],
            registry=series,
        )
        self.budget_spent_usd = Gauge(
            "llmproxy_budget_spent_usd",
            "What each proxy key spent in the current period (day, month), in USD.",
            ["key", "period"],
            registry=series,
            # Every worker sees the same shared spend; the group reports the
            # highest any live worker last saw.
            multiprocess_mode="livemax",
        )
        self.budget_limit_usd = Gauge(
            "llmproxy_budget_limit_usd",
            "Each proxy key's budget per period (day, month), in USD.",
            ["key", "period"],
            registry=series,
            multiprocess_mode="livemax",
        )
        self.budget_denied_total = Counter(
            "llmproxy_budget_denied",
            "Requests refused (402) for lack of budget, by proxy key (none: a user's budget "
            "refused a request without one).",
            ["key"],
            registry=series,
        )
        self.auth_failures = Counter(
            "llmproxy_auth_failures",
            "Requests refused for their key: missing_key, unknown_key, expired_key "
            "(401); provider_not_allowed, model_not_allowed, unpriced_model (403).",
            ["reason"],
            registry=series,
        )
        self._budget_limits: set[tuple[str, str]] = set()

    @classmethod
    def for_group(cls, directory: str) -> Metrics:
        """
        A worker's metrics: counted in C{directory}, the group's metrics
        directory, and exposed for every worker that counts there.

        @raise RuntimeError: if prometheus_client was imported without
            C{PROMETHEUS_MULTIPROC_DIR} set to C{directory}: it chooses how
            values are stored when it is first imported, so the master sets
            the variable for its workers before they start.
        """
        if (
            not getattr(values.ValueClass, "_multiprocess", False)
            or os.environ.get("PROMETHEUS_MULTIPROC_DIR") != directory
        ):
            raise RuntimeError(
                f"PROMETHEUS_MULTIPROC_DIR must be {directory} before prometheus_client is imported"
            )
        return cls(group_directory=directory)

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

    def key_label(self, key_id: str | None) -> str:
        """
        The label value for a key id: C{none} for none, the id for the
        first L{MAX_KEYS} distinct ids, C{other} after that.
        """
        if not key_id:
            return NO_KEY
        if key_id in self._keys:
            return key_id
        if len(self._keys) >= self._max_keys:
            return OTHER_MODEL
        self._keys.add(key_id)
        return key_id

    def request_finished(
        self,
        provider: str,
        model: str | None,
        status: int,
        duration_s: float,
        ttfb_s: float | None,
        usage: Usage,
        cost: Cost,
        key_id: str | None = None,
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
            # Every series is created (a dashboard sees zeros), but a zero is
            # not added: each inc() takes the value's lock.
            for kind, count in zip(TOKEN_TYPES, counts, strict=True):
                series = child(self.tokens, provider, label, kind)
                if count > 0:
                    series.inc(count)
            key = self.key_label(key_id)
            for kind, count in zip(KEY_TOKEN_TYPES, counts[:4], strict=True):
                series = child(self.key_tokens, key, kind)
                if count > 0:
                    series.inc(count)
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

    def upstream_attempt(self, provider: str, upstream: str, outcome: str) -> None:
        self._child(self.upstream_attempts, provider, upstream, outcome).inc()

    def retried(self, provider: str, reason: str) -> None:
        self._child(self.retries, provider, reason).inc()

    def fell_back(self, from_provider: str, to_provider: str) -> None:
        self._child(self.fallbacks, from_provider, to_provider).inc()

    def circuit_state(self, provider: str, upstream: str, model: str, state: int) -> None:
        label = self.model_label(provider, model) if model else ""
        self._child(self.circuit_states, provider, upstream, label).set(state)

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

    def auth_failure(self, reason: str) -> None:
        self.auth_failures.labels(reason).inc()

    def budget_denied(self, key_id: str | None) -> None:
        """
        A request was refused for lack of budget. Labels are proxy key ids
        (bounded by the configuration), never the hash of a client's own key.
        """
        self.budget_denied_total.labels(key_id or "none").inc()

    def budget_spent(self, key_id: str, period: str, usd: float) -> None:
        self._child(self.budget_spent_usd, key_id, period).set(usd)

    def budget_keys(
        self, key_ids: Collection[str], limits: Mapping[tuple[str, str], float]
    ) -> None:
        """
        The configured proxy keys and their budgets, C{(key id, period) ->
        USD}: a key no longer configured (revoked by a reload) leaves the
        series, spend included; a budget no longer set leaves the limits.
        """
        for gone in self._budget_limits - set(limits):
            self.budget_limit_usd.remove(*gone)
        for labels, usd in limits.items():
            self.budget_limit_usd.labels(*labels).set(usd)
        self._budget_limits = set(limits)
        for metric, *spent_labels in list(self._children):
            if metric is self.budget_spent_usd and spent_labels[0] not in key_ids:
                del self._children[(metric, *spent_labels)]
                self.budget_spent_usd.remove(*spent_labels)

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
