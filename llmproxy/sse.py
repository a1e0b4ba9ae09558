# -*- test-case-name: llmproxy.test.test_sse -*-
"""
An incremental, bounded parser for server-sent events.

It follows the WHATWG "event stream" rules (lines end in CR LF, LF or CR;
C{data} lines join with LF; C{:} starts a comment; C{id}, C{retry} and
C{event} fields; an optional leading byte-order mark), gives the same events
however the byte stream is split into chunks, and never holds more than
about C{max_event_bytes} for one event.

Each L{Event} carries the absolute byte offsets of its raw text, so a caller
that relays the stream can cut exactly one event out of it and pass every
other byte on unchanged (see L{llmproxy.providers.openai}).
"""

from __future__ import annotations

from attrs import frozen
from twisted.logger import Logger

_log = Logger()

DEFAULT_MAX_EVENT_BYTES = 1 << 20
"""Largest event (its raw lines, terminators included) kept whole: 1 MiB."""

DEFAULT_TAIL_BYTES = 64 << 10
"""How much of an oversized event's raw end is kept for L{Event.tail}."""

_BOM = b"\xef\xbb\xbf"
_LF = 0x0A
_CR = 0x0D
_COLON = 0x3A


@frozen
class Event:
    """
    One dispatched event, or one oversized block that was skipped.

    @ivar event: the C{event:} field, C{b""} when there was none (WHATWG
        then calls the event C{message}).
    @ivar data: the C{data:} lines joined with LF; C{b""} when truncated.
    @ivar id: the stream's last event id when this event was dispatched.
    @ivar start: absolute offset of the event's first raw byte.
    @ivar end: absolute offset of the blank line that ended the event; the
        raw event is C{[start, end)} plus that line's terminator (CR LF, LF
        or CR).  At the end of the stream there may be no terminator.
    @ivar truncated: C{True} when the event was bigger than the parser's
        bound: its data was not kept and C{tail} holds its raw end instead.
    @ivar tail: for a truncated event, the last raw bytes before C{end}
        (at most the parser's C{tail_bytes}); C{b""} otherwise.  Usage
        sits at the end of the big JSON payloads (image chunks, final
        responses), so this is enough to meter them.
    """

    event: bytes
    data: bytes
    id: bytes
    start: int
    end: int
    truncated: bool = False
    tail: bytes = b""


