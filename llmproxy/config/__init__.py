# -*- test-case-name: llmproxy.test.test_config -*-
"""
The configuration: YAML files in, one frozen L{Config} value out.

The rest of llmproxy imports from here; the submodules hold one idea each:
L{model} (the values), L{errors} (L{ConfigError} and how messages name a
key), L{checks} (the checker and the parsers for single values),
L{validate} (a mapping to a L{Config}), L{load} (files, C{extends},
C{${VAR}}, merging) and L{reference} (every key, its default and meaning).
"""

from llmproxy.config.errors import ConfigError
from llmproxy.config.load import load_config
from llmproxy.config.model import (
    PROVIDER_KINDS,
    PUBLIC_BASE_URLS,
    AlertsConfig,
    AuthBudgets,
    AuthConfig,
    Budget,
    CircuitBreakerConfig,
    Config,
    CorsConfig,
    CostTrackingConfig,
    Estimation,
    FeaturesConfig,
    FileTransport,
    Limits,
    LoggingConfig,
    MetricsConfig,
    ModelConfig,
    ModelPricing,
    Price,
    PriceTier,
    ProviderConfig,
    ProxyKey,
    RateLimitConfig,
    RateLimitOverrides,
    RedisConfig,
    RetryConfig,
    ServerConfig,
    StatusConfig,
    StreamGateConfig,
    Timeouts,
    TracingConfig,
    UpstreamConfig,
)
from llmproxy.config.reference import reference_keys, render_reference_table
from llmproxy.config.validate import (
    LOG_FORMATS,
    LOG_LEVELS,
    RESERVED_PROVIDER_NAMES,
    parse_config,
)

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "PROVIDER_KINDS",
    "PUBLIC_BASE_URLS",
    "RESERVED_PROVIDER_NAMES",
    "AlertsConfig",
    "AuthBudgets",
    "AuthConfig",
    "Budget",
    "CircuitBreakerConfig",
    "Config",
    "ConfigError",
    "CorsConfig",
    "CostTrackingConfig",
    "Estimation",
    "FeaturesConfig",
    "FileTransport",
    "Limits",
    "LoggingConfig",
    "MetricsConfig",
    "ModelConfig",
    "ModelPricing",
    "Price",
    "PriceTier",
    "ProviderConfig",
    "ProxyKey",
    "RateLimitConfig",
    "RateLimitOverrides",
    "RedisConfig",
    "RetryConfig",
    "ServerConfig",
    "StatusConfig",
    "StreamGateConfig",
    "Timeouts",
    "TracingConfig",
    "UpstreamConfig",
    "load_config",
    "parse_config",
    "reference_keys",
    "render_reference_table",
]
