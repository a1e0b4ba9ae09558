# -*- test-case-name: llmproxy.test.test_fake_upstream -*-
"""
A fake LLM upstream: the OpenAI, Anthropic and Gemini HTTP APIs as their
SDKs see them, with knobs for the failures a proxy has to survive.

Every end-to-end test, the SDK compatibility suite and the benchmarks talk
to this instead of the real providers.  Its wire formats (status codes,
headers, JSON shapes, SSE framing, usage fields, error bodies) are proved
against the official SDKs by C{tests.compat.test_fake_vs_sdks}: a shape an
SDK cannot parse is a bug here.

Use
===

In a test, on the reactor or in memory::

    fake = FakeUpstream(clock)
    port = yield listen(fake, reactor)          # an IListeningPort
    self.addCleanup(port.stopListening)         # also drops open connections
    ...
    received = yield fake.wait_for_request()

or mount C{fake.resource()} (routing only) or C{fake.site()} (a L{Site} that
also records raw header order and tracks connections) yourself.

What a test can observe: C{fake.received} (every L{ReceivedRequest}: raw
URI, raw header lines, body), C{wait_for_request()} (each request handed to
exactly one waiter, in order, even if it arrived first),
C{connection_lost_events} / C{wait_for_disconnect()} (clients that left
mid-response, with the clock time), C{paused_count} / C{resumed_count}
(flow control), C{bytes_sent}, C{last_body_sent}, C{active_responses}.

Standalone, for process-level tests and benchmarks::

    python -m llmproxy.testing.fake_upstream --port 0 [--interface 127.0.0.1]
        [--default x-fake-delay-ms=20 ...] [--no-auth]

prints the bound port number on a line of its own once it is listening.

Routes
======

Routes match on the B{end} of the raw request path, so the fake answers the
same under any prefix (a proxy C{base_url} of C{http://fake/some/prefix}
works) and records exactly what arrived (L{ReceivedRequest.uri}).

  - OpenAI: C{POST .../chat/completions}, C{.../completions},
    C{.../responses}, C{.../embeddings}; C{GET .../models},
    C{GET .../models/{id}}.  Auth: C{Authorization: Bearer <key>} (or
    Azure's C{api-key}); errors C{{"error": {"message", "type", "param",
    "code"}}}; request id in C{x-request-id}.
  - Anthropic: C{POST .../messages}, C{POST .../messages/count_tokens};
    C{GET .../models[/{id}]} when the request carries
    C{anthropic-version}.  Auth: C{x-api-key} or C{Authorization: Bearer}
    (else 401 C{authentication_error}); C{anthropic-version} is required
    (else 400).  Errors C{{"type": "error", "error": {"type", "message"},
    "request_id"}}; request id in C{request-id}.
  - Gemini: C{POST .../models/{model}:generateContent},
    C{:streamGenerateContent} (C{?alt=sse} gives SSE framed with
    C{\\r\\n\\r\\n}; without it a JSON array streamed element by element),
    C{:countTokens}, C{:embedContent}, C{:batchEmbedContents};
    C{GET .../v1beta/models[/{id}]} (any C{/v1beta/}, C{/v1alpha/} path, or
    one carrying a Gemini key).  Auth: C{?key=}, C{x-goog-api-key} or
    C{Authorization: Bearer} (none: 403 C{PERMISSION_DENIED}).  Errors
    C{{"error": {"code", "message", "status"}}}.

An API key starting with C{invalid} is rejected the way each provider
rejects a wrong key (OpenAI and Anthropic 401, Gemini 400
C{API_KEY_INVALID}).  C{fake.require_auth = False} turns every credential
check off.  Anything else is a 404 in the OpenAI shape.

Generated content is deterministic: text is L{text_pieces} (one piece per
stream chunk, one token per piece); when the request offers tools (OpenAI
C{tools}, Anthropic C{tools} with an C{input_schema}, Gemini
C{functionDeclarations}) and the tool choice does not forbid it, the answer
is one call to the first (or the forced) tool, with arguments made up from
its JSON schema and streamed in C{x-fake-chunks} pieces.  A request's
C{max_tokens} / C{max_completion_tokens} / C{max_output_tokens} /
C{generationConfig.maxOutputTokens} below the piece count truncates the
text and reports the provider's "length" finish reason.

Knobs
=====

Set per request as headers (so a test sets them on its client request and
the proxy passes them through), or per instance in C{fake.defaults} (keys
are the header names below, lower case; a request header wins).  An
unknown C{x-fake-*} header, or a bad value, is a 400 naming it: typos fail
loudly.  Durations are in milliseconds on the injected clock.

  - C{x-fake-status: N}: answer status N with the provider's own error body
    (checked before auth).  C{x-fake-error-message: text} sets its message,
    C{x-fake-retry-after: S} adds C{retry-after: S}.
  - C{x-fake-chunks: N} [3]: number of text pieces (stream content events).
  - C{x-fake-bytes: N}: instead, enough 8 KiB filler pieces that the
    content is at least N bytes (the body is slightly larger: framing).
    Pieces are generated lazily, so 50 MiB streams cost no memory.
  - C{x-fake-delay-ms: N} [0]: delay between two stream chunks (the first
    chunk goes with the headers; the last is followed by the end at once).
  - C{x-fake-headers-delay-ms: N} [0]: delay before the status line.
  - C{x-fake-hang: headers}: never answer.  C{x-fake-hang: body}: send the
    headers (with C{Content-Length} for JSON), then nothing.
  - C{x-fake-stall-after: N}: send N chunks, then nothing (connection open).
  - C{x-fake-die-after: N}: send N chunks, then close the connection without
    the rest or the chunked terminator (if N is at least the number of
    chunks, everything is sent and the terminator still withheld).  A JSON
    (non-stream) body is one chunk, so C{0} means headers then close.
  - C{x-fake-error-after: N}: after N stream chunks, send the provider's
    in-stream error event (OpenAI C{data: {"error": ...}}, Anthropic
    C{event: error}, Gemini C{data: {"error": ...}}) and end the response.
  - C{x-fake-gzip: 1}: C{Content-Encoding: gzip} (JSON and streams, each
    chunk flushed) when the request's C{Accept-Encoding} allows gzip.
  - C{x-fake-usage: 0}: omit usage everywhere (OpenAI C{usage}, the
    include_usage chunk, Anthropic C{usage}, Gemini C{usageMetadata}).
    For proxy tests: the Anthropic SDK needs usage in streams.
  - C{x-fake-model: name}: the model reported back [the request's model].
  - C{x-fake-input-tokens: N} [10], C{x-fake-output-tokens: N} [pieces],
    C{x-fake-reasoning-tokens: N} [0], C{x-fake-cached-tokens: N} [0],
    C{x-fake-cache-write-tokens: N} [0]: usage, each placed verbatim in the
    provider's own field; see L{FakeUpstream} for the exact mapping.
  - C{x-fake-finish-reason: value}: the finish/stop reason verbatim.
  - C{x-fake-set-cookie: value} (repeatable): a C{Set-Cookie} per value.
  - C{x-fake-header: Name: value} (repeatable): an extra response header
    per value (duplicates and hop-by-hop names allowed: they are the point).
"""

from __future__ import annotations

import argparse
import base64
import gzip as _gzip
import itertools
import math
import re
import struct
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import IO, Any, Protocol, cast
from urllib.parse import parse_qsl, unquote

import orjson
from attrs import frozen
from twisted.internet.defer import Deferred, DeferredQueue, gatherResults
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    IPushProducer,
    IReactorTCP,
    IReactorTime,
)
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.http import Request as HTTPRequest
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

__all__ = [
    "DEFAULT_CHUNKS",
    "DEFAULT_INPUT_TOKENS",
    "KNOBS",
    "ClientDisconnect",
    "FakeUpstream",
    "ReceivedRequest",
    "fake_text",
    "listen",
    "main",
    "text_pieces",
]

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
    }
)
"""Every knob header the fake understands (lower case)."""

_REPEATABLE = frozenset({"x-fake-set-cookie", "x-fake-header"})

DEFAULT_CHUNKS = 3
"""Text pieces in an answer when C{x-fake-chunks} is not set."""

DEFAULT_INPUT_TOKENS = 10
"""The reported input tokens when C{x-fake-input-tokens} is not set."""

_WORDS = ("Hello", " from", " the", " fake", " upstream", ".")
_FILLER_PIECE = ("filler " * 1171)[:8192]
_EMBEDDING_DIMENSIONS = 8
_FINGERPRINT = "fp_fake0001"
_MODEL_CREATED = 1700000000

OPENAI_MODELS = (
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "o3-mini",
    "gpt-3.5-turbo-instruct",
    "text-embedding-3-small",
    "text-embedding-3-large",
)
ANTHROPIC_MODELS = (
    "claude-sonnet-4-5",
    "claude-opus-4-1",
    "claude-haiku-4-5",
)
GEMINI_MODELS = (
    "gemini-2.5-pro",
    "gemini-2.5-flash",
    "gemini-2.0-flash",
    "gemini-embedding-001",
)


