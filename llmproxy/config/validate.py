# -*- test-case-name: llmproxy.test.test_config_validate -*-
"""
Turning one merged mapping into a L{Config}: which keys each section has,
what each key accepts, and the rules that span keys (a custom provider
needs a C{kind} and a C{base_url}, pricing overrides name aliases, rate
limit overrides inherit the base limits).

It is apart from L{llmproxy.config.load} so that a mapping that did not
come from files (L{parse_config}, used by tests) is validated exactly as a
merged one is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import attrs

from llmproxy.config.auth import parse_auth
from llmproxy.config.checks import (
    INVALID,
    MISSING,
    Checker,
    Invalid,
    Parser,
    amount,
    base_url,
    boolean,
    choice,
    count,
    fields,
    named,
    nested,
    one_of,
    positive_amount,
    positive_count,
    redis_url,
    section,
    string,
    string_list,
)
from llmproxy.config.cloud import base_url_required, deployments, finish_cloud_keys, region
from llmproxy.config.errors import ConfigError, KeyPath, Locate, segment
from llmproxy.config.model import (
    PROVIDER_KINDS,
    PUBLIC_BASE_URLS,
    REGIONAL_KINDS,
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
    default_providers,
    upstream_name,
)
from llmproxy.config.upstreams import (
    BREAKER_KEYS,
    GATE_KEYS,
    RETRY_KEYS,
    check_fallbacks,
    upstreams,
)

# -- server, logging ---------------------------------------------------------


def _listen(ck: Checker, path: KeyPath, value: object) -> tuple[str, ...] | Invalid:
    """
    Endpoint descriptions; the plugin parses them when it listens, so here
    they only have to be non-empty strings.
    """
    if isinstance(value, str):
        return ck.fail(path, "expected a list of endpoint descriptions (e.g. ['tcp:9002'])", value)
    return string_list(ck, path, value)


MIN_STATUS_TOKEN_LENGTH = 16
"""A shorter status-page token could be guessed."""

_TOKEN = re.compile(r"[\x21-\x7e]+")


def _status_token(ck: Checker, path: KeyPath, value: object) -> str | Invalid | None:
    """
    C{server.status.token}: none (C{null}), or a secret of at least
    L{MIN_STATUS_TOKEN_LENGTH} visible ASCII characters (it travels in a
    header and a URL). A bad one is never echoed: it is meant to be secret.
    """
    if value is None:
        return None
    if (
        isinstance(value, str)
        and len(value) >= MIN_STATUS_TOKEN_LENGTH
        and _TOKEN.fullmatch(value) is not None
    ):
        return value
    shown = "a non-string" if not isinstance(value, str) else f"{len(value)} characters"
    return ck.note(
        path,
        f"expected a secret of at least {MIN_STATUS_TOKEN_LENGTH} visible ASCII characters "
        f"without spaces (e.g. from `python -c 'import secrets; print(secrets.token_urlsafe())'`), "
        f"got {shown}",
    )


_STATUS_KEYS: Mapping[str, Parser] = {
    "enabled": boolean,
    "token": _status_token,
}


MAX_WORKERS = 256
"""More worker processes than this is a typo, not a machine."""


def _workers(ck: Checker, path: KeyPath, value: object) -> int | Invalid:
    workers: int | Invalid = positive_count(ck, path, value)
    if isinstance(workers, int) and workers > MAX_WORKERS:
        return ck.fail(path, f"expected an integer from 1 to {MAX_WORKERS}", value)
    return workers


_SERVER_KEYS: Mapping[str, Parser] = {
    "listen": _listen,
    "workers": _workers,
    "max_body_bytes": positive_count,
    "drain_timeout_seconds": amount,
    "shutdown_grace_seconds": amount,
    "cors": nested(CorsConfig, {"allow_origins": string_list}),
    "forwarded_headers": boolean,
    "status": nested(StatusConfig, _STATUS_KEYS),
    "max_connections": positive_count,
    "header_timeout_seconds": positive_amount,
    "body_timeout_seconds": positive_amount,
    "min_body_rate_bytes_per_second": positive_count,
    "client_stall_timeout_seconds": positive_amount,
}

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")

_LOGGING_KEYS: Mapping[str, Parser] = {
    "format": choice(*LOG_FORMATS),
    "level": choice(*LOG_LEVELS),
}


# -- providers and pricing ---------------------------------------------------

_PROVIDER_NAME = re.compile(r"[a-z0-9_-]+")
RESERVED_PROVIDER_NAMES = ("health", "metrics", "meta", "status")
"""Top-level paths the proxy answers itself, so no provider may be mounted there."""

_TIMEOUT_KEYS: Mapping[str, Parser] = {
    "connect_seconds": positive_amount,
    "first_byte_seconds": positive_amount,
    "idle_seconds": positive_amount,
    "total_seconds": amount,
}

_PRICE_KEYS = ("input", "output", "cache_read", "cache_write", "reasoning")


def _price(ck: Checker, path: KeyPath, given: Mapping[str, object]) -> Price | None:
    """
    A L{Price} from the price keys of C{given}: C{input} and C{output} are
    required; C{cache_read} and C{cache_write} default to C{input} (a
    provider without a cache discount), C{reasoning} to C{output}.
    """
    prices: dict[str, float] = {}
    for key in _PRICE_KEYS:
        if key in given:
            parsed = amount(ck, (*path, key), given[key])
            if not isinstance(parsed, Invalid):
                prices[key] = parsed
        elif key in ("input", "output"):
            ck.fail((*path, key), "expected a price in USD per 1M tokens", MISSING)
    if "input" not in prices or "output" not in prices:
        return None
    return Price(
        input=prices["input"],
        output=prices["output"],
        cache_read=prices.get("cache_read", prices["input"]),
        cache_write=prices.get("cache_write", prices["input"]),
        reasoning=prices.get("reasoning", prices["output"]),
    )


def _tiers(ck: Checker, path: KeyPath, value: list[object]) -> tuple[PriceTier, ...] | None:
    """
    Normalise a tier list: ascending thresholds with the catch-all
    (C{threshold: 0}) last.  Without a catch-all the largest tier becomes
    one, so requests above every threshold pay the largest tier's price and
    the rule "the first tier whose threshold >= input tokens, or 0" always
    finds a tier.
    """
    if not value:
        ck.fail(path, "expected at least one price tier", value)
        return None
    tiers: list[PriceTier] = []
    seen: dict[int, int] = {}
    ok = True
    for index, raw in enumerate(value):
        entry = (*path, index)
        given = fields(ck, entry, raw, ("threshold", *_PRICE_KEYS))
        if given is None:
            ok = False
            continue
        threshold: int | Invalid = INVALID
        if "threshold" in given:
            threshold = count(ck, (*entry, "threshold"), given["threshold"])
        else:
            ck.fail((*entry, "threshold"), "expected the tier's largest input token count", MISSING)
        price = _price(ck, entry, given)
        if isinstance(threshold, int) and threshold in seen:
            ck.fail(
                (*entry, "threshold"),
                f"expected a threshold no other tier has (tier [{seen[threshold]}] has it)",
                threshold,
            )
            ok = False
        elif isinstance(threshold, int) and price is not None:
            seen[threshold] = index
            tiers.append(PriceTier(threshold=threshold, price=price))
        else:
            ok = False
    if not ok:
        return None
    tiers.sort(key=lambda tier: (tier.threshold == 0, tier.threshold))
    if tiers[-1].threshold != 0:
        tiers[-1] = PriceTier(threshold=0, price=tiers[-1].price)
    return tuple(tiers)


def _pricing(
    ck: Checker, path: KeyPath, value: object, aliases: tuple[str, ...] | None
) -> ModelPricing | None:
    """
    C{pricing}: a price mapping (with optional C{overrides}) or a tier list.

    @param aliases: the model's aliases, which are the only names an
        override may use; L{None} inside an override, where C{overrides}
        is not allowed.
    """
    if isinstance(value, list):
        tiers = _tiers(ck, path, value)
        return None if tiers is None else ModelPricing(tiers=tiers)
    if not isinstance(value, Mapping):
        ck.fail(path, "expected a price mapping {input, output, ...} or a list of tiers", value)
        return None
    keys = (*_PRICE_KEYS, "overrides") if aliases is not None else _PRICE_KEYS
    given = fields(ck, path, value, keys)
    if given is None:
        return None
    price = _price(ck, path, given)
    overrides: dict[str, ModelPricing] = {}
    if "overrides" in given and aliases is not None:
        where = (*path, "overrides")
        for alias, entry, raw in named(ck, where, given["overrides"], "alias"):
            if alias not in aliases:
                expected = "expected one of the model's aliases"
                if aliases:
                    expected += " (" + ", ".join(aliases) + ")"
                ck.fail(entry, expected, alias)
                continue
            override = _pricing(ck, entry, raw, None)
            if override is not None:
                overrides[alias] = override
    if price is None:
        return None
    return ModelPricing(tiers=(PriceTier(threshold=0, price=price),), overrides=overrides)


def _models(ck: Checker, path: KeyPath, value: object) -> dict[str, ModelConfig]:
    """
    C{models}: model name -> aliases and pricing.  A name or alias may
    appear once per provider, so a response's model selects one price.
    """
    models: dict[str, ModelConfig] = {}
    owners: dict[str, str] = {}
    entries = named(ck, path, value, "model name")
    for name, _entry, _raw in entries:
        owners[name] = name
    for name, entry, raw in entries:
        given = fields(ck, entry, raw, ("aliases", "pricing"))
        if given is None:
            continue
        aliases: tuple[str, ...] = ()
        if "aliases" in given:
            parsed = string_list(ck, (*entry, "aliases"), given["aliases"])
            if not isinstance(parsed, Invalid):
                aliases = parsed
        for index, alias in enumerate(aliases):
            owner = owners.setdefault(alias, name)
            if owner != name:
                ck.fail(
                    (*entry, "aliases", index),
                    f"expected a name no other model of this provider uses ({owner!r} does)",
                    alias,
                )
        pricing = None
        if given.get("pricing") is not None:
            pricing = _pricing(ck, (*entry, "pricing"), given["pricing"], aliases)
        models[name] = ModelConfig(aliases=aliases, pricing=pricing)
    return models


_PROVIDER_KEYS: Mapping[str, Parser] = {
    "enabled": boolean,
    "kind": choice(*PROVIDER_KINDS),
    "base_url": base_url,
    "upstreams": upstreams,
    "fallback": string_list,
    "retry": nested(RetryConfig, RETRY_KEYS),
    "stream_gate": nested(StreamGateConfig, GATE_KEYS),
    "circuit_breaker": nested(CircuitBreakerConfig, BREAKER_KEYS),
    "timeouts": nested(Timeouts, _TIMEOUT_KEYS),
    "models": _models,
    "inject_stream_usage": boolean,
    "deployments": deployments,
    "region": region,
    "aws_sigv4": boolean,
    "google_adc": boolean,
}


def _provider(ck: Checker, path: KeyPath, name: str, value: object) -> ProviderConfig:
    """
    One provider.  A built-in name (C{openai}, C{anthropic}, C{gemini})
    defaults its C{kind} to the name and its C{base_url} to the public API;
    any other name must give both (or C{upstreams} instead of C{base_url}).
    """
    fixed: dict[str, Any] = {"name": name, "kind": "openai", "base_url": "http://invalid"}
    listed = isinstance(value, Mapping) and "upstreams" in value
    if isinstance(value, Mapping) and listed and "base_url" in value:
        ck.fail(
            (*path, "base_url"),
            "expected either base_url or upstreams, not both (base_url is the short form)",
            value["base_url"],
        )
    if name in PUBLIC_BASE_URLS:
        fixed.update(kind=name, base_url=PUBLIC_BASE_URLS[name])
    elif isinstance(value, Mapping):
        if "kind" not in value:
            ck.fail(
                (*path, "kind"),
                one_of(PROVIDER_KINDS) + " (required for a provider that is not built in)",
                MISSING,
            )
        if "base_url" not in value and not listed and base_url_required(value):
            needed = "required for a provider that is not built in"
            if value.get("kind") in REGIONAL_KINDS:
                needed += ", unless it gives a region"
            ck.fail((*path, "base_url"), f"expected an http(s) URL ({needed})", MISSING)
    provider = section(ck, path, value, ProviderConfig, _PROVIDER_KEYS, **fixed)
    provider = finish_cloud_keys(ck, path, value, provider)
    if listed and provider.upstreams:
        return attrs.evolve(provider, base_url=provider.upstreams[0].base_url)
    # The short form: one upstream at the final base_url (the cloud keys may
    # have derived it from a region after the default upstream was built).
    return attrs.evolve(
        provider,
        upstreams=(
            UpstreamConfig(name=upstream_name(provider.base_url), base_url=provider.base_url),
        ),
    )


def _providers(ck: Checker, path: KeyPath, value: object) -> dict[str, ProviderConfig]:
    """
    C{providers}: the three built-in providers always exist (at their public
    URLs unless configured otherwise; C{enabled: false} turns one off); any
    other name adds a provider mounted at C{/<name>/}.
    """
    providers = default_providers()
    if not isinstance(value, Mapping):
        ck.fail(path, "expected a mapping of provider names to providers", value)
        return providers
    for name, raw in value.items():
        entry = (*path, segment(name))
        if not isinstance(name, str) or not _PROVIDER_NAME.fullmatch(name):
            ck.fail(entry, "expected a provider name made of a-z, 0-9, '_' and '-'", name)
        elif name in RESERVED_PROVIDER_NAMES:
            ck.fail(
                entry,
                "expected a provider name other than " + ", ".join(RESERVED_PROVIDER_NAMES),
                name,
            )
        else:
            providers[name] = _provider(ck, entry, name, raw)
    check_fallbacks(ck, path, providers)
    return providers


# -- features ------------------------------------------------------------------

_LIMIT_KEYS: Mapping[str, Parser] = {
    "requests_per_minute": count,
    "tokens_per_minute": count,
    "requests_per_day": count,
    "tokens_per_day": count,
}


_OVERRIDE_SCOPES = {
    "per_provider": "provider name",
    "per_model": "model name",
    "per_key": "key id",
    "per_user": "user",
}


def _overrides(ck: Checker, path: KeyPath, value: object, base: Limits) -> RateLimitOverrides:
    """
    C{overrides.per_*.<name>}: each holds any of the four limit keys; the
    ones left out are filled from C{base} here, so the limiter never merges.
    """
    given = fields(ck, path, value, _OVERRIDE_SCOPES)
    scopes: dict[str, dict[str, Limits]] = {}
    inherited = attrs.asdict(base)
    for scope, what in _OVERRIDE_SCOPES.items():
        scopes[scope] = {
            name: section(ck, entry, raw, Limits, _LIMIT_KEYS, **inherited)
            for name, entry, raw in named(ck, (*path, scope), (given or {}).get(scope, {}), what)
        }
    return RateLimitOverrides(**scopes)


def _provider_chars(ck: Checker, path: KeyPath, value: object) -> dict[str, float] | Invalid:
    result: dict[str, float] = {}
    for name, entry, raw in named(ck, path, value, "provider name"):
        parsed = positive_amount(ck, entry, raw)
        if not isinstance(parsed, Invalid):
            result[name] = parsed
    return result


_ESTIMATION_KEYS: Mapping[str, Parser] = {
    "chars_per_token": positive_amount,
    "provider_chars_per_token": _provider_chars,
    "bytes_per_token": positive_amount,
    "max_sample_bytes": count,
    "optimistic_first_request": boolean,
}


def _fraction(ck: Checker, path: KeyPath, value: object) -> float | Invalid:
    """
    A number in (0, 1].
    """
    number: float | Invalid = positive_amount(ck, path, value)
    if isinstance(number, Invalid) or number <= 1:
        return number
    return ck.fail(path, "expected a number > 0 and <= 1", value)


_REDIS_KEYS: Mapping[str, Parser] = {
    "url": redis_url,
    "timeout_ms": positive_count,
    "outage_after_failures": positive_count,
    "outage_limit_fraction": _fraction,
}


def _rate_limiting(ck: Checker, path: KeyPath, value: object) -> RateLimitConfig:
    # limits first: the overrides inherit from them.
    limits = Limits()
    if isinstance(value, Mapping) and "limits" in value:
        limits = section(ck, (*path, "limits"), value["limits"], Limits, _LIMIT_KEYS)
    parsers: dict[str, Parser] = {
        "enabled": boolean,
        "backend": choice("memory", "redis"),
        "redis": nested(RedisConfig, _REDIS_KEYS),
        "fail_mode": choice("open", "closed"),
        "sweep_interval_seconds": positive_amount,
        "max_tracked_scopes": positive_count,
        "limits": lambda ck, p, v: limits,
        "overrides": lambda ck, p, v: _overrides(ck, p, v, limits),
        "estimation": nested(Estimation, _ESTIMATION_KEYS),
    }
    return section(ck, path, value, RateLimitConfig, parsers)


def _transport(ck: Checker, path: KeyPath, value: object) -> FileTransport | Invalid:
    """
    One cost-record transport; C{file} (JSON Lines appended to C{file.path},
    relative to the working directory) is the only type.
    """
    given = fields(ck, path, value, ("type", "file"))
    if given is None:
        return INVALID
    if given.get("type", MISSING) != "file":
        return ck.fail((*path, "type"), "expected 'file'", given.get("type", MISSING))
    if "file" not in given:
        return ck.fail((*path, "file"), "expected a mapping with a path", MISSING)
    where = (*path, "file")
    file = fields(ck, where, given["file"], ("path",))
    if file is None:
        return INVALID
    target = string(ck, (*where, "path"), file.get("path", MISSING))
    return target if isinstance(target, Invalid) else FileTransport(path=target)


def _transports(ck: Checker, path: KeyPath, value: object) -> tuple[FileTransport, ...] | Invalid:
    if not isinstance(value, list):
        return ck.fail(path, "expected a list of transports", value)
    parsed = [_transport(ck, (*path, index), item) for index, item in enumerate(value)]
    return tuple(item for item in parsed if isinstance(item, FileTransport))


_COST_TRACKING_KEYS: Mapping[str, Parser] = {
    "enabled": boolean,
    "transports": _transports,
    "flush_interval_seconds": positive_amount,
    "queue_size": positive_count,
}


def _cost_tracking(ck: Checker, path: KeyPath, value: object) -> CostTrackingConfig:
    errors = len(ck.errors)
    config = section(ck, path, value, CostTrackingConfig, _COST_TRACKING_KEYS)
    if config.enabled and not config.transports and len(ck.errors) == errors:
        given = value.get("transports", MISSING) if isinstance(value, Mapping) else MISSING
        ck.fail(
            (*path, "transports"), "expected at least one transport when enabled is true", given
        )
    return config


def otel_installed() -> bool:
    """
    Whether the optional OpenTelemetry packages (C{llmproxy[otel]}) can be
    imported.
    """
    from llmproxy.tracing import otel_available

    return otel_available()


def _tracing_enabled(ck: Checker, path: KeyPath, value: object) -> bool | Invalid:
    enabled = boolean(ck, path, value)
    if enabled is True and not otel_installed():
        return ck.note(
            path,
            "tracing needs the OpenTelemetry packages, which are not installed: "
            "pip install 'llmproxy[otel]'",
        )
    return enabled


_FEATURES_KEYS: Mapping[str, Parser] = {
    "rate_limiting": _rate_limiting,
    "cost_tracking": _cost_tracking,
    "metrics": nested(MetricsConfig, {"enabled": boolean}),
    "tracing": nested(TracingConfig, {"enabled": _tracing_enabled}),
}

_TOP_KEYS: Mapping[str, Parser] = {
    "server": nested(ServerConfig, _SERVER_KEYS),
    "logging": nested(LoggingConfig, _LOGGING_KEYS),
    "providers": _providers,
    "features": nested(FeaturesConfig, _FEATURES_KEYS),
    # Validated once the rest is known (see validate()): its rules name
    # providers and inherit rate limits.
    "auth": lambda ck, path, value: INVALID,
}


def validate(data: object, locate: Locate) -> Config:
    """
    Validate a merged configuration mapping.

    @param locate: names the file that set a key, for each error message.
    @raise ConfigError: with every problem found.
    """
    ck = Checker(locate)
    config = section(ck, (), data, Config, _TOP_KEYS)
    if isinstance(data, Mapping) and "auth" in data:
        rates = config.features.rate_limiting
        auth = parse_auth(ck, ("auth",), data["auth"], config.providers, rates)
        config = attrs.evolve(config, auth=auth)
    per_provider = config.features.rate_limiting.overrides.per_provider
    for name in per_provider:
        if name not in config.providers:
            path = ("features", "rate_limiting", "overrides", "per_provider", name)
            ck.fail(path, "expected the name of a configured provider", name)
    if ck.errors:
        raise ConfigError(ck.errors)
    return config


def parse_config(data: Mapping[str, object], source: str) -> Config:
    """
    Validate an already merged configuration mapping (as YAML would load it).

    @param source: names the origin in every error message, in place of a
        file name (L{load_config} instead names the file that set each key).
    @raise ConfigError: with every problem found.
    """
    return validate(data, lambda path: source)
