"""
Forwarding and streaming, end to end on real loopback sockets: a fake
upstream and the proxy in this process, clients on real connections.
"""

from __future__ import annotations

import gzip
import itertools
from collections.abc import Mapping
from typing import Any

import orjson
from treq.content import content
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.web.http_headers import Headers

from llmproxy.config import Timeouts
from tests.e2e.harness import (
    ANTHROPIC_HEADERS,
    CHAT,
    GEMINI_BODY,
    GEMINI_HEADERS,
    OPENAI_HEADERS,
    ProxyTestCase,
    RawClient,
    raw_exchange,
    raw_request,
    reactor,
    split_response,
)

CHAT_STREAM = (
    b'{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},'
    b'"messages":[{"role":"user","content":"Say hi"}]}'
)
MESSAGES = (
    b'{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"Say hi"}]}'
)
MESSAGES_STREAM = (
    b'{"model":"claude-sonnet-4-5","max_tokens":64,"stream":true,'
    b'"messages":[{"role":"user","content":"Say hi"}]}'
)

# (name, proxy path, upstream path, headers, body)
CASES = [
    ("openai", b"/openai/v1/chat/completions", b"/v1/chat/completions", OPENAI_HEADERS, CHAT),
    (
        "openai-sse",
        b"/openai/v1/chat/completions",
        b"/v1/chat/completions",
        OPENAI_HEADERS,
        CHAT_STREAM,
    ),
    ("anthropic", b"/anthropic/v1/messages", b"/v1/messages", ANTHROPIC_HEADERS, MESSAGES),
    (
        "anthropic-sse",
        b"/anthropic/v1/messages",
        b"/v1/messages",
        ANTHROPIC_HEADERS,
        MESSAGES_STREAM,
    ),
    (
        "gemini",
        b"/gemini/v1beta/models/gemini-2.5-flash:generateContent",
        b"/v1beta/models/gemini-2.5-flash:generateContent",
        GEMINI_HEADERS,
        GEMINI_BODY,
    ),
    (
        "gemini-sse",
        b"/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        b"/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        GEMINI_HEADERS,
        GEMINI_BODY,
    ),
    (
        "vllm",
        b"/vllm/v1/chat/completions",
        b"/prefix/v1/chat/completions",
        OPENAI_HEADERS,
        CHAT,
    ),
]


def _ct(name: str) -> bytes:
    if name.startswith("gemini"):
        return b"application/json; charset=UTF-8"
    return b"application/json"


@inlineCallbacks
def hanging_upstream_504(
    test: ProxyTestCase, path: bytes, headers: Mapping[bytes, bytes], body: bytes
) -> Any:
    """
    POST to an upstream that never sends its headers: the proxy answers 504
    within 3 seconds.

    @return: a Deferred that fires with the 504's headers and body.
    """
    started = reactor.seconds()
    status, response_headers, received = yield test.post(
        path, {**headers, b"x-fake-hang": b"headers"}, body
    )
    test.assertEqual(status, 504, received)
    test.assertLess(reactor.seconds() - started, 3.0)
    return response_headers, received


class RoundTripTests(ProxyTestCase):
    @inlineCallbacks
    def test_round_trips_identical(self) -> Any:
        """
        For each provider, JSON and SSE: the upstream received the client's
        request unchanged, and the client received the upstream's body byte
        for byte.
        """
        for name, proxy_path, upstream_path, headers, body in CASES:
            status, resp_headers, received = yield self.post(proxy_path, headers, body)
            self.assertEqual(status, 200, (name, received))
            self.assertEqual(received, self.fake.last_body_sent, name)
            self.assertNotIn(b"content-encoding", resp_headers, name)
            self.assertGreater(len(received), 50, name)
            seen = self.fake.received[-1]
            self.assertEqual(seen.uri, upstream_path, name)
            self.assertEqual(seen.body, body, name)
            if name.endswith("-sse"):
                self.assertTrue(resp_headers[b"content-type"][0].startswith(b"text/event-stream"))
                self.assertEqual(resp_headers[b"cache-control"], [b"no-cache"], name)
                self.assertEqual(resp_headers[b"x-accel-buffering"], [b"no"], name)
            else:
                self.assertEqual(resp_headers[b"content-type"], [_ct(name)], name)

    @inlineCallbacks
    def test_chunks_arrive_as_sent(self) -> Any:
        """
        A 10-chunk stream with 100 ms gaps reaches the client chunk by chunk:
        the first long before the last, the gaps preserved.
        """
        headers = {**OPENAI_HEADERS, b"x-fake-chunks": b"10", b"x-fake-delay-ms": b"100"}
        client = yield raw_exchange(
            self.proxy_port,
            raw_request(b"POST", b"/openai/v1/chat/completions", headers, CHAT_STREAM),
        )
        events = [c for c in client.chunks if b"data: {" in c.data]
        self.assertGreaterEqual(len(events), 10, [c.data for c in client.chunks])
        first, last = events[0].at, events[-1].at
        self.assertGreater(last - first, 0.8)
        gaps = [b.at - a.at for a, b in itertools.pairwise(events)]
        self.assertGreaterEqual(sum(1 for gap in gaps if gap > 0.05), 8, gaps)


