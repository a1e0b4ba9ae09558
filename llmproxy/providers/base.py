# -*- test-case-name: llmproxy.test.test_providers_base -*-
"""
What every provider wire format has in common: the request summary, the
format and meter interfaces, and the bounded machinery the meters share
(a usage tally, a JSON key scanner, JSON-body and SSE meters).

Nothing here touches the network or the reactor: a format turns bytes into
facts, and a meter watches a response body go by.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Iterable, Mapping
from urllib.parse import unquote_to_bytes

import orjson
from attrs import define, evolve, frozen

from llmproxy.sse import Event, SSEParser
from llmproxy.usage import Usage

JSON_BODY_LIMIT = 1 << 20
"""
A non-streaming response body up to this size (1 MiB) is kept whole and
parsed once at the end.  A bigger one (a large embeddings batch) is not kept:
from then on only a L{KeyScanner} window (C{SCAN_WINDOW}) follows it.
"""

SCAN_WINDOW = 64 << 10
"""Largest single value (a C{usage} object, a model name) a L{KeyScanner} reads."""

PROMPT_WALK_BUDGET = 200_000
"""Most JSON nodes L{text_chars} visits for one request."""

GENERATION_METHODS = frozenset({"POST", "PUT", "PATCH"})
"""Methods whose responses can report usage; C{GET} only re-reads old results."""


@frozen
class RequestInfo:
    """
    What a provider format learned from a client request.

    @ivar model: the requested model, when the request names one.
    @ivar streaming: the response will be streamed (SSE or a streamed array).
    @ivar user: the end user the client names in the body, if any.
    @ivar endpoint: a short, bounded name for the API called (safe as a
        metric label): C{chat.completions}, C{completions}, C{responses},
        C{embeddings}, C{models}, C{messages}, C{count_tokens},
        C{generateContent}, C{streamGenerateContent}, C{embedContent}, C{other}.
    @ivar body_json: the parsed body when it was JSON, else L{None}.
    @ivar method: the request method, upper case.  Usage is read only from
        responses to L{GENERATION_METHODS}: a C{GET} of a stored response
        would otherwise count its tokens a second time.
    """

    model: str | None
    streaming: bool
    user: str | None
    endpoint: str
    body_json: object | None
    method: str = "POST"


class Meter(abc.ABC):
    """
    Watches one response body go by and says what it cost.
    """

    @abc.abstractmethod
    def feed(self, data: bytes) -> bytes:
        """
        One upstream body chunk.

        @return: the bytes the client must receive now: C{data} itself
            unless this meter removes something from the stream.
        """

    @abc.abstractmethod
    def finish(self) -> bytes:
        """
        The upstream body ended.

        @return: bytes still held back that the client must receive
            (C{b""} normally).
        """

    @abc.abstractmethod
    def usage(self) -> Usage:
        """
        What is known so far; callable at any time, also after a disconnect.
        """


class ProviderFormat(abc.ABC):
    """
    One provider's wire format.

    @cvar kind: the config C{kind} this format serves.
    """

    kind: str

    @abc.abstractmethod
    def inspect_request(self, method: bytes, path: bytes, query: bytes, body: bytes) -> RequestInfo:
        """
        Summarise a request; never raises, whatever the input.

        @param path: the raw, still percent-encoded path after the mount
            prefix, without the query (C{b"/v1/chat/completions"}).
        @param query: the raw query string without C{?}, possibly C{b""}.
        """

    def rewrite_request(
        self, info: RequestInfo, body: bytes, inject_stream_usage: bool
    ) -> tuple[bytes, bool]:
        """
        The body to send upstream, and whether the response's usage-only
        chunk must then be removed.  Only OpenAI rewrites anything.
        """
        return body, False

    @abc.abstractmethod
    def error_body(self, status: int, message: str) -> bytes:
        """
        This provider's own JSON error body for an error the proxy makes.
        """

    @abc.abstractmethod
    def sse_error_event(self, status: int, message: str) -> bytes:
        """
        Complete SSE bytes that make this provider's SDK raise mid-stream.
        """

    @abc.abstractmethod
    def prompt_text_chars(self, info: RequestInfo) -> int | None:
        """
        How many characters of prompt text the request carries (for token
        estimation), or L{None} when its body was not JSON.
        """

    @abc.abstractmethod
    def new_meter(
        self,
        info: RequestInfo,
        content_type: bytes | None,
        headers: Mapping[str, str],
        strip_usage_chunk: bool,
    ) -> Meter:
        """
        A meter for the response to C{info}.

        @param content_type: the response C{Content-Type}, if any.
        @param headers: response headers, lower-case name to first value.
        @param strip_usage_chunk: the second result of L{rewrite_request}.
        """


# ---------------------------------------------------------------------------
# Small, total helpers: wire data is untrusted, so none of these raise.


def as_int(value: object) -> int:
    """
    A token count from JSON: a non-negative number, else 0.
    """
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value if value > 0 else 0
    if isinstance(value, float) and value > 0 and value < 1e18:
        return int(value)
    return 0


def as_str(value: object) -> str | None:
    """
    A non-empty JSON string, else L{None}.
    """
    return value if isinstance(value, str) and value else None


def dig(value: object, *path: str | int) -> object:
    """
    C{value[p0][p1]...} through dicts and lists, or L{None} where the path
    does not exist.
    """
    for step in path:
        if isinstance(step, str):
            if not isinstance(value, dict):
                return None
            value = value.get(step)
        else:
            if not isinstance(value, list) or not -len(value) <= step < len(value):
                return None
            value = value[step]
    return value


def loads(data: bytes | bytearray) -> object:
    """
    Parse JSON, or L{None} when it is not JSON.
    """
    try:
        return orjson.loads(data)
    except (ValueError, TypeError):
        return None


_JSON_START = frozenset(b"{[")
_JSON_SPACE = frozenset(b" \t\r\n")


def parse_json_body(body: bytes) -> object | None:
    """
    Parse a request body that looks like a JSON object or array; anything
    else (multipart uploads, binary) is not even tried.
    """
    i = 0
    n = len(body)
    while i < n and body[i] in _JSON_SPACE:
        i += 1
    if i == n or body[i] not in _JSON_START:
        return None
    return loads(body)


def decode_path(path: bytes) -> list[str]:
    """
    The non-empty, percent-decoded segments of a raw request path.
    """
    try:
        text = unquote_to_bytes(path).decode("utf-8", "replace")
    except Exception:
        return []
    return [segment for segment in text.split("/") if segment]


def query_values(query: bytes, name: str) -> list[str]:
    """
    Every value of C{name} in a raw query string, percent-decoded.
    """
    values = []
    for part in query.split(b"&"):
        key, _, value = part.partition(b"=")
        try:
            if unquote_to_bytes(key.replace(b"+", b" ")).decode("utf-8", "replace") == name:
                values.append(
                    unquote_to_bytes(value.replace(b"+", b" ")).decode("utf-8", "replace")
                )
        except Exception:
            continue
    return values


def media_type(content_type: bytes | None) -> bytes | None:
    """
    C{b"text/event-stream"} from C{b"Text/Event-Stream; charset=utf-8"}.
    """
    if content_type is None:
        return None
    return content_type.split(b";", 1)[0].strip().lower()


def is_json_type(media: bytes | None) -> bool:
    """
    Whether a response media type may carry JSON worth metering.  A missing
    type counts: the JSON meter copes with anything.
    """
    return (
        media is None
        or media in (b"", b"application/json", b"text/json")
        or media.endswith(b"+json")
    )


def json_string(raw: bytes) -> str | None:
    """
    Decode the body of a JSON string literal found by a regular expression
    (the bytes between its quotes).
    """
    if b"\\" not in raw:
        try:
            return raw.decode("utf-8") or None
        except UnicodeDecodeError:
            return None
    value = loads(b'"' + raw + b'"')
    return value if isinstance(value, str) and value else None


_SKIP_KEYS = frozenset(
    {
        # Binary or opaque payloads, which are not prompt text (or not text
        # the tokenizer counts by characters).
        "data",
        "image_url",
        "input_audio",
        "file_data",
        "file_id",
        "file_url",
        "b64_json",
        "inlineData",
        "inline_data",
        "fileData",
        "url",
        "image",
        "audio",
        "signature",
        "thoughtSignature",
        "thought_signature",
        "encrypted_content",
        # Structure, not text.
        "type",
        "role",
        "mimeType",
        "mime_type",
        "media_type",
        "cache_control",
        "id",
        "tool_use_id",
        "tool_call_id",
        "call_id",
        "model",
    }
)


def text_chars(roots: Iterable[object], *, count_keys: bool = False) -> int:
    """
    Characters of text in some JSON values: every string except binary
    payloads (base64 fields, C{data:} URLs) and structural fields.

    @param count_keys: also count object keys (for tool schemas, whose
        property names the model reads).
    @return: the count; at most L{PROMPT_WALK_BUDGET} nodes are visited, so
        a pathological body costs bounded work (and is under-counted).
    """
    total = 0
    stack = list(roots)
    steps = 0
    while stack and steps < PROMPT_WALK_BUDGET:
        node = stack.pop()
        steps += 1
        if isinstance(node, str):
            if not node.startswith("data:"):
                total += len(node)
        elif isinstance(node, dict):
            for key, value in node.items():
                if key in _SKIP_KEYS:
                    continue
                if count_keys:
                    total += len(key)
                stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)
    return total


# ---------------------------------------------------------------------------
# Usage accounting.


@define
class Tally:
    """
    The running, mutable usage of one response, in normalised units.

    Each provider's meter writes the fields; L{usage} freezes them.
    """

    request_model: str | None = None
    header_request_id: str | None = None
    model: str | None = None
    body_id: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    finish_reason: str | None = None
    reported: bool = False

    def set_tokens(
        self,
        input_tokens: int,
        output_tokens: int,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
    ) -> None:
        """
        Replace the token counts with a newer report.
        """
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.cache_read_tokens = cache_read_tokens
        self.cache_write_tokens = cache_write_tokens
        self.reasoning_tokens = reasoning_tokens
        self.reported = True

    def copy(self) -> Tally:
        return evolve(self)

    def usage(self) -> Usage:
        return Usage(
            model=self.model or self.request_model,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cache_read_tokens=self.cache_read_tokens,
            cache_write_tokens=self.cache_write_tokens,
            reasoning_tokens=self.reasoning_tokens,
            finish_reason=self.finish_reason,
            upstream_request_id=self.header_request_id or self.body_id,
            reported=self.reported,
        )


def new_tally(info: RequestInfo, headers: Mapping[str, str], id_headers: Iterable[str]) -> Tally:
    """
    A tally that falls back to the request's model and knows the upstream
    request id from the first of C{id_headers} present.
    """
    request_id = None
    for name in id_headers:
        request_id = as_str(headers.get(name))
        if request_id:
            break
    return Tally(request_model=info.model, header_request_id=request_id)


# ---------------------------------------------------------------------------
# Finding a few keys in JSON too big (or too incomplete) to parse.

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_SCALAR = re.compile(rb"-?[0-9][0-9.eE+-]*|true|false|null")
_OPEN = {0x7B: b"}", 0x5B: b"]"}
_MAX_ATTEMPTS = 256


class KeyScanner:
    """
    Finds C{"key": value} pairs in a stream of JSON text without parsing
    the whole of it.

    A key's value is read when it is complete: strings and numbers directly,
    objects and arrays by trying to parse up to each candidate closing
    bracket (at most 256 tries).  A value longer than the window is given up.
    Keys are matched at any depth: callers pick keys that only occur where
    they mean it, and prefer L{first} or L{last} accordingly.  C{null} and
    empty strings are not recorded.

    Memory: the window plus one chunk.

    @ivar first: the first value seen for each key.
    @ivar last: the last value seen for each key.
    """

    def __init__(self, keys: Iterable[str], window: int = SCAN_WINDOW) -> None:
        names = sorted({key.encode() for key in keys}, key=len, reverse=True)
        self._pattern = re.compile(
            rb'"(' + b"|".join(re.escape(name) for name in names) + rb')"[ \t\r\n]*:[ \t\r\n]*'
        )
        self._keep = max(len(name) for name in names) + 64
        self._window = window
        self._buf = bytearray()
        self._pos = 0
        self._pending: tuple[str, int, int, int] | None = None
        self.first: dict[str, object] = {}
        self.last: dict[str, object] = {}

    def feed(self, data: bytes | bytearray) -> None:
        """
        Scan some more JSON text.
        """
        self._buf += data
        buf = self._buf
        keep_from: int | None = None
        while True:
            if self._pending is not None:
                key, start, resume, attempts = self._pending
                done, value, end, resume, attempts = self._value(buf, start, resume, attempts)
                if not done:
                    if len(buf) - start > self._window or attempts > _MAX_ATTEMPTS:
                        self._pending = None
                        self._pos = start
                        continue
                    self._pending = (key, start, resume, attempts)
                    keep_from = start
                    break
                self._pending = None
                if end < 0:
                    self._pos = start
                    continue
                self._pos = end
                if value is not None and value != "":
                    self.first.setdefault(key, value)
                    self.last[key] = value
                continue
            match = self._pattern.search(buf, self._pos)
            if match is None:
                break
            if match.end() >= len(buf):
                keep_from = match.start()
                break
            key = match.group(1).decode()
            self._pending = (key, match.end(), match.end(), 0)
        if keep_from is None:
            keep_from = max(self._pos, len(buf) - self._keep)
        if keep_from > 0:
            del buf[:keep_from]
            self._pos = max(0, self._pos - keep_from)
            if self._pending is not None:
                key, start, resume, attempts = self._pending
                self._pending = (key, start - keep_from, resume - keep_from, attempts)

    def _value(
        self, buf: bytearray, start: int, resume: int, attempts: int
    ) -> tuple[bool, object, int, int, int]:
        """
        Try to read the value at C{buf[start]}.

        @return: C{(done, value, end, resume, attempts)}: not done means wait
            for more text; done with C{end < 0} means there is no usable
            value here.
        """
        first = buf[start]
        closer = _OPEN.get(first)
        if closer is not None:
            candidate = buf.find(closer, max(resume, start + 1))
            while candidate >= 0:
                if candidate - start > self._window or attempts > _MAX_ATTEMPTS:
                    return True, None, -1, resume, attempts
                attempts += 1
                value = loads(buf[start : candidate + 1])
                if value is not None:
                    return True, value, candidate + 1, resume, attempts
                candidate = buf.find(closer, candidate + 1)
            return False, None, -1, len(buf), attempts
        if first == 0x22:
            match = _STRING.match(buf, start)
            if match is None:
                return False, None, -1, resume, attempts
            return True, loads(match.group()), match.end(), resume, attempts
        match = _SCALAR.match(buf, start)
        if match is None:
            if len(buf) - start < 5:
                # Perhaps the start of a literal ("tr", "-"): wait for more.
                return False, None, -1, resume, attempts
            return True, None, -1, resume, attempts
        if match.end() >= len(buf):
            return False, None, -1, resume, attempts
        return True, loads(match.group()), match.end(), resume, attempts


class Extractor(abc.ABC):
    """
    Reads one provider's usage out of a response object, or out of the keys
    a L{KeyScanner} found in a body too big to parse.

    @cvar keys: the keys a scanner should look for.
    """

    keys: tuple[str, ...]

    @abc.abstractmethod
    def apply_json(self, tally: Tally, obj: object) -> None:
        """
        Apply one parsed response object.
        """

    @abc.abstractmethod
    def apply_scan(self, tally: Tally, scanner: KeyScanner) -> None:
        """
        Apply what a scanner found.
        """

    def scan(self, tally: Tally, data: bytes) -> None:
        """
        Apply what a fresh scanner finds in one fragment of JSON text.
        """
        scanner = KeyScanner(self.keys)
        scanner.feed(data)
        self.apply_scan(tally, scanner)


# ---------------------------------------------------------------------------
# Meters.


class NullMeter(Meter):
    """
    For responses that cannot carry usage (other media types, C{GET}s):
    passes bytes through and reports only what the request said.
    """

    def __init__(self, tally: Tally) -> None:
        self._usage = tally.usage()

    def feed(self, data: bytes) -> bytes:
        return data

    def finish(self) -> bytes:
        return b""

    def usage(self) -> Usage:
        return self._usage


class JSONBodyMeter(Meter):
    """
    Meters a non-streaming JSON body.

    Up to C{limit} bytes (L{JSON_BODY_LIMIT}) are kept and parsed once when
    usage is asked for.  Past that the kept bytes go through a L{KeyScanner}
    and are dropped, and the rest of the body streams through the scanner:
    memory stays under C{limit} plus the scanner's window whatever the body
    size.
    """

    def __init__(self, tally: Tally, extractor: Extractor, limit: int = JSON_BODY_LIMIT) -> None:
        self._base = tally
        self._extractor = extractor
        self._limit = limit
        self._buf = bytearray()
        self._scanner: KeyScanner | None = None
        self._seen = 0
        self._cached: tuple[int, Usage] | None = None

    def feed(self, data: bytes) -> bytes:
        self._seen += len(data)
        if self._scanner is not None:
            self._scanner.feed(data)
        else:
            self._buf += data
            if len(self._buf) > self._limit:
                scanner = self._scanner = KeyScanner(self._extractor.keys)
                buf = self._buf
                self._buf = bytearray()
                for i in range(0, len(buf), SCAN_WINDOW):
                    scanner.feed(buf[i : i + SCAN_WINDOW])
        return data

    def finish(self) -> bytes:
        return b""

    def usage(self) -> Usage:
        if self._cached is not None and self._cached[0] == self._seen:
            return self._cached[1]
        tally = self._base.copy()
        if self._scanner is not None:
            self._extractor.apply_scan(tally, self._scanner)
        elif self._buf:
            obj = loads(self._buf)
            if obj is not None:
                self._extractor.apply_json(tally, obj)
            else:
                # Truncated or not JSON: take what can be found.
                self._extractor.scan(tally, bytes(self._buf))
        usage = tally.usage()
        self._cached = (self._seen, usage)
        return usage


class ScanMeter(Meter):
    """
    Meters a JSON document that arrives over time (Gemini's streamed JSON
    array) with a L{KeyScanner}, so that usage is known as it comes.
    """

    def __init__(self, tally: Tally, extractor: Extractor) -> None:
        self._tally = tally
        self._extractor = extractor
        self._scanner = KeyScanner(extractor.keys)

    def feed(self, data: bytes) -> bytes:
        self._scanner.feed(data)
        return data

    def finish(self) -> bytes:
        return b""

    def usage(self) -> Usage:
        tally = self._tally.copy()
        self._extractor.apply_scan(tally, self._scanner)
        return tally.usage()


class SSEMeter(Meter):
    """
    Meters a server-sent event stream; a subclass reads the events.

    Without stripping, L{feed} returns each chunk as it came and the parser
    only observes.  With stripping, every event L{on_event} answers C{True}
    for is cut out of the stream (with its terminating blank line); to do
    that the bytes of an event still being received are held back until the
    event ends, never more than the parser's bound.
    """

    def __init__(self, tally: Tally, strip: bool = False, parser: SSEParser | None = None) -> None:
        self.tally = tally
        self._parser = parser if parser is not None else SSEParser()
        self._strip = strip
        self._held = bytearray()
        self._held_start = 0
        self._cursor = 0
        self._swallow = 0

    @abc.abstractmethod
    def on_event(self, event: Event) -> bool:
        """
        Read one event.

        @return: whether to remove it from the stream (only honoured when
            stripping).
        """

    def snapshot(self) -> Tally:
        """
        The tally to report; subclasses with lazy work override this.
        """
        return self.tally

    def usage(self) -> Usage:
        return self.snapshot().usage()

    def feed(self, data: bytes) -> bytes:
        events = self._parser.feed(data)
        if not self._strip:
            for event in events:
                self.on_event(event)
            return data
        drops = [event for event in events if self.on_event(event)]
        end = self._parser.offset
        if not (drops or self._held or self._swallow) and self._parser.hold_from == end:
            self._held_start = self._cursor = end
            return data
        self._held += data
        return self._release(drops, self._parser.hold_from)

    def finish(self) -> bytes:
        events = self._parser.finish()
        if not self._strip:
            for event in events:
                self.on_event(event)
            return b""
        drops = [event for event in events if self.on_event(event)]
        return self._release(drops, self._parser.offset)

    def _release(self, drops: list[Event], until: int) -> bytes:
        """
        The held bytes up to C{until}, less the dropped events.
        """
        out = bytearray()
        for event in drops:
            self._emit(out, event.start)
            self._cursor = event.end
            self._swallow = 1 if event.end < self._parser.offset else 0
        self._emit(out, until)
        done = self._cursor - self._held_start
        if done:
            del self._held[:done]
            self._held_start = self._cursor
        return bytes(out)

    def _emit(self, out: bytearray, stop: int) -> None:
        """
        Copy held bytes from the cursor to C{stop}, first eating the line
        terminator that ended a dropped event (CR LF, LF or CR; its LF may
        only arrive in a later chunk).
        """
        base = self._held_start
        held = self._held
        while self._swallow and self._cursor < stop:
            byte = held[self._cursor - base]
            if self._swallow == 1:
                self._cursor += 1
                self._swallow = 2 if byte == 0x0D else 0
            else:
                if byte == 0x0A:
                    self._cursor += 1
                self._swallow = 0
        if self._cursor < stop:
            out += held[self._cursor - base : stop - base]
            self._cursor = stop
