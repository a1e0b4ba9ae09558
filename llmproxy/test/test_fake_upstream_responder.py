"""
Tests for L{llmproxy.testing.fake_upstream.responder}: timing on the
injected clock, hangs, stalls and deaths, client disconnects, flow control
and gzip.
"""

from __future__ import annotations

import zlib

import orjson

from llmproxy.test.test_fake_upstream import (
    CHAT,
    OPENAI_AUTH,
    Connection,
    FakeTestCase,
    SmallBufferTransport,
    fake_timers,
    sse_events,
)
from llmproxy.testing.fake_upstream import FakeUpstream


class TimingTests(FakeTestCase):
    STREAM = {**CHAT, "stream": True}

    def test_delay_between_chunks(self) -> None:
        """
        The first chunk goes with the headers, the others one delay apart,
        and the end follows the last chunk at once.
        """
        connection = self.exchange(
            b"POST",
            b"/v1/chat/completions",
            [*OPENAI_AUTH, (b"x-fake-delay-ms", b"100"), (b"x-fake-chunks", b"2")],
            self.STREAM,
        )
        self.assertEqual(len(connection.response().chunks), 1)
        self.clock.advance(0.099)
        self.assertEqual(len(connection.response().chunks), 1)
        self.clock.advance(0.001)
        self.assertEqual(len(connection.response().chunks), 2)
        self.clock.pump([0.1, 0.1, 0.099])
        self.assertFalse(connection.response().complete)
        self.clock.advance(0.001)
        response = connection.response()
        # role, 2 pieces, finish, [DONE] at 0, 0.1, 0.2, 0.3, 0.4; then the end.
        self.assertEqual(len(response.chunks), 5)
        self.assertTrue(response.complete)
        self.assertEqual(self.fake.active_responses, 0)
        self.assertEqual(fake_timers(self.clock), [])

    def test_headers_delay(self) -> None:
        connection = self.exchange(
            b"POST",
            b"/v1/chat/completions",
            [*OPENAI_AUTH, (b"x-fake-headers-delay-ms", b"2000")],
            CHAT,
        )
        self.assertEqual(connection.raw, b"")
        self.clock.advance(1.999)
        self.assertEqual(connection.raw, b"")
        self.clock.advance(0.001)
        self.assertEqual(connection.response().status, 200)

    def test_hang_headers_and_disconnect(self) -> None:
        """
        C{hang: headers} never answers; the client leaving is recorded with
        the clock time and handed to L{FakeUpstream.wait_for_disconnect}.
        """
        connection = self.exchange(
            b"POST", b"/v1/chat/completions", [*OPENAI_AUTH, (b"x-fake-hang", b"headers")], CHAT
        )
        waiting = self.fake.wait_for_disconnect()
        self.clock.advance(3600)
        self.assertEqual(connection.raw, b"")
        self.assertNoResult(waiting)
        self.assertEqual(self.fake.active_responses, 1)
        connection.lose()
        self.assertEqual(self.successResultOf(waiting), 3600.0)
        [event] = self.fake.connection_lost_events
        self.assertFalse(event.headers_sent)
        self.assertEqual(event.request.uri, b"/v1/chat/completions")
        self.assertEqual(self.fake.active_responses, 0)

    def test_hang_body(self) -> None:
        connection = self.exchange(
            b"POST", b"/v1/chat/completions", [*OPENAI_AUTH, (b"x-fake-hang", b"body")], CHAT
        )
        response = connection.response()
        self.assertEqual(response.status, 200)
        self.assertTrue(int(response.header(b"content-length") or b"0") > 0)
        self.assertEqual(response.chunks, [])
        self.assertFalse(response.complete)
        connection.lose()
        self.assertTrue(self.fake.connection_lost_events[0].headers_sent)

    def test_stall_after(self) -> None:
        connection = self.exchange(
            b"POST",
            b"/v1/chat/completions",
            [*OPENAI_AUTH, (b"x-fake-stall-after", b"2")],
            self.STREAM,
        )
        self.clock.advance(600)
        response = connection.response()
        self.assertEqual(len(response.chunks), 2)
        self.assertFalse(response.complete)
        self.assertFalse(connection.transport.disconnecting)

    def test_die_after(self) -> None:
        """
        N chunks, then the connection closes without a terminator; that is
        not counted as a client disconnect.
        """
        connection = self.exchange(
            b"POST",
            b"/v1/chat/completions",
            [*OPENAI_AUTH, (b"x-fake-die-after", b"3")],
            self.STREAM,
        )
        response = connection.response()
        self.assertEqual(len(response.chunks), 3)
        self.assertFalse(response.complete)
        self.assertTrue(connection.transport.disconnecting)
        connection.lose()
        self.assertEqual(self.fake.connection_lost_events, [])
        self.assertEqual(self.fake.active_responses, 0)

    def test_die_after_everything(self) -> None:
        connection = self.exchange(
            b"POST",
            b"/v1/chat/completions",
            [*OPENAI_AUTH, (b"x-fake-die-after", b"100")],
            self.STREAM,
        )
        response = connection.response()
        self.assertEqual(sse_events(response.body)[-1][1], "[DONE]")
        self.assertFalse(response.complete)
        self.assertTrue(connection.transport.disconnecting)

    def test_die_after_zero_on_json(self) -> None:
        connection = self.exchange(
            b"POST", b"/v1/chat/completions", [*OPENAI_AUTH, (b"x-fake-die-after", b"0")], CHAT
        )
        response = connection.response()
        self.assertTrue(int(response.header(b"content-length") or b"0") > 0)
        self.assertEqual(response.chunks, [])
        self.assertTrue(connection.transport.disconnecting)

    def test_die_after_with_delay(self) -> None:
        """
        With a delay, the connection dies when the next chunk would be due.
        """
        connection = self.exchange(
            b"POST",
            b"/v1/chat/completions",
            [*OPENAI_AUTH, (b"x-fake-die-after", b"1"), (b"x-fake-delay-ms", b"50")],
            self.STREAM,
        )
        self.assertFalse(connection.transport.disconnecting)
        self.clock.advance(0.05)
        self.assertTrue(connection.transport.disconnecting)

    def test_client_disconnect_mid_stream(self) -> None:
        connection = self.exchange(
            b"POST",
            b"/v1/chat/completions",
            [*OPENAI_AUTH, (b"x-fake-delay-ms", b"100"), (b"x-fake-chunks", b"50")],
            self.STREAM,
        )
        self.clock.pump([0.1, 0.1, 0.05])
        connection.lose()
        self.assertEqual(self.successResultOf(self.fake.wait_for_disconnect()), 0.25)
        [event] = self.fake.connection_lost_events
        self.assertEqual(event.chunks_sent, 3)
        self.assertTrue(event.headers_sent)
        self.assertEqual(fake_timers(self.clock), [], "no timer left behind")


