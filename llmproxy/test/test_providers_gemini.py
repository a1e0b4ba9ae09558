"""
Tests for L{llmproxy.providers.gemini}.
"""

from __future__ import annotations

import orjson
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.providers import Meter, RequestFacts
from llmproxy.providers.gemini import GeminiFormat
from llmproxy.usage import Usage

# ---------------------------------------------------------------------------
# Golden payloads.  Shaped after the Gemini API reference
# (ai.google.dev/api: "Generating content" GenerateContentResponse and
# UsageMetadata, "Embeddings", "Counting tokens"), v1beta as served in 2025
# (gemini-2.5 era: thoughtsTokenCount, promptTokensDetails by modality,
# responseId).  Streams: alt=sse separates events with CR LF CR LF; without
# alt=sse the answer is one JSON array, pretty-printed, elements separated by
# ",\r\n".  Token counts are made up but consistent.

GENERATE_JSON = b"""{
  "candidates": [
    {
      "content": {
        "parts": [{"text": "Hello! How can I help you today?"}],
        "role": "model"
      },
      "finishReason": "STOP",
      "index": 0
    }
  ],
  "usageMetadata": {
    "promptTokenCount": 2152,
    "candidatesTokenCount": 9,
    "totalTokenCount": 2189,
    "cachedContentTokenCount": 2048,
    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 2152}],
    "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": 2048}],
    "thoughtsTokenCount": 28
  },
  "modelVersion": "gemini-2.5-flash",
  "responseId": "kKW2aOTnAvWxz7IPq7WbuQ4"
}"""
GENERATE_USAGE = Usage(
    model="gemini-2.5-flash",
    input_tokens=2152,
    output_tokens=9 + 28,
    cache_read_tokens=2048,
    reasoning_tokens=28,
    finish_reason="STOP",
    upstream_request_id="kKW2aOTnAvWxz7IPq7WbuQ4",
    reported=True,
)

GROUNDED_JSON = b"""{
  "candidates": [
    {
      "content": {"parts": [{"text": "Spain won Euro 2024."}], "role": "model"},
      "finishReason": "STOP",
      "groundingMetadata": {"webSearchQueries": ["who won euro 2024"]}
    }
  ],
  "usageMetadata": {
    "promptTokenCount": 12,
    "candidatesTokenCount": 8,
    "totalTokenCount": 301,
    "toolUsePromptTokenCount": 281,
    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 12}],
    "toolUsePromptTokensDetails": [{"modality": "TEXT", "tokenCount": 281}]
  },
  "modelVersion": "models/gemini-2.0-flash",
  "responseId": "abc"
}"""

SSE_CHUNKS = [
    b'{"candidates": [{"content": {"parts": [{"text": "The"}],"role": "model"},"index": 0}],'
    b'"usageMetadata": {"promptTokenCount": 10,"totalTokenCount": 10,'
    b'"promptTokensDetails": [{"modality": "TEXT","tokenCount": 10}]},'
    b'"modelVersion": "gemini-2.5-pro","responseId": "6ru2aKvCGNvgz7IP6PO30Ac"}',
    b'{"candidates": [{"content": {"parts": [{"text": " sky is blue."}],"role": "model"},'
    b'"index": 0}],"usageMetadata": {"promptTokenCount": 10,"candidatesTokenCount": 5,'
    b'"totalTokenCount": 120,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 10}],'
    b'"thoughtsTokenCount": 105},"modelVersion": "gemini-2.5-pro",'
    b'"responseId": "6ru2aKvCGNvgz7IP6PO30Ac"}',
    b'{"candidates": [{"content": {"parts": [{"text": ""}],"role": "model"},'
    b'"finishReason": "STOP","index": 0}],"usageMetadata": {"promptTokenCount": 10,'
    b'"candidatesTokenCount": 7,"totalTokenCount": 122,'
    b'"promptTokensDetails": [{"modality": "TEXT","tokenCount": 10}],'
    b'"thoughtsTokenCount": 105},"modelVersion": "gemini-2.5-pro",'
    b'"responseId": "6ru2aKvCGNvgz7IP6PO30Ac"}',
]
SSE_STREAM = b"".join(b"data: " + chunk + b"\r\n\r\n" for chunk in SSE_CHUNKS)
STREAM_USAGE = Usage(
    model="gemini-2.5-pro",
    input_tokens=10,
    output_tokens=7 + 105,
    reasoning_tokens=105,
    finish_reason="STOP",
    upstream_request_id="6ru2aKvCGNvgz7IP6PO30Ac",
    reported=True,
)
ARRAY_STREAM = (
    b"["
    + b",\r\n".join(orjson.dumps(orjson.loads(c), option=orjson.OPT_INDENT_2) for c in SSE_CHUNKS)
    + b"]"
)

