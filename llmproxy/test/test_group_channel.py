"""
Tests for L{llmproxy.group.channel} and L{llmproxy.group.stateservice}: two
channels joined in memory (frames cut at every possible byte), then the
state service on a real Unix socket.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, TimeoutError, inlineCallbacks, succeed
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llmproxy.group.channel import (
    FAILURE,
    HEADER,
    MAX_BODY,
    REPLY,
    Channel,
    ChannelClosed,
    Handler,
    RemoteError,
)
from llmproxy.group.stateservice import StateService

reactor: Any = _reactor
ECHO = 7
SLOW = 8
BROKEN = 9
REFUSE = 10


class Pair:
    """
    Two channels whose transports are L{StringTransport}s; L{pump} moves
    what each wrote to the other, C{chunk} bytes at a time.
    """

    def __init__(self, handlers: dict[int, Handler], chunk: int | None = None) -> None:
        self.clock = Clock()
        self.lost: list[Channel] = []
        self.a = Channel(handlers, self.clock, self.lost.append)
        self.b = Channel(handlers, self.clock, self.lost.append)
        self.a.makeConnection(StringTransport())
        self.b.makeConnection(StringTransport())
        self.chunk = chunk

    def pump(self) -> None:
        for _ in range(100):
            moved = False
            for source, target in ((self.a, self.b), (self.b, self.a)):
                transport: Any = source.transport
                data = transport.value()
                if not data:
                    continue
                transport.clear()
                moved = True
                step = self.chunk or len(data)
                for start in range(0, len(data), step):
                    target.dataReceived(data[start : start + step])
            if not moved:
                return


def handlers(waiting: list[Deferred[Any]]) -> dict[int, Handler]:
    """
    The test kinds: C{ECHO}, C{SLOW} (answers with a Deferred appended to
    C{waiting}), C{BROKEN} (a bug), C{REFUSE} (a refusal).
    """

    def slow(channel: Channel, body: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        waiting.append(d)
        return d

    def broken(channel: Channel, body: Any) -> Any:
        raise ZeroDivisionError("a bug")

    def refuse(channel: Channel, body: Any) -> Any:
        raise RemoteError("not now")

    return {
        ECHO: lambda channel, body: {"echo": body},
        SLOW: slow,
        BROKEN: broken,
        REFUSE: refuse,
    }


class ChannelTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.waiting: list[Deferred[Any]] = []
        self.pair = Pair(handlers(self.waiting))

    def test_calls_both_ways(self) -> None:
        """
        Either end calls the other; each answer reaches its own call.
        """
        pair = self.pair
        first = pair.a.call(ECHO, [1, "a"])
        second = pair.b.call(ECHO, None)
        third = pair.a.call(ECHO, {"x": 2})
        pair.pump()
        self.assertEqual(self.successResultOf(first), {"echo": [1, "a"]})
        self.assertEqual(self.successResultOf(second), {"echo": None})
        self.assertEqual(self.successResultOf(third), {"echo": {"x": 2}})

    def test_every_split(self) -> None:
        """
        Frames cut anywhere (one byte at a time) are put back together.
        """
        pair = Pair(handlers(self.waiting), chunk=1)
        calls = [pair.a.call(ECHO, "é" * n) for n in range(5)]
        pair.pump()
        self.assertEqual(
            [self.successResultOf(call) for call in calls], [{"echo": "é" * n} for n in range(5)]
        )

    def test_answer_later(self) -> None:
        """
        A handler may answer with a Deferred; answers go out as they come,
        in any order.
        """
        pair = self.pair
        first = pair.a.call(SLOW, 1)
        second = pair.a.call(SLOW, 2)
        pair.pump()
        self.assertNoResult(first)
        waiting = self.waiting
        waiting[1].callback("two")
        pair.pump()
        self.assertEqual(self.successResultOf(second), "two")
        self.assertNoResult(first)
        waiting[0].errback(RemoteError("one failed"))
        pair.pump()
        self.assertEqual(str(self.failureResultOf(first, RemoteError).value), "one failed")

    def test_one_way(self) -> None:
        """
        C{tell} sends a request nobody answers.
        """
        seen: list[Any] = []
        pair = Pair({ECHO: lambda channel, body: seen.append(body)})
        pair.a.tell(ECHO, ["x", 1])
        pair.pump()
        self.assertEqual(seen, [["x", 1]])
        transport: Any = pair.b.transport
        self.assertEqual(transport.value(), b"")

    def test_refusal_and_bug(self) -> None:
        """
        A handler's L{RemoteError} reaches the caller as is; any other
        exception too, as a L{RemoteError}, and is logged where it happened.
        """
        pair = self.pair
        refused = pair.a.call(REFUSE, None)
        broken = pair.a.call(BROKEN, None)
        pair.pump()
        self.assertEqual(str(self.failureResultOf(refused, RemoteError).value), "not now")
        self.assertEqual(str(self.failureResultOf(broken, RemoteError).value), "a bug")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_unknown_kind(self) -> None:
        pair = self.pair
        asked = pair.a.call(99, None)
        pair.pump()
        failure = self.failureResultOf(asked, RemoteError)
        self.assertEqual(str(failure.value), "nothing here serves kind 99")

    def test_timeout(self) -> None:
        """
        A call not answered in time fails with a timeout; the late answer is
        dropped.
        """
        pair = self.pair
        asked = pair.a.call(SLOW, None, timeout=1.0)
        pair.pump()
        pair.clock.advance(1.0)
        self.failureResultOf(asked, TimeoutError)
        waiting = self.waiting
        waiting[0].callback("late")
        pair.pump()
        later = pair.a.call(ECHO, 1)
        pair.pump()
        self.assertEqual(self.successResultOf(later), {"echo": 1})

    def test_connection_lost(self) -> None:
        """
        Calls waiting when the connection closes fail with
        L{ChannelClosed}, as do calls made afterwards; C{tell} is dropped.
        """
        pair = self.pair
        asked = pair.a.call(SLOW, None)
        pair.a.connectionLost()
        self.failureResultOf(asked, ChannelClosed)
        self.failureResultOf(pair.a.call(ECHO, 1), ChannelClosed)
        pair.a.tell(ECHO, 1)
        self.assertEqual(pair.lost, [pair.a])
        self.assertFalse(pair.a.open)


class BadInputTests(SynchronousTestCase):
    """
    A peer that sends garbage loses its connection; nothing raises.
    """

    def channel(self) -> tuple[Channel, StringTransport]:
        channel = Channel({ECHO: lambda channel, body: body}, Clock())
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport

    def test_oversized_frame(self) -> None:
        channel, transport = self.channel()
        channel.dataReceived(HEADER.pack(MAX_BODY + 1, 1, ECHO))
        self.assertTrue(transport.disconnecting)
        self.assertFalse(channel.open)

    def test_not_json(self) -> None:
        channel, transport = self.channel()
        channel.dataReceived(HEADER.pack(3, 1, ECHO) + b"{x]")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")

    def test_reply_to_nothing(self) -> None:
        """
        Answers to calls never made (or timed out) are ignored.
        """
        channel, transport = self.channel()
        channel.dataReceived(
            HEADER.pack(2, 42, REPLY) + b"{}" + HEADER.pack(2, 43, FAILURE) + b'""'
        )
        self.assertFalse(transport.disconnecting)
        self.assertTrue(channel.open)


class StateServiceTests(TestCase):
    """
    The master's state service on a real Unix socket.
    """

    @inlineCallbacks
    def test_serves_on_a_private_socket(self) -> Any:
        """
        The socket is created with mode 0600; each connection gets a channel
        with the service's handlers; stopping closes them and the socket.
        """
        directory = tempfile.mkdtemp(prefix="llmproxy-test-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "state.sock")
        lost: list[Channel] = []
        service = StateService(reactor, path, {ECHO: lambda channel, body: body * 2}, lost.append)
        service.privilegedStartService()
        service.startService()
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        client = Channel({}, reactor)
        yield connectProtocol(UNIXClientEndpoint(reactor, path), client)
        answer = yield client.call(ECHO, 21, timeout=5)
        self.assertEqual(answer, 42)
        self.assertEqual(len(service.channels), 1)
        yield service.stopService()
        for _ in range(100):
            if not client.open and lost:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertFalse(client.open)
        self.assertEqual(len(lost), 1)
        self.assertEqual(service.channels, set())
        with socket.socket(socket.AF_UNIX) as probe:
            self.assertRaises(OSError, probe.connect, path)
        yield succeed(None)
