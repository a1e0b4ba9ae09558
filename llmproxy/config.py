# -*- test-case-name: llmproxy.test.test_config -*-
"""
The configuration model: frozen attrs values built from YAML files.

Everything below L{Config} is a plain immutable value, so a reload swaps one
object and in-flight requests keep the one they started with.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, TypeVar, cast, get_args, get_type_hints
from urllib.parse import urlsplit

import attrs
import yaml
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
    """

    listen: tuple[str, ...] = ()
    max_body_bytes: int = 33554432
    drain_timeout_seconds: float = 600.0
    shutdown_grace_seconds: float = 0.0
    cors: CorsConfig = Factory(CorsConfig)
    forwarded_headers: bool = True


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
    @ivar timeout_ms: how long one limiter call may wait on Redis before
        C{fail_mode} decides.
    """

    url: str = "redis://127.0.0.1:6379/0"
    timeout_ms: int = 50


@frozen
class RateLimitConfig:
    enabled: bool = False
    backend: Literal["memory", "redis"] = "memory"
    redis: RedisConfig = Factory(RedisConfig)
    fail_mode: Literal["open", "closed"] = "open"
    sweep_interval_seconds: float = 30.0
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


def _default_providers() -> dict[str, ProviderConfig]:
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
    providers: Mapping[str, ProviderConfig] = Factory(_default_providers)
    features: FeaturesConfig = Factory(FeaturesConfig)


# ---------------------------------------------------------------------------
# Loading: YAML files, extends, ${VAR} expansion, deep merge, strict validation
# ---------------------------------------------------------------------------


class ConfigError(Exception):
    """
    The configuration is invalid; nothing was loaded.

    Each message names the file and the dotted key path it is about, in the
    form C{<file>: <key.path>: <what was expected>, got <value>}, so an
    operator can fix every problem in one pass rather than one per restart.

    @ivar errors: every problem found, in file order.
    """

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)


_Segment = str | int
"""A key (C{str}) or a list index (C{int}) in a path through the YAML tree."""

_Path = tuple[_Segment, ...]

_Locate = Callable[[_Path], str]
"""Names the file that set the value at a path, for error messages."""


class _Missing:
    """The value of a key that is absent: shown as C{nothing} in messages."""

    def __repr__(self) -> str:
        return "nothing"


_MISSING = _Missing()


class _Invalid:
    """Returned by a parser that has recorded an error for its value."""


_INVALID = _Invalid()


class _Expanded(str):
    """
    A string value that came out of a C{${VAR}} reference.

    Environment variables are always strings, so a numeric or boolean key
    accepts one of these when its text reads as a YAML number or boolean
    (C{requests_per_minute: ${RPM:-60}}); a literal string never does.
    """


def _segment(key: object) -> str:
    """
    The path segment for a mapping key: YAML allows non-string keys, which
    the validator rejects, so they are shown as their repr.
    """
    return key if isinstance(key, str) else repr(key)


def _dotted(path: _Path) -> str:
    """
    C{("features", "cost_tracking", "transports", 0, "type")} ->
    C{features.cost_tracking.transports[0].type}.
    """
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text or "(top level)"


def _show(value: object) -> str:
    """
    The value in an error message: its repr (C{'ten'}, C{True}, C{-1}), cut
    short so a whole mapping does not flood the terminal.
    """
    if isinstance(value, _Expanded):
        value = str(value)
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Checker:
    """
    Collects validation errors instead of stopping at the first one.
    """

    def __init__(self, locate: _Locate) -> None:
        self._locate = locate
        self.errors: list[str] = []

    def fail(self, path: _Path, expected: str, value: object) -> _Invalid:
        """
        Record that the value at C{path} is not what was expected.

        @return: L{_INVALID}, so a parser can C{return ck.fail(...)}.
        """
        return self.note(path, f"{expected}, got {_show(value)}")

    def note(self, path: _Path, message: str) -> _Invalid:
        """
        Record a problem with the key at C{path} that has no single value to
        show (an unknown key, a missing transport).
        """
        self.errors.append(f"{self._locate(path)}: {_dotted(path)}: {message}")
        return _INVALID


_Parser = Callable[[_Checker, _Path, object], Any]


def _scalar(value: object) -> object:
    """
    Read an expanded environment value as a YAML scalar (C{"60"} -> C{60},
    C{"true"} -> C{True}); any other value is returned unchanged.
    """
    if isinstance(value, _Expanded):
        try:
            loaded = yaml.safe_load(str(value))
        except yaml.YAMLError:
            return value
        if isinstance(loaded, bool | int | float):
            return loaded
    return value


def _bool(ck: _Checker, path: _Path, value: object) -> bool | _Invalid:
    value = _scalar(value)
    if isinstance(value, bool):
        return value
    return ck.fail(path, "expected true or false", value)


def _integer(minimum: int) -> _Parser:
    """
    A parser for an integer >= C{minimum}; booleans are not integers here,
    even though Python says they are.
    """
    expected = "expected an integer > 0" if minimum == 1 else f"expected an integer >= {minimum}"

    def parse(ck: _Checker, path: _Path, value: object) -> int | _Invalid:
        value = _scalar(value)
        if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
            return value
        return ck.fail(path, expected, value)

    return parse


def _number(positive: bool) -> _Parser:
    """
    A parser for a finite number that is > 0 (C{positive}) or >= 0; an
    integer is accepted and returned as a float.
    """
    expected = "expected a number > 0" if positive else "expected a number >= 0"

    def parse(ck: _Checker, path: _Path, value: object) -> float | _Invalid:
        value = _scalar(value)
        if (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and (value > 0 if positive else value >= 0)
        ):
            return float(value)
        return ck.fail(path, expected, value)

    return parse


_count = _integer(0)
_positive_count = _integer(1)
_amount = _number(positive=False)
_positive_amount = _number(positive=True)


def _string(ck: _Checker, path: _Path, value: object) -> str | _Invalid:
    if isinstance(value, str) and value:
        return str(value)
    return ck.fail(path, "expected a non-empty string", value)


def _string_list(ck: _Checker, path: _Path, value: object) -> tuple[str, ...] | _Invalid:
    if not isinstance(value, list):
        return ck.fail(path, "expected a list of non-empty strings", value)
    items = [_string(ck, (*path, index), item) for index, item in enumerate(value)]
    if any(isinstance(item, _Invalid) for item in items):
        return _INVALID
    return tuple(str(item) for item in items)


def _choice(*choices: str) -> _Parser:
    expected = "expected one of " + ", ".join(repr(choice) for choice in choices)

    def parse(ck: _Checker, path: _Path, value: object) -> str | _Invalid:
        if isinstance(value, str) and value in choices:
            return str(value)
        return ck.fail(path, expected, value)

    return parse


def _fields(
    ck: _Checker, path: _Path, value: object, allowed: Iterable[str]
) -> dict[str, object] | None:
    """
    Check that C{value} is a mapping whose keys are all in C{allowed}.

    @return: the known keys and their values, or L{None} if C{value} is not a
        mapping at all.  Unknown keys are reported and left out.
    """
    if not isinstance(value, Mapping):
        ck.fail(path, "expected a mapping", value)
        return None
    known = list(allowed)
    result: dict[str, object] = {}
    for key, item in value.items():
        if isinstance(key, str) and key in known:
            result[key] = item
            continue
        hint = ""
        if isinstance(key, str):
            close = difflib.get_close_matches(key, known, n=1)
            if close:
                hint = f" (did you mean {close[0]!r}?)"
        ck.note((*path, _segment(key)), f"unknown key{hint}, expected one of {', '.join(known)}")
    return result


_T = TypeVar("_T")


def _section(
    ck: _Checker,
    path: _Path,
    value: object,
    cls: Callable[..., _T],
    parsers: Mapping[str, _Parser],
    **fixed: Any,
) -> _T:
    """
    Build an attrs value from a mapping, one parser per key.

    Keys the mapping leaves out (or whose values are invalid) take the
    class's defaults, or the values in C{fixed}; an invalid value has been
    reported already, so the result only matters when there were no errors.
    """
    kwargs: dict[str, Any] = dict(fixed)
    given = _fields(ck, path, value, parsers)
    for key, item in (given or {}).items():
        parsed = parsers[key](ck, (*path, key), item)
        if not isinstance(parsed, _Invalid):
            kwargs[key] = parsed
    return cls(**kwargs)


def _named(ck: _Checker, path: _Path, value: object, what: str) -> list[tuple[str, _Path, object]]:
    """
    The entries of a mapping keyed by non-empty string names (models, users,
    scopes), each with its path.
    """
    if not isinstance(value, Mapping):
        ck.fail(path, f"expected a mapping of {what} to settings", value)
        return []
    entries = []
    for key, item in value.items():
        entry = (*path, _segment(key))
        if isinstance(key, str) and key:
            entries.append((key, entry, item))
        else:
            ck.fail(entry, f"expected a non-empty string as the {what}", key)
    return entries


# -- URLs ------------------------------------------------------------------


def _base_url(ck: _Checker, path: _Path, value: object) -> str | _Invalid:
    """
    An upstream base URL: http or https, a host, an optional port and an
    optional path prefix, returned without a trailing slash (the forwarded
    path always starts with one).
    """
    expected = "expected an http(s) URL: scheme, host, optional port and path prefix"
    if not isinstance(value, str):
        return ck.fail(path, expected, value)
    problem = _url_problem(value, ("http", "https"))
    if problem is None:
        parts = urlsplit(value)
        if parts.username is not None or "@" in parts.netloc:
            problem = "credentials do not belong in base_url"
        else:
            path_part = parts.path.rstrip("/")
            return f"{parts.scheme.lower()}://{parts.netloc}{path_part}"
    return ck.fail(path, f"{expected} ({problem})", value)


def _redis_url(ck: _Checker, path: _Path, value: object) -> str | _Invalid:
    expected = "expected a redis:// or rediss:// URL with a host"
    if not isinstance(value, str):
        return ck.fail(path, expected, value)
    problem = _url_problem(value, ("redis", "rediss"))
    if problem is None:
        db = urlsplit(value).path
        if db not in ("", "/") and not re.fullmatch(r"/[0-9]+", db):
            problem = "the path may only be a database number"
    if problem is not None:
        return ck.fail(path, f"{expected} ({problem})", value)
    return str(value)


def _url_problem(value: str, schemes: tuple[str, ...]) -> str | None:
    """
    What is wrong with C{value} as an absolute URL with one of C{schemes}, a
    host and no query or fragment, or L{None}.
    """
    if not value or any(char.isspace() for char in value):
        return "empty or contains whitespace"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as error:
        return str(error)
    if parts.scheme.lower() not in schemes:
        return "scheme must be " + " or ".join(schemes)
    if not parts.hostname:
        return "no host"
    if "?" in value or "#" in value:
        return "no query or fragment allowed"
    return None


# -- server, logging ---------------------------------------------------------


def _listen(ck: _Checker, path: _Path, value: object) -> tuple[str, ...] | _Invalid:
    """
    Endpoint descriptions; the plugin parses them when it listens, so here
    they only have to be non-empty strings.
    """
    if isinstance(value, str):
        return ck.fail(path, "expected a list of endpoint descriptions (e.g. ['tcp:9002'])", value)
    return _string_list(ck, path, value)


def _cors(ck: _Checker, path: _Path, value: object) -> CorsConfig:
    return _section(ck, path, value, CorsConfig, {"allow_origins": _string_list})


_SERVER_KEYS: Mapping[str, _Parser] = {
    "listen": _listen,
    "max_body_bytes": _positive_count,
    "drain_timeout_seconds": _amount,
    "shutdown_grace_seconds": _amount,
    "cors": _cors,
    "forwarded_headers": _bool,
}

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")

_LOGGING_KEYS: Mapping[str, _Parser] = {
    "format": _choice(*LOG_FORMATS),
    "level": _choice(*LOG_LEVELS),
}


# -- providers and pricing ---------------------------------------------------

_PROVIDER_NAME = re.compile(r"[a-z0-9_-]+")
RESERVED_PROVIDER_NAMES = ("health", "metrics", "meta")
"""Top-level paths the proxy answers itself, so no provider may be mounted there."""

_TIMEOUT_KEYS: Mapping[str, _Parser] = {
    "connect_seconds": _positive_amount,
    "first_byte_seconds": _positive_amount,
    "idle_seconds": _positive_amount,
    "total_seconds": _amount,
}

_PRICE_KEYS = ("input", "output", "cache_read", "cache_write", "reasoning")


def _price(ck: _Checker, path: _Path, given: Mapping[str, object]) -> Price | None:
    """
    A L{Price} from the price keys of C{given}: C{input} and C{output} are
    required; C{cache_read} and C{cache_write} default to C{input} (a
    provider without a cache discount), C{reasoning} to C{output}.
    """
    prices: dict[str, float] = {}
    for key in _PRICE_KEYS:
        if key in given:
            parsed = _amount(ck, (*path, key), given[key])
            if not isinstance(parsed, _Invalid):
                prices[key] = parsed
        elif key in ("input", "output"):
            ck.fail((*path, key), "expected a price in USD per 1M tokens", _MISSING)
    if "input" not in prices or "output" not in prices:
        return None
    return Price(
        input=prices["input"],
        output=prices["output"],
        cache_read=prices.get("cache_read", prices["input"]),
        cache_write=prices.get("cache_write", prices["input"]),
        reasoning=prices.get("reasoning", prices["output"]),
    )


def _tiers(ck: _Checker, path: _Path, value: list[object]) -> tuple[PriceTier, ...] | None:
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
        given = _fields(ck, entry, raw, ("threshold", *_PRICE_KEYS))
        if given is None:
            ok = False
            continue
        threshold: int | _Invalid = _INVALID
        if "threshold" in given:
            threshold = _count(ck, (*entry, "threshold"), given["threshold"])
        else:
            ck.fail(
                (*entry, "threshold"), "expected the tier's largest input token count", _MISSING
            )
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
    ck: _Checker, path: _Path, value: object, aliases: tuple[str, ...] | None
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
    given = _fields(ck, path, value, keys)
    if given is None:
        return None
    price = _price(ck, path, given)
    overrides: dict[str, ModelPricing] = {}
    if "overrides" in given and aliases is not None:
        where = (*path, "overrides")
        for alias, entry, raw in _named(ck, where, given["overrides"], "alias"):
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


def _models(ck: _Checker, path: _Path, value: object) -> dict[str, ModelConfig]:
    """
    C{models}: model name -> aliases and pricing.  A name or alias may
    appear once per provider, so a response's model selects one price.
    """
    models: dict[str, ModelConfig] = {}
    owners: dict[str, str] = {}
    entries = _named(ck, path, value, "model name")
    for name, _entry, _raw in entries:
        owners[name] = name
    for name, entry, raw in entries:
        given = _fields(ck, entry, raw, ("aliases", "pricing"))
        if given is None:
            continue
        aliases: tuple[str, ...] = ()
        if "aliases" in given:
            parsed = _string_list(ck, (*entry, "aliases"), given["aliases"])
            if not isinstance(parsed, _Invalid):
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


def _timeouts(ck: _Checker, path: _Path, value: object) -> Timeouts:
    return _section(ck, path, value, Timeouts, _TIMEOUT_KEYS)


_PROVIDER_KEYS: Mapping[str, _Parser] = {
    "enabled": _bool,
    "kind": _choice(*PROVIDER_KINDS),
    "base_url": _base_url,
    "timeouts": _timeouts,
    "models": _models,
    "inject_stream_usage": _bool,
}


def _provider(ck: _Checker, path: _Path, name: str, value: object) -> ProviderConfig:
    """
    One provider.  A built-in name (C{openai}, C{anthropic}, C{gemini})
    defaults its C{kind} to the name and its C{base_url} to the public API;
    any other name must give both.
    """
    fixed: dict[str, Any] = {"name": name, "kind": "openai", "base_url": "http://invalid"}
    if name in PUBLIC_BASE_URLS:
        fixed.update(kind=name, base_url=PUBLIC_BASE_URLS[name])
    elif isinstance(value, Mapping):
        if "kind" not in value:
            ck.fail(
                (*path, "kind"),
                "expected one of "
                + ", ".join(repr(kind) for kind in PROVIDER_KINDS)
                + " (required for a provider that is not built in)",
                _MISSING,
            )
        if "base_url" not in value:
            ck.fail(
                (*path, "base_url"),
                "expected an http(s) URL (required for a provider that is not built in)",
                _MISSING,
            )
    return _section(ck, path, value, ProviderConfig, _PROVIDER_KEYS, **fixed)


def _providers(ck: _Checker, path: _Path, value: object) -> dict[str, ProviderConfig]:
    """
    C{providers}: the three built-in providers always exist (at their public
    URLs unless configured otherwise; C{enabled: false} turns one off); any
    other name adds a provider mounted at C{/<name>/}.
    """
    providers = _default_providers()
    if not isinstance(value, Mapping):
        ck.fail(path, "expected a mapping of provider names to providers", value)
        return providers
    for name, raw in value.items():
        entry = (*path, _segment(name))
        if not isinstance(name, str) or not _PROVIDER_NAME.fullmatch(name):
            ck.fail(entry, "expected a provider name made of a-z, 0-9, '_' and '-'", name)
        elif name in RESERVED_PROVIDER_NAMES:
            ck.fail(entry, "expected a provider name other than health, metrics and meta", name)
        else:
            providers[name] = _provider(ck, entry, name, raw)
    return providers


# -- features ------------------------------------------------------------------

_LIMIT_KEYS: Mapping[str, _Parser] = {
    "requests_per_minute": _count,
    "tokens_per_minute": _count,
    "requests_per_day": _count,
    "tokens_per_day": _count,
}


def _limits(ck: _Checker, path: _Path, value: object) -> Limits:
    return _section(ck, path, value, Limits, _LIMIT_KEYS)


_OVERRIDE_SCOPES = {
    "per_provider": "provider name",
    "per_model": "model name",
    "per_key": "key id",
    "per_user": "user",
}


def _overrides(ck: _Checker, path: _Path, value: object, base: Limits) -> RateLimitOverrides:
    """
    C{overrides.per_*.<name>}: each holds any of the four limit keys; the
    ones left out are filled from C{base} here, so the limiter never merges.
    """
    given = _fields(ck, path, value, _OVERRIDE_SCOPES)
    scopes: dict[str, dict[str, Limits]] = {}
    inherited = attrs.asdict(base)
    for scope, what in _OVERRIDE_SCOPES.items():
        scopes[scope] = {
            name: _section(ck, entry, raw, Limits, _LIMIT_KEYS, **inherited)
            for name, entry, raw in _named(ck, (*path, scope), (given or {}).get(scope, {}), what)
        }
    return RateLimitOverrides(**scopes)


def _provider_chars(ck: _Checker, path: _Path, value: object) -> dict[str, float] | _Invalid:
    result: dict[str, float] = {}
    for name, entry, raw in _named(ck, path, value, "provider name"):
        parsed = _positive_amount(ck, entry, raw)
        if not isinstance(parsed, _Invalid):
            result[name] = parsed
    return result


_ESTIMATION_KEYS: Mapping[str, _Parser] = {
    "chars_per_token": _positive_amount,
    "provider_chars_per_token": _provider_chars,
    "bytes_per_token": _positive_amount,
    "max_sample_bytes": _count,
    "optimistic_first_request": _bool,
}

_REDIS_KEYS: Mapping[str, _Parser] = {
    "url": _redis_url,
    "timeout_ms": _positive_count,
}


def _rate_limiting(ck: _Checker, path: _Path, value: object) -> RateLimitConfig:
    # limits first: the overrides inherit from them.
    limits = Limits()
    if isinstance(value, Mapping) and "limits" in value:
        limits = _limits(ck, (*path, "limits"), value["limits"])
    parsers: dict[str, _Parser] = {
        "enabled": _bool,
        "backend": _choice("memory", "redis"),
        "redis": lambda ck, p, v: _section(ck, p, v, RedisConfig, _REDIS_KEYS),
        "fail_mode": _choice("open", "closed"),
        "sweep_interval_seconds": _positive_amount,
        "limits": lambda ck, p, v: limits,
        "overrides": lambda ck, p, v: _overrides(ck, p, v, limits),
        "estimation": lambda ck, p, v: _section(ck, p, v, Estimation, _ESTIMATION_KEYS),
    }
    return _section(ck, path, value, RateLimitConfig, parsers)


def _transport(ck: _Checker, path: _Path, value: object) -> FileTransport | _Invalid:
    """
    One cost-record transport; C{file} (JSON Lines appended to C{file.path},
    relative to the working directory) is the only type.
    """
    given = _fields(ck, path, value, ("type", "file"))
    if given is None:
        return _INVALID
    if given.get("type", _MISSING) != "file":
        return ck.fail((*path, "type"), "expected 'file'", given.get("type", _MISSING))
    if "file" not in given:
        return ck.fail((*path, "file"), "expected a mapping with a path", _MISSING)
    where = (*path, "file")
    file = _fields(ck, where, given["file"], ("path",))
    if file is None:
        return _INVALID
    target = _string(ck, (*where, "path"), file.get("path", _MISSING))
    return target if isinstance(target, _Invalid) else FileTransport(path=target)


def _transports(ck: _Checker, path: _Path, value: object) -> tuple[FileTransport, ...] | _Invalid:
    if not isinstance(value, list):
        return ck.fail(path, "expected a list of transports", value)
    parsed = [_transport(ck, (*path, index), item) for index, item in enumerate(value)]
    return tuple(item for item in parsed if isinstance(item, FileTransport))


_COST_TRACKING_KEYS: Mapping[str, _Parser] = {
    "enabled": _bool,
    "transports": _transports,
    "flush_interval_seconds": _positive_amount,
    "queue_size": _positive_count,
}


def _cost_tracking(ck: _Checker, path: _Path, value: object) -> CostTrackingConfig:
    errors = len(ck.errors)
    config = _section(ck, path, value, CostTrackingConfig, _COST_TRACKING_KEYS)
    if config.enabled and not config.transports and len(ck.errors) == errors:
        given = value.get("transports", _MISSING) if isinstance(value, Mapping) else _MISSING
        ck.fail(
            (*path, "transports"), "expected at least one transport when enabled is true", given
        )
    return config


_FEATURES_KEYS: Mapping[str, _Parser] = {
    "rate_limiting": _rate_limiting,
    "cost_tracking": _cost_tracking,
    "metrics": lambda ck, p, v: _section(ck, p, v, MetricsConfig, {"enabled": _bool}),
}

_TOP_KEYS: Mapping[str, _Parser] = {
    "server": lambda ck, p, v: _section(ck, p, v, ServerConfig, _SERVER_KEYS),
    "logging": lambda ck, p, v: _section(ck, p, v, LoggingConfig, _LOGGING_KEYS),
    "providers": _providers,
    "features": lambda ck, p, v: _section(ck, p, v, FeaturesConfig, _FEATURES_KEYS),
}


def _validate(data: object, locate: _Locate) -> Config:
    ck = _Checker(locate)
    config = _section(ck, (), data, Config, _TOP_KEYS)
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
    return _validate(data, lambda path: source)


# -- files -----------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """
    PyYAML's safe loader, except that a key given twice in one mapping is an
    error (PyYAML silently keeps the last, hiding a typo'd override).
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # unhashable: the base class reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep)


_REFERENCE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")


def _expand(
    value: object, path: _Path, source: str, environ: Mapping[str, str], errors: list[str]
) -> object:
    """
    Expand C{${VAR}} and C{${VAR:-default}} in every string value (not in
    keys).  As in the shell, the default applies when C{VAR} is unset or
    empty; C{$${} writes a literal C{${}.
    """
    if isinstance(value, dict):
        return {
            key: _expand(item, (*path, _segment(key)), source, environ, errors)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [
            _expand(item, (*path, index), source, environ, errors)
            for index, item in enumerate(value)
        ]
    if not isinstance(value, str) or _REFERENCE.search(value) is None:
        return value
    problems: list[str] = []

    def substitute(match: re.Match[str]) -> str:
        text = match.group(0)
        if text == "$${":
            return "${"
        name, default = match.group(1), match.group(2)
        if name is None:
            problems.append("expected ${NAME} or ${NAME:-default} after '${'")
            return text
        found = environ.get(name, "")
        if found:
            return found
        if default is not None:
            return default
        if name in environ:
            return ""
        problems.append(f"expected environment variable {name} to be set (or ${{{name}:-default}})")
        return text

    expanded = _REFERENCE.sub(substitute, value)
    for problem in problems:
        errors.append(f"{source}: {_dotted(path)}: {problem}, got {_show(value)}")
    return _Expanded(expanded)


def _read_yaml(source: str, errors: list[str]) -> dict[str, object] | None:
    """
    Parse one file; problems are appended to C{errors}.

    @return: its mapping (an empty file is an empty mapping), or L{None}.
    """
    try:
        with open(source, "rb") as stream:
            data = yaml.load(stream, Loader=_Loader)  # a SafeLoader subclass
    except OSError as error:
        errors.append(f"{source}: cannot read the file: {error.strerror or error}")
        return None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = error.problem or error.context or "syntax error"
        errors.append(f"{source}: {where}invalid YAML: {problem}")
        return None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        errors.append(f"{source}: invalid YAML: {error}")
        return None
    if data is None:
        return {}
    if not isinstance(data, dict):
        errors.append(f"{source}: (top level): expected a mapping, got {_show(data)}")
        return None
    return data


def _load_file(
    source: str,
    environ: Mapping[str, str],
    layers: list[tuple[str, dict[str, object]]],
    errors: list[str],
    chain: tuple[tuple[str, str], ...],
) -> None:
    """
    Append C{source}'s layers to C{layers} in merge order: what it extends
    first (recursively), then the file itself.

    @param chain: (real path, name) of the files whose C{extends} led here,
        outermost first, to detect cycles.
    """
    real = os.path.realpath(source)
    data = _read_yaml(source, errors)
    if data is None:
        return
    data = cast(dict[str, object], _expand(data, (), source, environ, errors))
    if "extends" in data:
        target = data.pop("extends")
        if not isinstance(target, str) or not target:
            errors.append(
                f"{source}: extends: expected the path of a YAML file, got {_show(target)}"
            )
        else:
            parent = os.path.normpath(os.path.join(os.path.dirname(source), str(target)))
            here = (*chain, (real, source))
            cycle = [name for path, name in here if path == os.path.realpath(parent)]
            if cycle:
                names = " -> ".join([name for _, name in here] + [parent])
                errors.append(
                    f"{source}: extends: expected a file not already in the extends chain "
                    f"(cycle {names}), got {_show(target)}"
                )
            elif not os.path.isfile(parent):
                errors.append(
                    f"{source}: extends: expected the path of a YAML file, relative to this "
                    f"one, got {_show(target)} ({parent} does not exist)"
                )
            else:
                _load_file(parent, environ, layers, errors, here)
    layers.append((source, data))


def _merge(base: object, overlay: object) -> object:
    """
    Deep merge: mappings merge key by key; anything else (scalars, lists)
    in C{overlay} replaces what C{base} had.
    """
    if isinstance(base, dict) and isinstance(overlay, dict):
        merged = dict(base)
        for key, value in overlay.items():
            merged[key] = _merge(base[key], value) if key in base else value
        return merged
    return overlay


def _paths(value: object, prefix: _Path = ()) -> Iterator[_Path]:
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, _segment(key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


def _locator(layers: Sequence[tuple[str, dict[str, object]]]) -> _Locate:
    """
    Name the file responsible for a path of the merged tree: the last file
    (in merge order) that contains the path, or its nearest parent.
    """
    sets = [(source, set(_paths(data))) for source, data in layers]

    def locate(path: _Path) -> str:
        for length in range(len(path), -1, -1):
            for source, paths in reversed(sets):
                if path[:length] in paths:
                    return source
        return layers[-1][0]

    return locate


def load_config(paths: Sequence[str], environ: Mapping[str, str]) -> Config:
    """
    Load, merge and validate configuration files.

    Each file may name another with C{extends} (relative to itself), which is
    loaded first; later files, and files over the ones they extend, are
    deep-merged over earlier ones.  C{${VAR}} references are expanded from
    C{environ} in every string value before merging.  Error messages name the
    file that set the offending key.

    @param paths: the files, in order; none means the built-in defaults.
    @param environ: the environment for C{${VAR}} (normally C{os.environ}).
    @raise ConfigError: with every problem found; nothing is half-loaded.
    """
    if not paths:
        return Config()
    errors: list[str] = []
    layers: list[tuple[str, dict[str, object]]] = []
    for path in paths:
        _load_file(path, environ, layers, errors, ())
    if errors:
        raise ConfigError(errors)
    merged: object = {}
    for _source, data in layers:
        merged = _merge(merged, data)
    return _validate(merged, _locator(layers))


# ---------------------------------------------------------------------------
# Reference: every key, its default and its meaning (README, check-config)
# ---------------------------------------------------------------------------

_P = "providers.<name>"
_M = f"{_P}.models.<model>"
_RL = "features.rate_limiting"
_CT = "features.cost_tracking"

_REFERENCE_ROWS: tuple[tuple[str, str | None, str], ...] = (
    # (key, default or None to read it from the model, meaning)
    (
        "extends",
        "(none)",
        "Path of a file to load first, relative to this file; this file merges over it",
    ),
    (
        "server.listen",
        None,
        "Endpoint descriptions (`tcp:9002:interface=127.0.0.1`, `ssl:...`, `unix:...`, "
        "`systemd:domain=INET:index=0`); empty: `--listen`, else `tcp:$PORT`, else `tcp:9002`",
    ),
    ("server.max_body_bytes", None, "Largest request body accepted; a larger one gets 413"),
    (
        "server.drain_timeout_seconds",
        None,
        "On SIGTERM, how long in-flight requests and streams may still run",
    ),
    (
        "server.shutdown_grace_seconds",
        None,
        "On SIGTERM, how long listeners stay open while `/health` answers 503",
    ),
    ("server.cors.allow_origins", None, "Origins allowed by CORS (`*` = any)"),
    (
        "server.forwarded_headers",
        None,
        "Append `X-Forwarded-For` and set `X-Forwarded-Proto` on forwarded requests",
    ),
    ("logging.format", None, "`text` or `json` (one JSON object per line)"),
    ("logging.level", None, "`debug`, `info`, `warn`, `error` or `critical`"),
    (f"{_P}.enabled", None, "Mount the provider at `/<name>/`; `false` answers 404 there"),
    (
        f"{_P}.kind",
        "(the name)",
        "Wire format: `openai`, `anthropic` or `gemini`; required for a name that is not built in",
    ),
    (
        f"{_P}.base_url",
        "(public API)",
        "Upstream scheme, host, optional port and path prefix; required for a name not built in",
    ),
    (
        f"{_P}.inject_stream_usage",
        None,
        "Ask OpenAI-format streams for usage and hide the added usage chunk from the client",
    ),
    (f"{_P}.timeouts.connect_seconds", None, "Connecting to the upstream"),
    (f"{_P}.timeouts.first_byte_seconds", None, "Until the upstream's response headers (else 504)"),
    (f"{_P}.timeouts.idle_seconds", None, "Between two chunks of the response body"),
    (f"{_P}.timeouts.total_seconds", None, "Whole request; `0` = no limit"),
    (f"{_M}.aliases", "[]", "Other names of the model (dated snapshots) priced like it"),
    (
        f"{_M}.pricing",
        "(unpriced)",
        "A price mapping (keys below) or a list of tiers; USD per 1M tokens",
    ),
    (f"{_M}.pricing.input", "(required)", "Price of uncached input tokens"),
    (f"{_M}.pricing.output", "(required)", "Price of output tokens that are not reasoning"),
    (f"{_M}.pricing.cache_read", "(= input)", "Price of input tokens read from the cache"),
    (f"{_M}.pricing.cache_write", "(= input)", "Price of input tokens written to the cache"),
    (f"{_M}.pricing.reasoning", "(= output)", "Price of reasoning (thinking) output tokens"),
    (
        f"{_M}.pricing.overrides.<alias>",
        "{}",
        "Price keys (or tiers) for responses naming that alias (one of `aliases`)",
    ),
    (
        f"{_M}.pricing[].threshold",
        "(required)",
        "Tier list: a tier applies while input tokens <= threshold; `0` = catch-all; "
        "each tier also holds the price keys",
    ),
    (f"{_RL}.enabled", None, "Enforce the limits below"),
    (f"{_RL}.backend", None, "`memory` (one process) or `redis` (shared by every instance)"),
    (f"{_RL}.redis.url", None, "`redis://[:password@]host:port/db` or `rediss://...`"),
    (
        f"{_RL}.redis.timeout_ms",
        None,
        "How long a limiter call may wait for Redis before `fail_mode`",
    ),
    (
        f"{_RL}.fail_mode",
        None,
        "When the backend is unreachable: `open` admits requests, `closed` refuses them",
    ),
    (f"{_RL}.sweep_interval_seconds", None, "How often the memory backend drops idle scopes"),
    (f"{_RL}.limits.requests_per_minute", None, "Per scope; `0` = unlimited"),
    (f"{_RL}.limits.tokens_per_minute", None, "Per scope; `0` = unlimited"),
    (f"{_RL}.limits.requests_per_day", None, "Per scope; `0` = unlimited"),
    (f"{_RL}.limits.tokens_per_day", None, "Per scope; `0` = unlimited"),
    (
        f"{_RL}.overrides.per_provider.<name>.<limit>",
        "(from limits)",
        "Any of the four limit keys for one provider; a key left out inherits `limits`",
    ),
    (
        f"{_RL}.overrides.per_model.<model>.<limit>",
        "(from limits)",
        "The same for one model",
    ),
    (
        f"{_RL}.overrides.per_key.<key_id>.<limit>",
        "(from limits)",
        "The same for one client key (its hash id)",
    ),
    (f"{_RL}.overrides.per_user.<user>.<limit>", "(from limits)", "The same for one user"),
    (f"{_RL}.estimation.chars_per_token", None, "Characters of prompt text per estimated token"),
    (
        f"{_RL}.estimation.provider_chars_per_token",
        None,
        "Provider name to characters per token, replacing `chars_per_token` for that provider",
    ),
    (f"{_RL}.estimation.bytes_per_token", None, "Body bytes per token when no text is sampled"),
    (
        f"{_RL}.estimation.max_sample_bytes",
        None,
        "Largest JSON body whose text is read for the estimate",
    ),
    (
        f"{_RL}.estimation.optimistic_first_request",
        None,
        "Admit a request whose estimate alone exceeds a token limit while its scope is unused",
    ),
    (f"{_CT}.enabled", None, "Write one cost record per forwarded request"),
    (f"{_CT}.transports[].type", "(required)", "`file` (the only type)"),
    (
        f"{_CT}.transports[].file.path",
        "(required)",
        "JSON Lines file the records are appended to (relative to the working directory)",
    ),
    (f"{_CT}.flush_interval_seconds", None, "How often buffered records are written"),
    (
        f"{_CT}.queue_size",
        None,
        "Records held while a sink fails before new ones are dropped (and counted)",
    ),
    ("features.metrics.enabled", None, "Serve Prometheus metrics at `/metrics`"),
)


def _yaml_text(value: object) -> str:
    """
    A default as it would be written in YAML: C{true}, C{600}, C{["*"]}.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, tuple | list):
        return "[" + ", ".join(f'"{item}"' for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{key}: {_yaml_text(item)}" for key, item in value.items()) + "}"
    return str(value)


def _model_default(key: str) -> str:
    """
    The default of a dotted key, read from the attrs model: C{<...>}
    segments step into a mapping's value type, other segments name fields.
    """
    cls: Any = Config
    parts = key.split(".")
    for index, part in enumerate(parts):
        if part.startswith("<"):
            cls = get_args(cls)[1]
            continue
        field = attrs.fields_dict(cls)[part]
        if index == len(parts) - 1:
            default: object = field.default
            factory = getattr(default, "factory", None)  # an attrs Factory
            if callable(factory):
                default = factory()
            return _yaml_text(default)
        cls = get_type_hints(cls)[part]
    raise KeyError(key)


def reference_keys() -> list[tuple[str, str, str]]:
    """
    Every configuration key: C{(dotted key, default, meaning)}.

    Keys use C{<name>}-style placeholders for names the operator chooses and
    C{[]} for list items.  Defaults come from the attrs model where it holds
    them; a default in parentheses is prose (C{(required)}, C{(= input)}).
    """
    return [
        (key, _model_default(key) if default is None else default, meaning)
        for key, default, meaning in _REFERENCE_ROWS
    ]


def render_reference_table() -> str:
    """
    The Markdown table of L{reference_keys} that README.md's configuration
    reference holds verbatim (a test keeps the two equal).
    """
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, meaning in reference_keys():
        shown = default[1:-1] if default.startswith("(") else f"`{default}`"
        lines.append(f"| `{key}` | {shown} | {meaning} |")
    return "\n".join(lines) + "\n"