class BackpressureTests(ProxyTestCase):
    timeout = 60

    @inlineCallbacks
    def test_slow_client_pauses_upstream(self) -> Any:
        """
        A client that reads nothing for 5 s while the upstream has 50 MB to
        send: the proxy buffers at most a few hundred KB for it, the
        upstream is paused, and every byte arrives in order afterwards.
        """
        total = 50 * 1024 * 1024
        headers = {**OPENAI_HEADERS, b"x-fake-bytes": b"%d" % total}
        client = RawClient(
            raw_request(b"POST", b"/openai/v1/chat/completions", headers, CHAT_STREAM)
        )
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy_port), client)
        yield client.next_data()
        assert client.transport is not None
        client.transport.pauseProducing()  # type: ignore[attr-defined]
        peak = 0
        for _ in range(50):
            yield deferLater(reactor, 0.1, lambda: None)
            peak = max(peak, self._proxy_buffered())
        self.assertLess(peak, 512 * 1024, "proxy buffered too much for one stream")
        self.assertGreater(self.fake.paused_count, 0)
        self.assertLess(self.fake.bytes_sent, total // 2)
        client.transport.resumeProducing()  # type: ignore[attr-defined]
        raw = yield client.done
        status, _, body = split_response(raw)
        self.assertEqual(status, 200)
        self.assertGreaterEqual(len(body), total)
        self.assertEqual(body, self.fake.last_body_sent)

    def _proxy_buffered(self) -> int:
        """
        Bytes the proxy holds in user space for its client connections.
        """
        held = 0
        for channel in list(self.service._site.channels):
            transport: Any = channel.transport
            if transport is None:
                continue
            held += len(getattr(transport, "dataBuffer", b""))
            held += getattr(transport, "_tempDataLen", 0)
        return held


class DisconnectTests(ProxyTestCase):
    @inlineCallbacks
    def test_client_drop_closes_upstream(self) -> Any:
        headers = {**OPENAI_HEADERS, b"x-fake-chunks": b"100", b"x-fake-delay-ms": b"50"}
        client = RawClient(
            raw_request(b"POST", b"/openai/v1/chat/completions", headers, CHAT_STREAM)
        )
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy_port), client)
        yield client.next_data()
        yield client.next_data()
        assert client.transport is not None
        dropped = reactor.seconds()
        waiting = self.fake.wait_for_disconnect()
        client.transport.abortConnection()  # type: ignore[attr-defined]
        seen_at = yield waiting
        self.assertLess(seen_at - dropped, 1.0)


