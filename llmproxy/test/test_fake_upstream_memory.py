"""
The fake upstream in memory, the way unit tests of the proxy mount it: its
resource behind treq's L{RequestTraversalAgent}, every timer on a L{Clock}.

No socket and no global reactor: the agent moves bytes through
L{twisted.test.iosim} when flushed, and the fake's delays fire only when the
test advances the clock.
"""

from __future__ import annotations

from typing import Any

import orjson
import treq
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from llmproxy.attempt import BytesProducer
from llmproxy.testing.fake_upstream import FakeUpstream, fake_text

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


class _Reader(Protocol):
    """
    Keeps a response body as it arrives, and why it ended.
    """

    def __init__(self) -> None:
        self.data = b""
        self.ended: BaseException | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.ended = reason.value

    @property
    def events(self) -> int:
        """
        The SSE events received so far.
        """
        return self.data.count(b"data: ")


def _global_delayed_calls() -> set[IDelayedCall]:
    """
    What is scheduled on the global reactor (imported late: trial installs
    it before a test runs).
    """
    from twisted.internet import reactor

    return set(reactor.getDelayedCalls())


class InMemoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.fake = FakeUpstream(self.clock)
        self.agent: Any = RequestTraversalAgent(self.fake.resource())
        self.global_calls = _global_delayed_calls()

    def tearDown(self) -> None:
        self.assertEqual(_global_delayed_calls() - self.global_calls, set())

    def post(
        self, body: Any, headers: dict[bytes, list[bytes]] | None = None
    ) -> Deferred[IResponse]:
        every = {b"Authorization": [b"Bearer sk-test"], **(headers or {})}
        requested: Deferred[IResponse] = self.agent.request(
            b"POST",
            b"http://upstream.test/v1/chat/completions",
            Headers(every),
            BytesProducer(orjson.dumps(body)),
        )
        return requested

    def advance(self, seconds: float) -> None:
        """
        Fire the fake's timers due in C{seconds}, then deliver what they
        wrote.
        """
        self.clock.advance(seconds)
        self.agent.flush()

    def test_json_chat_completion(self) -> None:
        response = self.successResultOf(self.post(CHAT))
        self.assertEqual(response.code, 200)
        body = self.successResultOf(treq.json_content(response))
        self.assertEqual(body["choices"][0]["message"]["content"], fake_text())
        [received] = self.fake.received
        self.assertEqual(received.uri, b"/v1/chat/completions")
        self.assertEqual(received.json(), CHAT)

    def test_stream_runs_on_the_clock(self) -> None:
        """
        The headers delay and the delay between chunks are timers on the
        fake's clock: the stream moves only when it advances, and finishes.
        """
        requested = self.post(
            {**CHAT, "stream": True},
            {
                b"x-fake-headers-delay-ms": [b"500"],
                b"x-fake-delay-ms": [b"100"],
                b"x-fake-chunks": [b"2"],
            },
        )
        self.assertNoResult(requested)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.advance(0.5)
        response = self.successResultOf(requested)
        [content_type] = response.headers.getRawHeaders(b"content-type")
        self.assertTrue(content_type.startswith(b"text/event-stream"))
        reader = _Reader()
        response.deliverBody(reader)
        # role, 2 pieces, finish, [DONE]: the first with the headers, then
        # one per 100 ms, and the end right after the last.
        self.assertEqual(reader.events, 1)
        for expected in range(2, 6):
            self.advance(0.099)
            self.assertEqual(reader.events, expected - 1)
            self.advance(0.001)
            self.assertEqual(reader.events, expected)
        self.assertIsInstance(reader.ended, ResponseDone)
        self.assertIn(b"data: [DONE]", reader.data)
        self.assertEqual(self.fake.active_responses, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_injected_error_status(self) -> None:
        response = self.successResultOf(
            self.post(CHAT, {b"x-fake-status": [b"429"], b"x-fake-retry-after": [b"7"]})
        )
        self.assertEqual(response.code, 429)
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"7"])
        body = self.successResultOf(treq.json_content(response))
        self.assertEqual(body["error"]["code"], "rate_limit_exceeded")

    def test_client_disconnect(self) -> None:
        """
        A client that stops reading mid-stream is a L{ClientDisconnect} at
        the clock's time, and the fake's stream timer is cancelled.
        """
        requested = self.post(
            {**CHAT, "stream": True}, {b"x-fake-delay-ms": [b"100"], b"x-fake-chunks": [b"50"]}
        )
        reader = _Reader()
        self.successResultOf(requested).deliverBody(reader)
        self.advance(0.1)
        self.assertEqual(reader.events, 2)
        disconnected = self.fake.wait_for_disconnect()
        self.assertNoResult(disconnected)
        assert reader.transport is not None
        reader.transport.stopProducing()  # type: ignore[attr-defined]
        self.agent.flush()
        self.assertEqual(self.successResultOf(disconnected), 0.1)
        [event] = self.fake.connection_lost_events
        self.assertEqual((event.headers_sent, event.chunks_sent), (True, 2))
        self.assertEqual(self.fake.active_responses, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