def text_pieces(chunks: int) -> list[str]:
    """
    The text pieces the fake answers with for C{x-fake-chunks: chunks}, one
    per stream content event.
    """
    return [_WORDS[i % len(_WORDS)] for i in range(chunks)]


def fake_text(chunks: int = DEFAULT_CHUNKS) -> str:
    """
    The whole answer text for C{x-fake-chunks: chunks}.
    """
    return "".join(text_pieces(chunks))


# ---------------------------------------------------------------------------
# Values


@frozen
class ReceivedRequest:
    """
    One request as it reached the fake.

    @ivar method: the request method.
    @ivar uri: the request target exactly as sent (still percent-encoded).
    @ivar path: C{uri} up to the C{?}.
    @ivar query: C{uri} after the C{?} (empty without one), raw.
    @ivar headers: every header line in arrival order with its name as sent
        and duplicates kept, when served through L{FakeUpstream.site} (or
        L{listen}); mounted as a bare L{FakeUpstream.resource}, names come
        from Twisted's L{Headers} (canonical case, grouped by name).
    @ivar body: the request body.
    """

    method: bytes
    uri: bytes
    path: bytes
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header_values(self, name: bytes | str) -> list[bytes]:
        """
        Every value of header C{name} (case-insensitive), in order.
        """
        wanted = (name.encode("latin-1") if isinstance(name, str) else name).lower()
        return [value for key, value in self.headers if key.lower() == wanted]

    def header(self, name: bytes | str) -> bytes | None:
        """
        The first value of header C{name} (case-insensitive), or C{None}.
        """
        values = self.header_values(name)
        return values[0] if values else None

    def json(self) -> Any:
        """
        The body parsed as JSON.
        """
        return orjson.loads(self.body)


@frozen
class ClientDisconnect:
    """
    A client connection that went away before its response was complete.

    @ivar time: the clock's time when the fake noticed.
    @ivar request: the request whose response was cut short.
    @ivar headers_sent: whether the status line had been sent.
    @ivar chunks_sent: body chunks written before the loss.
    @ivar bytes_sent: body bytes written before the loss (after gzip).
    """

    time: float
    request: ReceivedRequest
    headers_sent: bool
    chunks_sent: int
    bytes_sent: int


class _KnobError(ValueError):
    """
    A knob header with an unknown name or a bad value.
    """


@frozen
class _Knobs:
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


def _collect_knobs(
    headers: Sequence[tuple[bytes, bytes]], defaults: Mapping[str, str]
) -> dict[str, list[str]]:
    """
    Merge the knob headers of a request over the instance defaults.

    @raise _KnobError: for an C{x-fake-*} name that is not a knob.
    """
    found: dict[str, list[str]] = {}
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1").lower()
        if not name.startswith("x-fake-"):
            continue
        if name not in KNOBS:
            raise _KnobError(f"unknown fake-upstream knob {name!r}")
        found.setdefault(name, []).append(raw_value.decode("latin-1"))
    merged: dict[str, list[str]] = {}
    for name, value in defaults.items():
        if name.lower() not in KNOBS:
            raise _KnobError(f"unknown fake-upstream knob {name!r} in defaults")
        merged[name.lower()] = [value]
    merged.update(found)
    return merged


