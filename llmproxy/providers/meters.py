# -*- test-case-name: llmproxy.test.test_providers_meters -*-
"""
Meters: objects that watch one response body go by and say what it cost,
with bounded memory whatever the body's size.

A provider module picks a meter for each response (see
L{llmproxy.providers.format.ProviderFormat.new_meter}) and supplies an
L{Extractor} that knows where its usage lives; everything else (buffering,
scanning, SSE framing, stripping an event from a stream) is shared here.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping

from attrs import define, evolve

from llmproxy.providers.keyscan import SCAN_WINDOW, KeyScanner
from llmproxy.providers.wire import as_str, loads
from llmproxy.sse import Event, SSEParser
from llmproxy.usage import Usage

JSON_BODY_LIMIT = 1 << 20
"""
A non-streaming response body up to this size (1 MiB) is kept whole and
parsed once at the end.  A bigger one (a large embeddings batch) is not kept:
from then on only a L{KeyScanner} window (C{SCAN_WINDOW}) follows it.
"""


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


@define
class Tally:
    """
    The running usage of one response: who answered and why it stopped, as
    meters find it, and the provider's latest token report.

    @ivar request_model: the model the request named (the fallback).
    @ivar header_request_id: the upstream's request id from its headers.
    @ivar model: the model the response names.
    @ivar body_id: the response's own id (the fallback request id).
    @ivar tokens: the latest token report, normalised; a later report
        replaces an earlier one. L{None} until the provider reports any.
    """

    request_model: str | None = None
    header_request_id: str | None = None
    model: str | None = None
    body_id: str | None = None
    finish_reason: str | None = None
    tokens: Usage | None = None

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
        self.tokens = Usage(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cache_read_tokens=cache_read_tokens,
            cache_write_tokens=cache_write_tokens,
            reasoning_tokens=reasoning_tokens,
            reported=True,
        )

    @property
    def reported(self) -> bool:
        return self.tokens is not None

    def copy(self) -> Tally:
        return evolve(self)

    def usage(self) -> Usage:
        return evolve(
            self.tokens or Usage(),
            model=self.model or self.request_model,
            finish_reason=self.finish_reason,
            upstream_request_id=self.header_request_id or self.body_id,
        )


def new_tally(
    request_model: str | None, headers: Mapping[str, str], id_headers: Iterable[str]
) -> Tally:
    """
    A tally that falls back to the request's model and knows the upstream
    request id from the first of C{id_headers} present.
    """
    request_id = None
    for name in id_headers:
        request_id = as_str(headers.get(name))
        if request_id:
            break
    return Tally(request_model=request_model, header_request_id=request_id)


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
