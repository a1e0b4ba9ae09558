# -*- test-case-name: llmproxy.test.test_config_auth -*-
"""
The C{auth} section: proxy keys, the provider credentials swapped in for
them, budgets and budget alerts.

It is validated after the rest of the configuration, because its rules
span sections: a key's C{providers} and the C{credentials} must name
configured providers, and a key's C{limits} inherit
C{features.rate_limiting.limits} the way a C{per_key} override does.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from urllib.parse import urlsplit

import attrs

from llmproxy.config.checks import (
    INVALID,
    MISSING,
    Checker,
    Invalid,
    Parser,
    amount,
    choice,
    count,
    named,
    nested,
    positive_count,
    section,
    string,
    string_list,
)
from llmproxy.config.errors import KeyPath
from llmproxy.config.model import (
    AlertsConfig,
    AuthBudgets,
    AuthConfig,
    Budget,
    Limits,
    ProviderConfig,
    ProxyKey,
    RateLimitConfig,
)

AUTH_MODES = ("passthrough", "keys", "mixed")

KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""
A key id: it appears in headers, metric labels, Redis key names and log
lines, so it is kept to a short run of safe characters.
"""

_HASH = re.compile(r"sha256:([0-9a-fA-F]{64})")

_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
"""An HTTP field name (RFC 9110 token)."""

_NOT_CREDENTIAL_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "te", "upgrade", "keep-alive"}
)
"""Headers the proxy sets itself, which a credential may not replace."""

_LIMIT_KEYS = ("requests_per_minute", "tokens_per_minute", "requests_per_day", "tokens_per_day")


def glob_problem(pattern: str) -> str | None:
    """
    What is wrong with a model glob, or L{None}. Patterns use C{*} (any
    run of characters), C{?} (one character) and C{[...]} (one of a set,
    C{[!...]} for none of it); a C{[} that never closes is refused, since it
    would silently match itself only.
    """
    if not pattern or pattern != pattern.strip():
        return "empty or with surrounding whitespace"
    index = 0
    while index < len(pattern):
        if pattern[index] == "[":
            end = index + 1
            if end < len(pattern) and pattern[end] == "!":
                end += 1
            if end < len(pattern) and pattern[end] == "]":
                end += 1
            end = pattern.find("]", end)
            if end < 0:
                return "a '[' without its closing ']'"
            index = end
        index += 1
    return None


def _globs(ck: Checker, path: KeyPath, value: object) -> tuple[str, ...] | Invalid:
    patterns = string_list(ck, path, value)
    if isinstance(patterns, Invalid):
        return patterns
    for index, pattern in enumerate(patterns):
        problem = glob_problem(pattern)
        if problem is not None:
            ck.fail((*path, index), f"expected a model glob ({problem})", pattern)
    return patterns


def _fractions(ck: Checker, path: KeyPath, value: object) -> tuple[float, ...] | Invalid:
    """
    C{alert_at}: fractions of a budget, each > 0 and <= 1, kept ascending
    and once each.
    """
    if not isinstance(value, list):
        return ck.fail(path, "expected a list of fractions (e.g. [0.8, 1.0])", value)
    found: set[float] = set()
    ok = True
    for index, item in enumerate(value):
        parsed = amount(ck, (*path, index), item)
        if isinstance(parsed, Invalid):
            ok = False
        elif not 0 < parsed <= 1:
            ck.fail((*path, index), "expected a fraction > 0 and <= 1", item)
            ok = False
        else:
            found.add(parsed)
    return tuple(sorted(found)) if ok else INVALID


def _optional_usd(ck: Checker, path: KeyPath, value: object) -> float | Invalid | None:
    if value is None:
        return None
    parsed: float | Invalid = amount(ck, path, value)
    return parsed


_BUDGET_KEYS: Mapping[str, Parser] = {
    "daily_usd": _optional_usd,
    "monthly_usd": _optional_usd,
    "reserve_output_tokens": positive_count,
    "unpriced": choice("deny", "allow"),
    "alert_at": _fractions,
}

budget = nested(Budget, _BUDGET_KEYS)
"""A C{budget} mapping: the caps and how they are kept."""


def _key_hash(ck: Checker, path: KeyPath, value: object) -> bytes | Invalid:
    match = _HASH.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return ck.fail(
            path,
            "expected 'sha256:' and 64 hex digits (python -m llmproxy new-key prints it)",
            value,
        )
    return bytes.fromhex(match.group(1))


def _key_id(ck: Checker, path: KeyPath, value: object) -> str | Invalid:
    if isinstance(value, str) and KEY_ID.fullmatch(value):
        return value
    return ck.fail(path, "expected a key id of up to 64 letters, digits, '.', '_' and '-'", value)


def parse_time(value: object) -> float | None:
    """
    POSIX seconds from a YAML timestamp, a date (its midnight) or an ISO
    8601 string; a time without a zone is UTC, as YAML has it. L{None} when
    C{value} is none of these.
    """
    if isinstance(value, str):
        text = value.strip()
        try:
            value = datetime.datetime.fromisoformat(text)
        except ValueError:
            try:
                value = datetime.date.fromisoformat(text)
            except ValueError:
                return None
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.UTC)
        return value.timestamp()
    if isinstance(value, datetime.date):
        return datetime.datetime(
            value.year, value.month, value.day, tzinfo=datetime.UTC
        ).timestamp()
    return None