class ErrorTests(ProxyTestCase):
    timeouts = Timeouts(connect_seconds=2, first_byte_seconds=0.5, idle_seconds=0.5)

    @inlineCallbacks
    def test_unreachable_upstream_502(self) -> Any:
        yield self.service.stopService()
        yield self.start_proxy(self.config("http://127.0.0.1:1"))
        for path, headers, check in [
            (b"/openai/v1/chat/completions", OPENAI_HEADERS, self._openai_error),
            (b"/anthropic/v1/messages", ANTHROPIC_HEADERS, self._anthropic_error),
            (
                b"/gemini/v1beta/models/gemini-2.5-flash:generateContent",
                GEMINI_HEADERS,
                self._gemini_error,
            ),
        ]:
            status, resp_headers, body = yield self.post(path, headers, CHAT)
            self.assertEqual(status, 502, body)
            self.assertEqual(resp_headers[b"x-llm-proxy-error-source"], [b"upstream"])
            check(body, 502)

    @inlineCallbacks
    def test_hang_before_headers_504(self) -> Any:
        resp_headers, body = yield hanging_upstream_504(
            self, b"/anthropic/v1/messages", ANTHROPIC_HEADERS, MESSAGES
        )
        self.assertEqual(resp_headers[b"x-llm-proxy-error-source"], [b"upstream"])
        self._anthropic_error(body, 504)

    @inlineCallbacks
    def test_death_mid_stream_error_event(self) -> Any:
        for path, headers, body, marker in [
            (b"/openai/v1/chat/completions", OPENAI_HEADERS, CHAT_STREAM, b'"error"'),
            (b"/anthropic/v1/messages", ANTHROPIC_HEADERS, MESSAGES_STREAM, b'"type":"error"'),
            (
                b"/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                GEMINI_HEADERS,
                GEMINI_BODY,
                b'"error"',
            ),
        ]:
            dying = {**headers, b"x-fake-chunks": b"10", b"x-fake-die-after": b"3"}
            status, _, received = yield self.post(path, dying, body)
            self.assertEqual(status, 200)
            last_event = received.replace(b"\r\n", b"\n").strip().rsplit(b"\n\n", 1)[-1]
            self.assertIn(marker, last_event.replace(b" ", b""), path)
            if not path.startswith(b"/gemini"):
                # Gemini's SDK only raises on a plain data: {"error": ...} event.
                self.assertIn(b"event: error", last_event, path)
            self.assertNotIn(b"[DONE]", received, path)

    @inlineCallbacks
    def test_idle_stream_error_event(self) -> Any:
        headers = {**OPENAI_HEADERS, b"x-fake-hang": b"body"}
        status, _, received = yield self.post(b"/openai/v1/chat/completions", headers, CHAT_STREAM)
        self.assertEqual(status, 200)
        self.assertIn(b"event: error", received)
        self.assertNotIn(b"[DONE]", received)

    def _openai_error(self, body: bytes, status: int) -> None:
        error = orjson.loads(body)["error"]
        self.assertIsInstance(error["message"], str)
        self.assertIn("type", error)
        self.assertIn("code", error)

    def _anthropic_error(self, body: bytes, status: int) -> None:
        parsed = orjson.loads(body)
        self.assertEqual(parsed["type"], "error")
        self.assertIsInstance(parsed["error"]["message"], str)
        self.assertIsInstance(parsed["error"]["type"], str)

    def _gemini_error(self, body: bytes, status: int) -> None:
        error = orjson.loads(body)["error"]
        self.assertEqual(error["code"], status)
        self.assertIsInstance(error["status"], str)
        self.assertIsInstance(error["message"], str)


class TotalTimeoutTests(ProxyTestCase):
    """
    C{timeouts.total_seconds} bounds the whole call: before the headers
    (504) and during a stream that keeps sending (an error event).
    """

    timeouts = Timeouts(connect_seconds=2, first_byte_seconds=5, idle_seconds=5, total_seconds=1)

    @inlineCallbacks
    def test_stream_cut_at_the_total_budget(self) -> Any:
        headers = {**OPENAI_HEADERS, b"x-fake-chunks": b"50", b"x-fake-delay-ms": b"100"}
        started = reactor.seconds()
        status, _, received = yield self.post(b"/openai/v1/chat/completions", headers, CHAT_STREAM)
        elapsed = reactor.seconds() - started
        self.assertEqual(status, 200)
        self.assertIn(b"event: error", received)
        self.assertIn(b"total time budget", received)
        self.assertNotIn(b"[DONE]", received)
        # Chunks kept coming every 100 ms, so only the total budget ended it.
        self.assertGreater(received.count(b"chat.completion.chunk"), 3)
        self.assertLess(elapsed, 3.0)

    @inlineCallbacks
    def test_headers_late_504(self) -> Any:
        yield hanging_upstream_504(self, b"/openai/v1/chat/completions", OPENAI_HEADERS, CHAT)


