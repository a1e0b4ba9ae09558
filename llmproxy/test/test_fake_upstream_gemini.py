"""
Tests for L{llmproxy.testing.fake_upstream.gemini}: the Gemini routes and
their shapes.
"""

from __future__ import annotations

from llmproxy.test.test_fake_upstream import (
    CONTENTS,
    GEMINI_AUTH,
    WEATHER_ARGUMENTS,
    WEATHER_TOOL_SCHEMA,
    FakeTestCase,
    sse_events,
)
from llmproxy.testing.fake_upstream import DEFAULT_CHUNKS, DEFAULT_INPUT_TOKENS, fake_text


class GeminiTests(FakeTestCase):
    def test_generate_content(self) -> None:
        response = self.post(
            b"/v1beta/models/gemini-2.0-flash:generateContent",
            CONTENTS,
            [*GEMINI_AUTH, (b"x-fake-reasoning-tokens", b"6"), (b"x-fake-cached-tokens", b"4")],
        )
        self.assertEqual(response.header(b"content-type"), b"application/json; charset=UTF-8")
        body = response.json()
        candidate = body["candidates"][0]
        self.assertEqual(candidate["content"]["parts"], [{"text": fake_text()}])
        self.assertEqual(candidate["finishReason"], "STOP")
        self.assertEqual(body["modelVersion"], "gemini-2.0-flash")
        usage = body["usageMetadata"]
        self.assertEqual(usage["promptTokenCount"], DEFAULT_INPUT_TOKENS)
        self.assertEqual(usage["candidatesTokenCount"], DEFAULT_CHUNKS)
        self.assertEqual(usage["thoughtsTokenCount"], 6)
        self.assertEqual(usage["cachedContentTokenCount"], 4)
        self.assertEqual(usage["totalTokenCount"], DEFAULT_INPUT_TOKENS + DEFAULT_CHUNKS + 6)

    def test_stream_sse(self) -> None:
        """
        C{alt=sse}: C{data: ...\\r\\n\\r\\n} events, one per write; the last
        carries the finish reason and the full usage.
        """
        response = self.post(
            b"/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
            CONTENTS,
            GEMINI_AUTH,
        )
        self.assertEqual(response.header(b"content-type"), b"text/event-stream")
        self.assertTrue(all(chunk.endswith(b"\r\n\r\n") for chunk in response.chunks))
        events = [d for _, d in sse_events(response.body, b"\r\n\r\n")]
        self.assertEqual(len(events), DEFAULT_CHUNKS)
        text = "".join(e["candidates"][0]["content"]["parts"][0]["text"] for e in events)
        self.assertEqual(text, fake_text())
        self.assertNotIn("candidatesTokenCount", events[0]["usageMetadata"])
        self.assertEqual(events[-1]["usageMetadata"]["candidatesTokenCount"], DEFAULT_CHUNKS)
        self.assertEqual(events[-1]["candidates"][0]["finishReason"], "STOP")

    def test_stream_json_array(self) -> None:
        """
        Without C{alt=sse}: a JSON array, written element by element.
        """
        response = self.post(
            b"/v1beta/models/gemini-2.0-flash:streamGenerateContent", CONTENTS, GEMINI_AUTH
        )
        self.assertEqual(response.header(b"content-type"), b"application/json; charset=UTF-8")
        self.assertEqual(len(response.chunks), DEFAULT_CHUNKS + 1)
        self.assertTrue(response.chunks[0].startswith(b"["))
        items = response.json()
        self.assertEqual(len(items), DEFAULT_CHUNKS)
        self.assertEqual(items[-1]["candidates"][0]["finishReason"], "STOP")

    def test_function_call(self) -> None:
        tools = [{"functionDeclarations": [{"name": "weather", "parameters": WEATHER_TOOL_SCHEMA}]}]
        body = self.post(
            b"/v1beta/models/gemini-2.0-flash:generateContent",
            {**CONTENTS, "tools": tools},
            GEMINI_AUTH,
        ).json()
        [part] = body["candidates"][0]["content"]["parts"]
        self.assertEqual(part["functionCall"], {"name": "weather", "args": WEATHER_ARGUMENTS})

    def test_snake_case_fields(self) -> None:
        """
        google-genai sends some fields snake_case (the API takes both).
        """
        declaration = {"name": "weather", "parameters_json_schema": WEATHER_TOOL_SCHEMA}
        body = self.post(
            b"/v1beta/models/gemini-2.0-flash:generateContent",
            {**CONTENTS, "tools": [{"function_declarations": [declaration]}]},
            GEMINI_AUTH,
        ).json()
        [part] = body["candidates"][0]["content"]["parts"]
        self.assertEqual(part["functionCall"]["args"], WEATHER_ARGUMENTS)
        limited = self.post(
            b"/v1beta/models/gemini-2.0-flash:generateContent",
            {**CONTENTS, "generation_config": {"max_output_tokens": 1}},
            GEMINI_AUTH,
        ).json()
        self.assertEqual(limited["candidates"][0]["finishReason"], "MAX_TOKENS")

    def test_count_tokens_and_embeddings(self) -> None:
        count = self.post(
            b"/v1beta/models/gemini-2.0-flash:countTokens", CONTENTS, GEMINI_AUTH
        ).json()
        self.assertEqual(count["totalTokens"], DEFAULT_INPUT_TOKENS)
        one = self.post(
            b"/v1beta/models/gemini-embedding-001:embedContent",
            {"content": {"parts": [{"text": "a"}]}, "outputDimensionality": 3},
            GEMINI_AUTH,
        ).json()
        self.assertEqual(len(one["embedding"]["values"]), 3)
        batch = self.post(
            b"/v1beta/models/gemini-embedding-001:batchEmbedContents",
            {"requests": [{"content": {"parts": [{"text": "a"}]}}] * 2},
            GEMINI_AUTH,
        ).json()
        self.assertEqual(len(batch["embeddings"]), 2)

    def test_models(self) -> None:
        listing = self.exchange(b"GET", b"/v1beta/models", GEMINI_AUTH).response().json()
        self.assertIn("models/gemini-2.0-flash", [m["name"] for m in listing["models"]])
        one = self.exchange(b"GET", b"/v1beta/models/gemini-2.0-flash?key=k").response()
        self.assertEqual(one.json()["name"], "models/gemini-2.0-flash")
        missing = self.exchange(b"GET", b"/v1beta/models/nope", GEMINI_AUTH).response()
        self.assertEqual(missing.status, 404)
        self.assertEqual(missing.json()["error"]["status"], "NOT_FOUND")