def _expires_at(ck: Checker, path: KeyPath, value: object) -> float | Invalid:
    parsed = parse_time(value)
    if parsed is None:
        return ck.fail(path, "expected an ISO 8601 time such as 2026-12-31T23:59:59Z", value)
    return parsed


class _Keys:
    """
    C{auth.keys}: each key, with the rules between keys (unique ids and
    hashes) and towards other sections (configured providers, limits).
    """

    def __init__(self, providers: Mapping[str, ProviderConfig], rates: RateLimitConfig) -> None:
        self._providers = providers
        self._rates = rates

    def _providers_list(
        self, ck: Checker, path: KeyPath, value: object
    ) -> tuple[str, ...] | Invalid:
        names = string_list(ck, path, value)
        if isinstance(names, Invalid):
            return names
        for index, name in enumerate(names):
            if name not in self._providers:
                ck.fail((*path, index), "expected the name of a configured provider", name)
        return names

    def _limits(self, ck: Checker, path: KeyPath, value: object) -> Limits:
        parsers: dict[str, Parser] = dict.fromkeys(_LIMIT_KEYS, count)
        return section(ck, path, value, Limits, parsers, **attrs.asdict(self._rates.limits))

    def __call__(self, ck: Checker, path: KeyPath, value: object) -> tuple[ProxyKey, ...] | Invalid:
        if not isinstance(value, list):
            return ck.fail(path, "expected a list of keys ({id, hash, ...})", value)
        parsers: dict[str, Parser] = {
            "id": _key_id,
            "hash": _key_hash,
            "user": string,
            "providers": self._providers_list,
            "models": _globs,
            "limits": self._limits,
            "budget": budget,
            "expires_at": _expires_at,
        }
        keys: list[ProxyKey] = []
        ids: dict[str, int] = {}
        hashes: dict[bytes, int] = {}
        for index, raw in enumerate(value):
            entry = (*path, index)
            errors = len(ck.errors)
            key = section(ck, entry, raw, ProxyKey, parsers, id="", hash=b"")
            if isinstance(raw, Mapping):
                for required in ("id", "hash"):
                    if required not in raw:
                        ck.fail((*entry, required), f"expected the key's {required}", MISSING)
            if len(ck.errors) != errors:
                continue
            if key.id in ids:
                ck.fail(
                    (*entry, "id"),
                    f"expected an id no other key has ([{ids[key.id]}] has it)",
                    key.id,
                )
                continue
            if key.hash in hashes:
                where = (*entry, "hash")
                ck.fail(
                    where,
                    f"expected a hash no other key has ([{hashes[key.hash]}] has it)",
                    "sha256:" + key.hash.hex(),
                )
                continue
            if key.limits is not None and key.id in self._rates.overrides.per_key:
                ck.note(
                    (*entry, "limits"),
                    "limits for this key are also set in "
                    f"features.rate_limiting.overrides.per_key.{key.id}; set them in one place",
                )
                continue
            ids[key.id] = index
            hashes[key.hash] = index
            keys.append(key)
        return tuple(keys)


def _credentials(
    providers: Mapping[str, ProviderConfig],
) -> Parser:
    def parse(ck: Checker, path: KeyPath, value: object) -> dict[str, dict[str, str]]:
        result: dict[str, dict[str, str]] = {}
        for name, entry, raw in named(ck, path, value, "provider name"):
            if name not in providers:
                ck.fail(entry, "expected the name of a configured provider", name)
                continue
            headers: dict[str, str] = {}
            for header, where, text in named(ck, entry, raw, "header name"):
                if not _HEADER_NAME.fullmatch(header) or header.lower() in _NOT_CREDENTIAL_HEADERS:
                    ck.fail(where, "expected a header name a credential can travel in", header)
                elif not isinstance(text, str) or not text or "\r" in text or "\n" in text:
                    ck.fail(where, "expected a non-empty header value on one line", text)
                else:
                    headers[header] = str(text)
            result[name] = headers
        return result

    return parse


def _webhook_url(ck: Checker, path: KeyPath, value: object) -> str | Invalid:
    expected = "expected an http(s) URL with a host"
    if not isinstance(value, str) or any(char.isspace() for char in value):
        return ck.fail(path, expected, value)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as error:
        return ck.fail(path, f"{expected} ({error})", value)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return ck.fail(path, expected, value)
    return str(value)


def _per_user(ck: Checker, path: KeyPath, value: object) -> dict[str, Budget]:
    return {user: budget(ck, entry, raw) for user, entry, raw in named(ck, path, value, "user")}


def parse_auth(
    ck: Checker,
    path: KeyPath,
    value: object,
    providers: Mapping[str, ProviderConfig],
    rates: RateLimitConfig,
) -> AuthConfig:
    """
    The C{auth} section.

    @param providers: the configured providers, which C{keys[].providers}
        and C{credentials} must name.
    @param rates: C{features.rate_limiting}, whose C{limits} a key's own
        C{limits} inherit.
    """
    parsers: dict[str, Parser] = {
        "mode": choice(*AUTH_MODES),
        "keys": _Keys(providers, rates),
        "credentials": _credentials(providers),
        "budgets": nested(AuthBudgets, {"per_user": _per_user}),
        "alerts": nested(AlertsConfig, {"webhook_url": _webhook_url}),
    }
    return section(ck, path, value, AuthConfig, parsers)
