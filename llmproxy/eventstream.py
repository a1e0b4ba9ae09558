# -*- test-case-name: llmproxy.test.test_eventstream -*-
"""
The AWS event stream (C{application/vnd.amazon.eventstream}): the binary
framing Amazon Bedrock streams its responses in, read incrementally with
bounded memory, and written (for the errors the proxy makes and for the
fake upstream).

A frame ("message") is::

    total length   uint32, big endian, the whole frame
    headers length uint32
    prelude CRC    CRC32 of the eight bytes above
    headers        name length (uint8), name, value type (uint8), value
    payload        total - headers - 16 bytes
    message CRC    CRC32 of everything before it

Header values are typed: booleans (types 0 and 1, no value bytes), an 8-,
16-, 32- or 64-bit integer (2-5), bytes and strings (6 and 7, a uint16
length first), a timestamp (8, int64 milliseconds) and a UUID (9, 16
bytes).  The proxy only reads strings (C{:event-type}, C{:message-type},
C{:exception-type}, C{:content-type}); the others are skipped by size.

L{EventStreamDecoder} gives the same frames however the bytes are split
into chunks, keeps at most one frame of up to C{keep_bytes} whole, and
passes bigger frames by with only their headers kept (their CRC is still
checked, on the fly).  Anything malformed (a bad CRC, a length out of the
format's bounds, a header that runs past its block) raises
L{EventStreamError} once; the decoder then ignores the rest of the stream.

botocore has a parser too (C{botocore.eventstream.EventStreamBuffer}), but
it holds every frame whole, up to its 24 MiB payload limit, and would make
botocore a requirement for metering Bedrock even when clients send their
own API keys; this one is small, bounded and checked against botocore's in
the tests.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Mapping

from attrs import frozen

PRELUDE_BYTES = 12
"""Total length, headers length and the prelude's CRC."""

MIN_FRAME_BYTES = PRELUDE_BYTES + 4
"""A frame with no headers and no payload."""

MAX_HEADERS_BYTES = 128 * 1024
"""The format's limit on one frame's headers block."""

MAX_PAYLOAD_BYTES = 24 * 1024 * 1024
"""The format's limit on one frame's payload (what the AWS SDKs accept)."""

DEFAULT_KEEP_BYTES = 1 << 20
"""Frames up to this size (1 MiB) are kept whole and their payload returned."""

_PRELUDE = struct.Struct(">III")
_UINT32 = struct.Struct(">I")
_UINT16 = struct.Struct(">H")

# Value sizes of the fixed-size header types; None: a uint16 length first.
_FIXED_SIZES: Mapping[int, int | None] = {
    0: 0,
    1: 0,
    2: 1,
    3: 2,
    4: 4,
    5: 8,
    6: None,
    7: None,
    8: 8,
    9: 16,
}
_STRING = 7


class EventStreamError(ValueError):
    """
    The bytes are not a well-formed event stream.
    """


@frozen
class Frame:
    """
    One event stream message.

    @ivar headers: the string-valued headers, by name (C{:event-type},
        C{:message-type}, ...); headers of other types are left out.
    @ivar payload: the payload, or L{None} when the frame was bigger than
        the decoder keeps (its headers were still read).
    @ivar size: the frame's total length in bytes.
    """

    headers: Mapping[str, str]
    payload: bytes | None
    size: int

    @property
    def message_type(self) -> str:
        """
        C{event}, C{exception} or C{error} (the default is C{event}).
        """
        return self.headers.get(":message-type", "event")

    @property
    def event_type(self) -> str | None:
        """
        The event's name (C{metadata}, C{chunk}, ...), or the exception's.
        """
        return self.headers.get(":event-type") or self.headers.get(":exception-type")


