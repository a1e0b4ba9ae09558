"""
Tests for L{llmproxy.sse}.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.sse import Event, SSEParser

_BOM = b"\xef\xbb\xbf"


def parse(stream: bytes, *pieces: int, **kwargs: int) -> list[Event]:
    """
    Feed C{stream} to a new parser, split at the offsets C{pieces}, then
    finish it.
    """
    parser = SSEParser(**kwargs)
    events: list[Event] = []
    last = 0
    for cut in sorted(pieces):
        events += parser.feed(stream[last:cut])
        last = cut
    events += parser.feed(stream[last:])
    events += parser.finish()
    return events


def reference(stream: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """
    A direct, whole-stream reading of the WHATWG rules, to check the
    incremental parser against: C{(event, data, id)} per dispatch, plus the
    lenient last event L{SSEParser.finish} documents.
    """
    if stream.startswith(_BOM):
        stream = stream[3:]
    lines = re.split(rb"\r\n|\r|\n", stream)
    partial = lines.pop()
    if partial:
        lines.append(partial)
    lines.append(b"")
    out = []
    data: list[bytes] | None = None
    kind = b""
    last_id = b""
    for line in lines:
        if not line:
            if data is not None:
                out.append((kind, b"\n".join(data), last_id))
            data, kind = None, b""
            continue
        if line.startswith(b":"):
            continue
        name, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            data = (data or []) + [value]
        elif name == b"event":
            kind = value
        elif name == b"id" and b"\0" not in value:
            last_id = value
    return out


def summary(events: list[Event]) -> list[tuple[bytes, bytes, bytes]]:
    return [(event.event, event.data, event.id) for event in events]


class ParsingTests(SynchronousTestCase):
    """
    The WHATWG rules, one by one.
    """

    def test_lineEndings(self) -> None:
        """
        LF, CR LF and CR all end lines, and may be mixed.
        """
        for ending in (b"\n", b"\r\n", b"\r"):
            stream = b"data: a" + ending + b"data: b" + ending + ending
            self.assertEqual(summary(parse(stream)), [(b"", b"a\nb", b"")])
        mixed = b"data: a\rdata: b\r\n\ndata: c\n\r"
        self.assertEqual(summary(parse(mixed)), [(b"", b"a\nb", b""), (b"", b"c", b"")])

    def test_fields(self) -> None:
        """
        C{event} names the event; C{id} persists across events (but not one
        with NUL); one leading space is removed from a value; a line
        without a colon is a field with an empty value; unknown fields and
        comments are ignored; C{retry} takes digits only.
        """
        stream = (
            b": comment\n"
            b"event: delta\n"
            b"id: 1\n"
            b"data:  two spaces\n"
            b"unknown: x\n"
            b"retry: 1500\n"
            b"\n"
            b"id: bad\0id\n"
            b"data\n"
            b"retry: 15x\n"
            b"\n"
        )
        parser = SSEParser()
        events = parser.feed(stream)
        self.assertEqual(
            summary(events),
            [(b"delta", b" two spaces", b"1"), (b"", b"", b"1")],
        )
        self.assertEqual(parser.retry, 1500)
        self.assertEqual(parser.last_event_id, b"1")

    def test_noDataNoEvent(self) -> None:
        """
        A block without a C{data} line dispatches nothing, and its event
        type does not leak into the next event.
        """
        stream = b"event: ping\n\n\n\ndata: x\n\n"
        self.assertEqual(summary(parse(stream)), [(b"", b"x", b"")])

    def test_byteOrderMark(self) -> None:
        """
        One leading UTF-8 byte-order mark is ignored, even when split.
        """
        stream = _BOM + b"data: x\n\n"
        for cut in range(len(stream)):
            self.assertEqual(summary(parse(stream, cut)), [(b"", b"x", b"")])
        self.assertEqual(summary(parse(_BOM + _BOM + b"data: x\n\n")), [])

    def test_offsets(self) -> None:
        """
        C{start} and C{end} delimit the raw event; its terminating blank
        line follows C{end}.
        """
        stream = b"data: a\r\n\r\n: c\nevent: e\ndata: b\n\n"
        first, second = parse(stream)
        self.assertEqual(stream[first.start : first.end], b"data: a\r\n")
        self.assertEqual(stream[first.end : first.end + 2], b"\r\n")
        self.assertEqual(stream[second.start : second.end], b": c\nevent: e\ndata: b\n")
        self.assertEqual(second.end, len(stream) - 1)

    def test_splitCRLF(self) -> None:
        """
        A CR LF split between chunks is one line ending: no extra blank
        line, the same offsets.
        """
        stream = b"data: a\r\n\r\ndata: b\r\n\r\n"
        whole = parse(stream)
        for cut in range(len(stream) + 1):
            self.assertEqual(parse(stream, cut), whole)

    def test_finishDispatchesLastEvent(self) -> None:
        """
        A stream that ends without the final blank line still gives its last
        event, whether or not its last line ended.
        """
        self.assertEqual(summary(parse(b"data: a\n")), [(b"", b"a", b"")])
        self.assertEqual(summary(parse(b"data: a\ndata: b")), [(b"", b"a\nb", b"")])
        self.assertEqual(summary(parse(b"event: x\n")), [])
        self.assertEqual(parse(b"data: a"), [Event(b"", b"a", b"", 0, 7)])

    def test_finishResets(self) -> None:
        """
        After L{SSEParser.finish} the parser starts afresh.
        """
        parser = SSEParser()
        parser.feed(b"event: x\ndata: a")
        parser.finish()
        self.assertEqual(parser.feed(b"data: b\n\n"), [Event(b"", b"b", b"", 16, 24)])

    def test_emptyChunk(self) -> None:
        """
        An empty chunk changes nothing.
        """
        parser = SSEParser()
        self.assertEqual(parser.feed(b""), [])
        self.assertEqual(parser.offset, 0)

    def test_holdFrom(self) -> None:
        """
        L{SSEParser.hold_from} is where the event being read starts.
        """
        parser = SSEParser()
        parser.feed(b"data: a\n\ndata: b")
        self.assertEqual(parser.hold_from, 9)
        parser.feed(b"\n\n")
        self.assertEqual(parser.hold_from, parser.offset)
        parser.feed(b"\r")
        self.assertEqual(parser.hold_from, parser.offset)
        parser.feed(b"\ndata: c\r")
        self.assertEqual(parser.hold_from, 20)

    def test_badArguments(self) -> None:
        """
        The bound must leave room for an event, and the tail must fit in it.
        """
        self.assertRaises(ValueError, SSEParser, 8)
        self.assertRaises(ValueError, SSEParser, 64, 65)


class BoundTests(SynchronousTestCase):
    """
    An event larger than the bound is skipped, logged once, and reported as
    truncated with its raw tail.
    """

    def test_oversizedEvent(self) -> None:
        """
        The big event is replaced by a truncated one whose tail is the end
        of its raw bytes; the events around it are untouched.
        """
        big = b"data: " + b"x" * 200 + b"END\n"
        stream = b"data: a\n\n" + big + b"\n" + b"data: b\n\n"
        with capturedLogs() as logs:
            events = parse(stream, max_event_bytes=100, tail_bytes=10)
        self.assertEqual(
            events,
            [
                Event(b"", b"a", b"", 0, 8),
                Event(b"", b"", b"", 9, 9 + len(big), True, b"xxxxxxEND\n"),
                Event(b"", b"b", b"", 10 + len(big), 18 + len(big)),
            ],
        )
        warnings = [log for log in logs if log["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["limit"], 100)

    def test_oversizedKeepsType(self) -> None:
        """
        An C{event:} line before the data that overflows is kept.
        """
        stream = b"event: big\ndata: " + b"y" * 100 + b"\n\n"
        (event,) = parse(stream, max_event_bytes=50, tail_bytes=4)
        self.assertEqual((event.event, event.truncated, event.tail), (b"big", True, b"yyy\n"))

    def test_boundIsExact(self) -> None:
        """
        An event of exactly C{max_event_bytes} (without its final blank line)
        is kept; one byte more is not.
        """
        fits = b"data: " + b"z" * 57 + b"\n"
        self.assertEqual(len(fits), 64)
        (event,) = parse(fits + b"\n", max_event_bytes=64, tail_bytes=8)
        self.assertFalse(event.truncated)
        (event,) = parse(b"data: z" + fits + b"\n", max_event_bytes=64, tail_bytes=0)
        self.assertEqual((event.truncated, event.tail), (True, b""))

    def test_memoryBounded(self) -> None:
        """
        A 4 MiB line fed in small chunks is never buffered beyond the bound.
        """
        parser = SSEParser(max_event_bytes=1 << 16, tail_bytes=1 << 10)
        parser.feed(b"event: huge\ndata: ")
        chunk = b"q" * 4096
        for _ in range(1024):
            parser.feed(chunk)
            self.assertLessEqual(len(parser._line), 1 << 16)
            self.assertLessEqual(len(parser._raw_tail), 2 << 10)
        (event,) = parser.feed(b"tail\n\n")
        self.assertTrue(event.truncated)
        self.assertEqual(event.tail, b"q" * 1019 + b"tail\n")

    def test_truncatedAtEnd(self) -> None:
        """
        A stream that ends inside an oversized event reports it truncated.
        """
        (event,) = parse(b"data: " + b"w" * 100, max_event_bytes=32, tail_bytes=3)
        self.assertEqual((event.truncated, event.tail, event.end), (True, b"www", 106))

    def test_oneWarningPerEvent(self) -> None:
        """
        Each oversized event is logged once, however many chunks it spans.
        """
        parser = SSEParser(max_event_bytes=32, tail_bytes=0)
        with capturedLogs() as logs:
            for _ in range(2):
                for _ in range(10):
                    parser.feed(b"data: " + b"v" * 20 + b"\n")
                parser.feed(b"\n")
        self.assertEqual(len([log for log in logs if log["log_level"] == LogLevel.warn]), 2)


# Hypothesis: streams built from real SSE lines, every line ending, values
# without line breaks, a possible BOM and a possible unterminated end.
_values = st.binary(max_size=24).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_lines = st.one_of(
    _values.map(lambda v: b"data: " + v),
    _values.map(lambda v: b"data:" + v),
    st.just(b"data"),
    st.sampled_from([b"event: message_start", b"event: x", b"id: 3", b"id", b": keep-alive"]),
    st.sampled_from([b"retry: 250", b"retry: x1", b"bogus: field"]),
    st.just(b""),
    st.just(b""),
    _values,
)
_endings = st.sampled_from([b"\n", b"\r\n", b"\r"])


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(st.tuples(_lines, _endings), max_size=30))
    stream = b"".join(line + ending for line, ending in lines)
    if draw(st.booleans()):
        stream = _BOM + stream
    if draw(st.booleans()):
        stream += draw(_values)
    return stream


@st.composite
def split_streams(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    stream = draw(streams())
    cuts = draw(st.lists(st.integers(0, len(stream)), max_size=12))
    return stream, cuts


class PropertyTests(SynchronousTestCase):
    """
    Chunk boundaries never change what the parser sees.
    """

    @settings(max_examples=400, deadline=None)
    @given(split_streams())
    def test_anySplit(self, case: tuple[bytes, list[int]]) -> None:
        """
        Any split gives the same events, offsets included, as the whole
        stream at once, and as one byte at a time; and those events are the
        ones the WHATWG rules give.
        """
        stream, cuts = case
        whole = parse(stream)
        self.assertEqual(parse(stream, *cuts), whole)
        self.assertEqual(parse(stream, *range(len(stream))), whole)
        self.assertEqual(summary(whole), reference(stream))

    @settings(max_examples=400, deadline=None)
    @given(split_streams())
    def test_anySplitBounded(self, case: tuple[bytes, list[int]]) -> None:
        """
        With a bound small enough to truncate events, any split still gives
        the same events, tails included.
        """
        stream, cuts = case
        bounds = {"max_event_bytes": 24, "tail_bytes": 7}
        whole = parse(stream, **bounds)
        self.assertEqual(parse(stream, *cuts, **bounds), whole)
        self.assertEqual(parse(stream, *range(len(stream)), **bounds), whole)
        for event in whole:
            if event.truncated:
                end = event.end
                start = max(event.start, end - 7)
                self.assertEqual(event.tail, stream[start:end])
