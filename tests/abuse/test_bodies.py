"""
Item: one request must not take a gigabyte. Request bodies above the parse
limit are read by a bounded scan of their top level, so a body of millions
of tiny JSON values costs a small multiple of its size, and its facts are
still right.
"""

from __future__ import annotations

from typing import Any

import orjson
from twisted.internet.defer import inlineCallbacks

from llmproxy.providers.format import PARSE_LIMIT
from tests.abuse.harness import (
    OPENAI_HEADERS,
    AbuseCase,
    ScriptedConnection,
    proc_status,
    serve_script,
)

ANSWER = orjson.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
)


def answer(connection: ScriptedConnection, head: bytes, body: bytes) -> None:
    connection.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
        % len(ANSWER)
        + ANSWER
    )


class HugeBodyTests(AbuseCase):
    @inlineCallbacks
    def test_tiny_values_cost_a_small_multiple(self) -> Any:
        """
        A 31 MB body of C{{},} (a parser's twenty-fold in objects) raises the
        daemon's peak memory by less than four times the body, and its model
        is still read from the top level, after a decoy nested key.
        """
        _, base = yield serve_script(self, answer)
        proc = yield self.start_proxy(self.config(upstream=base))
        status, _, _ = yield self.post(proc)
        self.assertEqual(status, 200)
        before = proc_status(proc.pid, "VmHWM") * 1024
        body = (
            b'{"messages": [{"input": {"model": "decoy"}},'
            + b"{}," * 10_300_000
            + b'{}], "model": "gpt-4o-mini", "user": "big"}'
        )
        status, _, received = yield self.post(proc, body=body)
        self.assertEqual(status, 200, received)
        growth = proc_status(proc.pid, "VmHWM") * 1024 - before
        self.assertLess(growth, 4 * len(body), f"peak grew {growth >> 20} MiB")
        status, _, _ = yield self.get(proc, "/health")
        self.assertEqual(status, 200)
        yield self.wait_for(lambda: len(self.access_lines(proc)) >= 3)
        line = next(a for a in self.access_lines(proc) if a.get("user_id") == "big")
        self.assertEqual((line["model"], line["status"]), ("gpt-4o-mini", 200))

    @inlineCallbacks
    def test_large_stream_still_metered(self) -> Any:
        """
        A streamed chat request above the parse limit still asks the
        upstream for usage (written into the body in place): its tokens are
        counted and the client never sees the added usage chunk.
        """
        proc = yield self.start_proxy(self.config())
        filler = [{"role": "user", "content": "word " * 1000}] * (PARSE_LIMIT // 5000 + 1)
        body = orjson.dumps({"messages": filler, "model": "gpt-4o-mini", "stream": True})
        self.assertGreater(len(body), PARSE_LIMIT)
        status, _, received = yield self.post(
            proc, body=body, headers={**OPENAI_HEADERS, "x-fake-input-tokens": "4321"}
        )
        self.assertEqual(status, 200)
        self.assertNotIn(b'"usage":{', received.replace(b" ", b""))
        sent = orjson.loads(self.fake.received[-1].body)
        self.assertEqual(sent["stream_options"], {"include_usage": True})
        self.assertEqual(sent["messages"], filler)
        yield self.wait_for(lambda: len(self.access_lines(proc)) >= 1)
        self.assertEqual(self.access_lines(proc)[0]["input_tokens"], 4321)

    @inlineCallbacks
    def test_too_complex_refused(self) -> Any:
        """
        A large body with more escaped or bracketed strings than the scan
        walks past is refused with 400 in the provider's shape, not
        forwarded blind.
        """
        proc = yield self.start_proxy(self.config())
        body = b'{"input": [' + b'"{",' * 60_000 + b'"x"], "model": "m", "pad": "'
        body += b"x" * PARSE_LIMIT + b'"}'
        status, headers, received = yield self.post(proc, "/openai/v1/embeddings", body)
        self.assertEqual(status, 400, received)
        self.assertEqual(headers.getRawHeaders(b"x-llm-proxy-error-source"), [b"proxy"])
        self.assertIn("too complex", orjson.loads(received)["error"]["message"])
        self.assertEqual(self.fake.received, [])
