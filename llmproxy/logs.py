# -*- test-case-name: llmproxy.test.test_logs -*-
"""
Log observers: text or JSON lines on a stream, filtered by level, with every
credential scrubbed before a byte is written.

Redaction happens at the observer, not at the call sites, so a credential
that reaches a log event by any route (a Twisted error, a repr of a
request, an upstream error body) still never reaches the output.
"""

from __future__ import annotations

import re
from typing import IO, Any

import orjson
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatEventAsClassicLogText,
)
from zope.interface import implementer

LEVELS: dict[str, LogLevel] = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}

_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    # Authorization: Bearer <token> / Basic <token>.
    (
        re.compile(r"(?i)\b(bearer|basic)(\s+)(?!\[REDACTED\])[A-Za-z0-9._~+/=-]{4,}"),
        r"\1\2[REDACTED]",
    ),
    # Header-ish pairs: x-api-key: sk-..., "authorization": "...", (b'x-goog-api-key', [b'...']).
    (
        re.compile(
            r"(?i)((?:x-api-key|x-goog-api-key|api-key|proxy-authorization|authorization)"
            r"['\"]?\s*[:=,]\s*[\[(]?\s*(?:b?['\"])?)(?!\[REDACTED\]|bearer\b|basic\b)[^'\"\s,\])]+"
        ),
        r"\1[REDACTED]",
    ),
    # ?key=... / &key=... query parameters.
    (re.compile(r"(?i)([?&](?:key|api_key|api-key)=)[^&\s'\"]+"), r"\1[REDACTED]"),
    # Bare provider keys that escaped every other rule.
    (
        re.compile(r"\b(?:sk-ant-[A-Za-z0-9_-]{8,}|sk-[A-Za-z0-9_-]{16,}|AIza[0-9A-Za-z_-]{20,})"),
        "[REDACTED]",
    ),
)


_TRIGGERS = ("bearer", "basic", "api-key", "api_key", "authorization", "key=", "sk-", "aiza")
"""
Substrings (lower case) at least one of which every rule needs; a line with
none of them is returned untouched without running the expressions.
"""


def redact(text: str) -> str:
    """
    Replace anything that looks like a credential in C{text}.
    """
    lowered = text.lower()
    if not any(trigger in lowered for trigger in _TRIGGERS):
        return text
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return text


@implementer(ILogObserver)
class TextObserver:
    """
    One classic text line per event, redacted.
    """

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        text = formatEventAsClassicLogText(event)
        if text is None:
            return
        self._stream.write(redact(text))
        self._stream.flush()


_RESERVED_KEYS = frozenset(
    {"log_format", "log_time", "log_level", "log_namespace", "log_logger", "log_source"}
)


def _jsonable(value: object) -> object:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


@implementer(ILogObserver)
class JSONObserver:
    """
    One JSON object per line (NDJSON, no RFC 7464 separator), redacted.

    The formatted message is under C{"message"}; the event's own keyword
    fields are kept at the top level so log shippers can index them.
    """

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        record: dict[str, object] = {
            "time": event.get("log_time"),
            "level": getattr(level, "name", None),
            "namespace": event.get("log_namespace"),
            "message": formatEvent(event),
        }
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        for key, value in event.items():
            if key.startswith("log_") or key in _RESERVED_KEYS or key in record:
                continue
            record[key] = _jsonable(value)
        line = orjson.dumps(record, default=str).decode("utf-8")
        self._stream.write(redact(line) + "\n")
        self._stream.flush()


class LevelHolder:
    """
    The current minimum level, kept in one place so a reload can change it
    without rebuilding observers.
    """

    def __init__(self, level: str) -> None:
        self.predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])

    def set(self, level: str) -> None:
        self.predicate.setLogLevelForNamespace("", LEVELS[level])


def make_observer(fmt: str, level: LevelHolder, stream: IO[str]) -> ILogObserver:
    """
    Build the process's log observer: C{text} or C{json} lines, filtered by
    C{level}, credentials redacted.
    """
    inner: ILogObserver = JSONObserver(stream) if fmt == "json" else TextObserver(stream)
    return FilteringLogObserver(inner, [level.predicate])