class HeaderTests(ProxyTestCase):
    @inlineCallbacks
    def test_request_headers(self) -> Any:
        headers = {
            **ANTHROPIC_HEADERS,
            b"anthropic-beta": b"prompt-caching-2024-07-31",
            b"Connection": b"close, X-Secret-Hop",
            b"X-Secret-Hop": b"must-not-pass",
            b"Keep-Alive": b"timeout=5",
            b"TE": b"trailers",
            b"Upgrade": b"websocket",
            b"Proxy-Authorization": b"Basic cHJveHk=",
            b"Accept-Encoding": b"br",
            b"X-Custom": b"kept",
        }
        status, _, _ = yield self.post(b"/anthropic/v1/messages?beta=true", headers, MESSAGES)
        self.assertEqual(status, 200)
        seen = dict((k.lower(), v) for k, v in self.fake.received[-1].headers)
        self.assertEqual(seen[b"x-api-key"], b"sk-ant-test")
        self.assertEqual(seen[b"anthropic-beta"], b"prompt-caching-2024-07-31")
        self.assertEqual(seen[b"anthropic-version"], b"2023-06-01")
        self.assertEqual(seen[b"x-custom"], b"kept")
        self.assertEqual(seen[b"host"], b"127.0.0.1:%d" % self.upstream_port)
        for hop in (b"x-secret-hop", b"keep-alive", b"te", b"upgrade", b"proxy-authorization"):
            self.assertNotIn(hop, seen)
        self.assertNotIn(b"br", seen.get(b"accept-encoding", b""))
        self.assertEqual(seen[b"x-forwarded-for"], b"127.0.0.1")
        self.assertEqual(seen[b"x-forwarded-proto"], b"http")
        self.assertEqual(self.fake.received[-1].query, b"beta=true")

    @inlineCallbacks
    def test_query_key_and_alt_sse_kept(self) -> Any:
        path = b"/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&key=AIza-q"
        headers = {b"content-type": b"application/json"}
        status, _, _ = yield self.post(path, headers, GEMINI_BODY)
        self.assertEqual(status, 200)
        self.assertEqual(self.fake.received[-1].query, b"alt=sse&key=AIza-q")

    @inlineCallbacks
    def test_duplicate_response_headers_and_cors(self) -> Any:
        headers = [
            *OPENAI_HEADERS.items(),
            (b"x-fake-set-cookie", b"a=1"),
            (b"x-fake-set-cookie", b"b=2"),
            (b"Origin", b"https://app.example"),
        ]
        _, resp_headers, _ = yield self.post(b"/openai/v1/chat/completions", headers, CHAT)
        self.assertEqual(len(resp_headers[b"set-cookie"]), 2)
        self.assertEqual(resp_headers[b"access-control-allow-origin"], [b"*"])
        self.assertIn(b"x-llm-proxy-request-id", resp_headers)


class UploadTests(ProxyTestCase):
    @inlineCallbacks
    def test_multipart_forwarded_untouched(self) -> Any:
        """
        A multipart upload (even a malformed one) is forwarded byte for byte:
        the proxy never parses form bodies.
        """
        body = b"--xyz\r\nContent-Disposition: form-data; name=purpose\r\n\r\nbatch\r\n--broken"
        headers = {
            b"authorization": b"Bearer sk-test-1",
            b"content-type": b"multipart/form-data; boundary=xyz",
        }
        status, resp_headers, _ = yield self.post(b"/openai/v1/files", headers, body)
        self.assertNotIn(b"x-llm-proxy-error-source", resp_headers)
        self.assertEqual(self.fake.received[-1].body, body)
        self.assertEqual(self.fake.received[-1].path, b"/v1/files")
        self.assertNotEqual(status, 400)


class PathSafetyTests(ProxyTestCase):
    @inlineCallbacks
    def test_dot_segments_rejected(self) -> Any:
        for target in [
            b"/openai/v1/../admin",
            b"/openai/v1/%2e%2E/admin",
            b"/openai/%2E/v1/models",
            b"/openai/v1/..%2Fadmin",
            b"/openai/v1/..%5cadmin",
            b"/openai/v1/..\\admin",
            b"/meta/alice/openai/v1/%2e%2e/x",
        ]:
            before = len(self.fake.received)
            client = yield raw_exchange(
                self.proxy_port, raw_request(b"GET", target, OPENAI_HEADERS)
            )
            status, headers, body = split_response(client.received)
            self.assertEqual(status, 400, (target, body))
            self.assertEqual(headers[b"x-llm-proxy-error-source"], [b"proxy"])
            self.assertIn(b"error", body)
            self.assertEqual(len(self.fake.received), before, target)

    @inlineCallbacks
    def test_authority_tricks_stay_on_the_upstream(self) -> Any:
        """
        C{//host}, C{@host}, absolute-form with a foreign authority: every
        request that is forwarded reaches the configured upstream, with the
        client's path kept as a path.
        """
        for target, expected in [
            (b"/openai/v1/models/@evil.example", b"/v1/models/@evil.example"),
            (b"/openai/v1/models/a%2Fb", b"/v1/models/a%2Fb"),
            (b"http://evil.example/openai/v1/models", b"/v1/models"),
            (b"http://evil.example:80/openai/v1/models?x=1", b"/v1/models?x=1"),
        ]:
            client = yield raw_exchange(
                self.proxy_port, raw_request(b"GET", target, OPENAI_HEADERS, host=b"evil.example")
            )
            status, _, body = split_response(client.received)
            self.assertIn(status, (200, 404), (target, body))
            seen = self.fake.received[-1]
            self.assertEqual(seen.uri, expected, target)
            host = dict((k.lower(), v) for k, v in seen.headers)[b"host"]
            self.assertEqual(host, b"127.0.0.1:%d" % self.upstream_port)
        before = len(self.fake.received)
        client = yield raw_exchange(
            self.proxy_port, raw_request(b"GET", b"/openai//evil.example/v1/models", OPENAI_HEADERS)
        )
        status, _headers, _ = split_response(client.received)
        if len(self.fake.received) > before:
            self.assertEqual(self.fake.received[-1].uri, b"//evil.example/v1/models")
        else:
            self.assertIn(status, (308, 404))