def _parse_knobs(values: Mapping[str, list[str]]) -> _Knobs:
    """
    Turn knob header values into L{_Knobs}.

    @raise _KnobError: for a value of the wrong kind.
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
            raise _KnobError(f"{name}: expected an integer, got {text!r}") from None
        if number < minimum:
            raise _KnobError(f"{name}: expected an integer >= {minimum}, got {number}")
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
        raise _KnobError(f"{name}: expected 0 or 1, got {text!r}")

    hang = last("x-fake-hang")
    if hang is not None and hang not in ("headers", "body"):
        raise _KnobError(f"x-fake-hang: expected 'headers' or 'body', got {hang!r}")
    extra: list[tuple[str, str]] = []
    for value in values.get("x-fake-header", []):
        header_name, colon, header_value = value.partition(":")
        if not colon or not header_name.strip():
            raise _KnobError(f"x-fake-header: expected 'Name: value', got {value!r}")
        extra.append((header_name.strip(), header_value.strip()))
    status = integer("x-fake-status", 100)
    if status is not None and status > 599:
        raise _KnobError(f"x-fake-status: expected 100-599, got {status}")
    chunks = integer("x-fake-chunks")
    input_tokens = integer("x-fake-input-tokens")
    return _Knobs(
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
    )


def _accepts_gzip(headers: Sequence[tuple[bytes, bytes]]) -> bool:
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


# ---------------------------------------------------------------------------
# Replies


@frozen
class _Reply:
    """
    A response about to be written.

    @ivar chunks: the body, one write per item.  A JSON reply is one chunk;
        a stream is one event per chunk.
    @ivar error_event: the provider's in-stream error event, for
        C{x-fake-error-after}.
    """

    status: int
    headers: list[tuple[bytes, bytes]]
    chunks: Iterable[bytes]
    streaming: bool = False
    error_event: bytes | None = None


@frozen
class _Call:
    """
    Everything a route handler needs about one request.
    """

    knobs: _Knobs
    request: ReceivedRequest
    serial: int
    now: int
    query: dict[str, str]
    params: dict[str, str]
    body: Any = None
    require_auth: bool = True

    def ident(self, prefix: str) -> str:
        """
        A deterministic identifier unique per request within one fake.
        """
        return f"{prefix}fake{self.serial:016d}"


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def _sse_data(value: Any, end: bytes = b"\n\n") -> bytes:
    return b"data: " + _dumps(value) + end


def _sse_event(name: str, value: Any) -> bytes:
    return b"event: " + name.encode("ascii") + b"\ndata: " + _dumps(value) + b"\n\n"


def _split(text: str, parts: int) -> list[str]:
    """
    Cut C{text} into at most C{parts} non-empty consecutive pieces.
    """
    if not text:
        return []
    parts = max(1, min(parts, len(text)))
    size = math.ceil(len(text) / parts)
    return [text[i : i + size] for i in range(0, len(text), size)]


def _fake_value(schema: Any) -> Any:
    """
    A value that satisfies a (simple) JSON schema: the made-up arguments of
    a tool call.
    """
    if not isinstance(schema, dict):
        return "fake"
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    kind = str(kind).lower() if kind is not None else "object"
    if kind == "object":
        properties = schema.get("properties")
        if not isinstance(properties, dict):
            return {}
        return {str(key): _fake_value(value) for key, value in properties.items()}
    return {
        "string": "fake",
        "integer": 1,
        "number": 1.5,
        "boolean": True,
        "array": [],
        "null": None,
    }.get(kind, "fake")


@frozen
class _Tool:
    name: str
    schema: Any


@frozen
class _Generation:
    """
    What the fake model "generated" for one request.

    @ivar pieces: the text pieces (empty for a tool call).
    @ivar tool: the tool called, if any.
    @ivar arguments: the tool call's arguments as JSON text.
    @ivar argument_pieces: C{arguments} cut for streaming.
    @ivar truncated: the text was cut by the request's max tokens.
    @ivar visible_tokens: output tokens excluding reasoning.
    """

    pieces: Sequence[str]
    tool: _Tool | None
    arguments: str
    argument_pieces: list[str]
    truncated: bool
    visible_tokens: int

    @property
    def text(self) -> str:
        return "".join(self.pieces)


class _Filler(Sequence[str]):
    """
    C{count} filler pieces without C{count} list slots.
    """

    def __init__(self, count: int) -> None:
        self._count = count

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return _Filler(len(range(*index.indices(self._count))))
        if not -self._count <= index < self._count:
            raise IndexError(index)
        return _FILLER_PIECE

    def __iter__(self) -> Iterator[str]:
        return itertools.repeat(_FILLER_PIECE, self._count)


def _generate(call: _Call, tools: Sequence[_Tool], max_tokens: object) -> _Generation:
    knobs = call.knobs
    if tools:
        tool = tools[0]
        value = _fake_value(tool.schema)
        # Every provider wants an object of arguments, whatever the schema says.
        arguments = _dumps(value if isinstance(value, dict) else {}).decode()
        argument_pieces = _split(arguments, max(1, knobs.chunks))
        visible = knobs.output_tokens
        return _Generation(
            pieces=[],
            tool=tool,
            arguments=arguments,
            argument_pieces=argument_pieces,
            truncated=False,
            visible_tokens=len(argument_pieces) if visible is None else visible,
        )
    pieces: Sequence[str]
    if knobs.total_bytes is not None:
        pieces = _Filler(max(1, math.ceil(knobs.total_bytes / len(_FILLER_PIECE))))
    else:
        pieces = text_pieces(knobs.chunks)
    truncated = False
    if (
        isinstance(max_tokens, int)
        and not isinstance(max_tokens, bool)
        and 0 <= max_tokens < len(pieces)
    ):
        pieces = pieces[:max_tokens]
        truncated = True
    visible = knobs.output_tokens
    return _Generation(
        pieces=pieces,
        tool=None,
        arguments="",
        argument_pieces=[],
        truncated=truncated,
        visible_tokens=len(pieces) if visible is None else visible,
    )


def _embedding(index: int, dimensions: int) -> list[float]:
    """
    A deterministic vector whose values survive a float32 round trip
    exactly (so base64 answers decode to the same numbers).
    """
    return [((index + j) % 8) / 8.0 - 0.5 for j in range(dimensions)]


_STATUS_MESSAGES = {
    400: "Invalid request.",
    401: "Invalid authentication credentials.",
    402: "Payment required.",
    403: "Permission denied.",
    404: "Not found.",
    408: "Request timed out.",
    409: "Conflict.",
    413: "Request too large.",
    422: "Unprocessable request.",
    429: "Rate limit reached, please slow down.",
    500: "The server had an error while processing your request.",
    502: "Bad gateway.",
    503: "The service is temporarily overloaded.",
    504: "The request timed out.",
    529: "Overloaded.",
}


def _status_message(status: int) -> str:
    return _STATUS_MESSAGES.get(status, f"Error {status}.")


# ---------------------------------------------------------------------------
# Dialects: headers and error shapes per provider


class _Dialect:
    """
    Headers and error shapes of one provider.
    """

    json_type = b"application/json"
    sse_type = b"text/event-stream; charset=utf-8"

    def headers(self, call: _Call, content_type: bytes) -> list[tuple[bytes, bytes]]:
        raise NotImplementedError()

    def error_body(self, call: _Call, status: int, message: str, code: str | None) -> Any:
        raise NotImplementedError()

    def stream_error(self, call: _Call) -> bytes:
        raise NotImplementedError()

    def check_auth(self, call: _Call) -> _Reply | None:
        raise NotImplementedError()

    def error(
        self, call: _Call, status: int, message: str | None = None, code: str | None = None
    ) -> _Reply:
        text = message if message is not None else _status_message(status)
        return _Reply(
            status=status,
            headers=self.headers(call, self.json_type),
            chunks=[_dumps(self.error_body(call, status, text, code))],
        )

    def json(self, call: _Call, value: Any) -> _Reply:
        return _Reply(
            status=200, headers=self.headers(call, self.json_type), chunks=[_dumps(value)]
        )

    def stream(
        self, call: _Call, chunks: Iterable[bytes], content_type: bytes | None = None
    ) -> _Reply:
        return _Reply(
            status=200,
            headers=self.headers(call, content_type or self.sse_type),
            chunks=chunks,
            streaming=True,
            error_event=self.stream_error(call),
        )


def _bearer(request: ReceivedRequest) -> str | None:
    value = request.header(b"authorization")
    if value is None:
        return None
    scheme, _, token = value.decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class _OpenAI(_Dialect):
    _types = {
        400: "invalid_request_error",
        401: "invalid_request_error",
        403: "permission_error",
        404: "invalid_request_error",
        409: "invalid_request_error",
        413: "invalid_request_error",
        422: "invalid_request_error",
        429: "requests",
    }
    _codes = {401: "invalid_api_key", 429: "rate_limit_exceeded"}

    def headers(self, call: _Call, content_type: bytes) -> list[tuple[bytes, bytes]]:
        return [
            (b"Content-Type", content_type),
            (b"Server", b"cloudflare"),
            (b"x-request-id", call.ident("req_").encode()),
            (b"openai-organization", b"fake-org"),
            (b"openai-processing-ms", b"1"),
            (b"openai-version", b"2020-10-01"),
            (b"x-ratelimit-limit-requests", b"10000"),
            (b"x-ratelimit-remaining-requests", b"9999"),
            (b"x-ratelimit-reset-requests", b"6ms"),
            (b"x-ratelimit-limit-tokens", b"30000000"),
            (b"x-ratelimit-remaining-tokens", b"29999990"),
            (b"x-ratelimit-reset-tokens", b"0s"),
        ]

    def error_body(self, call: _Call, status: int, message: str, code: str | None) -> Any:
        kind = self._types.get(status, "server_error" if status >= 500 else "invalid_request_error")
        return {
            "error": {
                "message": message,
                "type": kind,
                "param": None,
                "code": code if code is not None else self._codes.get(status),
            }
        }

    def stream_error(self, call: _Call) -> bytes:
        return _sse_data(self.error_body(call, 500, _status_message(500), None))

    def check_auth(self, call: _Call) -> _Reply | None:
        if not call.require_auth:
            return None
        key = _bearer(call.request)
        if key is None:
            azure = call.request.header(b"api-key")
            key = azure.decode("latin-1").strip() if azure else None
        if not key:
            return self.error(
                call,
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                None,
            )
        if key.startswith("invalid"):
            return self.error(call, 401, f"Incorrect API key provided: {key[:4]}****.")
        return None


class _Anthropic(_Dialect):
    _types = {
        400: "invalid_request_error",
        401: "authentication_error",
        402: "billing_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        500: "api_error",
        504: "timeout_error",
        529: "overloaded_error",
    }

    def headers(self, call: _Call, content_type: bytes) -> list[tuple[bytes, bytes]]:
        return [
            (b"Content-Type", content_type),
            (b"Server", b"cloudflare"),
            (b"request-id", call.ident("req_").encode()),
            (b"anthropic-organization-id", b"00000000-0000-4000-8000-00000000fa4e"),
            (b"anthropic-ratelimit-requests-limit", b"4000"),
            (b"anthropic-ratelimit-requests-remaining", b"3999"),
            (b"anthropic-ratelimit-requests-reset", b"1970-01-01T00:00:00Z"),
        ]

    def error_body(self, call: _Call, status: int, message: str, code: str | None) -> Any:
        kind = code or self._types.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        return {
            "type": "error",
            "error": {"type": kind, "message": message},
            "request_id": call.ident("req_"),
        }

    def stream_error(self, call: _Call) -> bytes:
        return _sse_event(
            "error",
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        )

    def check_auth(self, call: _Call) -> _Reply | None:
        if call.require_auth:
            header = call.request.header(b"x-api-key")
            key = header.decode("latin-1").strip() if header else _bearer(call.request)
            if not key:
                return self.error(call, 401, "x-api-key header is required")
            if key.startswith("invalid"):
                return self.error(call, 401, "invalid x-api-key")
        if call.request.header(b"anthropic-version") is None:
            return self.error(call, 400, "anthropic-version: header is required")
        return None


class _Gemini(_Dialect):
    json_type = b"application/json; charset=UTF-8"
    sse_type = b"text/event-stream"
    _statuses = {
        400: "INVALID_ARGUMENT",
        401: "UNAUTHENTICATED",
        403: "PERMISSION_DENIED",
        404: "NOT_FOUND",
        409: "ABORTED",
        429: "RESOURCE_EXHAUSTED",
        499: "CANCELLED",
        500: "INTERNAL",
        501: "NOT_IMPLEMENTED",
        503: "UNAVAILABLE",
        504: "DEADLINE_EXCEEDED",
    }

    def headers(self, call: _Call, content_type: bytes) -> list[tuple[bytes, bytes]]:
        return [
            (b"Content-Type", content_type),
            (b"Vary", b"Origin, X-Origin, Referer"),
            (b"X-Content-Type-Options", b"nosniff"),
            (b"Server", b"scaffolding on HTTPServer2"),
        ]

    def error_body(self, call: _Call, status: int, message: str, code: str | None) -> Any:
        error: dict[str, Any] = {
            "code": status,
            "message": message,
            "status": self._statuses.get(
                status, "INTERNAL" if status >= 500 else "FAILED_PRECONDITION"
            ),
        }
        if code is not None:
            error["details"] = [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": code,
                    "domain": "googleapis.com",
                }
            ]
        return {"error": error}

    def stream_error(self, call: _Call) -> bytes:
        return _sse_data(
            self.error_body(call, 500, "An internal error has occurred.", None), b"\r\n\r\n"
        )

    def check_auth(self, call: _Call) -> _Reply | None:
        if not call.require_auth:
            return None
        header = call.request.header(b"x-goog-api-key")
        key = call.query.get("key") or (header.decode("latin-1").strip() if header else None)
        if not key:
            key = _bearer(call.request)
        if not key:
            return self.error(
                call,
                403,
                "Method doesn't allow unregistered callers (callers without established "
                "identity). Please use API Key or other form of API consumer identity to "
                "call this API.",
            )
        if key.startswith("invalid"):
            return self.error(
                call, 400, "API key not valid. Please pass a valid API key.", "API_KEY_INVALID"
            )
        return None


_OPENAI = _OpenAI()
_ANTHROPIC = _Anthropic()
_GEMINI = _Gemini()


# ---------------------------------------------------------------------------
# OpenAI routes


def _openai_usage(call: _Call, generation: _Generation) -> dict[str, Any]:
    knobs = call.knobs
    completion = generation.visible_tokens + knobs.reasoning_tokens
    prompt_details: dict[str, Any] = {"cached_tokens": knobs.cached_tokens, "audio_tokens": 0}
    if knobs.cache_write_tokens:
        prompt_details["cache_write_tokens"] = knobs.cache_write_tokens
    return {
        "prompt_tokens": knobs.input_tokens,
        "completion_tokens": completion,
        "total_tokens": knobs.input_tokens + completion,
        "prompt_tokens_details": prompt_details,
        "completion_tokens_details": {
            "reasoning_tokens": knobs.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _openai_chat_tools(body: dict[str, Any]) -> list[_Tool]:
    tools = body.get("tools")
    if not isinstance(tools, list) or body.get("tool_choice") == "none":
        return []
    found = [
        _Tool(str(tool["function"].get("name")), tool["function"].get("parameters"))
        for tool in tools
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict)
    ]
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        wanted = choice["function"].get("name")
        found = [tool for tool in found if tool.name == wanted] or found
    return found


def _openai_model(call: _Call) -> str:
    return call.knobs.model or str(call.body.get("model"))


def _openai_require(call: _Call, *names: str) -> _Reply | None:
    for name in names:
        if name not in call.body:
            return _OPENAI.error(call, 400, f"Missing required parameter: '{name}'.")
    return None


def _openai_include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _chat_completions(call: _Call) -> _Reply:
    missing = _openai_require(call, "model", "messages")
    if missing is not None:
        return missing
    body = call.body
    knobs = call.knobs
    model = _openai_model(call)
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    generation = _generate(call, _openai_chat_tools(body), limit)
    if knobs.finish_reason is not None:
        finish = knobs.finish_reason
    elif generation.tool is not None:
        finish = "tool_calls"
    else:
        finish = "length" if generation.truncated else "stop"
    call_id = call.ident("call_")
    if body.get("stream") is not True:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": None if generation.tool else generation.text,
            "refusal": None,
            "annotations": [],
        }
        if generation.tool is not None:
            message["tool_calls"] = [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": generation.tool.name, "arguments": generation.arguments},
                }
            ]
        value: dict[str, Any] = {
            "id": call.ident("chatcmpl-"),
            "object": "chat.completion",
            "created": call.now,
            "model": model,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            ],
            "service_tier": "default",
            "system_fingerprint": _FINGERPRINT,
        }
        if knobs.usage:
            value["usage"] = _openai_usage(call, generation)
        return _OPENAI.json(call, value)

    include_usage = _openai_include_usage(body)

    def chunks() -> Iterator[bytes]:
        base = {
            "id": call.ident("chatcmpl-"),
            "object": "chat.completion.chunk",
            "created": call.now,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": _FINGERPRINT,
        }

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            value = dict(base)
            value["choices"] = [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ]
            if include_usage:
                value["usage"] = None
            return _sse_data(value)

        if generation.tool is not None:
            yield chunk(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": call_id,
                            "type": "function",
                            "function": {"name": generation.tool.name, "arguments": ""},
                        }
                    ],
                    "refusal": None,
                }
            )
            for piece in generation.argument_pieces:
                yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        else:
            yield chunk({"role": "assistant", "content": "", "refusal": None})
            for piece in generation.pieces:
                yield chunk({"content": piece})
        yield chunk({}, finish)
        if include_usage and knobs.usage:
            value = dict(base)
            value["choices"] = []
            value["usage"] = _openai_usage(call, generation)
            yield _sse_data(value)
        yield b"data: [DONE]\n\n"

    return _OPENAI.stream(call, chunks())


def _completions(call: _Call) -> _Reply:
    missing = _openai_require(call, "model", "prompt")
    if missing is not None:
        return missing
    body = call.body
    knobs = call.knobs
    model = _openai_model(call)
    generation = _generate(call, [], body.get("max_tokens"))
    finish = knobs.finish_reason or ("length" if generation.truncated else "stop")
    usage = _openai_usage(call, generation)
    if body.get("stream") is not True:
        value: dict[str, Any] = {
            "id": call.ident("cmpl-"),
            "object": "text_completion",
            "created": call.now,
            "model": model,
            "choices": [
                {"text": generation.text, "index": 0, "logprobs": None, "finish_reason": finish}
            ],
            "system_fingerprint": _FINGERPRINT,
        }
        if knobs.usage:
            value["usage"] = usage
        return _OPENAI.json(call, value)

    include_usage = _openai_include_usage(body)

    def chunks() -> Iterator[bytes]:
        def chunk(text: str, finish_reason: str | None) -> bytes:
            value: dict[str, Any] = {
                "id": call.ident("cmpl-"),
                "object": "text_completion",
                "created": call.now,
                "choices": [
                    {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
                ],
                "model": model,
                "system_fingerprint": _FINGERPRINT,
            }
            if include_usage:
                value["usage"] = None
            return _sse_data(value)

        for piece in generation.pieces:
            yield chunk(piece, None)
        yield chunk("", finish)
        if include_usage and knobs.usage:
            yield _sse_data(
                {
                    "id": call.ident("cmpl-"),
                    "object": "text_completion",
                    "created": call.now,
                    "choices": [],
                    "model": model,
                    "system_fingerprint": _FINGERPRINT,
                    "usage": usage,
                }
            )
        yield b"data: [DONE]\n\n"

    return _OPENAI.stream(call, chunks())


def _responses(call: _Call) -> _Reply:
    missing = _openai_require(call, "model")
    if missing is not None:
        return missing
    body = call.body
    knobs = call.knobs
    model = _openai_model(call)
    tools = body.get("tools")
    offered = []
    if isinstance(tools, list) and body.get("tool_choice") != "none":
        offered = [
            _Tool(str(tool.get("name")), tool.get("parameters"))
            for tool in tools
            if isinstance(tool, dict) and tool.get("type") == "function"
        ]
    generation = _generate(call, offered, body.get("max_output_tokens"))
    completion = generation.visible_tokens + knobs.reasoning_tokens
    usage = {
        "input_tokens": knobs.input_tokens,
        "input_tokens_details": {
            "cached_tokens": knobs.cached_tokens,
            "cache_write_tokens": knobs.cache_write_tokens,
        },
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": knobs.reasoning_tokens},
        "total_tokens": knobs.input_tokens + completion,
    }
    item_id = call.ident("fc_" if generation.tool else "msg_")
    final_status = "incomplete" if generation.truncated else "completed"

    def item(status: str, done: bool) -> dict[str, Any]:
        if generation.tool is not None:
            return {
                "id": item_id,
                "type": "function_call",
                "status": status,
                "arguments": generation.arguments if done else "",
                "call_id": call.ident("call_"),
                "name": generation.tool.name,
            }
        return {
            "id": item_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": [part(generation.text)] if done else [],
        }

    def part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def response(status: str, output: list[Any], with_usage: bool) -> dict[str, Any]:
        return {
            "id": call.ident("resp_"),
            "object": "response",
            "created_at": call.now,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": (
                {"reason": "max_output_tokens"} if status == "incomplete" else None
            ),
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "store": body.get("store", True),
            "temperature": body.get("temperature", 1.0),
            "text": {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": tools if isinstance(tools, list) else [],
            "top_p": body.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": usage if with_usage and knobs.usage else None,
            "user": None,
            "metadata": body.get("metadata") or {},
        }

    if body.get("stream") is not True:
        return _OPENAI.json(call, response(final_status, [item(final_status, True)], True))

    def chunks() -> Iterator[bytes]:
        sequence = itertools.count()

        def event(kind: str, **fields: Any) -> bytes:
            return _sse_event(kind, {"type": kind, "sequence_number": next(sequence), **fields})

        yield event("response.created", response=response("in_progress", [], False))
        yield event("response.in_progress", response=response("in_progress", [], False))
        yield event("response.output_item.added", output_index=0, item=item("in_progress", False))
        where = {"item_id": item_id, "output_index": 0}
        if generation.tool is not None:
            for piece in generation.argument_pieces:
                yield event("response.function_call_arguments.delta", delta=piece, **where)
            yield event(
                "response.function_call_arguments.done",
                arguments=generation.arguments,
                name=generation.tool.name,
                **where,
            )
        else:
            text_where = {**where, "content_index": 0}
            yield event("response.content_part.added", part=part(""), **text_where)
            for piece in generation.pieces:
                yield event("response.output_text.delta", delta=piece, logprobs=[], **text_where)
            text = generation.text
            yield event("response.output_text.done", text=text, logprobs=[], **text_where)
            yield event("response.content_part.done", part=part(text), **text_where)
        yield event("response.output_item.done", output_index=0, item=item(final_status, True))
        yield event(
            f"response.{final_status}",
            response=response(final_status, [item(final_status, True)], True),
        )

    return _OPENAI.stream(call, chunks())


def _embeddings(call: _Call) -> _Reply:
    missing = _openai_require(call, "model", "input")
    if missing is not None:
        return missing
    body = call.body
    raw = body["input"]
    if isinstance(raw, list) and raw and not all(isinstance(x, int) for x in raw):
        count = len(raw)
    else:
        count = 1
    dimensions = body.get("dimensions")
    if not isinstance(dimensions, int) or dimensions <= 0:
        dimensions = _EMBEDDING_DIMENSIONS
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        return _OPENAI.error(call, 400, f"Invalid encoding_format: {encoding!r}.")
    data = []
    for index in range(count):
        vector = _embedding(index, dimensions)
        embedding: Any = vector
        if encoding == "base64":
            embedding = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    value: dict[str, Any] = {"object": "list", "data": data, "model": _openai_model(call)}
    if call.knobs.usage:
        value["usage"] = {
            "prompt_tokens": call.knobs.input_tokens,
            "total_tokens": call.knobs.input_tokens,
        }
    return _OPENAI.json(call, value)


def _openai_model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": _MODEL_CREATED, "owned_by": "system"}


def _openai_models(call: _Call) -> _Reply:
    return _OPENAI.json(
        call, {"object": "list", "data": [_openai_model_object(m) for m in OPENAI_MODELS]}
    )


def _openai_model_get(call: _Call) -> _Reply:
    name = call.params["model"]
    if name not in OPENAI_MODELS:
        return _OPENAI.error(call, 404, f"The model '{name}' does not exist", "model_not_found")
    return _OPENAI.json(call, _openai_model_object(name))


# ---------------------------------------------------------------------------
# Anthropic routes


def _anthropic_usage(call: _Call, output_tokens: int) -> dict[str, Any]:
    knobs = call.knobs
    usage: dict[str, Any] = {
        "input_tokens": knobs.input_tokens,
        "cache_creation_input_tokens": knobs.cache_write_tokens,
        "cache_read_input_tokens": knobs.cached_tokens,
        "cache_creation": {
            "ephemeral_5m_input_tokens": knobs.cache_write_tokens,
            "ephemeral_1h_input_tokens": 0,
        },
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }
    return usage


def _anthropic_tools(body: dict[str, Any]) -> list[_Tool]:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not isinstance(tools, list) or (isinstance(choice, dict) and choice.get("type") == "none"):
        return []
    found = [
        _Tool(str(tool.get("name")), tool.get("input_schema"))
        for tool in tools
        if isinstance(tool, dict) and "input_schema" in tool
    ]
    if isinstance(choice, dict) and choice.get("type") == "tool":
        found = [tool for tool in found if tool.name == choice.get("name")] or found
    return found


def _anthropic_require(call: _Call, *names: str) -> _Reply | None:
    for name in names:
        if name not in call.body:
            return _ANTHROPIC.error(call, 400, f"{name}: Field required")
    return None


def _messages(call: _Call) -> _Reply:
    missing = _anthropic_require(call, "model", "max_tokens", "messages")
    if missing is not None:
        return missing
    body = call.body
    knobs = call.knobs
    model = knobs.model or str(body["model"])
    generation = _generate(call, _anthropic_tools(body), body.get("max_tokens"))
    if knobs.finish_reason is not None:
        stop = knobs.finish_reason
    elif generation.tool is not None:
        stop = "tool_use"
    else:
        stop = "max_tokens" if generation.truncated else "end_turn"
    output_tokens = generation.visible_tokens + knobs.reasoning_tokens
    tool_id = call.ident("toolu_")
    message_id = call.ident("msg_")

    def final_usage() -> dict[str, Any]:
        usage = _anthropic_usage(call, output_tokens)
        if knobs.reasoning_tokens:
            usage["output_tokens_details"] = {"thinking_tokens": knobs.reasoning_tokens}
        return usage

    if body.get("stream") is not True:
        if generation.tool is not None:
            content: list[Any] = [
                {
                    "type": "tool_use",
                    "id": tool_id,
                    "name": generation.tool.name,
                    "input": orjson.loads(generation.arguments),
                }
            ]
        else:
            content = [{"type": "text", "text": generation.text}]
        value: dict[str, Any] = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
        }
        if knobs.usage:
            value["usage"] = final_usage()
        return _ANTHROPIC.json(call, value)

    def chunks() -> Iterator[bytes]:
        start: dict[str, Any] = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
        }
        if knobs.usage:
            start["usage"] = _anthropic_usage(call, 1)
        yield _sse_event("message_start", {"type": "message_start", "message": start})
        if generation.tool is not None:
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": tool_id,
                "name": generation.tool.name,
                "input": {},
            }
        else:
            block = {"type": "text", "text": ""}
        yield _sse_event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": block},
        )
        yield _sse_event("ping", {"type": "ping"})
        deltas: Iterable[dict[str, str]]
        if generation.tool is not None:
            deltas = (
                {"type": "input_json_delta", "partial_json": piece}
                for piece in generation.argument_pieces
            )
        else:
            deltas = ({"type": "text_delta", "text": piece} for piece in generation.pieces)
        for delta in deltas:
            yield _sse_event(
                "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
            )
        yield _sse_event("content_block_stop", {"type": "content_block_stop", "index": 0})
        message_delta: dict[str, Any] = {
            "type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": None},
        }
        if knobs.usage:
            usage = final_usage()
            message_delta["usage"] = {
                key: usage[key]
                for key in (
                    "input_tokens",
                    "cache_creation_input_tokens",
                    "cache_read_input_tokens",
                    "output_tokens",
                    "output_tokens_details",
                )
                if key in usage
            }
        yield _sse_event("message_delta", message_delta)
        yield _sse_event("message_stop", {"type": "message_stop"})

    return _ANTHROPIC.stream(call, chunks())


def _count_tokens(call: _Call) -> _Reply:
    missing = _anthropic_require(call, "model", "messages")
    if missing is not None:
        return missing
    return _ANTHROPIC.json(call, {"input_tokens": call.knobs.input_tokens})


def _anthropic_model_object(name: str) -> dict[str, Any]:
    return {
        "type": "model",
        "id": name,
        "display_name": name.replace("-", " ").title(),
        "created_at": "2025-05-14T00:00:00Z",
    }


def _anthropic_models(call: _Call) -> _Reply:
    return _ANTHROPIC.json(
        call,
        {
            "data": [_anthropic_model_object(m) for m in ANTHROPIC_MODELS],
            "has_more": False,
            "first_id": ANTHROPIC_MODELS[0],
            "last_id": ANTHROPIC_MODELS[-1],
        },
    )


def _anthropic_model_get(call: _Call) -> _Reply:
    name = call.params["model"]
    if name not in ANTHROPIC_MODELS:
        return _ANTHROPIC.error(call, 404, f"model: {name}")
    return _ANTHROPIC.json(call, _anthropic_model_object(name))


# ---------------------------------------------------------------------------
# Gemini routes


def _gemini_usage(call: _Call, candidates: int | None) -> dict[str, Any]:
    """
    C{usageMetadata}; with C{candidates=None}, the prompt-only form the
    real API puts on stream chunks before the last.
    """
    knobs = call.knobs
    usage: dict[str, Any] = {
        "promptTokenCount": knobs.input_tokens,
        "totalTokenCount": knobs.input_tokens,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": knobs.input_tokens}],
    }
    if candidates is not None:
        usage["candidatesTokenCount"] = candidates
        usage["totalTokenCount"] = knobs.input_tokens + candidates + knobs.reasoning_tokens
    if knobs.reasoning_tokens and candidates is not None:
        usage["thoughtsTokenCount"] = knobs.reasoning_tokens
    if knobs.cached_tokens:
        usage["cachedContentTokenCount"] = knobs.cached_tokens
        usage["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": knobs.cached_tokens}]
    return usage


def _gemini_field(value: dict[str, Any], camel: str) -> Any:
    """
    A field of a Gemini request, spelt in camelCase or snake_case: the API
    takes both (proto3 JSON), and google-genai sends some fields snake_case
    (C{parameters_json_schema}).
    """
    if camel in value:
        return value[camel]
    return value.get(re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), camel))


def _gemini_tools(body: dict[str, Any]) -> list[_Tool]:
    config = _gemini_field(body, "toolConfig")
    if isinstance(config, dict):
        calling = _gemini_field(config, "functionCallingConfig")
        if isinstance(calling, dict) and calling.get("mode") == "NONE":
            return []
    found: list[_Tool] = []
    tools = body.get("tools")
    if not isinstance(tools, list):
        return found
    for tool in tools:
        declarations = (
            _gemini_field(tool, "functionDeclarations") if isinstance(tool, dict) else None
        )
        if not isinstance(declarations, list):
            continue
        for declaration in declarations:
            if isinstance(declaration, dict):
                schema = declaration.get("parameters") or _gemini_field(
                    declaration, "parametersJsonSchema"
                )
                found.append(_Tool(str(declaration.get("name")), schema))
    return found


def _gemini_max_tokens(body: dict[str, Any]) -> object:
    config = _gemini_field(body, "generationConfig")
    return _gemini_field(config, "maxOutputTokens") if isinstance(config, dict) else None


def _gemini_generate(call: _Call) -> _Reply:
    body = call.body
    if "contents" not in body:
        return _GEMINI.error(
            call, 400, "* GenerateContentRequest.contents: contents is not specified"
        )
    knobs = call.knobs
    model = knobs.model or call.params["model"]
    generation = _generate(call, _gemini_tools(body), _gemini_max_tokens(body))
    if knobs.finish_reason is not None:
        finish = knobs.finish_reason
    else:
        finish = "MAX_TOKENS" if generation.truncated else "STOP"
    response_id = call.ident("resp-")

    def candidate(parts: list[Any], finish_reason: str | None) -> dict[str, Any]:
        value: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
        if finish_reason is not None:
            value["finishReason"] = finish_reason
        return value

    def response(parts: list[Any], finish_reason: str | None, last: bool) -> dict[str, Any]:
        value: dict[str, Any] = {"candidates": [candidate(parts, finish_reason)]}
        if knobs.usage:
            value["usageMetadata"] = _gemini_usage(
                call, generation.visible_tokens if last else None
            )
        value["modelVersion"] = model
        value["responseId"] = response_id
        return value

    def responses() -> Iterator[dict[str, Any]]:
        if generation.tool is not None:
            yield whole
            return
        count = len(generation.pieces)
        if count == 0:
            yield response([{"text": ""}], finish, True)
            return
        for index, piece in enumerate(generation.pieces):
            last = index == count - 1
            yield response([{"text": piece}], finish if last else None, last)

    if generation.tool is not None:
        call_part = {
            "functionCall": {
                "name": generation.tool.name,
                "args": orjson.loads(generation.arguments),
            }
        }
        whole = response([call_part], finish, True)
    else:
        whole = response([{"text": generation.text}], finish, True)

    method = call.params["method"]
    if method == "generateContent":
        return _GEMINI.json(call, whole)
    if call.query.get("alt") == "sse":
        return _GEMINI.stream(call, (_sse_data(value, b"\r\n\r\n") for value in responses()))

    def array() -> Iterator[bytes]:
        separator = b"["
        for value in responses():
            yield separator + _dumps(value)
            separator = b",\r\n"
        yield b"]" if separator != b"[" else b"[]"

    return _GEMINI.stream(call, array(), _GEMINI.json_type)


def _gemini_count_tokens(call: _Call) -> _Reply:
    tokens = call.knobs.input_tokens
    value: dict[str, Any] = {
        "totalTokens": tokens,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": tokens}],
    }
    if call.knobs.cached_tokens:
        value["cachedContentTokenCount"] = call.knobs.cached_tokens
    return _GEMINI.json(call, value)


def _gemini_dimensions(request: Any) -> int:
    if isinstance(request, dict):
        dimensions = _gemini_field(request, "outputDimensionality")
        if isinstance(dimensions, int) and dimensions > 0:
            return dimensions
    return _EMBEDDING_DIMENSIONS


def _gemini_embed(call: _Call) -> _Reply:
    body = call.body
    if call.params["method"] == "embedContent":
        if "content" not in body:
            return _GEMINI.error(
                call, 400, "* EmbedContentRequest.content: content is not specified"
            )
        return _GEMINI.json(
            call, {"embedding": {"values": _embedding(0, _gemini_dimensions(body))}}
        )
    requests = body.get("requests")
    if not isinstance(requests, list) or not requests:
        return _GEMINI.error(call, 400, "* BatchEmbedContentsRequest.requests: is empty")
    return _GEMINI.json(
        call,
        {
            "embeddings": [
                {"values": _embedding(index, _gemini_dimensions(request))}
                for index, request in enumerate(requests)
            ]
        },
    )


def _gemini_model_object(name: str) -> dict[str, Any]:
    embedding = "embedding" in name
    return {
        "name": f"models/{name}",
        "version": "001",
        "displayName": name.replace("-", " ").title(),
        "description": "A model served by the fake upstream.",
        "inputTokenLimit": 1048576 if not embedding else 2048,
        "outputTokenLimit": 65536 if not embedding else 1,
        "supportedGenerationMethods": (
            ["embedContent", "countTokens"]
            if embedding
            else ["generateContent", "countTokens", "createCachedContent"]
        ),
    }


def _gemini_models(call: _Call) -> _Reply:
    return _GEMINI.json(call, {"models": [_gemini_model_object(m) for m in GEMINI_MODELS]})


def _gemini_model_get(call: _Call) -> _Reply:
    name = call.params["model"]
    if name not in GEMINI_MODELS:
        return _GEMINI.error(call, 404, f"models/{name} is not found for API version v1beta.")
    return _GEMINI.json(call, _gemini_model_object(name))


# ---------------------------------------------------------------------------
# Routing

_Handler = Callable[[_Call], _Reply]

_GEMINI_METHOD = re.compile(r"/models/([^/:]+):([A-Za-z]+)$")
_MODEL_ID = re.compile(r"/models/([^/]+)$")
_GEMINI_METHODS: dict[str, _Handler] = {
    "generateContent": _gemini_generate,
    "streamGenerateContent": _gemini_generate,
    "countTokens": _gemini_count_tokens,
    "embedContent": _gemini_embed,
    "batchEmbedContents": _gemini_embed,
}


def _route(
    request: ReceivedRequest, query: Mapping[str, str]
) -> tuple[_Dialect, _Handler | None, dict[str, str]]:
    """
    Pick the provider and handler for a request from the end of its path.
    """
    path = request.path.decode("latin-1")
    method = request.method
    gemini_method = _GEMINI_METHOD.search(path)
    if gemini_method is not None:
        model = _percent_decode(gemini_method.group(1))
        name = gemini_method.group(2)
        handler = _GEMINI_METHODS.get(name) if method == b"POST" else None
        return _GEMINI, handler, {"model": model, "method": name}
    model_id = _MODEL_ID.search(path)
    is_gemini = (
        "/v1beta/" in path + "/"
        or "/v1alpha/" in path + "/"
        or "key" in query
        or request.header(b"x-goog-api-key") is not None
    )
    is_anthropic = request.header(b"anthropic-version") is not None
    if method == b"GET" and (path.endswith("/models") or model_id is not None):
        params = {"model": _percent_decode(model_id.group(1))} if model_id else {}
        if is_gemini:
            return _GEMINI, _gemini_model_get if model_id else _gemini_models, params
        if is_anthropic:
            return _ANTHROPIC, _anthropic_model_get if model_id else _anthropic_models, params
        return _OPENAI, _openai_model_get if model_id else _openai_models, params
    if path.endswith("/messages/count_tokens"):
        return _ANTHROPIC, _count_tokens if method == b"POST" else None, {}
    if path.endswith("/messages"):
        return _ANTHROPIC, _messages if method == b"POST" else None, {}
    if is_gemini:
        return _GEMINI, None, {}
    posts: dict[str, _Handler] = {
        "/chat/completions": _chat_completions,
        "/completions": _completions,
        "/responses": _responses,
        "/embeddings": _embeddings,
    }
    for suffix, handler in posts.items():
        if path.endswith(suffix):
            return _OPENAI, handler if method == b"POST" else None, {}
    return _OPENAI, None, {}


def _percent_decode(text: str) -> str:
    return unquote(text)


def _parse_query(query: bytes) -> dict[str, str]:
    return dict(parse_qsl(query.decode("latin-1"), keep_blank_values=True))


def _not_found(dialect: _Dialect, call: _Call) -> _Reply:
    request = call.request
    if dialect is _OPENAI:
        message = f"Invalid URL ({request.method.decode()} {request.path.decode('latin-1')})"
    elif dialect is _ANTHROPIC:
        message = "Not Found"
    else:
        message = "The requested URL was not found on this server."
    return dialect.error(call, 404, message)


# ---------------------------------------------------------------------------
# Writing responses


class _WebRequest(Protocol):
    """
    The parts of L{twisted.web.server.Request} the fake uses, typed (the
    class itself is not annotated).
    """

    method: bytes
    uri: bytes
    content: IO[bytes] | None
    requestHeaders: Headers
    responseHeaders: Headers

    def setResponseCode(self, code: int) -> None: ...

    def write(self, data: bytes) -> None: ...

    def finish(self) -> None: ...

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...

    def notifyFinish(self) -> Deferred[None]: ...

    def loseConnection(self) -> None: ...


@implementer(IPushProducer)
class _Responder:
    """
    Writes one L{_Reply} on the injected clock, honouring the timing and
    failure knobs and the transport's flow control.

    It is the request's push producer: when the client reads slowly the
    transport pauses it (counted in L{FakeUpstream.paused_count}) and no
    chunk is written until it is resumed.
    """

    def __init__(
        self,
        fake: FakeUpstream,
        request: _WebRequest,
        received: ReceivedRequest,
        knobs: _Knobs,
        reply: _Reply,
        gzip: bool,
    ) -> None:
        self._fake = fake
        self._request = request
        self._received = received
        self._knobs = knobs
        self._reply = reply
        self._gzip = gzip
        self._chunks: Iterator[bytes] = iter(reply.chunks)
        self._lookahead: bytes | None = None
        self._compressor = zlib.compressobj(wbits=31) if gzip and reply.streaming else None
        self._timer: IDelayedCall | None = None
        self._paused = False
        self._stalled = False
        self._done = False
        self._dying = False
        self._ended = False
        self._registered = False
        self._headers_sent = False
        self._chunks_sent = 0
        self._bytes_sent = 0
        self.sent: list[bytes] | None = [] if fake.record_bodies else None

    def start(self) -> None:
        self._fake.active_responses += 1
        self._request.notifyFinish().addCallbacks(self._finished, self._lost)
        if self._knobs.hang == "headers":
            return
        if self._knobs.headers_delay > 0:
            self._timer = self._fake.clock.callLater(self._knobs.headers_delay, self._send_headers)
        else:
            self._send_headers()

    def _send_headers(self) -> None:
        self._timer = None
        request = self._request
        reply = self._reply
        request.setResponseCode(reply.status)
        headers = request.responseHeaders
        for name, value in reply.headers:
            headers.setRawHeaders(name, [value])
        for cookie in self._knobs.set_cookies:
            headers.addRawHeader(b"Set-Cookie", cookie.encode("latin-1"))
        for name_text, value_text in self._knobs.extra_headers:
            headers.addRawHeader(name_text.encode("latin-1"), value_text.encode("latin-1"))
        if self._knobs.retry_after is not None:
            headers.addRawHeader(b"retry-after", self._knobs.retry_after.encode("latin-1"))
        if self._gzip:
            headers.addRawHeader(b"Content-Encoding", b"gzip")
            headers.addRawHeader(b"Vary", b"Accept-Encoding")
        if not reply.streaming:
            body = b"".join(reply.chunks)
            if self._gzip:
                body = _gzip.compress(body, mtime=0)
            self._chunks = iter([body])
            headers.setRawHeaders(b"Content-Length", [str(len(body)).encode()])
        request.write(b"")
        self._headers_sent = True
        self._fake._last_responder = self
        if self._done:
            return
        if self._knobs.hang == "body":
            self._stalled = True
            return
        request.registerProducer(self, True)
        self._registered = True
        self._pump()

    def _take(self) -> bytes | None:
        if self._lookahead is not None:
            chunk, self._lookahead = self._lookahead, None
            return chunk
        return next(self._chunks, None)

    def _has_more(self) -> bool:
        if self._lookahead is None:
            self._lookahead = next(self._chunks, None)
        return self._lookahead is not None

    def _pump(self) -> None:
        self._timer = None
        knobs = self._knobs
        while not (self._paused or self._done or self._stalled):
            sent = self._chunks_sent
            if knobs.die_after is not None and sent >= knobs.die_after:
                self._die()
                return
            error_event = self._reply.error_event
            error_due = knobs.error_after is not None and sent >= knobs.error_after
            if error_event is not None and error_due:
                self._write(error_event)
                self._complete()
                return
            if knobs.stall_after is not None and sent >= knobs.stall_after:
                self._stalled = True
                return
            chunk = self._take()
            if chunk is None:
                if knobs.die_after is not None:
                    self._die()
                else:
                    self._complete()
                return
            self._write(chunk)
            self._chunks_sent += 1
            if knobs.delay <= 0 or self._done:
                continue
            if knobs.die_after is not None or self._has_more():
                self._timer = self._fake.clock.callLater(knobs.delay, self._pump)
                return

    def _write(self, data: bytes) -> None:
        if self._compressor is not None:
            data = self._compressor.compress(data) + self._compressor.flush(zlib.Z_SYNC_FLUSH)
        self._count(data)
        self._request.write(data)

    def _count(self, data: bytes) -> None:
        self._bytes_sent += len(data)
        self._fake.bytes_sent += len(data)
        if self.sent is not None:
            self.sent.append(data)

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            self._request.unregisterProducer()

    def _complete(self) -> None:
        if self._compressor is not None:
            tail = self._compressor.flush()
            self._count(tail)
            self._request.write(tail)
        self._done = True
        self._unregister()
        self._request.finish()

    def _die(self) -> None:
        self._dying = True
        self._done = True
        self._cancel_timer()
        self._unregister()
        self._request.loseConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._fake.active_responses -= 1

    def _finished(self, ignored: object) -> None:
        self._end()

    def _lost(self, reason: Failure) -> None:
        self._done = True
        self._cancel_timer()
        self._end()
        if not self._dying:
            self._fake._connection_lost(
                ClientDisconnect(
                    time=self._fake.clock.seconds(),
                    request=self._received,
                    headers_sent=self._headers_sent,
                    chunks_sent=self._chunks_sent,
                    bytes_sent=self._bytes_sent,
                )
            )

    # IPushProducer

    def pauseProducing(self) -> None:
        if not self._paused:
            self._paused = True
            self._fake.paused_count += 1

    def resumeProducing(self) -> None:
        if self._paused:
            self._paused = False
            self._fake.resumed_count += 1
            if self._timer is None and not (self._done or self._stalled):
                self._pump()

    def stopProducing(self) -> None:
        self._done = True
        self._cancel_timer()


# ---------------------------------------------------------------------------
# The server


class _RecordingRequest(Request):
    """
    A request that keeps its header lines as they arrived (filled in by
    L{_FakeChannel}).
    """

    raw_headers: list[tuple[bytes, bytes]] | None = None


class _FakeChannel(HTTPChannel):
    """
    An HTTP channel that records raw header lines and tells its fake when
    it connects and disconnects.
    """

    def headerReceived(self, line: bytes) -> bool:
        accepted: bool = super().headerReceived(line)
        if accepted and self.requests:
            request = self.requests[-1]
            if isinstance(request, _RecordingRequest):
                if request.raw_headers is None:
                    request.raw_headers = []
                name, _, value = line.partition(b":")
                request.raw_headers.append((name, value.strip(b" \t")))
        return accepted

    def _owner(self) -> FakeUpstream | None:
        factory = self.factory
        return factory.fake if isinstance(factory, _FakeSite) else None

    def connectionMade(self) -> None:
        super().connectionMade()
        owner = self._owner()
        if owner is not None:
            owner._channels.add(self)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        owner = self._owner()
        if owner is not None:
            owner._channel_gone(self)


class _FakeSite(Site):
    """
    A quiet L{Site} (no access log: the fake runs under benchmarks) for one
    L{FakeUpstream}.
    """

    protocol = _FakeChannel  # type: ignore[assignment]

    def __init__(self, fake: FakeUpstream) -> None:
        super().__init__(fake.resource(), requestFactory=_RecordingRequest, reactor=fake.clock)
        self.fake = fake

    def log(self, request: HTTPRequest) -> None:
        pass


class _FakeResource(Resource):
    """
    Every path, every method: the fake routes on the raw request path.
    """

    isLeaf = True

    def __init__(self, fake: FakeUpstream) -> None:
        super().__init__()
        self._fake = fake

    def render(self, request: Request) -> object:
        self._fake._handle(request)
        return NOT_DONE_YET


class FakeUpstream:
    """
    A fake OpenAI + Anthropic + Gemini upstream (see the module docstring
    for routes and knobs).

    Usage fields, per provider, from the knobs (I{in}: input, I{cr}:
    cached, I{cw}: cache-write, I{out}: output, I{r}: reasoning):
      - OpenAI: C{prompt_tokens}=in, C{prompt_tokens_details.cached_tokens}=cr
        (and C{cache_write_tokens}=cw when non-zero), C{completion_tokens}=
        out+r, C{completion_tokens_details.reasoning_tokens}=r; Responses:
        C{input_tokens}=in, C{input_tokens_details.{cached_tokens,
        cache_write_tokens}}, C{output_tokens}=out+r,
        C{output_tokens_details.reasoning_tokens}=r.
      - Anthropic: C{input_tokens}=in, C{cache_read_input_tokens}=cr,
        C{cache_creation_input_tokens}=cw, C{output_tokens}=out+r (and
        C{output_tokens_details.thinking_tokens}=r when non-zero);
        C{message_start} says C{output_tokens: 1}, C{message_delta} carries
        the cumulative totals.
      - Gemini: C{promptTokenCount}=in, C{cachedContentTokenCount}=cr (when
        non-zero), C{candidatesTokenCount}=out, C{thoughtsTokenCount}=r (when
        non-zero), C{totalTokenCount}=in+out+r; stream chunks before the
        last carry the prompt-only form.

    @ivar clock: the clock every delay runs on.
    @ivar defaults: knob values used when a request does not set them
        (keys: knob header names, lower case).
    @ivar require_auth: check credentials like the real APIs do.
    @ivar received: every request, in arrival order.
    @ivar connection_lost_events: every response cut short by its client.
    @ivar paused_count: times the transport paused a response's writes.
    @ivar resumed_count: times it resumed one.
    @ivar bytes_sent: body bytes written over all responses (after gzip,
        before chunked framing).
    @ivar active_responses: responses started and not yet finished or lost.
    @ivar record_bodies: keep each response's body for L{last_body_sent}
        (on by default; the standalone server turns it off).
    @ivar record_requests: append to L{received} and feed
        L{wait_for_request} (on by default; off in the standalone server,
        where nobody reads them and a long benchmark would grow them forever).
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.defaults: dict[str, str] = {}
        self.require_auth = True
        self.received: list[ReceivedRequest] = []
        self.connection_lost_events: list[ClientDisconnect] = []
        self.paused_count = 0
        self.resumed_count = 0
        self.bytes_sent = 0
        self.active_responses = 0
        self.record_bodies = True
        self.record_requests = True
        self._last_responder: _Responder | None = None
        self._serial = itertools.count(1)
        self._requests: DeferredQueue[ReceivedRequest] = DeferredQueue()
        self._losses: DeferredQueue[float] = DeferredQueue()
        self._channels: set[_FakeChannel] = set()
        self._idle: list[Deferred[None]] = []
        self._resource = _FakeResource(self)

    def resource(self) -> IResource:
        """
        The fake as a leaf resource: mount it anywhere.
        """
        return self._resource

    def site(self) -> Site:
        """
        A L{Site} serving the fake that also records raw header order and
        lets L{disconnect_all} drop its connections.  Its timers run on
        C{clock}.
        """
        return _FakeSite(self)

    @property
    def last_body_sent(self) -> bytes:
        """
        The body bytes (after gzip, without chunked framing) of the response
        whose headers went out last, so far if it is still streaming.  Empty
        when C{record_bodies} is off or nothing was sent.
        """
        responder = self._last_responder
        if responder is None or responder.sent is None:
            return b""
        return b"".join(responder.sent)

    def wait_for_request(self) -> Deferred[ReceivedRequest]:
        """
        The next request not yet handed out: every request is delivered to
        exactly one call, in arrival order (the first call gets the first
        request ever received, immediately if it has already arrived).
        """
        return self._requests.get()

    def wait_for_disconnect(self) -> Deferred[float]:
        """
        Like L{wait_for_request}, for L{connection_lost_events}: fires with
        the clock time at which the next not yet handed out client
        connection was lost mid-response.
        """
        return self._losses.get()

    def disconnect_all(self) -> Deferred[None]:
        """
        Abort every open connection made through L{site}; fires once all of
        them are closed (so trial sees a clean reactor).
        """
        done: Deferred[None] = Deferred()
        if not self._channels:
            done.callback(None)
            return done
        self._idle.append(done)
        for channel in list(self._channels):
            transport = channel.transport
            if transport is not None:
                transport.abortConnection()  # type: ignore[attr-defined]
        return done

    def _channel_gone(self, channel: _FakeChannel) -> None:
        self._channels.discard(channel)
        if not self._channels:
            waiting, self._idle = self._idle, []
            for waiter in waiting:
                waiter.callback(None)

    def _connection_lost(self, event: ClientDisconnect) -> None:
        self.connection_lost_events.append(event)
        self._losses.put(event.time)

    def _record(self, request: Request) -> ReceivedRequest:
        uri: bytes = request.uri
        if isinstance(request, _RecordingRequest) and request.raw_headers is not None:
            headers = list(request.raw_headers)
        else:
            headers = [
                (name, value)
                for name, values in request.requestHeaders.getAllRawHeaders()
                for value in values
            ]
        content = request.content
        body = b""
        if content is not None:
            content.seek(0)
            body = content.read()
        received = ReceivedRequest(
            method=request.method,
            uri=uri,
            path=uri.partition(b"?")[0],
            query=uri.partition(b"?")[2],
            headers=headers,
            body=body,
        )
        if self.record_requests:
            self.received.append(received)
        return received

    def _handle(self, request: Request) -> None:
        received = self._record(request)
        query = _parse_query(received.query)
        dialect, handler, params = _route(received, query)
        call = _Call(
            knobs=_Knobs(),
            request=received,
            serial=next(self._serial),
            now=int(self.clock.seconds()),
            query=query,
            params=params,
            require_auth=self.require_auth,
        )
        reply: _Reply | None = None
        knobs = call.knobs
        try:
            knobs = _parse_knobs(_collect_knobs(received.headers, self.defaults))
        except _KnobError as error:
            reply = dialect.error(call, 400, str(error))
        else:
            call = _Call(
                knobs=knobs,
                request=received,
                serial=call.serial,
                now=call.now,
                query=query,
                params=params,
                require_auth=self.require_auth,
            )
            if knobs.status is not None:
                reply = dialect.error(call, knobs.status, knobs.error_message)
            else:
                reply = dialect.check_auth(call)
            if reply is None:
                if handler is None:
                    reply = _not_found(dialect, call)
                else:
                    reply = self._dispatch(dialect, handler, call)
        _Responder(
            self,
            cast(_WebRequest, request),
            received,
            call.knobs,
            reply,
            gzip=call.knobs.gzip and _accepts_gzip(received.headers),
        ).start()
        # Last, so a waiter resuming synchronously sees the response under way.
        if self.record_requests:
            self._requests.put(received)

    def _dispatch(self, dialect: _Dialect, handler: _Handler, call: _Call) -> _Reply:
        if call.request.method == b"POST":
            try:
                body = orjson.loads(call.request.body) if call.request.body else None
            except orjson.JSONDecodeError:
                return dialect.error(call, 400, "We could not parse the JSON body of your request.")
            if not isinstance(body, dict):
                return dialect.error(call, 400, "The request body must be a JSON object.")
            call = _Call(
                knobs=call.knobs,
                request=call.request,
                serial=call.serial,
                now=call.now,
                query=call.query,
                params=call.params,
                body=body,
                require_auth=call.require_auth,
            )
        return handler(call)


