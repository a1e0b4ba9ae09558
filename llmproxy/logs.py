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
import os
import re
import select
from collections.abc import Callable, Iterable
from typing import IO, Any, Protocol

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

from llmproxy.config import Config

LEVELS: dict[str, LogLevel] = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}

_HEADERS = (
    r"(?:x-api-key|x-goog-api-key|api-key|proxy-authorization|authorization"
    r"|x-amz-security-token)"
)
_SCHEME = r"(?:(?:bearer|basic)\s+)?"

_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    # AWS SigV4: the signature (the access key id before it is no secret).
    (re.compile(r"(?i)\b(signature=)[0-9a-f]{16,}"), r"\1[REDACTED]"),
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
    # Bare provider keys (and the proxy's own) that escaped every other rule.
    (
        re.compile(
            r"\b(?:sk-ant-[A-Za-z0-9_-]{8,}|sk-[A-Za-z0-9_-]{16,}|AIza[0-9A-Za-z_-]{20,}"
            r"|ABSK[A-Za-z0-9+/=]{20,}|bedrock-api-key-[A-Za-z0-9+/=%_-]{20,}"
            r"|ya29\.[A-Za-z0-9._-]{20,}|llmp-[A-Za-z0-9_-]{16,})"
        ),
        "[REDACTED]",
    ),
)


_TRIGGERS = (
    "bearer",
    "basic",
    "api-key",
    "api_key",
    "authorization",
    "key=",
    "sk-",
    "aiza",
    "signature=",
    "x-amz-security-token",
    "absk",
    "ya29.",
    "llmp-",
)
"""
Substrings (lower case) at least one of which every rule needs; a line with
none of them is returned untouched without running the expressions.
"""


MIN_SECRET_LENGTH = 8
"""Configured secrets shorter than this are not searched for (too many false hits)."""


class SecretHolder:
    """
    The credentials the configuration holds (C{auth.credentials}), which
    no log line may contain whatever form they take; a reload replaces
    them.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets: tuple[str, ...] = ()
        self.set(secrets)

    def set(self, secrets: Iterable[str]) -> None:
        found = set()
        for secret in secrets:
            found.add(secret)
            # "Bearer sk-..." also hides a bare "sk-...".
            scheme, _, token = secret.partition(" ")
            if token and scheme.isalpha():
                found.add(token.strip())
        # Longest first: a secret containing another is replaced whole.
        self.secrets = tuple(
            sorted((s for s in found if len(s) >= MIN_SECRET_LENGTH), key=len, reverse=True)
        )


def configured_secrets(config: Config) -> list[str]:
    """
    Every header value of C{auth.credentials}.
    """
    return [value for headers in config.auth.credentials.values() for value in headers.values()]


def redact(text: str, secrets: SecretHolder | None = None) -> str:
    """
    Replace anything that looks like a credential in C{text}, and every
    configured secret.
    """
    if secrets is not None:
        for secret in secrets.secrets:
            if secret in text:
                text = text.replace(secret, "[REDACTED]")
    lowered = text.lower()
    if not any(trigger in lowered for trigger in _TRIGGERS):
        return text
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return text


class TextSink(Protocol):
    """
    Where L{LineBuffer} writes: a text stream, or L{WholeLines}.
    """

    def write(self, text: str, /) -> object: ...

    def flush(self) -> object: ...


class WholeLines:
    """
    Writes text to a file descriptor shared with other processes (the
    workers of a group share the master's stdout) so that their lines do
    not interleave: each C{write()} ends at a line end and holds at most
    C{PIPE_BUF} bytes, which a pipe writes in one piece (and a stream
    socket, such as the journal's, takes whole at that size in practice).
    A single line longer than that may still be split.
    """

    def __init__(self, fd: int, write: Callable[[int, memoryview], int] = os.write) -> None:
        self._fd = fd
        self._write = write

    def write(self, text: str) -> None:
        data = memoryview(text.encode("utf-8", "replace"))
        limit = select.PIPE_BUF
        while data:
            size = len(data)
            if size > limit:
                cut = bytes(data[:limit]).rfind(b"\n")
                size = cut + 1 if cut >= 0 else limit
            chunk = data[:size]
            while chunk:
                chunk = chunk[self._write(self._fd, chunk) :]
            data = data[size:]

    def flush(self) -> None:
        pass


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

    def __init__(self, stream: TextSink, clock: IReactorTime | None = None) -> None:
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

    def __init__(self, stream: IO[str] | LineBuffer, secrets: SecretHolder | None = None) -> None:
        self._out = stream if isinstance(stream, LineBuffer) else LineBuffer(stream)
        self._secrets = secrets

    def __call__(self, event: dict[str, Any]) -> None:
        text = _preformatted_line(event) or formatEventAsClassicLogText(
            event, formatTime=_line_time
        )
        if text is None:
            return
        self._out.add(redact(text, self._secrets), _urgent(event))


def _preformatted_line(event: dict[str, Any]) -> str | None:
    """
    The classic line of an event whose message is already formatted (its
    format is C{"{message}"}, as the access line's is), built directly:
    the same text as C{formatEventAsClassicLogText} gives, without a pass
    through C{string.Formatter} for every request. L{None} for any other
    event.
    """
    message = event.get("message")
    if (
        event.get("log_format") != "{message}"
        or type(message) is not str
        or not message
        or "log_failure" in event
    ):
        return None
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        namespace = event.get("log_namespace", "-")
        system = f"{namespace}#{level.name if level is not None else '-'}"
    when = _line_time(event.get("log_time"))
    return f"{when} [{system}] {message.replace(chr(10), chr(10) + chr(9))}\n"


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

    def __init__(self, stream: IO[str] | LineBuffer, secrets: SecretHolder | None = None) -> None:
        self._out = stream if isinstance(stream, LineBuffer) else LineBuffer(stream)
        self._secrets = secrets

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
        self._out.add(redact(line, self._secrets) + "\n", _urgent(event))


class LevelHolder:
    """
    The current minimum level, kept in one place so a reload can change it
    without rebuilding observers.
    """

    def __init__(self, level: str) -> None:
        self.predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])

    def set(self, level: str) -> None:
        self.predicate.setLogLevelForNamespace("", LEVELS[level])


def make_observer(
    fmt: str,
    level: LevelHolder,
    stream: IO[str] | LineBuffer,
    secrets: SecretHolder | None = None,
) -> ILogObserver:
    """
    Build the process's log observer: C{text} or C{json} lines, filtered by
    C{level}, credentials (and the C{secrets} the configuration holds)
    redacted, written to C{stream} (a L{LineBuffer} to batch the writes).
    """
    observer = JSONObserver if fmt == "json" else TextObserver
    inner: ILogObserver = observer(stream, secrets)
    return FilteringLogObserver(inner, [level.predicate])


def process_log(
    fmt: str, level: str, stream: TextSink, reactor: Any, secrets: SecretHolder | None = None
) -> tuple[LevelHolder, ILogObserver]:
    """
    The log of a process that runs C{reactor}: lines batched on its clock
    (see L{LineBuffer}) and flushed once more after it has shut down, so the
    last lines (the drain, "stopped") are written.

    @param secrets: the credentials the configuration holds, redacted too.
    @return: the level holder (a reload sets it) and the observer.
    """
    holder = LevelHolder(level)
    lines = LineBuffer(stream, reactor)
    reactor.addSystemEventTrigger("after", "shutdown", lines.flush)
    return holder, make_observer(fmt, holder, lines, secrets)
