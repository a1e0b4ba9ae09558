# -*- test-case-name: llmproxy.test.test_fake_upstream_knobs -*-
"""
The knobs: the C{x-fake-*} request headers (and
L{FakeUpstream.defaults <llmproxy.testing.fake_upstream.FakeUpstream>})
that make one response of the fake slow, broken or odd.

Parsing is strict, so that a typo in a test fails loudly instead of quietly
testing nothing: an unknown name or a bad value is a L{KnobError}, which the
fake answers with a 400 naming it.  What each knob does is listed in the
package docstring.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from attrs import frozen

KNOBS: frozenset[str] = frozenset(
    {
        "x-fake-status",
        "x-fake-error-message",
        "x-fake-retry-after",
        "x-fake-chunks",
        "x-fake-bytes",
        "x-fake-delay-ms",
        "x-fake-headers-delay-ms",
        "x-fake-hang",
        "x-fake-stall-after",
        "x-fake-die-after",
        "x-fake-error-after",
        "x-fake-gzip",
        "x-fake-usage",
        "x-fake-model",
        "x-fake-input-tokens",
        "x-fake-output-tokens",
        "x-fake-reasoning-tokens",
        "x-fake-cached-tokens",
        "x-fake-cache-write-tokens",
        "x-fake-finish-reason",
        "x-fake-set-cookie",
        "x-fake-header",
        "x-fake-fail-first",
        "x-fake-reset",
    }
)
"""Every knob header the fake understands (lower case)."""

DEFAULT_CHUNKS = 3
"""Text pieces in an answer when C{x-fake-chunks} is not set."""

DEFAULT_INPUT_TOKENS = 10
"""The reported input tokens when C{x-fake-input-tokens} is not set."""


class KnobError(ValueError):
    """
    A knob header with an unknown name or a bad value.
    """


@frozen
class Knobs:
    """
    The parsed knobs of one request.
    """

    status: int | None = None
    error_message: str | None = None
    retry_after: str | None = None
    chunks: int = DEFAULT_CHUNKS
    total_bytes: int | None = None
    delay: float = 0.0
    headers_delay: float = 0.0
    hang: str | None = None
    stall_after: int | None = None
    die_after: int | None = None
    error_after: int | None = None
    gzip: bool = False
    usage: bool = True
    model: str | None = None
    input_tokens: int = DEFAULT_INPUT_TOKENS
    output_tokens: int | None = None
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    finish_reason: str | None = None
    set_cookies: tuple[str, ...] = ()
    extra_headers: tuple[tuple[str, str], ...] = ()
    fail_first: int | None = None
    reset: bool = False


def collect_knobs(
    headers: Sequence[tuple[bytes, bytes]], defaults: Mapping[str, str]
) -> dict[str, list[str]]:
    """
    Merge the knob headers of a request over the instance defaults.

    @raise KnobError: for an C{x-fake-*} name that is not a knob.
    """
    found: dict[str, list[str]] = {}
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1").lower()
        if not name.startswith("x-fake-"):
            continue
        if name not in KNOBS:
            raise KnobError(f"unknown fake-upstream knob {name!r}")
        found.setdefault(name, []).append(raw_value.decode("latin-1"))
    merged: dict[str, list[str]] = {}
    for name, value in defaults.items():
        if name.lower() not in KNOBS:
            raise KnobError(f"unknown fake-upstream knob {name!r} in defaults")
        merged[name.lower()] = [value]
    merged.update(found)
    return merged


def parse_knobs(values: Mapping[str, list[str]]) -> Knobs:
    """
    Turn knob header values into L{Knobs}.

    @raise KnobError: for a value of the wrong kind.
    """

    def last(name: str) -> str | None:
        got = values.get(name)
        return got[-1].strip() if got else None

    def integer(name: str, minimum: int = 0) -> int | None:
        text = last(name)
        if text is None:
            return None
        try:
            number = int(text)
        except ValueError:
            raise KnobError(f"{name}: expected an integer, got {text!r}") from None
        if number < minimum:
            raise KnobError(f"{name}: expected an integer >= {minimum}, got {number}")
        return number

    def millis(name: str) -> float:
        number = integer(name)
        return 0.0 if number is None else number / 1000.0

    def flag(name: str, default: bool) -> bool:
        text = last(name)
        if text is None:
            return default
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise KnobError(f"{name}: expected 0 or 1, got {text!r}")

    hang = last("x-fake-hang")
    if hang is not None and hang not in ("headers", "body"):
        raise KnobError(f"x-fake-hang: expected 'headers' or 'body', got {hang!r}")
    extra: list[tuple[str, str]] = []
    for value in values.get("x-fake-header", []):
        header_name, colon, header_value = value.partition(":")
        if not colon or not header_name.strip():
            raise KnobError(f"x-fake-header: expected 'Name: value', got {value!r}")
        extra.append((header_name.strip(), header_value.strip()))
    status = integer("x-fake-status", 100)
    if status is not None and status > 599:
        raise KnobError(f"x-fake-status: expected 100-599, got {status}")
    chunks = integer("x-fake-chunks")
    input_tokens = integer("x-fake-input-tokens")
    return Knobs(
        status=status,
        error_message=last("x-fake-error-message"),
        retry_after=last("x-fake-retry-after"),
        chunks=DEFAULT_CHUNKS if chunks is None else chunks,
        total_bytes=integer("x-fake-bytes"),
        delay=millis("x-fake-delay-ms"),
        headers_delay=millis("x-fake-headers-delay-ms"),
        hang=hang,
        stall_after=integer("x-fake-stall-after"),
        die_after=integer("x-fake-die-after"),
        error_after=integer("x-fake-error-after"),
        gzip=flag("x-fake-gzip", False),
        usage=flag("x-fake-usage", True),
        model=last("x-fake-model"),
        input_tokens=DEFAULT_INPUT_TOKENS if input_tokens is None else input_tokens,
        output_tokens=integer("x-fake-output-tokens"),
        reasoning_tokens=integer("x-fake-reasoning-tokens") or 0,
        cached_tokens=integer("x-fake-cached-tokens") or 0,
        cache_write_tokens=integer("x-fake-cache-write-tokens") or 0,
        finish_reason=last("x-fake-finish-reason"),
        set_cookies=tuple(values.get("x-fake-set-cookie", [])),
        extra_headers=tuple(extra),
        fail_first=integer("x-fake-fail-first"),
        reset=flag("x-fake-reset", False),
    )


def accepts_gzip(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """
    Whether the request's C{Accept-Encoding} allows gzip (C{gzip} or C{*}
    with a non-zero quality).
    """
    for name, value in headers:
        if name.lower() != b"accept-encoding":
            continue
        for item in value.decode("latin-1").split(","):
            coding, _, params = item.strip().partition(";")
            if coding.strip().lower() not in ("gzip", "x-gzip", "*"):
                continue
            quality = params.strip()
            if quality.startswith("q="):
                try:
                    if float(quality[2:]) == 0.0:
                        continue
                except ValueError:
                    continue
            return True
    return False