# ---------------------------------------------------------------------------
# Listening


@implementer(IListeningPort)
class _FakePort:
    """
    A listening port whose C{stopListening} also drops the fake's open
    connections and waits until they are gone.
    """

    def __init__(self, port: IListeningPort, fake: FakeUpstream) -> None:
        self._port = port
        self._fake = fake

    def startListening(self) -> None:
        self._port.startListening()

    def stopListening(self) -> Deferred[None]:
        stopped = self._port.stopListening()
        waits: list[Deferred[Any]] = [self._fake.disconnect_all()]
        if isinstance(stopped, Deferred):
            waits.append(stopped)
        gathered = gatherResults(waits, consumeErrors=True)
        result: Deferred[None] = gathered.addCallback(lambda ignored: None)
        return result

    def getHost(self) -> IAddress:
        return self._port.getHost()


def listen(
    fake: FakeUpstream, reactor: IReactorTCP, port: int = 0, interface: str = "127.0.0.1"
) -> Deferred[IListeningPort]:
    """
    Serve C{fake} over TCP.  The port's C{stopListening} also closes every
    open connection of the fake, so C{addCleanup(port.stopListening)} leaves
    a clean reactor.
    """
    endpoint = TCP4ServerEndpoint(reactor, port, interface=interface)
    listening: Deferred[IListeningPort] = endpoint.listen(fake.site())
    return listening.addCallback(lambda bound: _FakePort(bound, fake))