EMBED_JSON = (
    b'{\n  "embedding": {\n    "values": [\n      0.0139, -0.0064, -0.0612\n    ]\n  }\n}\n'
)

ERROR_JSON = b"""{
  "error": {
    "code": 400,
    "message": "API key not valid. Please pass a valid API key.",
    "status": "INVALID_ARGUMENT"
  }
}"""

# ---------------------------------------------------------------------------

FORMAT = GeminiFormat()


def request(
    path: bytes, body: object = None, query: bytes = b"", method: bytes = b"POST"
) -> RequestFacts:
    raw = b"" if body is None else orjson.dumps(body)
    return FORMAT.inspect(method, path, query, raw).facts


def run(meter: Meter, body: bytes, size: int) -> bytes:
    out = b"".join(meter.feed(body[i : i + size]) for i in range(0, len(body), size))
    return out + meter.finish()


GENERATE = request(b"/v1beta/models/gemini-2.5-flash:generateContent", {"contents": []})
STREAM = request(
    b"/v1beta/models/gemini-2.5-pro:streamGenerateContent", {"contents": []}, b"alt=sse"
)


class InspectTests(SynchronousTestCase):
    """
    L{GeminiFormat.inspect}.
    """

    def test_generate(self) -> None:
        body = {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]}
        self.assertEqual(
            request(b"/v1beta/models/gemini-2.5-flash:generateContent", body, b"key=AIza"),
            RequestFacts(
                method="POST",
                endpoint="generateContent",
                model="gemini-2.5-flash",
                streaming=False,
                prompt_chars=2,
            ),
        )

    def test_endpoints(self) -> None:
        cases = [
            (
                b"/v1beta/models/gemini-2.5-pro:streamGenerateContent",
                b"",
                "streamGenerateContent",
                True,
            ),
            (
                b"/v1beta/models/gemini-2.5-pro%3AstreamGenerateContent",
                b"alt=sse",
                "streamGenerateContent",
                True,
            ),
            (b"/v1beta/models/gemini-2.5-pro:generateContent", b"alt=sse", "generateContent", True),
            (
                b"/v1beta/models/gemini-2.5-pro:generateContent",
                b"%24alt=sse",
                "generateContent",
                True,
            ),
            (b"/v1/models/gemini-embedding-001:embedContent", b"", "embedContent", False),
            (b"/v1beta/models/gemini-embedding-001:batchEmbedContents", b"", "embedContent", False),
            (b"/v1beta/models/gemini-2.5-pro:countTokens", b"", "count_tokens", False),
            (b"/v1beta/models", b"pageSize=5", "models", False),
            (b"/v1beta/models/gemini-2.5-pro", b"", "models", False),
            (b"/v1beta/cachedContents", b"", "other", False),
            (b"/upload/v1beta/files", b"uploadType=multipart", "other", False),
            (b"/v1beta/openai/chat/completions", b"", "chat.completions", False),
            (b"/v1beta/openai/embeddings", b"", "embeddings", False),
        ]
        for path, query, endpoint, streaming in cases:
            info = FORMAT.inspect(b"POST", path, query, b"").facts
            self.assertEqual((info.endpoint, info.streaming), (endpoint, streaming), path)

    def test_maxOutputTokens(self) -> None:
        path = b"/v1beta/models/gemini-2.5-flash:generateContent"
        for config, expected in (
            ({"generationConfig": {"maxOutputTokens": 64}}, 64),
            ({"generation_config": {"max_output_tokens": 32}}, 32),
            ({"generationConfig": {"temperature": 1}}, None),
        ):
            self.assertEqual(request(path, {"contents": [], **config}).max_output_tokens, expected)

    def test_model(self) -> None:
        info = request(b"/v1beta/models/gemini-2.5-flash%2Dlite:generateContent")
        self.assertEqual(info.model, "gemini-2.5-flash-lite")
        info = request(b"/v1beta/tunedModels/my-tuned:generateContent")
        self.assertEqual(info.model, "my-tuned")
        info = request(
            b"/v1beta/openai/chat/completions", {"model": "gemini-2.0-flash", "stream": True}
        )
        self.assertEqual((info.model, info.streaming), ("gemini-2.0-flash", True))

    def test_garbage(self) -> None:
        for path in (b"", b"/", b"/:", b"/models/:generateContent", b"/\xff%ff:x"):
            info = FORMAT.inspect(b"POST", path, b"&&=&%zz", b"\xff").facts
            self.assertIsNone(info.prompt_chars)


