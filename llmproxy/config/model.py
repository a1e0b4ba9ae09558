# -*- test-case-name: llmproxy.test.test_config -*-
"""
The configuration values: frozen attrs classes, from L{Config} down.

They are kept apart from the code that builds them (L{llmproxy.config.validate},
L{llmproxy.config.load}) because the rest of llmproxy only reads them.
Everything here is a plain immutable value, so a reload swaps one object and
in-flight requests keep the one they started with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal
from urllib.parse import urlsplit

from attrs import Factory, field, frozen

PUBLIC_BASE_URLS: Mapping[str, str] = {
    "openai": "https://api.openai.com",
    "anthropic": "https://api.anthropic.com",
    "gemini": "https://generativelanguage.googleapis.com",
}
"""Where each built-in provider lives when no config names a C{base_url}."""

PROVIDER_KINDS = ("openai", "anthropic", "gemini", "azure_openai", "bedrock", "vertex")
"""The wire formats llmproxy speaks."""

REGIONAL_KINDS = ("bedrock", "vertex")
"""Kinds whose C{base_url} can be derived from a C{region}."""


@frozen
class Timeouts:
    """
    Per-provider upstream timeouts, in seconds.

    @ivar total_seconds: whole-request budget; C{0} means none.
    """

    connect_seconds: float = 10.0
    first_byte_seconds: float = 600.0
    idle_seconds: float = 300.0
    total_seconds: float = 0.0


@frozen
class Price:
    """
    USD per one million tokens, each kind of token priced on its own.
    """

    input: float
    output: float
    cache_read: float
    cache_write: float
    reasoning: float


@frozen
class PriceTier:
    """
    A price that applies while a request's input tokens are at most
    C{threshold}; C{threshold == 0} is the catch-all tier.
    """

    threshold: int
    price: Price


@frozen
class ModelPricing:
    """
    How one model is priced.

    @ivar tiers: sorted by ascending threshold with the catch-all (C{0}) last,
        so the first tier whose threshold is >= the input tokens (or is 0) wins.
    @ivar overrides: alias name -> pricing used when the response names that alias.
    """

    tiers: tuple[PriceTier, ...]
    overrides: Mapping[str, ModelPricing] = Factory(dict)


@frozen
class ModelConfig:
    aliases: tuple[str, ...] = ()
    pricing: ModelPricing | None = None


def upstream_name(base_url: str) -> str:
    """
    The default name of the upstream at C{base_url}: its host, and its port
    when the URL gives one.
    """
    return urlsplit(base_url).netloc.rpartition("@")[2] or base_url


@frozen
class UpstreamConfig:
    """
    One place a provider's requests can go.

    @ivar name: shown in metrics, C{/health}, records and
        C{X-LLM-Proxy-Upstream}; by default the base URL's host (and port).
    @ivar base_url: scheme, host, optional port and optional path prefix,
        without a trailing slash.
    @ivar weight: its share of traffic among the available upstreams of its
        priority.
    @ivar priority: lower goes first; a higher one is used only while every
        lower one is unavailable or has failed for the request.
    @ivar headers: request headers set (or replaced) for this upstream: a
        credential the proxy holds, for example.
    @ivar models: requested model -> the name this upstream knows it by.
    """

    name: str
    base_url: str
    weight: int = 1
    priority: int = 0
    headers: Mapping[str, str] = Factory(dict)
    models: Mapping[str, str] = Factory(dict)


@frozen
class RetryConfig:
    """
    Upstream tries per client request, fallbacks included (1: no retry).

    @ivar backoff_seconds: the first backoff before trying an upstream that
        has already failed for the request; it doubles each time, with
        full jitter.
    @ivar max_wait_seconds: the longest C{Retry-After} worth waiting for.
    """

    max_attempts: int = 3
    backoff_seconds: float = 0.25
    max_wait_seconds: float = 10.0


@frozen
class StreamGateConfig:
    """
    How long a stream's opening events are held back, waiting for its first
    content event (so a failure before it can still be retried); C{0} in
    either turns the gate off.
    """

    max_bytes: int = 16384
    max_seconds: float = 10.0


@frozen
class CircuitBreakerConfig:
    """
    C{failures} consecutive failed attempts on one upstream for one model
    open its circuit for C{cooldown_seconds}.
    """

    failures: int = 5
    cooldown_seconds: float = 30.0


@frozen
class ProviderConfig:
    """
    One mounted provider: requests under C{/<name>/} go to its upstreams.

    @ivar kind: the wire format (one of L{PROVIDER_KINDS}).
    @ivar base_url: the first upstream's base URL (the one-upstream short
        form of C{upstreams}): scheme, host, optional port and optional path
        prefix, without a trailing slash.
    @ivar upstreams: where requests go; by default the one at C{base_url}.
    @ivar fallback: other mounts of the same kind, tried in order once
        every upstream of this one is unavailable or has failed.
    @ivar deployments: C{azure_openai}: deployment name -> the model it runs
        (for prices, limits and records).
    @ivar region: C{bedrock}: the AWS region; C{vertex}: the Google Cloud
        region (or C{global}); the default C{base_url} is derived from it.
    @ivar aws_sigv4: C{bedrock}: sign every request with the proxy's own AWS
        credentials (SigV4), replacing the client's authorization.
    @ivar google_adc: C{vertex}: send every request with an OAuth token from
        the proxy's own Application Default Credentials, replacing the
        client's authorization.
    """

    name: str
    kind: str
    base_url: str
    enabled: bool = True
    timeouts: Timeouts = Factory(Timeouts)
    models: Mapping[str, ModelConfig] = Factory(dict)
    inject_stream_usage: bool = True
    upstreams: tuple[UpstreamConfig, ...] = Factory(
        lambda self: (UpstreamConfig(name=upstream_name(self.base_url), base_url=self.base_url),),
        takes_self=True,
    )
    fallback: tuple[str, ...] = ()
    retry: RetryConfig = Factory(RetryConfig)
    stream_gate: StreamGateConfig = Factory(StreamGateConfig)
    circuit_breaker: CircuitBreakerConfig = Factory(CircuitBreakerConfig)
    deployments: Mapping[str, str] = Factory(dict)
    region: str | None = None
    aws_sigv4: bool = False
    google_adc: bool = False


@frozen
class CorsConfig:
    allow_origins: tuple[str, ...] = ("*",)


@frozen
class StatusConfig:
    """
    The status page (C{/status}, C{/status.json}).

    @ivar token: when set, the page needs it (bearer or C{?token=}); when
        not, only clients on this machine may see it.
    """

    enabled: bool = True
    token: str | None = None


@frozen
class ServerConfig:
    """
    @ivar listen: endpoint descriptions; empty means "not configured", so the
        plugin falls back to C{tcp:$PORT} and then C{tcp:9002}.
    @ivar workers: how many processes accept on the listeners; above 1, a
        master process supervises them (see L{llmproxy.group}).
    @ivar max_connections: client connections served at once (see
        L{llmproxy.channel} for this and the deadlines below).
    @ivar header_timeout_seconds: how long a request head may take.
    @ivar body_timeout_seconds: how long a request body may take, plus one
        second per C{min_body_rate_bytes_per_second} bytes it delivered.
    @ivar client_stall_timeout_seconds: how long a client may leave a
        response unread before it is dropped.
    """

    listen: tuple[str, ...] = ()
    workers: int = 1
    max_body_bytes: int = 33554432
    drain_timeout_seconds: float = 600.0
    shutdown_grace_seconds: float = 0.0
    cors: CorsConfig = Factory(CorsConfig)
    forwarded_headers: bool = True
    status: StatusConfig = Factory(StatusConfig)
    max_connections: int = 1000
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 30.0
    min_body_rate_bytes_per_second: int = 1024
    client_stall_timeout_seconds: float = 120.0


@frozen
class LoggingConfig:
    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warn", "error", "critical"] = "info"


@frozen
class Limits:
    """
    Rate limits for one scope; C{0} means unlimited.
    """

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    requests_per_day: int = 0
    tokens_per_day: int = 0


@frozen
class RateLimitOverrides:
    """
    Per-scope limits. Each value is already complete: keys the YAML left out
    were filled from the base C{limits} at load time.
    """

    per_provider: Mapping[str, Limits] = Factory(dict)
    per_model: Mapping[str, Limits] = Factory(dict)
    per_key: Mapping[str, Limits] = Factory(dict)
    per_user: Mapping[str, Limits] = Factory(dict)


@frozen
class Estimation:
    chars_per_token: float = 4.0
    provider_chars_per_token: Mapping[str, float] = Factory(dict)
    bytes_per_token: float = 4.0
    max_sample_bytes: int = 20000
    optimistic_first_request: bool = True


@frozen
class RedisConfig:
    """
    @ivar timeout_ms: how long one limiter call may go unanswered before it
        counts as a failure (it still waits for its answer).
    @ivar outage_after_failures: failures in a row that make an outage,
        during which requests are decided without Redis (by C{fail_mode}).
    @ivar outage_limit_fraction: during an outage with C{fail_mode: open},
        the fraction of each limit this instance enforces on its own.
    """

    url: str = "redis://127.0.0.1:6379/0"
    timeout_ms: int = 250
    outage_after_failures: int = 3
    outage_limit_fraction: float = 1.0


@frozen
class RateLimitConfig:
    """
    @ivar max_tracked_scopes: scope-windows the memory backend keeps
        counters for; beyond it, new client-named scopes share one counter
        per kind (see L{llmproxy.ratelimit.memory}).
    """

    enabled: bool = False
    backend: Literal["memory", "redis"] = "memory"
    redis: RedisConfig = Factory(RedisConfig)
    fail_mode: Literal["open", "closed"] = "open"
    sweep_interval_seconds: float = 30.0
    max_tracked_scopes: int = 100000
    limits: Limits = Factory(Limits)
    overrides: RateLimitOverrides = Factory(RateLimitOverrides)
    estimation: Estimation = Factory(Estimation)


@frozen
class FileTransport:
    path: str


@frozen
class CostTrackingConfig:
    """
    @ivar queue_size: records held in memory before a failing sink starts
        dropping them (each drop is counted in a metric).
    """

    enabled: bool = False
    transports: tuple[FileTransport, ...] = ()
    flush_interval_seconds: float = 5.0
    queue_size: int = 100000


@frozen
class MetricsConfig:
    enabled: bool = True


@frozen
class TracingConfig:
    """
    OpenTelemetry traces and GenAI metrics, exported by OTLP as the
    standard C{OTEL_*} environment variables say.
    """

    enabled: bool = False


@frozen
class Budget:
    """
    A spending cap in USD for one proxy key or one user, per UTC day and
    calendar month; L{None} means no cap for that period.

    @ivar reserve_output_tokens: the output reserved for a request that
        names no maximum of its own.
    @ivar unpriced: C{deny} refuses (403) a model without a price, since its
        cost cannot be counted; C{allow} forwards it and counts nothing.
    @ivar alert_at: fractions of a cap whose crossing is logged (and posted
        to the alert webhook), ascending.
    """

    daily_usd: float | None = None
    monthly_usd: float | None = None
    reserve_output_tokens: int = 1024
    unpriced: Literal["deny", "allow"] = "deny"
    alert_at: tuple[float, ...] = (0.8, 1.0)


@frozen
class ProxyKey:
    """
    One key the proxy issues (C{auth.keys[]}).

    @ivar id: names the key in limits, records, metrics and logs.
    @ivar hash: the SHA-256 of the key itself (32 bytes); the key is never
        stored.
    @ivar user: the user of its requests when nothing else names one.
    @ivar providers: the provider mounts it may use; L{None} for all.
    @ivar models: glob patterns of the models it may use; L{None} for all.
    @ivar limits: rate limits for its C{key:<id>} scope, already merged
        with C{features.rate_limiting.limits}; L{None} when not set.
    @ivar expires_at: POSIX time from which it is refused, or L{None}.
    """

    id: str
    hash: bytes
    user: str | None = None
    providers: tuple[str, ...] | None = None
    models: tuple[str, ...] | None = None
    limits: Limits | None = None
    budget: Budget | None = None
    expires_at: float | None = None


@frozen
class AuthBudgets:
    per_user: Mapping[str, Budget] = Factory(dict)


@frozen
class AlertsConfig:
    """
    @ivar webhook_url: where budget alerts are POSTed as JSON, if anywhere.
    """

    webhook_url: str | None = field(default=None, repr=False)


@frozen
class AuthConfig:
    """
    Who may use the proxy, with which credentials upstream, and at what cost.

    @ivar mode: C{passthrough} forwards the client's credential; C{keys}
        accepts proxy keys only; C{mixed} swaps a proxy key and passes any
        other credential through.
    @ivar credentials: provider mount -> the headers that carry the
        provider credential when a proxy key is swapped.
    """

    mode: Literal["passthrough", "keys", "mixed"] = "passthrough"
    keys: tuple[ProxyKey, ...] = ()
    credentials: Mapping[str, Mapping[str, str]] = field(factory=dict, repr=False)
    budgets: AuthBudgets = Factory(AuthBudgets)
    alerts: AlertsConfig = Factory(AlertsConfig)


@frozen
class FeaturesConfig:
    rate_limiting: RateLimitConfig = Factory(RateLimitConfig)
    cost_tracking: CostTrackingConfig = Factory(CostTrackingConfig)
    metrics: MetricsConfig = Factory(MetricsConfig)
    tracing: TracingConfig = Factory(TracingConfig)


def default_providers() -> dict[str, ProviderConfig]:
    """
    The three built-in providers at their public base URLs, which every
    configuration has unless it turns one off.
    """
    return {
        name: ProviderConfig(name=name, kind=name, base_url=url)
        for name, url in PUBLIC_BASE_URLS.items()
    }


@frozen
class Config:
    """
    The whole configuration. C{Config()} is the built-in default: the three
    providers at their public base URLs, no limits, no cost sink.
    """

    server: ServerConfig = Factory(ServerConfig)
    logging: LoggingConfig = Factory(LoggingConfig)
    providers: Mapping[str, ProviderConfig] = Factory(default_providers)
    features: FeaturesConfig = Factory(FeaturesConfig)
    auth: AuthConfig = Factory(AuthConfig)