class BodyLimitTests(ProxyTestCase):
    timeout = 60

    @inlineCallbacks
    def test_oversized_content_length_413_without_reading(self) -> Any:
        headers = {
            **OPENAI_HEADERS,
            b"Content-Length": b"%d" % (64 * 1024 * 1024),
            b"Origin": b"https://app.example",
        }
        request = b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        request += b"".join(k + b": " + v + b"\r\n" for k, v in headers.items()) + b"\r\n"
        client = RawClient(request)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy_port), client)
        yield client.next_data()
        status, resp_headers, body = split_response(client.received)
        self.assertEqual(status, 413)
        self.assertEqual(resp_headers[b"x-llm-proxy-error-source"], [b"proxy"])
        self.assertEqual(resp_headers[b"access-control-allow-origin"], [b"*"])
        self.assertIn("message", orjson.loads(body)["error"])
        self.assertEqual(len(self.fake.received), 0)
        assert client.transport is not None
        client.transport.loseConnection()
        yield client.done

    @inlineCallbacks
    def test_oversized_chunked_upload_413(self) -> Any:
        request = (
            b"POST /anthropic/v1/messages HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
        )
        chunk = b"x" * (1024 * 1024)
        client = RawClient(request)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy_port), client)
        assert client.transport is not None
        for _ in range(20):
            if client.chunks:
                break
            client.transport.write(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            yield deferLater(reactor, 0.01, lambda: None)
        yield client.done
        status, _, body = split_response(client.received)
        self.assertEqual(status, 413)
        self.assertEqual(orjson.loads(body)["type"], "error")
        self.assertEqual(len(self.fake.received), 0)

    @inlineCallbacks
    def test_eight_megabyte_body_identical(self) -> Any:
        filler = bytes(range(256)) * (8 * 1024 * 1024 // 256)
        body = (
            b'{"model":"gpt-4o-mini","input":"' + filler.hex().encode()[: 8 * 1024 * 1024] + b'"}'
        )
        response = yield self.http.post(
            self.proxy_url + "/openai/v1/embeddings",
            data=body,
            headers=Headers(
                {b"content-type": [b"application/json"], b"authorization": [b"Bearer k"]}
            ),
        )
        yield content(response)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.fake.received[-1].body, body)


class CompressionTests(ProxyTestCase):
    @inlineCallbacks
    def test_gzip_upstream_decoded_for_client(self) -> Any:
        """
        treq asks for gzip and decodes it: the client gets the decoded body,
        no Content-Encoding, no stale Content-Length (JSON and SSE).
        """
        for body in (CHAT, CHAT_STREAM):
            headers = {**OPENAI_HEADERS, b"x-fake-gzip": b"1", b"Accept-Encoding": b"br"}
            status, resp_headers, received = yield self.post(
                b"/openai/v1/chat/completions", headers, body
            )
            self.assertEqual(status, 200)
            sent = self.fake.last_body_sent
            self.assertEqual(sent[:2], b"\x1f\x8b", "the upstream did send gzip")
            self.assertNotIn(b"content-encoding", resp_headers)
            if b"content-length" in resp_headers:
                self.assertEqual(int(resp_headers[b"content-length"][0]), len(received))
            self.assertEqual(received, gzip.decompress(sent))
            asked = self.fake.received[-1].header(b"accept-encoding") or b""
            self.assertIn(b"gzip", asked)
            self.assertNotIn(b"br", asked)