class JSONMeterTests(SynchronousTestCase):
    """
    Non-streaming bodies.
    """

    def test_generate(self) -> None:
        for size in (1, 31, len(GENERATE_JSON)):
            meter = FORMAT.new_meter(GENERATE, b"application/json; charset=UTF-8", {}, False)
            self.assertEqual(run(meter, GENERATE_JSON, size), GENERATE_JSON)
            self.assertEqual(meter.usage(), GENERATE_USAGE)

    def test_toolUsePrompt(self) -> None:
        """
        Tool-use prompt tokens (search results the model read) are input;
        a C{models/} prefix on the model version goes.
        """
        meter = FORMAT.new_meter(GENERATE, b"application/json", {}, False)
        run(meter, GROUNDED_JSON, 100)
        self.assertEqual(
            meter.usage(),
            Usage(
                model="gemini-2.0-flash",
                input_tokens=12 + 281,
                output_tokens=8,
                finish_reason="STOP",
                upstream_request_id="abc",
                reported=True,
            ),
        )

    def test_embed(self) -> None:
        """
        C{embedContent} reports no usage: the request's model, unreported.
        """
        info = request(b"/v1beta/models/gemini-embedding-001:embedContent", {"content": {}})
        meter = FORMAT.new_meter(info, b"application/json", {}, False)
        run(meter, EMBED_JSON, 8)
        self.assertEqual(meter.usage(), Usage(model="gemini-embedding-001"))

    def test_error(self) -> None:
        meter = FORMAT.new_meter(GENERATE, b"application/json", {"x-request-id": "gw-1"}, False)
        run(meter, ERROR_JSON, 8)
        self.assertEqual(meter.usage(), Usage(model="gemini-2.5-flash", upstream_request_id="gw-1"))

    def test_countTokens(self) -> None:
        info = request(b"/v1beta/models/gemini-2.5-pro:countTokens", {"contents": []})
        meter = FORMAT.new_meter(info, b"application/json", {}, False)
        run(meter, b'{"totalTokens": 31, "usageMetadata": {"promptTokenCount": 31}}', 8)
        self.assertFalse(meter.usage().reported)

    def test_openAICompatible(self) -> None:
        info = request(b"/v1beta/openai/chat/completions", {"model": "gemini-2.0-flash"})
        meter = FORMAT.new_meter(info, b"application/json", {}, False)
        run(
            meter,
            b'{"choices":[{"finish_reason":"stop","index":0,"message":{"content":"Hi",'
            b'"role":"assistant"}}],"created":1740000000,"model":"gemini-2.0-flash",'
            b'"object":"chat.completion","usage":{"completion_tokens":2,"prompt_tokens":4,'
            b'"total_tokens":6}}',
            50,
        )
        usage = meter.usage()
        self.assertEqual((usage.input_tokens, usage.output_tokens), (4, 2))


