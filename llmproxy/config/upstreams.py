# -*- test-case-name: llmproxy.test.test_config_validate -*-
"""
The keys of a provider's resilience: its C{upstreams} (each with its own
headers and model names), its C{fallback} mounts, and the C{retry},
C{stream_gate} and C{circuit_breaker} sections (see docs/resilience.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import attrs

from llmproxy.config.checks import (
    MISSING,
    Checker,
    Invalid,
    Parser,
    amount,
    base_url,
    count,
    named,
    positive_amount,
    positive_count,
    section,
    string,
)
from llmproxy.config.errors import KeyPath, segment
from llmproxy.config.model import ProviderConfig, UpstreamConfig, upstream_name

_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def header_map(ck: Checker, path: KeyPath, value: object) -> dict[str, str] | Invalid:
    """
    Request headers an upstream sets: valid header names to string values.
    """
    if not isinstance(value, Mapping):
        return ck.fail(path, "expected a mapping of header names to values", value)
    headers: dict[str, str] = {}
    for name, item in value.items():
        entry = (*path, segment(name))
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            ck.fail(entry, "expected a header name (letters, digits, '-')", name)
        elif not isinstance(item, str) or "\r" in item or "\n" in item:
            ck.fail(entry, "expected a header value: one line of text", item)
        else:
            headers[name] = str(item)
    return headers


def model_map(ck: Checker, path: KeyPath, value: object) -> dict[str, str] | Invalid:
    """
    Model renames: requested model -> the upstream's name for it.
    """
    renames: dict[str, str] = {}
    for name, entry, raw in named(ck, path, value, "model name"):
        if isinstance(raw, str) and raw:
            renames[name] = raw
        else:
            ck.fail(entry, "expected the model's name at this upstream", raw)
    return renames


_UPSTREAM_KEYS: Mapping[str, Parser] = {
    "name": string,
    "base_url": base_url,
    "weight": positive_count,
    "priority": count,
    "headers": header_map,
    "models": model_map,
}


def upstreams(ck: Checker, path: KeyPath, value: object) -> tuple[UpstreamConfig, ...] | Invalid:
    """
    C{upstreams}: a non-empty list; each needs a C{base_url}, and names
    (by default the host) are unique within the provider.
    """
    if not isinstance(value, list) or not value:
        return ck.fail(path, "expected a non-empty list of upstreams", value)
    upstreams: list[UpstreamConfig] = []
    seen: set[str] = set()
    for index, raw in enumerate(value):
        entry = (*path, index)
        if isinstance(raw, Mapping) and "base_url" not in raw:
            ck.fail((*entry, "base_url"), "expected an http(s) URL (required)", MISSING)
            continue
        upstream = section(ck, entry, raw, UpstreamConfig, _UPSTREAM_KEYS, name="", base_url="")
        if not upstream.base_url:
            continue
        if not upstream.name:
            upstream = attrs.evolve(upstream, name=upstream_name(upstream.base_url))
        if upstream.name in seen:
            ck.fail(
                (*entry, "name"),
                "expected a name no other upstream of this provider has",
                upstream.name,
            )
        seen.add(upstream.name)
        upstreams.append(upstream)
    return tuple(upstreams)


RETRY_KEYS: Mapping[str, Parser] = {
    "max_attempts": positive_count,
    "backoff_seconds": amount,
    "max_wait_seconds": amount,
}
GATE_KEYS: Mapping[str, Parser] = {"max_bytes": count, "max_seconds": amount}
BREAKER_KEYS: Mapping[str, Parser] = {
    "failures": positive_count,
    "cooldown_seconds": positive_amount,
}


def check_fallbacks(ck: Checker, path: KeyPath, providers: Mapping[str, ProviderConfig]) -> None:
    """
    Every C{fallback} names another mounted provider of the same kind.
    """
    for name, provider in providers.items():
        for index, other in enumerate(provider.fallback):
            entry = (*path, name, "fallback", index)
            target = providers.get(other)
            if other == name:
                ck.fail(entry, "expected another provider than this one", other)
            elif target is None:
                ck.fail(entry, "expected the name of a configured provider", other)
            elif target.kind != provider.kind:
                ck.fail(entry, f"expected a provider of kind {provider.kind!r}", other)
            elif not target.enabled:
                ck.fail(entry, "expected an enabled provider", other)