class FlowControlTests(FakeTestCase):
    def test_full_buffer_pauses_writes(self) -> None:
        """
        A transport whose buffer fills pauses the response: nothing more is
        written until it resumes, and both are counted.
        """
        transport = SmallBufferTransport(limit=1)
        connection = Connection(self.fake, transport)
        connection.send(
            b"POST",
            b"/v1/chat/completions",
            [*OPENAI_AUTH, (b"x-fake-chunks", b"4")],
            {**CHAT, "stream": True},
        )
        self.assertEqual(self.fake.paused_count, 1)
        self.assertEqual(len(connection.response().chunks), 1)
        self.clock.advance(10)
        self.assertEqual(len(connection.response().chunks), 1)
        # role, 4 pieces, finish, [DONE]: one more per drain.
        for expected in range(2, 8):
            transport.drain()
            self.assertEqual(len(connection.response().chunks), expected)
        self.assertFalse(connection.response().complete)
        transport.drain()
        self.assertEqual(self.fake.resumed_count, 7)
        self.assertTrue(connection.response().complete)
        self.assertEqual(self.fake.active_responses, 0)

    def test_pause_during_delay(self) -> None:
        connection = self.exchange(
            b"POST",
            b"/v1/chat/completions",
            [*OPENAI_AUTH, (b"x-fake-delay-ms", b"10")],
            {**CHAT, "stream": True},
        )
        connection.channel.pauseProducing()
        self.clock.advance(1)
        self.assertEqual(len(connection.response().chunks), 1)
        connection.channel.resumeProducing()
        self.assertEqual(len(connection.response().chunks), 2)
        self.clock.pump([0.01] * 10)
        self.assertTrue(connection.response().complete)

    def test_bytes_filler(self) -> None:
        response = self.post(
            b"/v1/chat/completions",
            {**CHAT, "stream": True},
            [*OPENAI_AUTH, (b"x-fake-bytes", b"100000")],
        )
        self.assertTrue(response.complete)
        chunks = [d for _, d in sse_events(response.body)][:-1]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        self.assertGreaterEqual(len(text), 100000)
        self.assertLess(len(text), 100000 + 8192)
        self.assertEqual(self.fake.bytes_sent, len(response.body))
        self.assertEqual(self.fake.last_body_sent, response.body)

    def test_last_body_sent(self) -> None:
        """
        The body of the latest response, as written (gzip included), even
        mid-stream; nothing when recording is off.
        """
        self.assertEqual(self.fake.last_body_sent, b"")
        gzipped = self.post(
            b"/v1/chat/completions",
            CHAT,
            [*OPENAI_AUTH, (b"x-fake-gzip", b"1"), (b"Accept-Encoding", b"gzip")],
        )
        self.assertEqual(self.fake.last_body_sent, gzipped.body)
        streaming = self.exchange(
            b"POST",
            b"/v1/chat/completions",
            [*OPENAI_AUTH, (b"x-fake-delay-ms", b"10")],
            {**CHAT, "stream": True},
        )
        self.assertEqual(self.fake.last_body_sent, streaming.response().body)
        self.assertNotEqual(self.fake.last_body_sent, b"")
        self.fake.record_bodies = False
        self.post(b"/v1/chat/completions", CHAT, OPENAI_AUTH)
        self.assertEqual(self.fake.last_body_sent, b"")

    def test_gzip(self) -> None:
        """
        With C{x-fake-gzip} and an C{Accept-Encoding} that allows it, JSON
        and streams are gzip-encoded (streams chunk by chunk); otherwise not.
        """
        stream = {**CHAT, "stream": True}
        gzip_headers = [*OPENAI_AUTH, (b"x-fake-gzip", b"1"), (b"Accept-Encoding", b"gzip")]
        plain = self.post(b"/v1/chat/completions", stream, OPENAI_AUTH)
        # A fresh fake numbers its first request like this one did.
        self.fake = FakeUpstream(self.clock)
        encoded = self.post(b"/v1/chat/completions", stream, gzip_headers)
        self.assertEqual(encoded.header(b"content-encoding"), b"gzip")
        decoder = zlib.decompressobj(wbits=31)
        first = decoder.decompress(encoded.chunks[0])
        self.assertEqual(first, plain.chunks[0], "each chunk is flushed")
        rest = b"".join(decoder.decompress(c) for c in encoded.chunks[1:]) + decoder.flush()
        self.assertTrue(decoder.eof)
        self.assertEqual(first + rest, plain.body)

        json = self.post(b"/v1/chat/completions", CHAT, gzip_headers)
        self.assertEqual(json.header(b"content-length"), str(len(json.body)).encode())
        self.assertEqual(
            orjson.loads(zlib.decompress(json.body, wbits=31))["object"], "chat.completion"
        )

        refused = self.post(
            b"/v1/chat/completions",
            CHAT,
            [*OPENAI_AUTH, (b"x-fake-gzip", b"1"), (b"Accept-Encoding", b"gzip;q=0, identity")],
        )
        self.assertIsNone(refused.header(b"content-encoding"))
        self.assertEqual(refused.json()["object"], "chat.completion")