class SSEParser:
    """
    Turns a chunked byte stream into L{Event}s.

    Feed it every chunk with L{feed} and call L{finish} once at the end.
    The result does not depend on where chunk boundaries fall.

    Memory: the partial line plus the current event's data lines, never more
    than C{max_event_bytes}, plus up to C{2 * tail_bytes} of raw bytes kept
    for the tail of an event that grows past C{max_event_bytes - tail_bytes}.

    @ivar last_event_id: the last C{id:} field seen (WHATWG "last event ID").
    @ivar retry: the last valid C{retry:} field, in milliseconds, or L{None}.
    """

    def __init__(
        self,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        tail_bytes: int = DEFAULT_TAIL_BYTES,
    ) -> None:
        """
        @param max_event_bytes: an event whose raw lines (up to its ending
            blank line) exceed this is skipped, logged once, and dispatched
            as a truncated L{Event}.
        @param tail_bytes: how much of a skipped event's raw end to keep.
        """
        if max_event_bytes < 16 or not 0 <= tail_bytes <= max_event_bytes:
            raise ValueError("need max_event_bytes >= 16 and 0 <= tail_bytes <= max_event_bytes")
        self._max = max_event_bytes
        self._tail_bytes = tail_bytes
        self.last_event_id = b""
        self.retry: int | None = None
        self._offset = 0
        self._first_line = True
        self._pending_cr = False
        self._line = bytearray()
        self._line_len = 0
        self._block_start = 0
        self._data: list[bytes] = []
        self._type = b""
        self._skipping = False
        self._raw_tail = bytearray()

    @property
    def offset(self) -> int:
        """
        How many bytes have been fed so far.
        """
        return self._offset

    @property
    def hold_from(self) -> int:
        """
        The absolute offset of the first byte of the event still being read,
        or L{offset} when nothing could still become an event.

        Bytes before this offset belong to events already returned (or to
        nothing), so a relay that may drop events only ever needs to hold
        back the bytes from here on; an oversized event is never held.
        """
        return self._offset if self._skipping else self._block_start

    def feed(self, data: bytes) -> list[Event]:
        """
        Parse one chunk.

        @return: the events the chunk completed, in stream order.
        """
        events: list[Event] = []
        n = len(data)
        if not n:
            return events
        base = self._offset
        self._offset = base + n
        pos = 0
        if self._pending_cr:
            # A CR ended the previous chunk; an LF here is the rest of that
            # line terminator, and belongs to whatever that line belonged to.
            self._pending_cr = False
            if data[0] == _LF:
                pos = 1
                if self._block_start == base:
                    self._block_start = base + 1
        seg = 0
        has_cr = b"\r" in data
        while pos < n:
            nl = data.find(b"\n", pos)
            if has_cr:
                cr = data.find(b"\r", pos, nl if nl >= 0 else n)
                if cr >= 0:
                    end = cr
                    after = cr + 1
                    if after < n:
                        if data[after] == _LF:
                            after += 1
                    else:
                        self._pending_cr = True
                else:
                    end = nl
                    after = nl + 1
            else:
                end = nl
                after = nl + 1
            if end < 0:
                self._partial(data, pos, n, base)
                break
            length = self._line_len + (end - pos)
            self._line_len = 0
            if not self._skipping and base + end - self._block_start > self._max:
                self._skip()
            if self._skipping:
                self._first_line = False
                if length == 0:
                    self._retain(data, seg, end, base)
                    events.append(self._truncated(base + end))
                    self._reset(base + after)
                    seg = after
            else:
                if self._line:
                    self._line += data[pos:end]
                    line = bytes(self._line)
                    self._line.clear()
                else:
                    line = data[pos:end]
                if self._first_line:
                    self._first_line = False
                    if line.startswith(_BOM):
                        line = line[3:]
                if line:
                    self._field(line)
                else:
                    if self._data:
                        events.append(self._event(base + end))
                    self._reset(base + after)
                    seg = after
            pos = after
        self._retain(data, seg, n, base)
        return events

    def finish(self) -> list[Event]:
        """
        The stream ended.

        Unlike the WHATWG rules, which drop an event the stream ends inside
        of, a last event with data is still returned, as the official SDKs
        do: a server that omits the final blank line should still be
        metered.  The parser is then reset for a new stream at the same
        offset.

        @return: that last event, if any.
        """
        events: list[Event] = []
        if self._line_len and not self._skipping:
            line = bytes(self._line)
            if self._first_line and line.startswith(_BOM):
                line = line[3:]
            if line:
                self._field(line)
        if self._skipping:
            events.append(self._truncated(self._offset))
        elif self._data:
            events.append(self._event(self._offset))
        self._line.clear()
        self._line_len = 0
        self._pending_cr = False
        self._reset(self._offset)
        return events

    def _partial(self, data: bytes, pos: int, n: int, base: int) -> None:
        """
        Keep the unterminated end of a chunk, unless that makes the event
        too big.
        """
        self._line_len += n - pos
        if not self._skipping and base + n - self._block_start > self._max:
            self._skip()
        if not self._skipping:
            self._line += data[pos:n]

    def _skip(self) -> None:
        """
        The current event outgrew the bound: drop what is buffered, log once,
        and ignore its lines until the blank line that ends it.
        """
        self._skipping = True
        self._line.clear()
        self._data = []
        _log.warn(
            "Server-sent event larger than {limit} bytes skipped (at stream offset {offset})",
            limit=self._max,
            offset=self._block_start,
        )

    def _retain(self, data: bytes, lo: int, hi: int, base: int) -> None:
        """
        Keep the current event's raw bytes C{data[lo:hi]} that lie in its
        last C{tail_bytes} before the bound, for a truncated event's tail.

        Only events already longer than C{max_event_bytes - tail_bytes} keep
        anything, and they keep a bounded rolling window.
        """
        if not self._tail_bytes:
            return
        keep_from = self._block_start + self._max - self._tail_bytes - base
        if hi <= keep_from:
            return
        self._raw_tail += data[max(lo, keep_from) : hi]
        extra = len(self._raw_tail) - self._tail_bytes
        if extra > self._tail_bytes:
            del self._raw_tail[:extra]

    def _truncated(self, end: int) -> Event:
        tail = bytes(self._raw_tail[-self._tail_bytes :]) if self._tail_bytes else b""
        return Event(self._type, b"", self.last_event_id, self._block_start, end, True, tail)

    def _event(self, end: int) -> Event:
        data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
        return Event(self._type, data, self.last_event_id, self._block_start, end)

    def _reset(self, start: int) -> None:
        """
        Start a new event at absolute offset C{start}.
        """
        self._block_start = start
        self._data = []
        self._type = b""
        self._skipping = False
        if self._raw_tail:
            self._raw_tail.clear()

    def _field(self, line: bytes) -> None:
        """
        Apply one non-blank line to the event being built.
        """
        if line.startswith(b"data: "):
            self._data.append(line[6:])
            return
        if line[0] == _COLON:
            return
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._type = value
        elif name == b"id":
            if b"\0" not in value:
                self.last_event_id = value
        elif name == b"retry" and value.isdigit():
            self.retry = int(value)
