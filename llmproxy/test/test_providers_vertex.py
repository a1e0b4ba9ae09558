"""
Tests for L{llmproxy.providers.vertex}.
"""

from __future__ import annotations

import orjson
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.providers.vertex import VertexFormat

BASE = b"/v1/projects/my-proj/locations/us-east5/publishers/"

# A Claude message as Vertex AI returns it (rawPredict): Anthropic's shape,
# with Anthropic's model name.
CLAUDE_JSON = orjson.dumps(
    {
        "id": "msg_vrtx_01",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-20250514",
        "content": [{"type": "text", "text": "Hi"}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 10, "cache_creation_input_tokens": 2, "output_tokens": 5},
    }
)
GEMINI_SSE = (
    b'data: {"candidates": [{"content": {"parts": [{"text": "Hi"}]}}],'
    b' "modelVersion": "gemini-2.5-flash"}\r\n\r\n'
    b'data: {"candidates": [{"finishReason": "STOP"}], "usageMetadata": {"promptTokenCount": 7,'
    b' "candidatesTokenCount": 3, "thoughtsTokenCount": 4, "totalTokenCount": 14},'
    b' "modelVersion": "gemini-2.5-flash", "responseId": "r1"}\r\n\r\n'
)


class VertexTests(SynchronousTestCase):
    fmt = VertexFormat()

    def test_claude(self) -> None:
        body = orjson.dumps(
            {
                "anthropic_version": "vertex-2023-10-16",
                "messages": [{"role": "user", "content": "abcd"}],
                "max_tokens": 5,
            }
        )
        facts = self.fmt.inspect(
            b"POST", BASE + b"anthropic/models/claude-sonnet-4@20250514:rawPredict", b"", body
        ).facts
        self.assertEqual(
            (facts.endpoint, facts.model, facts.streaming),
            ("messages", "claude-sonnet-4@20250514", False),
        )
        self.assertEqual(facts.prompt_chars, 4)
        stream = self.fmt.inspect(
            b"POST", BASE + b"anthropic/models/claude-sonnet-4@20250514:streamRawPredict", b"", body
        ).facts
        self.assertTrue(stream.streaming)
        meter = self.fmt.new_meter(facts, b"application/json", {})
        meter.feed(CLAUDE_JSON)
        usage = meter.usage()
        self.assertEqual(
            (usage.model, usage.input_tokens, usage.cache_write_tokens, usage.output_tokens),
            ("claude-sonnet-4-20250514", 12, 2, 5),
        )

    def test_claude_count_tokens(self) -> None:
        facts = self.fmt.inspect(
            b"POST", BASE + b"anthropic/models/count-tokens:rawPredict", b"", b"{}"
        ).facts
        self.assertEqual(facts.endpoint, "count_tokens")
        self.assertFalse(self.fmt.new_meter(facts, b"application/json", {}).usage().reported)

    def test_gemini(self) -> None:
        facts = self.fmt.inspect(
            b"POST",
            BASE + b"google/models/gemini-2.5-flash:streamGenerateContent",
            b"alt=sse",
            b"{}",
        ).facts
        self.assertEqual(
            (facts.endpoint, facts.model, facts.streaming),
            ("streamGenerateContent", "gemini-2.5-flash", True),
        )
        meter = self.fmt.new_meter(facts, b"text/event-stream", {})
        self.assertEqual(meter.feed(GEMINI_SSE), GEMINI_SSE)
        meter.finish()
        usage = meter.usage()
        self.assertEqual(
            (usage.input_tokens, usage.output_tokens, usage.reasoning_tokens), (7, 7, 4)
        )

    def test_openapi(self) -> None:
        facts = self.fmt.inspect(
            b"POST",
            b"/v1/projects/p/locations/us-central1/endpoints/openapi/chat/completions",
            b"",
            b'{"model": "google/gemini-2.5-flash", "messages": []}',
        ).facts
        self.assertEqual(
            (facts.endpoint, facts.model), ("chat.completions", "google/gemini-2.5-flash")
        )

    def test_stream_errors(self) -> None:
        """
        A Claude stream ends with Anthropic's error event, a Gemini stream
        with Google's bare data line; proxy errors are Google's shape.
        """
        claude = self.fmt.inspect(
            b"POST", BASE + b"anthropic/models/c:streamRawPredict", b"", b"{}"
        ).facts
        ending = self.fmt.stream_error(claude, b"text/event-stream", None)
        assert ending is not None
        self.assertIn(b'event: error\ndata: {"type":"error"', ending(502, "x") or b"")
        gemini = self.fmt.inspect(
            b"POST", BASE + b"google/models/g:streamGenerateContent", b"alt=sse", b"{}"
        ).facts
        ending = self.fmt.stream_error(gemini, b"text/event-stream", None)
        assert ending is not None
        self.assertTrue((ending(502, "x") or b"").startswith(b'\n\ndata: {"error"'))
        self.assertEqual(
            orjson.loads(self.fmt.error_body(429, "m"))["error"]["status"], "RESOURCE_EXHAUSTED"
        )
