"""
Tests for L{llmproxy.relay}: whose silence counts, the upstream's or the
client's.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone

from llmproxy.relay import Relay


class FakeUpstreamTransport:
    """
    The upstream side: what the relay asks of the response's transport.
    """

    def __init__(self) -> None:
        self.paused = False
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


class FakeClientTransport:
    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


class FakeSite:
    def __init__(self) -> None:
        self.dropped_for: list[str] = []

    def dropped(self, reason: str) -> None:
        self.dropped_for.append(reason)


class FakeChannel:
    def __init__(self) -> None:
        self.site = FakeSite()
        self.transport = FakeClientTransport()


class FakeRequest:
    def __init__(self) -> None:
        self.channel = FakeChannel()
        self.producer: Any = None
        self.written: list[bytes] = []
        self.finished = False

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def finish(self) -> None:
        self.finished = True

    def loseConnection(self) -> None:
        pass


class RelayTimerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.request = FakeRequest()
        self.ended: list[tuple[bool, str | None, str]] = []
        self.relay = Relay(
            self.request,  # type: ignore[arg-type]
            None,
            self.clock,
            idle_seconds=5,
            deadline=None,
            error_event=lambda status, message: b"event: error\n\n",
            ended=lambda *args: self.ended.append(args),
            stall_seconds=20,
        )
        self.upstream = FakeUpstreamTransport()
        self.relay.makeConnection(self.upstream)

    def test_registered_as_producer(self) -> None:
        self.assertIs(self.request.producer, self.relay)
        self.relay.pauseProducing()
        self.assertTrue(self.upstream.paused)
        self.relay.resumeProducing()
        self.assertFalse(self.upstream.paused)
        self.relay.stopProducing()
        self.assertTrue(self.upstream.stopped)

    def test_upstream_silence(self) -> None:
        """
        While the client reads, the upstream's silence is what counts.
        """
        self.clock.advance(4)
        self.relay.dataReceived(b"data: 1\n\n")
        self.clock.advance(4.9)
        self.assertFalse(self.upstream.stopped)
        self.clock.advance(0.2)
        self.assertTrue(self.upstream.stopped)
        self.relay.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.ended[0][:2], (False, "idle_timeout"))

    def test_client_pause_is_not_upstream_silence(self) -> None:
        """
        A client that stops reading for longer than the idle limit (the
        upstream is then paused by the relay) is no upstream failure; once
        it reads again, the idle limit counts again, from then.
        """
        self.relay.pauseProducing()
        self.clock.advance(15)
        self.relay.dataReceived(b"data: late\n\n")  # already read before the pause
        self.clock.advance(4)
        self.assertFalse(self.upstream.stopped)
        self.assertFalse(self.request.channel.transport.aborted)
        self.relay.resumeProducing()
        self.clock.advance(4.9)
        self.assertFalse(self.upstream.stopped)
        self.relay.dataReceived(b"data: 2\n\n")
        self.relay.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.ended, [(True, None, "")])

    def test_client_stall_drops_the_client(self) -> None:
        """
        A client that reads nothing for the stall limit is dropped, and
        counted as such; the upstream is not blamed.
        """
        self.relay.pauseProducing()
        self.clock.advance(19.9)
        self.assertFalse(self.request.channel.transport.aborted)
        self.clock.advance(0.2)
        self.assertTrue(self.request.channel.transport.aborted)
        self.assertEqual(self.request.channel.site.dropped_for, ["stalled_reading"])
        self.assertFalse(self.upstream.stopped)
        # The request's notifyFinish errback then makes the call tell the relay.
        self.relay.client_gone()
        self.relay.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.ended, [(False, None, "client left")])

    def test_after_the_end(self) -> None:
        """
        Flow control after the body ended (the channel may still hold the
        relay as its producer when the client left) does nothing.
        """
        self.relay.client_gone()
        self.relay.connectionLost(Failure(ResponseDone()))
        self.relay.pauseProducing()
        self.relay.resumeProducing()
        self.relay.stopProducing()
        self.assertEqual(self.ended, [(False, None, "client left")])

    def test_deadline_while_paused(self) -> None:
        """
        The call's total deadline counts whoever is slow.
        """
        self.relay.deadline = self.clock.seconds() + 8
        self.relay.pauseProducing()
        self.clock.advance(8.1)
        self.assertTrue(self.upstream.stopped)
        self.relay.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.ended[0][:2], (False, "total_timeout"))
