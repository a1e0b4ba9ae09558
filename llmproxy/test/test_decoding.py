"""
Tests for L{llmproxy.decoding}: gzip bodies inflated a bounded piece at a
time, following the consumer's flow control.
"""

from __future__ import annotations

import gzip
import tracemalloc
from typing import Any

from twisted.internet.defer import succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Response, ResponseDone
from twisted.web.http_headers import Headers

from llmproxy.decoding import (
    PER_TURN,
    PIECE,
    GunzipAgent,
    GzipDecodingError,
    _Gunzip,
    _GunzippedResponse,
)
from llmproxy.test.test_relay import FakeUpstreamTransport


class Consumer(Protocol):
    """
    The body's protocol (the relay in the proxy): counts what it gets and
    pauses its transport once it has C{pause_after} bytes.
    """

    def __init__(self, pause_after: int | None = None) -> None:
        self.size = 0
        self.pieces: list[int] = []
        self.tail = b""
        self.pause_after = pause_after
        self.ended: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        self.pieces.append(len(data))
        self.tail = (self.tail + data)[-100:]
        if self.pause_after is not None and self.size >= self.pause_after:
            self.pause_after = None
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        self.ended = reason


class GunzipTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.upstream = FakeUpstreamTransport()

    def decoder(self, consumer: Consumer) -> _Gunzip:
        decoder = _Gunzip(consumer, self.clock)
        decoder.makeConnection(self.upstream)
        return decoder

    def test_bomb_bounded_per_turn(self) -> None:
        """
        100 MB of zeros in 100 KB of gzip, received at once: each reactor
        turn inflates at most L{PER_TURN} bytes, in pieces of at most
        L{PIECE}, the upstream stays paused meanwhile, and memory stays
        within a few pieces.
        """
        bomb = gzip.compress(b"\0" * 100_000_000)
        self.assertLess(len(bomb), 200_000)
        consumer = Consumer()
        decoder = self.decoder(consumer)
        tracemalloc.start()
        try:
            decoder.dataReceived(bomb)
            self.assertEqual(consumer.size, PER_TURN)
            self.assertTrue(self.upstream.paused)
            decoder.connectionLost(Failure(ResponseDone()))
            turns = 0
            while consumer.ended is None:
                # One reactor turn: run the one pending continuation.
                (later,) = self.clock.calls
                self.clock.calls.remove(later)
                later.called = True
                before = consumer.size
                later.func(*later.args, **later.kw)
                self.assertLessEqual(consumer.size - before, PER_TURN)
                turns += 1
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertEqual(consumer.size, 100_000_000)
        self.assertEqual(max(consumer.pieces), PIECE)
        self.assertGreaterEqual(turns, 100_000_000 // PER_TURN - 1)
        self.assertLess(peak, 2 * len(bomb) + 4 * PIECE)
        assert consumer.ended is not None
        self.assertTrue(consumer.ended.check(ResponseDone))

    def test_consumer_pause(self) -> None:
        """
        A consumer that pauses stops the inflation at once and keeps the
        upstream paused; resuming goes on from there.
        """
        body = gzip.compress(b"x" * (10 * PIECE))
        consumer = Consumer(pause_after=2 * PIECE)
        decoder = self.decoder(consumer)
        decoder.dataReceived(body)
        self.assertEqual(consumer.size, 2 * PIECE)
        self.assertTrue(self.upstream.paused)
        decoder.connectionLost(Failure(ResponseDone()))
        self.assertIsNone(consumer.ended, "ended before the body was delivered")
        decoder.resumeProducing()
        self.assertEqual(consumer.size, 10 * PIECE)
        self.assertIsNotNone(consumer.ended)

    def test_small_chunks_follow_the_upstream(self) -> None:
        """
        Ordinary bodies pass through as they arrive; the upstream is not
        paused when nothing waits.
        """
        body = gzip.compress(b"data: hello\n\n" * 1000)
        consumer = Consumer()
        decoder = self.decoder(consumer)
        for i in range(0, len(body), 7):
            decoder.dataReceived(body[i : i + 7])
            self.assertFalse(self.upstream.paused)
        decoder.connectionLost(Failure(ResponseDone()))
        self.assertEqual(consumer.size, 13 * 1000)
        self.assertTrue(consumer.tail.endswith(b"hello\n\n"))

    def test_corrupt(self) -> None:
        """
        A corrupt body stops the upstream and ends the consumer with a
        decoding error, not a complete body.
        """
        consumer = Consumer()
        decoder = self.decoder(consumer)
        decoder.dataReceived(gzip.compress(b"fine")[:10] + b"\xff" * 50)
        self.assertTrue(self.upstream.stopped)
        decoder.connectionLost(Failure(ResponseDone()))
        assert consumer.ended is not None
        self.assertTrue(consumer.ended.check(GzipDecodingError))

    def test_stop(self) -> None:
        consumer = Consumer()
        decoder = self.decoder(consumer)
        decoder.dataReceived(gzip.compress(b"\0" * (4 * PER_TURN)))
        decoder.stopProducing()
        self.assertTrue(self.upstream.stopped)
        self.clock.advance(0)
        self.assertEqual(consumer.size, PER_TURN)


class AgentTests(SynchronousTestCase):
    """
    L{GunzipAgent} takes gzip off the codings and leaves the others.
    """

    def response(self, encoding: bytes | None) -> Any:
        headers = Headers()
        if encoding is not None:
            headers.setRawHeaders(b"content-encoding", [encoding])
        response = Response._construct((b"HTTP", 1, 1), 200, b"OK", headers, None, None)

        class Agent:
            def request(self, *args: Any) -> Any:
                return succeed(response)

        got = GunzipAgent(Agent(), Clock()).request(b"GET", b"http://x/")  # type: ignore[arg-type]
        return self.successResultOf(got)

    def test_codings(self) -> None:
        for given, left, decoded in [
            (b"gzip", None, True),
            (b"x-gzip", None, True),
            (b"br, gzip", [b"br"], True),
            (b"gzip, br", [b"gzip, br"], False),
            (b"identity", [b"identity"], False),
            (None, None, False),
        ]:
            response = self.response(given)
            self.assertEqual(response.headers.getRawHeaders(b"content-encoding"), left, given)
            self.assertEqual(isinstance(response, _GunzippedResponse), decoded, given)
