"""
Item: slowloris. Connections that drip a request head or a body, or that
just sit there, are cut on deadlines; the number of open connections is
capped with a clean refusal; C{/health} answers throughout.
"""

from __future__ import annotations

from typing import Any

import orjson
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import LoopingCall

from llmproxy.channel import RESERVE
from tests.abuse.harness import AbuseCase, Dribbler, connect, sleep
from tests.abuse.test_names import metric
from tests.e2e.harness import raw_exchange, raw_request, reactor, split_response

HEAD = b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"


class DeadlineTests(AbuseCase):
    @inlineCallbacks
    def test_dripped_heads_cut(self) -> Any:
        """
        Thirty connections dripping a request head a byte every 0.2 s (each
        byte would reset an idle timer) are all answered 408 and closed at
        the head deadline; a connection that sends nothing is closed too;
        C{/health} answers meanwhile.
        """
        proc = yield self.start_proxy(self.config("server: {header_timeout_seconds: 1}\n"))
        drippers = [Dribbler() for _ in range(30)]
        yield gatherResults([connect(proc.port, d) for d in drippers])
        silent = Dribbler()
        yield connect(proc.port, silent)
        position = [0]

        def drip() -> None:
            for dribbler in drippers:
                dribbler.send(HEAD[position[0] : position[0] + 1])
            position[0] += 1

        dripping = LoopingCall(drip)
        dripping.clock = reactor
        dripping.start(0.2)

        def stop() -> None:
            if dripping.running:
                dripping.stop()

        self.addCleanup(stop)
        status, _, _ = yield self.get(proc)
        self.assertEqual(status, 200)
        yield gatherResults([d.closed for d in [*drippers, silent]])
        self.assertLess(position[0], 12, "closed long after the deadline")
        for dribbler in drippers:
            self.assertTrue(dribbler.received.startswith(b"HTTP/1.1 408 "), dribbler.received)
            self.assertIn(b"x-llm-proxy-error-source: proxy", dribbler.received.lower())
        status, _, exposition = yield self.get(proc, "/metrics")
        dropped = metric(exposition.decode(), "llmproxy_client_dropped_total")
        self.assertGreaterEqual(dropped, 31)

    @inlineCallbacks
    def test_trickled_body_cut_fast_body_kept(self) -> Any:
        """
        A body trickling 10 bytes every 0.2 s is answered 408 once its time
        is up (1 s plus what its bytes bought); a body that takes three
        times as long at a healthy rate is forwarded.
        """
        proc = yield self.start_proxy(
            self.config("server: {body_timeout_seconds: 1, min_body_rate_bytes_per_second: 1000}\n")
        )
        body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"'
        body += b"x" * 300_000 + b'"}]}'
        head = (
            b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer sk-slow\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        slow, fast = Dribbler(), Dribbler()
        yield gatherResults([connect(proc.port, slow), connect(proc.port, fast)])
        slow.send(head)
        fast.send(head)
        sent = 0
        for _ in range(15):
            slow.send(body[sent : sent + 10])
            fast.send(body[sent * 2000 : (sent + 10) * 2000])
            sent += 10
            yield sleep(0.2)
        fast.send(body[sent * 2000 :])
        yield slow.closed
        self.assertTrue(slow.received.startswith(b"HTTP/1.1 408 "), slow.received)
        error = orjson.loads(slow.received.partition(b"\r\n\r\n")[2])["error"]
        self.assertIn("not received in time", error["message"])
        yield self.wait_for(lambda: b"\r\n\r\n" in fast.received)
        self.assertTrue(fast.received.startswith(b"HTTP/1.1 200 "), fast.received[:200])
        self.assertEqual(len(self.fake.received), 1)


class ConnectionCapTests(AbuseCase):
    @inlineCallbacks
    def test_cap_refuses_cleanly_and_health_answers(self) -> Any:
        """
        With C{max_connections: 10} held by clients that send nothing: a
        new request gets 503 in the provider's shape with C{Retry-After},
        C{/health} still answers 200 (and says how many are open), and
        connections beyond the reserve are closed at once; once the holders
        leave, requests are served again.
        """
        proc = yield self.start_proxy(
            self.config("server: {max_connections: 10, header_timeout_seconds: 30}\n")
        )
        holders = [Dribbler() for _ in range(10)]
        yield gatherResults([connect(proc.port, h) for h in holders])
        yield sleep(0.2)
        client = yield raw_exchange(
            proc.port,
            raw_request(
                b"POST",
                b"/anthropic/v1/messages",
                {b"x-api-key": b"sk-ant-x", b"anthropic-version": b"2023-06-01"},
                b"{}",
            ),
        )
        status, headers, body = split_response(client.received)
        self.assertEqual(status, 503, body)
        self.assertEqual(headers[b"retry-after"], [b"1"])
        self.assertEqual(headers[b"x-llm-proxy-error-source"], [b"proxy"])
        self.assertEqual(orjson.loads(body)["type"], "error")
        client = yield raw_exchange(proc.port, raw_request(b"GET", b"/health"))
        status, headers, body = split_response(client.received)
        self.assertEqual(status, 200, body)
        self.assertEqual(orjson.loads(body)["connections"]["max"], 10)
        self.assertGreaterEqual(orjson.loads(body)["connections"]["open"], 10)
        flood = [Dribbler() for _ in range(RESERVE + 20)]
        # Beyond the reserve a connection is reset as it is accepted: its
        # connect may fail outright.
        yield gatherResults([connect(proc.port, f).addErrback(lambda _: None) for f in flood])
        yield sleep(0.5)
        self.assertGreaterEqual(sum(1 for f in flood if not f.connected), 20)
        for connection in [*holders, *flood]:
            if connection.transport is not None:
                connection.transport.loseConnection()
        yield sleep(0.3)
        status, _, _ = yield self.post(proc)
        self.assertEqual(status, 200)
        self.assertEqual(len(self.fake.received), 1)

    @inlineCallbacks
    def test_idle_keepalive_makes_room(self) -> Any:
        """
        At the cap, an idle keep-alive connection is closed to serve a new
        one instead of refusing it.
        """
        proc = yield self.start_proxy(
            self.config("server: {max_connections: 5, header_timeout_seconds: 30}\n")
        )
        keeper = Dribbler()
        yield connect(proc.port, keeper)
        keeper.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        yield self.wait_for(lambda: b"\r\n\r\n" in keeper.received)
        holders = [Dribbler() for _ in range(4)]
        yield gatherResults([connect(proc.port, h) for h in holders])
        yield sleep(0.2)
        status, _, _ = yield self.post(proc)
        self.assertEqual(status, 200)
        yield keeper.closed
        for holder in holders:
            self.assertTrue(holder.connected)
            holder.transport.loseConnection()  # type: ignore[union-attr]


class HeadLimitTests(AbuseCase):
    @inlineCallbacks
    def test_oversized_heads_answered(self) -> Any:
        """
        A request line over 16 KiB is answered 414, a header section over
        16 KiB or with too many headers 431, garbage 400: each as JSON with
        the error source, never a silent close.
        """
        proc = yield self.start_proxy(self.config())
        cases = [
            (b"GET /openai/" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
            (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", 431),
            (
                b"GET /health HTTP/1.1\r\nHost: x\r\n"
                + b"".join(b"X-H%d: %s\r\n" % (n, b"v" * 200) for n in range(100))
                + b"\r\n",
                431,
            ),
            (
                b"GET /health HTTP/1.1\r\nHost: x\r\n"
                + b"".join(b"X-H%d: v\r\n" % n for n in range(600))
                + b"\r\n",
                431,
            ),
            (b"GET /health HTTP/1.1\r\nHost x\r\n\r\n", 400),
            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
        ]
        for raw, expected in cases:
            client = yield raw_exchange(proc.port, raw)
            status, headers, body = split_response(client.received)
            self.assertEqual(status, expected, raw[:60])
            self.assertEqual(headers[b"x-llm-proxy-error-source"], [b"proxy"])
            self.assertIn("message", orjson.loads(body)["error"])

    @inlineCallbacks
    def test_undecodable_path(self) -> Any:
        """
        A path that is not UTF-8 once decoded gets a JSON 400 with the
        error source; on a provider's route it is forwarded raw, as any
        path is.
        """
        proc = yield self.start_proxy(self.config())
        client = yield raw_exchange(proc.port, raw_request(b"GET", b"/meta/%FF/"))
        status, headers, body = split_response(client.received)
        self.assertEqual(status, 400, body)
        self.assertEqual(headers[b"x-llm-proxy-error-source"], [b"proxy"])
        self.assertIn("UTF-8", orjson.loads(body)["error"]["message"])
        client = yield raw_exchange(
            proc.port,
            raw_request(b"GET", b"/openai/v1/files/%FF", {b"authorization": b"Bearer sk-x"}),
        )
        status, _, _ = split_response(client.received)
        self.assertEqual(self.fake.received[-1].path, b"/v1/files/%FF")
        self.assertNotIn(b"Traceback", proc.output)
