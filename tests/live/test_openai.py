"""
The C{openai} SDK against api.openai.com through a real proxy process
(C{make test-openai}); skipped without C{OPENAI_API_KEY}.

The answers are real, so the tests check shapes, never text: content came
back, usage was counted, errors raised the SDK's own class.
"""

from __future__ import annotations

import json
from typing import Any

import openai
from twisted.internet.defer import Deferred

from tests.live.support import LiveTestCase, live_model

MODEL = live_model("openai", "gpt-4o-mini")
EMBEDDING_MODEL = live_model("openai_embedding", "text-embedding-3-small")
MESSAGES: Any = [{"role": "user", "content": "Say hello in one word."}]
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather forecast for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}


class OpenAILiveTests(LiveTestCase):
    key_variable = "OPENAI_API_KEY"

    def client(self, api_key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(**self.sdk_options("/openai/v1", api_key))

    def test_chat_json(self) -> Deferred[None]:
        def call() -> None:
            with self.client() as c:
                raw = c.chat.completions.with_raw_response.create(
                    model=MODEL, messages=MESSAGES, max_tokens=20
                )
            completion = raw.parse()
            self.assertTrue(completion.choices[0].message.content)
            assert completion.usage is not None
            self.assertGreater(completion.usage.prompt_tokens, 0)
            self.assertGreater(completion.usage.completion_tokens, 0)
            self.assertTrue(raw.headers["x-llm-proxy-request-id"])
            self.assertTrue(completion._request_id)

        return self.in_thread(call)

    def test_chat_stream_without_include_usage(self) -> Deferred[None]:
        """
        The proxy asks for usage upstream and hides the usage chunk: the
        SDK sees a stream without one.
        """

        def call() -> None:
            with self.client() as c:
                chunks = list(
                    c.chat.completions.create(
                        model=MODEL, messages=MESSAGES, max_tokens=20, stream=True
                    )
                )
            self.assertEqual([c for c in chunks if c.usage is not None], [])
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            self.assertTrue(text)
            finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
            self.assertIn(finishes[-1], ("stop", "length"))

        return self.in_thread(call)

    def test_chat_stream_with_include_usage(self) -> Deferred[None]:
        def call() -> None:
            with self.client() as c:
                chunks = list(
                    c.chat.completions.create(
                        model=MODEL,
                        messages=MESSAGES,
                        max_tokens=20,
                        stream=True,
                        stream_options={"include_usage": True},
                    )
                )
            last = chunks[-1]
            self.assertEqual(last.choices, [])
            assert last.usage is not None
            self.assertGreater(last.usage.total_tokens, 0)

        return self.in_thread(call)

    def test_chat_tool_call(self) -> Deferred[None]:
        def call() -> None:
            with (
                self.client() as c,
                c.chat.completions.stream(
                    model=MODEL,
                    messages=[{"role": "user", "content": "Weather in Paris?"}],
                    tools=[WEATHER_TOOL],
                    tool_choice={"type": "function", "function": {"name": "weather"}},
                ) as stream,
            ):
                final = stream.get_final_completion()
            [tool_call] = final.choices[0].message.tool_calls or []
            self.assertEqual(tool_call.function.name, "weather")
            self.assertIsInstance(json.loads(tool_call.function.arguments)["city"], str)

        return self.in_thread(call)

    def test_responses(self) -> Deferred[None]:
        def call() -> None:
            with self.client() as c:
                response = c.responses.create(model=MODEL, input="Say hello.")
                with c.responses.stream(model=MODEL, input="Say hello.") as stream:
                    deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
                    final = stream.get_final_response()
            self.assertTrue(response.output_text)
            self.assertEqual(response.status, "completed")
            self.assertEqual("".join(deltas), final.output_text)
            assert final.usage is not None
            self.assertGreater(final.usage.output_tokens, 0)

        return self.in_thread(call)

    def test_embeddings(self) -> Deferred[None]:
        def call() -> None:
            with self.client() as c:
                result = c.embeddings.create(model=EMBEDDING_MODEL, input=["hello", "world"])
            self.assertEqual(len(result.data), 2)
            self.assertGreater(len(result.data[0].embedding), 0)
            self.assertGreater(result.usage.prompt_tokens, 0)

        return self.in_thread(call)

    def test_models(self) -> Deferred[None]:
        def call() -> None:
            with self.client() as c:
                names = [model.id for model in c.models.list()]
            self.assertTrue(names)

        return self.in_thread(call)

    def test_errors(self) -> Deferred[None]:
        """
        The API's own errors reach the SDK as its own classes.  The
        C{x-fake-status} header only matters to the fake upstream
        (L{tests.live.support.against_fake}); the real API ignores it and
        rejects the empty message list itself.
        """

        def call() -> None:
            with (
                self.client(api_key="invalid-key-for-llmproxy-tests") as c,
                self.assertRaises(openai.AuthenticationError) as denied,
            ):
                c.models.list()
            self.assertEqual(denied.exception.status_code, 401)
            with self.client() as c, self.assertRaises(openai.BadRequestError) as bad:
                c.chat.completions.create(
                    model=MODEL, messages=[], extra_headers={"x-fake-status": "400"}
                )
            self.assertEqual(bad.exception.status_code, 400)
            self.assertTrue(bad.exception.message)

        return self.in_thread(call)
