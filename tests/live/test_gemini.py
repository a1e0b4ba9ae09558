"""
The C{google-genai} SDK against the Gemini API (v1beta) through a real proxy
process (C{make test-gemini}); skipped without C{GEMINI_API_KEY}.

The SDK sends the key as C{x-goog-api-key}; the C{?key=} form is checked
with raw requests.
"""

from __future__ import annotations

from typing import Any

import orjson
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types
from treq.content import content
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.web.http_headers import Headers

from tests.live.support import SDK_TIMEOUT, LiveTestCase, live_model

MODEL = live_model("gemini", "gemini-2.5-flash-lite")
PROMPT = "Say hello in one word."
CONFIG = genai_types.GenerateContentConfig(max_output_tokens=50)


class GeminiLiveTests(LiveTestCase):
    key_variable = "GEMINI_API_KEY"

    def client(self, api_key: str | None = None, **headers: str) -> genai.Client:
        return genai.Client(
            api_key=api_key or self.key,
            http_options=genai_types.HttpOptions(
                base_url=f"{self.proxy.url}/gemini",
                api_version="v1beta",
                timeout=int(SDK_TIMEOUT * 1000),
                headers=headers or None,
            ),
        )

    def test_generate_content(self) -> Deferred[None]:
        def call() -> None:
            with self.client() as c:
                response = c.models.generate_content(model=MODEL, contents=PROMPT, config=CONFIG)
            self.assertTrue(response.text)
            usage = response.usage_metadata
            assert usage is not None
            self.assertGreater(usage.prompt_token_count or 0, 0)

        return self.in_thread(call)

    def test_generate_content_stream(self) -> Deferred[None]:
        def call() -> None:
            with self.client() as c:
                chunks = list(
                    c.models.generate_content_stream(model=MODEL, contents=PROMPT, config=CONFIG)
                )
            self.assertTrue("".join(chunk.text or "" for chunk in chunks))
            usage = chunks[-1].usage_metadata
            assert usage is not None
            self.assertGreater(usage.total_token_count or 0, 0)

        return self.in_thread(call)

    def test_function_call(self) -> Deferred[None]:
        declaration = genai_types.FunctionDeclaration(
            name="weather",
            description="The weather forecast for a city.",
            parameters_json_schema={
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        )
        config = genai_types.GenerateContentConfig(
            tools=[genai_types.Tool(function_declarations=[declaration])],
            tool_config=genai_types.ToolConfig(
                function_calling_config=genai_types.FunctionCallingConfig(
                    mode=genai_types.FunctionCallingConfigMode.ANY
                )
            ),
        )

        def call() -> None:
            with self.client() as c:
                response = c.models.generate_content(
                    model=MODEL, contents="Weather in Paris?", config=config
                )
            [function_call, *_] = response.function_calls or []
            self.assertEqual(function_call.name, "weather")
            self.assertIsInstance((function_call.args or {}).get("city"), str)

        return self.in_thread(call)

    @inlineCallbacks
    def test_key_in_query(self) -> Any:
        """
        C{?key=} instead of the header, for JSON and for SSE.  Failure
        messages name the endpoint, never the URL (it holds the key).
        """
        base = f"{self.proxy.url}/gemini/v1beta/models/{MODEL}"
        body = orjson.dumps({"contents": [{"parts": [{"text": PROMPT}]}]})
        headers = Headers({b"content-type": [b"application/json"]})
        response = yield self.http.post(
            f"{base}:generateContent?key={self.key}", data=body, headers=headers
        )
        answer = yield content(response)
        self.assertEqual(response.code, 200, "generateContent?key=")
        self.assertIn("candidates", orjson.loads(answer))
        response = yield self.http.post(
            f"{base}:streamGenerateContent?alt=sse&key={self.key}", data=body, headers=headers
        )
        stream = yield content(response)
        self.assertEqual(response.code, 200, "streamGenerateContent?alt=sse&key=")
        events = [line for line in stream.splitlines() if line.startswith(b"data: ")]
        self.assertTrue(events)
        self.assertIn("usageMetadata", orjson.loads(events[-1][len(b"data: ") :]))

    def test_models(self) -> Deferred[None]:
        def call() -> None:
            with self.client() as c:
                names = [model.name for model in c.models.list()]
            self.assertTrue(names)

        return self.in_thread(call)

    def test_errors(self) -> Deferred[None]:
        """
        A wrong key is Gemini's 400 C{INVALID_ARGUMENT}; an unknown model is
        a 404.  C{x-fake-status} matters only to the fake upstream.
        """

        def call() -> None:
            with (
                self.client(api_key="invalid-key-for-llmproxy-tests") as c,
                self.assertRaises(genai_errors.ClientError) as denied,
            ):
                c.models.generate_content(model=MODEL, contents=PROMPT, config=CONFIG)
            self.assertEqual(denied.exception.code, 400)
            self.assertEqual(denied.exception.status, "INVALID_ARGUMENT")
            with (
                self.client(**{"x-fake-status": "404"}) as c,
                self.assertRaises(genai_errors.ClientError) as missing,
            ):
                c.models.generate_content(
                    model="no-such-model-llmproxy", contents=PROMPT, config=CONFIG
                )
            self.assertEqual(missing.exception.code, 404)
            self.assertTrue(missing.exception.message)

        return self.in_thread(call)
