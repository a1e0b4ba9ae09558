"""
Item: a slow client must not be blamed on the upstream. While a client
does not read, the relay stops reading the upstream; that silence is not
the upstream's, and a client that stalls past its limit is dropped as a
client fault.
"""

from __future__ import annotations

from typing import Any

import orjson
from twisted.internet.defer import inlineCallbacks

from tests.abuse.harness import CHAT_STREAM, AbuseCase, Dribbler, connect, sleep
from tests.abuse.test_names import metric
from tests.e2e.harness import split_response

REQUEST = (
    b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    b"Authorization: Bearer sk-slow-reader\r\nContent-Type: application/json\r\n"
    b"x-fake-bytes: 16000000\r\nContent-Length: %d\r\n\r\n" % len(CHAT_STREAM) + CHAT_STREAM
)


class SlowClientTests(AbuseCase):
    timeout = 60

    @inlineCallbacks
    def stalled(self, pause: float) -> Any:
        """
        A daemon with a 0.5 s upstream idle limit and a 2 s client stall
        limit; a client that reads the headers of a 16 MB stream, then reads
        nothing for C{pause} seconds, then reads on (what is left).
        """
        proc = yield self.start_proxy(
            self.config("server: {client_stall_timeout_seconds: 2}\n", idle=0.5)
        )
        # It stops reading within the read that brings the first bytes.
        reader = Dribbler(stop_reading_at=1)
        yield connect(proc.port, reader)
        reader.small_buffer()
        reader.send(REQUEST)
        yield self.wait_for(lambda: reader.size > 0)
        transport: Any = reader.transport
        yield sleep(pause)
        transport.resumeProducing()
        yield reader.closed
        _, _, exposition = yield self.get(proc, "/metrics")
        _, _, health = yield self.get(proc, "/health")
        return proc, reader.received, exposition.decode(), orjson.loads(health)

    @inlineCallbacks
    def test_pause_longer_than_upstream_idle(self) -> Any:
        """
        A client that reads nothing for 1.5 s (three times the upstream's
        idle limit, under its own 2 s) gets the whole stream, and the
        upstream is not counted as failing.
        """
        proc, received, exposition, health = yield self.stalled(1.5)
        status, _, body = split_response(received)
        self.assertEqual(status, 200)
        self.assertTrue(body.rstrip().endswith(b"data: [DONE]"), body[-200:])
        self.assertNotIn(b"event: error", body)
        self.assertGreater(self.fake.paused_count, 0, "the upstream was never paused")
        self.assertEqual(metric(exposition, "llmproxy_upstream_errors_total"), 0)
        self.assertEqual(health["providers"]["openai"]["errors"], 0)
        yield self.wait_for(lambda: bool(self.access_lines(proc)))
        self.assertTrue(self.access_lines(proc)[0]["complete"])

    @inlineCallbacks
    def test_stall_past_the_limit_drops_the_client(self) -> Any:
        """
        A client that reads nothing for 3 s is dropped as a client fault
        after 2 s: counted as C{stalled_reading}, not as an upstream error,
        and the provider's health is untouched.
        """
        proc, received, exposition, health = yield self.stalled(3)
        self.assertNotIn(b"data: [DONE]", received[-1000:])
        self.assertGreater(self.fake.paused_count, 0, "the upstream was never paused")
        self.assertEqual(metric(exposition, "llmproxy_upstream_errors_total"), 0)
        self.assertIn('llmproxy_client_dropped_total{reason="stalled_reading"} 1.0', exposition)
        self.assertEqual(health["providers"]["openai"]["errors"], 0)
        yield self.wait_for(lambda: bool(self.access_lines(proc)))
        self.assertFalse(self.access_lines(proc)[0]["complete"])
        self.assertIn(b"client read nothing for 2", proc.output)