def parse_headers(block: bytes | bytearray | memoryview) -> dict[str, str]:
    """
    The string-valued headers of one headers block.

    @raise EventStreamError: when a header runs past the block or has an
        unknown value type.
    """
    headers: dict[str, str] = {}
    view = memoryview(block)
    end = len(view)
    at = 0
    while at < end:
        name_length = view[at]
        at += 1
        if at + name_length + 1 > end:
            raise EventStreamError("event stream header name runs past its block")
        name = bytes(view[at : at + name_length]).decode("utf-8", "replace")
        at += name_length
        kind = view[at]
        at += 1
        if kind not in _FIXED_SIZES:
            raise EventStreamError(f"unknown event stream header type {kind}")
        size = _FIXED_SIZES[kind]
        if size is None:
            if at + 2 > end:
                raise EventStreamError("event stream header value runs past its block")
            (size,) = _UINT16.unpack_from(view, at)
            at += 2
            if at + size > end:
                raise EventStreamError("event stream header value runs past its block")
            if kind == _STRING:
                headers[name] = bytes(view[at : at + size]).decode("utf-8", "replace")
        elif at + size > end:
            raise EventStreamError("event stream header value runs past its block")
        at += size
    return headers


class EventStreamDecoder:
    """
    Turns a chunked event stream into L{Frame}s, with bounded memory.

    Memory: one kept frame (at most C{keep_bytes}), or for a bigger frame
    its headers block (at most L{MAX_HEADERS_BYTES}); never the payload of
    a frame bigger than C{keep_bytes}.

    @ivar at_boundary: whether every byte fed so far belongs to a complete
        frame, i.e. bytes written now would start a new frame.
    @ivar failed: the error that stopped decoding, if any.
    """

    def __init__(self, keep_bytes: int = DEFAULT_KEEP_BYTES) -> None:
        if keep_bytes < MIN_FRAME_BYTES:
            raise ValueError(f"keep_bytes must be at least {MIN_FRAME_BYTES}")
        self._keep = keep_bytes
        # The start of the frame being read (all of it, for a frame kept whole).
        self._buf = bytearray()
        # A big frame being passed by: its length, its headers, how many of
        # its bytes have gone by, their running CRC, and its own CRC bytes.
        self._skipping = False
        self._total = 0
        self._headers: dict[str, str] = {}
        self._seen = 0
        self._crc = 0
        self._crc_bytes = bytearray()
        self.failed: EventStreamError | None = None

    @property
    def at_boundary(self) -> bool:
        return self.failed is None and not self._skipping and not self._buf

    def feed(self, data: bytes) -> list[Frame]:
        """
        Decode one chunk.

        @return: the frames the chunk completed, in stream order.
        @raise EventStreamError: the first time the stream turns out to be
            malformed; later calls return nothing.
        """
        if self.failed is not None or not data:
            return []
        try:
            return self._feed(data)
        except EventStreamError as error:
            self._fail(error)
            raise

    def finish(self) -> None:
        """
        The stream ended.

        @raise EventStreamError: it ended inside a frame.
        """
        if self.failed is None and not self.at_boundary:
            error = EventStreamError("event stream ended inside a frame")
            self._fail(error)
            raise error

    def _fail(self, error: EventStreamError) -> None:
        self.failed = error
        self._buf = bytearray()
        self._crc_bytes = bytearray()
        self._headers = {}
        self._skipping = False

    def _feed(self, data: bytes) -> list[Frame]:
        frames: list[Frame] = []
        view = memoryview(data)
        while view:
            if self._skipping:
                view = self._skip(view, frames)
                continue
            self._buf += view
            view = memoryview(b"")
            while True:
                frame = self._take_buffered()
                if frame is None:
                    break
                frames.append(frame)
            if self._buf and self.skipping():
                # The buffered rest belongs to the big frame (and what follows it).
                view = memoryview(bytes(self._buf))
                self._buf = bytearray()
        return frames

    def skipping(self) -> bool:
        """
        Whether a frame too big to keep is passing by.
        """
        return self._skipping

    def _take_buffered(self) -> Frame | None:
        """
        Take one frame off the front of the buffer.

        @return: the frame, or L{None} when more bytes are needed or when the
            frame is too big to keep: then its prelude and headers have been
            consumed and skipping has begun.
        """
        buf = self._buf
        if self._skipping or len(buf) < PRELUDE_BYTES:
            return None
        total, headers_length, prelude_crc = _PRELUDE.unpack_from(buf, 0)
        if zlib.crc32(bytes(buf[:8])) != prelude_crc:
            raise EventStreamError("event stream prelude CRC mismatch")
        if total < MIN_FRAME_BYTES or headers_length > MAX_HEADERS_BYTES:
            raise EventStreamError(f"event stream frame length {total} out of bounds")
        if headers_length > total - MIN_FRAME_BYTES:
            raise EventStreamError("event stream headers longer than their frame")
        if total - MIN_FRAME_BYTES - headers_length > MAX_PAYLOAD_BYTES:
            raise EventStreamError(f"event stream frame length {total} too large")
        head_end = PRELUDE_BYTES + headers_length
        if total <= self._keep:
            if len(buf) < total:
                return None
            frame = bytes(buf[:total])
            del buf[:total]
            (message_crc,) = _UINT32.unpack_from(frame, total - 4)
            if zlib.crc32(memoryview(frame)[: total - 4]) != message_crc:
                raise EventStreamError("event stream message CRC mismatch")
            headers = parse_headers(memoryview(frame)[PRELUDE_BYTES:head_end])
            return Frame(headers, frame[head_end : total - 4], total)
        if len(buf) < head_end:
            return None
        head = bytes(buf[:head_end])
        del buf[:head_end]
        self._headers = parse_headers(memoryview(head)[PRELUDE_BYTES:])
        self._total = total
        self._crc = zlib.crc32(head)
        self._seen = head_end
        self._skipping = True
        return None

    def _skip(self, view: memoryview, frames: list[Frame]) -> memoryview:
        """
        Pass part of a big frame by, checking its CRC.

        @return: the bytes of C{view} after the frame, if it ended there.
        """
        body_left = self._total - 4 - self._seen
        if body_left > 0:
            taken = view[:body_left]
            self._crc = zlib.crc32(taken, self._crc)
            self._seen += len(taken)
            view = view[len(taken) :]
        need = self._total - self._seen
        if need <= 0 or not view:
            return view
        taken = view[:need]
        self._crc_bytes += taken
        self._seen += len(taken)
        view = view[len(taken) :]
        if self._seen < self._total:
            return view
        (message_crc,) = _UINT32.unpack_from(self._crc_bytes, 0)
        self._crc_bytes = bytearray()
        self._skipping = False
        if message_crc != self._crc:
            raise EventStreamError("event stream message CRC mismatch")
        frames.append(Frame(self._headers, None, self._total))
        self._headers = {}
        return view