class StreamTests(SynchronousTestCase):
    """
    C{streamGenerateContent}: SSE and the streamed JSON array.
    """

    def test_sse(self) -> None:
        for size in (1, 17, len(SSE_STREAM)):
            meter = FORMAT.new_meter(STREAM, b"text/event-stream", {}, False)
            for i in range(0, len(SSE_STREAM), size):
                chunk = SSE_STREAM[i : i + size]
                self.assertIs(meter.feed(chunk), chunk)
            self.assertEqual(meter.finish(), b"")
            self.assertEqual(meter.usage(), STREAM_USAGE)

    def test_ssePartial(self) -> None:
        """
        Cut after two chunks: the last usage seen so far wins.
        """
        meter = FORMAT.new_meter(STREAM, b"text/event-stream", {}, False)
        meter.feed(SSE_STREAM[: SSE_STREAM.index(SSE_CHUNKS[2]) + 40])
        usage = meter.usage()
        self.assertEqual(
            (usage.input_tokens, usage.output_tokens, usage.finish_reason, usage.reported),
            (10, 110, None, True),
        )

    def test_array(self) -> None:
        info = request(b"/v1beta/models/gemini-2.5-pro:streamGenerateContent", {"contents": []})
        for size in (1, 29, len(ARRAY_STREAM)):
            meter = FORMAT.new_meter(info, b"application/json; charset=UTF-8", {}, False)
            self.assertEqual(run(meter, ARRAY_STREAM, size), ARRAY_STREAM)
            self.assertEqual(meter.usage(), STREAM_USAGE)

    def test_arrayPartial(self) -> None:
        info = request(b"/v1beta/models/gemini-2.5-pro:streamGenerateContent", {"contents": []})
        meter = FORMAT.new_meter(info, b"application/json", {}, False)
        meter.feed(ARRAY_STREAM[: ARRAY_STREAM.index(b"STOP")])
        usage = meter.usage()
        self.assertEqual((usage.output_tokens, usage.finish_reason), (110, None))

    def test_imageChunk(self) -> None:
        """
        A chunk too big for the parser (an inline image) is skipped, and its
        usage, at its end, still read.
        """
        image = (
            b'{"candidates": [{"content": {"parts": [{"inlineData": {"mimeType": "image/png",'
            b'"data": "' + b"iVBORw0KGgo" * 200_000 + b'"}}],"role": "model"},'
            b'"finishReason": "STOP","index": 0}],"usageMetadata": {"promptTokenCount": 7,'
            b'"candidatesTokenCount": 1290,"totalTokenCount": 1297},'
            b'"modelVersion": "gemini-2.5-flash-image","responseId": "img-1"}'
        )
        body = b"data: " + image + b"\r\n\r\n"
        meter = FORMAT.new_meter(STREAM, b"text/event-stream", {}, False)
        run(meter, body, 65536)
        self.assertEqual(
            meter.usage(),
            Usage(
                model="gemini-2.5-flash-image",
                input_tokens=7,
                output_tokens=1290,
                finish_reason="STOP",
                upstream_request_id="img-1",
                reported=True,
            ),
        )


class ErrorShapeTests(SynchronousTestCase):
    """
    Errors the proxy makes, in Google's shape.
    """

    def test_errorBody(self) -> None:
        cases = {
            400: "INVALID_ARGUMENT",
            403: "PERMISSION_DENIED",
            404: "NOT_FOUND",
            413: "INVALID_ARGUMENT",
            429: "RESOURCE_EXHAUSTED",
            500: "INTERNAL",
            502: "UNAVAILABLE",
            503: "UNAVAILABLE",
            504: "DEADLINE_EXCEEDED",
            418: "FAILED_PRECONDITION",
            599: "INTERNAL",
        }
        for status, name in cases.items():
            self.assertEqual(
                orjson.loads(FORMAT.error_body(status, "m")),
                {"error": {"code": status, "message": "m", "status": name}},
            )

    def test_sseErrorEvent(self) -> None:
        event = FORMAT.sse_error_event(504, "idle")
        self.assertTrue(event.startswith(b'data: {"error":'))
        self.assertTrue(event.endswith(b"\n\n"))
        self.assertEqual(
            orjson.loads(event[len(b"data: ") :]),
            {"error": {"code": 504, "message": "idle", "status": "DEADLINE_EXCEEDED"}},
        )


class PromptTextTests(SynchronousTestCase):
    """
    L{GeminiFormat.prompt_text_chars}.
    """

    def test_generate(self) -> None:
        info = request(
            b"/v1beta/models/gemini-2.5-flash:generateContent",
            {
                "systemInstruction": {"parts": [{"text": "Be terse."}]},
                "contents": [
                    {
                        "role": "user",
                        "parts": [
                            {"text": "Describe"},
                            {"inlineData": {"mimeType": "image/jpeg", "data": "/9j/4AAQ"}},
                            {"fileData": {"mimeType": "video/mp4", "fileUri": "https://x"}},
                        ],
                    }
                ],
                "tools": [{"functionDeclarations": [{"name": "f"}]}],
                "generationConfig": {"temperature": 0.2},
            },
        )
        self.assertEqual(info.prompt_chars, 9 + 8 + (20 + 4 + 1))

    def test_embed(self) -> None:
        info = request(
            b"/v1beta/models/gemini-embedding-001:batchEmbedContents",
            {
                "requests": [
                    {
                        "model": "models/gemini-embedding-001",
                        "content": {"parts": [{"text": "abc"}]},
                    }
                ]
            },
        )
        self.assertEqual(info.prompt_chars, 3)

    def test_notJSON(self) -> None:
        info = FORMAT.inspect(b"POST", b"/upload/v1beta/files", b"", b"--b\r\n").facts
        self.assertIsNone(info.prompt_chars)