# ---------------------------------------------------------------------------
# Standalone


def _options(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llmproxy.testing.fake_upstream",
        description="Serve the fake LLM upstream; print the bound port on stdout.",
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port (0: any free one)")
    parser.add_argument("--interface", default="127.0.0.1", help="address to bind")
    parser.add_argument(
        "--default",
        action="append",
        default=[],
        metavar="KNOB=VALUE",
        help="a knob default for every request, e.g. x-fake-delay-ms=20 (repeatable)",
    )
    parser.add_argument("--no-auth", action="store_true", help="do not check credentials")
    options = parser.parse_args(list(argv))
    for item in options.default:
        name, equals, _ = item.partition("=")
        if not equals or name.strip().lower() not in KNOBS:
            parser.error(f"--default: expected KNOB=VALUE with a known knob, got {item!r}")
    return options


def main(argv: Sequence[str] | None = None) -> None:
    """
    Run the fake until SIGINT/SIGTERM.
    """
    from twisted.internet.task import react

    options = _options(sys.argv[1:] if argv is None else argv)

    def run(reactor: Any) -> Deferred[None]:
        fake = FakeUpstream(reactor)
        fake.require_auth = not options.no_auth
        fake.record_bodies = False
        fake.record_requests = False
        for item in options.default:
            name, _, value = item.partition("=")
            fake.defaults[name.strip().lower()] = value.strip()
        listening = listen(fake, reactor, options.port, options.interface)

        def announce(port: IListeningPort) -> Deferred[None]:
            print(port.getHost().port, flush=True)  # type: ignore[attr-defined]
            return Deferred()

        return listening.addCallback(announce)

    react(run)
