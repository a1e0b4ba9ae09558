# -*- test-case-name: llmproxy.test.test_logs -*-
"""
Log observers: text or JSON lines on a stream, filtered by level, with every
credential scrubbed before a byte is written.

Redaction happens at the observer, not at the call sites, so a credential
that reaches a log event by any route (a Twisted error, a repr of a
request, an upstream error body) still never reaches the output.
"""

from __future__ import annotations

import functools
import re
from typing import IO, Any

import orjson
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python.failure import Failure
from twisted.web._newclient import ParseError
from zope.interface import implementer

LEVELS: dict[str, LogLevel] = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}

_HEADERS = r"(?:x-api-key|x-goog-api-key|api-key|proxy-authorization|authorization)"
_SCHEME = r"(?:(?:bearer|basic)\s+)?"

_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    # A credential header's quoted value, whatever it holds, up to its closing
    # quote: "authorization": "Bearer ...", (b'x-api-key', [b'...']).
    (
        re.compile(
            rf"(?is)({_HEADERS}['\"]?\s*[:=,]\s*[\[(]?\s*b?(['\"]){_SCHEME})"
            r"(?!\[REDACTED\])(?:\\.|(?!\2)[^\\])+"
        ),
        r"\1[REDACTED]",
    ),
    # Its unquoted value, whatever it holds, to the end of the line (or of the
    # JSON string the line is in): x-api-key: ..., Authorization: Bearer ...
    (
        re.compile(
            rf"(?i)({_HEADERS}\s*[:=]\s*{_SCHEME})"
            r"(?!\[REDACTED\]|b?['\"\[(])(?:[^\r\n\"\\]|\\[^rn])+"
        ),
        r"\1[REDACTED]",
    ),
    # Bearer <token> / Basic <token> anywhere else, to the next space or quote
    # (escapes such as \xc3 included).
    (
        re.compile(r"(?i)\b(bearer|basic)(\s+)(?!\[REDACTED\])(?:[^\s'\"\\]|\\.)+"),
        r"\1\2[REDACTED]",
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


def describe_failure(failure: Failure) -> str:
    """
    A failure's text for a log line, without the bytes an upstream sent:
    Twisted's response parse errors carry the raw status line or header
    (which may echo a credential in any form), so for those only their
    kind is told. The failures a response's Deferred wraps
    (C{ResponseFailed}, C{ResponseNeverReceived}) are told one by one.
    """
    reasons = getattr(failure.value, "reasons", None)
    if isinstance(reasons, list) and reasons:
        inner = "; ".join(
            describe_failure(reason) for reason in reasons if isinstance(reason, Failure)
        )
        return f"{type(failure.value).__name__}: {inner}"
    if failure.check(ParseError):
        return f"{type(failure.value).__name__} (invalid upstream response; its bytes not logged)"
    return failure.getErrorMessage() or type(failure.value).__name__


FLUSH_SECONDS = 0.1
"""How long a buffered log line may wait before it is written."""

FLUSH_BYTES = 64 * 1024
"""Buffered text that is written at once, without waiting for the timer."""


class LineBuffer:
    """
    Collects log lines and writes them to C{stream} in batches: when the
    timer armed by the first line of a batch fires, when a batch reaches
    L{FLUSH_BYTES}, with any urgent line (see L{_urgent}), and on L{flush}.

    Writing and flushing a stream per access line was a system call on
    every request, in the reactor thread; batching turns hundreds of them
    into one. Without a clock (tools, tests) every line is written at once.
    """

    def __init__(self, stream: IO[str], clock: IReactorTime | None = None) -> None:
        self._stream = stream
        self._clock = clock
        self._lines: list[str] = []
        self._size = 0
        self._timer: IDelayedCall | None = None

    def add(self, line: str, urgent: bool = False) -> None:
        self._lines.append(line)
        self._size += len(line)
        if self._clock is None or urgent or self._size >= FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = self._clock.callLater(FLUSH_SECONDS, self._timed_flush)

    def _timed_flush(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """
        Write everything buffered now (also called at shutdown).
        """
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        text = "".join(self._lines)
        self._lines = []
        self._size = 0
        self._stream.write(text)
        self._stream.flush()


BATCHED_NAMESPACE = "llmproxy.access"
"""The per-request access lines: the only ones worth batching."""


def _urgent(event: dict[str, Any]) -> bool:
    """
    Whether a line is written at once: everything but an access line below
    C{warn} (startup, reload and shutdown lines are rare, and whoever
    watches the output waits for them).
    """
    if event.get("log_namespace") != BATCHED_NAMESPACE:
        return True
    level = event.get("log_level")
    return level is not None and level >= LogLevel.warn


@functools.lru_cache(maxsize=2)
def _second_text(second: int) -> str:
    """
    Twisted's timestamp for one whole second, remembered: log lines have
    second resolution, and building it (time zone, datetime, strftime) was
    a visible share of each access line's cost.
    """
    return formatTime(second)


def _line_time(when: float | None) -> str:
    return "-" if when is None else _second_text(int(when))


@implementer(ILogObserver)
class TextObserver:
    """
    One classic text line per event, redacted.
    """

    def __init__(self, stream: IO[str] | LineBuffer) -> None:
        self._out = stream if isinstance(stream, LineBuffer) else LineBuffer(stream)

    def __call__(self, event: dict[str, Any]) -> None:
        text = formatEventAsClassicLogText(event, formatTime=_line_time)
        if text is None:
            return
        self._out.add(redact(text), _urgent(event))


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

    def __init__(self, stream: IO[str] | LineBuffer) -> None:
        self._out = stream if isinstance(stream, LineBuffer) else LineBuffer(stream)

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
        self._out.add(redact(line) + "\n", _urgent(event))


class LevelHolder:
    """
    The current minimum level, kept in one place so a reload can change it
    without rebuilding observers.
    """

    def __init__(self, level: str) -> None:
        self.predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])

    def set(self, level: str) -> None:
        self.predicate.setLogLevelForNamespace("", LEVELS[level])


def make_observer(fmt: str, level: LevelHolder, stream: IO[str] | LineBuffer) -> ILogObserver:
    """
    Build the process's log observer: C{text} or C{json} lines, filtered by
    C{level}, credentials redacted, written to C{stream} (a L{LineBuffer}
    to batch the writes).
    """
    inner: ILogObserver = JSONObserver(stream) if fmt == "json" else TextObserver(stream)
    return FilteringLogObserver(inner, [level.predicate])
