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

from attrs import Factory, frozen

PUBLIC_BASE_URLS: Mapping[str, str] = {
    "openai": "https://api.openai.com",
    "anthropic": "https://api.anthropic.com",
    "gemini": "https://generativelanguage.googleapis.com",
}
"""Where each built-in provider lives when no config names a C{base_url}."""

PROVIDER_KINDS = ("openai", "anthropic", "gemini")
"""The wire formats llmproxy speaks."""


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


@frozen
class ProviderConfig:
    """
    One mounted provider: requests under C{/<name>/} go to C{base_url}.

    @ivar kind: the wire format (C{openai}, C{anthropic} or C{gemini}).
    @ivar base_url: scheme, host, optional port and optional path prefix,
        without a trailing slash.
    """

    name: str
    kind: str
    base_url: str
    enabled: bool = True
    timeouts: Timeouts = Factory(Timeouts)
    models: Mapping[str, ModelConfig] = Factory(dict)
    inject_stream_usage: bool = True


@frozen
class CorsConfig:
    allow_origins: tuple[str, ...] = ("*",)


@frozen
class ServerConfig:
    """
    @ivar listen: endpoint descriptions; empty means "not configured", so the
        plugin falls back to C{tcp:$PORT} and then C{tcp:9002}.
    @ivar max_connections: client connections served at once (see
        L{llmproxy.channel} for this and the deadlines below).
    @ivar header_timeout_seconds: how long a request head may take.
    @ivar body_timeout_seconds: how long a request body may take, plus one
        second per C{min_body_rate_bytes_per_second} bytes it delivered.
    @ivar client_stall_timeout_seconds: how long a client may leave a
        response unread before it is dropped.
    """

    listen: tuple[str, ...] = ()
    max_body_bytes: int = 33554432
    drain_timeout_seconds: float = 600.0
    shutdown_grace_seconds: float = 0.0
    cors: CorsConfig = Factory(CorsConfig)
    forwarded_headers: bool = True
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
class FeaturesConfig:
    rate_limiting: RateLimitConfig = Factory(RateLimitConfig)
    cost_tracking: CostTrackingConfig = Factory(CostTrackingConfig)
    metrics: MetricsConfig = Factory(MetricsConfig)


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
