"""
Tests for L{llmproxy.eventstream}.
"""

from __future__ import annotations

import random
import struct
import zlib

from twisted.trial.unittest import SynchronousTestCase

from llmproxy.eventstream import (
    MAX_PAYLOAD_BYTES,
    EventStreamDecoder,
    EventStreamError,
    encode_frame,
    event_frame,
    exception_frame,
    parse_headers,
)

# A frame as the AWS SDKs' own encoder writes it (headers of several types),
# built here byte by byte from the format's definition.
_TYPED_HEADERS = (
    b"\x05:flag\x00"  # bool true
    b"\x04:int\x04\x00\x00\x00\x2a"  # int32 42
    b"\x03:ts\x08\x00\x00\x01\x8f\x00\x00\x00\x00"  # timestamp
    b"\x03:id\x09"
    + bytes(range(16))  # uuid
    + b"\x0b:event-type\x07\x00\x08metadata"  # string
)


def _typed_frame(payload: bytes) -> bytes:
    total = 16 + len(_TYPED_HEADERS) + len(payload)
    prelude = struct.pack(">II", total, len(_TYPED_HEADERS))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    body = prelude + _TYPED_HEADERS + payload
    return body + struct.pack(">I", zlib.crc32(body))


def _split(data: bytes, rng: random.Random, largest: int) -> list[bytes]:
    pieces = []
    at = 0
    while at < len(data):
        size = rng.randint(1, largest)
        pieces.append(data[at : at + size])
        at += size
    return pieces


class DecoderTests(SynchronousTestCase):
    def stream(self) -> tuple[bytes, list[str]]:
        frames = [
            event_frame("messageStart", b'{"role":"assistant"}'),
            event_frame("contentBlockDelta", b'{"delta":{"text":"hi"}}' * 40),
            event_frame("big", bytes(range(256)) * 40),
            _typed_frame(b'{"usage":{"inputTokens":1}}'),
            exception_frame("throttlingException", b'{"message":"slow"}'),
        ]
        return b"".join(frames), [
            "messageStart",
            "contentBlockDelta",
            "big",
            "metadata",
            "throttlingException",
        ]

    def test_any_split(self) -> None:
        """
        The same frames come out however the stream is cut into chunks, with
        frames kept whole or passed by (C{keep_bytes} below their size).
        """
        data, names = self.stream()
        rng = random.Random(7)
        for keep in (16, 200, 1 << 20):
            for largest in (1, 3, 64, 5000):
                decoder = EventStreamDecoder(keep)
                frames = []
                for piece in _split(data, rng, largest):
                    frames += decoder.feed(piece)
                decoder.finish()
                self.assertEqual([frame.event_type for frame in frames], names)
                self.assertTrue(decoder.at_boundary)
                kept = [frame.payload for frame in frames if frame.payload is not None]
                self.assertTrue(all(len(payload) + 60 <= keep for payload in kept))

    def test_payload_and_types(self) -> None:
        data, _names = self.stream()
        frames = EventStreamDecoder().feed(data)
        self.assertEqual(frames[3].payload, b'{"usage":{"inputTokens":1}}')
        self.assertEqual(frames[3].headers, {":event-type": "metadata"})
        self.assertEqual(frames[4].message_type, "exception")
        self.assertEqual(frames[0].message_type, "event")
        self.assertEqual(sum(frame.size for frame in frames), len(data))

    def test_big_frame_not_kept(self) -> None:
        """
        A frame bigger than C{keep_bytes} is passed by: its headers are read,
        its payload never held, however large.
        """
        payload = b"x" * (5 << 20)
        frame = event_frame("chunk", payload)
        decoder = EventStreamDecoder(keep_bytes=1 << 16)
        found = []
        for at in range(0, len(frame), 1 << 16):
            found += decoder.feed(frame[at : at + (1 << 16)])
            self.assertLess(len(decoder._buf), 1 << 16)
        [only] = found
        self.assertIsNone(only.payload)
        self.assertEqual(only.event_type, "chunk")

    def test_agrees_with_botocore(self) -> None:
        """
        What L{encode_frame} writes, botocore's own parser reads the same.
        """
        try:
            from botocore.eventstream import EventStreamBuffer
        except ImportError:
            self.skipTest("botocore is not installed")
        data, names = self.stream()
        buffer = EventStreamBuffer()
        buffer.add_data(data)
        messages = list(buffer)
        self.assertEqual(len(messages), len(names))
        self.assertEqual(messages[0].headers[":event-type"], "messageStart")
        self.assertEqual(messages[3].headers[":int"], 42)
        self.assertEqual(messages[4].payload, b'{"message":"slow"}')

    def test_bad_prelude_crc(self) -> None:
        data = bytearray(event_frame("chunk", b"{}"))
        data[9] ^= 0xFF
        decoder = EventStreamDecoder()
        self.assertRaises(EventStreamError, decoder.feed, bytes(data))
        self.assertIsNotNone(decoder.failed)
        self.assertFalse(decoder.at_boundary)
        # Once broken, the rest of the stream is ignored, not buffered.
        self.assertEqual(decoder.feed(b"x" * 100000), [])
        self.assertEqual(len(decoder._buf), 0)

    def test_bad_message_crc(self) -> None:
        for keep in (16, 1 << 20):
            data = bytearray(event_frame("chunk", b'{"bytes":"abc"}'))
            data[-6] ^= 0x01
            with self.assertRaises(EventStreamError) as caught:
                EventStreamDecoder(keep).feed(bytes(data))
            self.assertIn("message CRC", str(caught.exception))

    def test_lengths_out_of_bounds(self) -> None:
        """
        A prelude that claims a frame too small, too large, or with more
        headers than the frame holds is an error at once: nothing waits for
        gigabytes that will never come.
        """
        for total, headers in (
            (8, 0),
            (MAX_PAYLOAD_BYTES + (1 << 20), 0),
            (20, 10),
            (1000, 200000),
        ):
            prelude = struct.pack(">II", total, headers)
            prelude += struct.pack(">I", zlib.crc32(prelude))
            self.assertRaises(EventStreamError, EventStreamDecoder().feed, prelude)

    def test_ends_inside_frame(self) -> None:
        frame = event_frame("chunk", b"{}")
        decoder = EventStreamDecoder()
        self.assertEqual(decoder.feed(frame[:-3]), [])
        self.assertFalse(decoder.at_boundary)
        self.assertRaises(EventStreamError, decoder.finish)

    def test_bad_headers(self) -> None:
        for block in (b"\x05:name", b"\x01x\x63", b"\x01x\x07\x00\x09abc"):
            self.assertRaises(EventStreamError, parse_headers, block)
        frame = encode_frame([], b"")
        self.assertEqual(EventStreamDecoder().feed(frame)[0].headers, {})

    def test_garbage(self) -> None:
        """
        Random bytes never raise anything but L{EventStreamError}.
        """
        rng = random.Random(3)
        for _ in range(300):
            junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))
            decoder = EventStreamDecoder(64)
            try:
                decoder.feed(junk)
                decoder.finish()
            except EventStreamError:
                pass