def encode_header(name: str, value: str) -> bytes:
    """
    One string-valued header.
    """
    raw_name = name.encode("utf-8")
    raw_value = value.encode("utf-8")
    return (
        bytes([len(raw_name)])
        + raw_name
        + bytes([_STRING])
        + _UINT16.pack(len(raw_value))
        + raw_value
    )


def encode_frame(headers: Iterable[tuple[str, str]], payload: bytes) -> bytes:
    """
    One complete frame with string-valued C{headers}, in order.
    """
    block = b"".join(encode_header(name, value) for name, value in headers)
    total = MIN_FRAME_BYTES + len(block) + len(payload)
    prelude = _PRELUDE.pack(total, len(block), 0)[:8]
    prelude += _UINT32.pack(zlib.crc32(prelude))
    body = prelude + block + payload
    return body + _UINT32.pack(zlib.crc32(body))


def event_frame(event_type: str, payload: bytes) -> bytes:
    """
    An C{event} frame with a JSON payload, as Bedrock sends them.
    """
    return encode_frame(
        (
            (":event-type", event_type),
            (":content-type", "application/json"),
            (":message-type", "event"),
        ),
        payload,
    )


def exception_frame(exception_type: str, payload: bytes) -> bytes:
    """
    An C{exception} frame with a JSON payload: the AWS SDKs raise it as the
    service error C{exception_type} names.
    """
    return encode_frame(
        (
            (":exception-type", exception_type),
            (":content-type", "application/json"),
            (":message-type", "exception"),
        ),
        payload,
    )
