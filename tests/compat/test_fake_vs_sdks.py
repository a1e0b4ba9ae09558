"""
The official SDKs (C{openai}, C{anthropic}, C{google-genai}) pointed
directly at the fake upstream: every shape the fake produces must parse, and
every error status must raise the SDK's own exception with the message.

A failure here is a bug in the fake (or a change in an SDK), never in the
proxy: the proxy is not involved.  The fake runs in the reactor on loopback;
each SDK call runs in a worker thread (the SDKs are synchronous), so a test
is C{deferToThread(a function that calls the SDK and asserts)}.  Clients are
closed in the thread and use C{max_retries=0} (or no retry options), so
429/500 answers come back at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import anthropic
import openai
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from llmproxy.testing.fake_upstream import (
    DEFAULT_CHUNKS,
    DEFAULT_INPUT_TOKENS,
    FakeUpstream,
    fake_text,
    listen,
)

T = TypeVar("T")

STRICT_WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer"},
        "unit": {"type": "string", "enum": ["c", "f"]},
    },
    "required": ["city", "days", "unit"],
    "additionalProperties": False,
}
WEATHER_ARGUMENTS = {"city": "fake", "days": 1, "unit": "c"}
ERROR_CASES = ((400, "bad input"), (401, "who are you"), (429, "slow down"), (500, "it broke"))


def _real_reactor() -> Any:
    """
    The global reactor, imported once trial has installed it.
    """
    from twisted.internet import reactor

    return reactor


class _SDKTestCase(TestCase):
    """
    A fake upstream listening on loopback for the test's SDK clients.
    """

    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        reactor = _real_reactor()
        self.fake = FakeUpstream(reactor)
        port = yield listen(self.fake, reactor)
        self.addCleanup(port.stopListening)
        self.base_url = f"http://127.0.0.1:{port.getHost().port}"

    def in_thread(self, function: Callable[[], T]) -> Deferred[T]:
        result: Deferred[T] = deferToThread(function)
        return result


class OpenAITests(_SDKTestCase):
    def client(self, **headers: str) -> openai.OpenAI:
        return openai.OpenAI(
            api_key="sk-test",
            base_url=f"{self.base_url}/v1",
            max_retries=0,
            default_headers=headers or None,
        )

    def test_chat_json(self) -> Deferred[None]:
        def call() -> None:
            with self.client(**{"x-fake-cached-tokens": "4", "x-fake-reasoning-tokens": "2"}) as c:
                completion = c.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
                )
            self.assertEqual(completion.choices[0].message.content, fake_text())
            self.assertEqual(completion.choices[0].finish_reason, "stop")
            self.assertEqual(completion.model, "gpt-4o")
            usage = completion.usage
            assert usage is not None
            self.assertEqual(usage.prompt_tokens, DEFAULT_INPUT_TOKENS)
            self.assertEqual(usage.completion_tokens, DEFAULT_CHUNKS + 2)
            assert usage.prompt_tokens_details is not None
            self.assertEqual(usage.prompt_tokens_details.cached_tokens, 4)
            assert usage.completion_tokens_details is not None
            self.assertEqual(usage.completion_tokens_details.reasoning_tokens, 2)
            self.assertTrue(completion._request_id)

        return self.in_thread(call)

    def test_chat_stream_without_usage(self) -> Deferred[None]:
        def call() -> None:
            with self.client() as c:
                chunks = list(
                    c.chat.completions.create(
                        model="gpt-4o",
                        messages=[{"role": "user", "content": "hi"}],
                        stream=True,
                    )
                )
            self.assertEqual(chunks[0].choices[0].delta.role, "assistant")
            text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
            self.assertEqual(text, fake_text())
            self.assertEqual(chunks[-1].choices[0].finish_reason, "stop")
            self.assertTrue(all(chunk.usage is None for chunk in chunks))

        return self.in_thread(call)

    def test_chat_stream_with_usage(self) -> Deferred[None]:
        def call() -> None:
            with self.client() as c:
                chunks = list(
                    c.chat.completions.create(
                        model="gpt-4o",
                        messages=[{"role": "user", "content": "hi"}],
                        stream=True,
                        stream_options={"include_usage": True},
                    )
                )
            last = chunks[-1]
            self.assertEqual(last.choices, [])
            assert last.usage is not None
            self.assertEqual(last.usage.completion_tokens, DEFAULT_CHUNKS)
            self.assertEqual(last.usage.total_tokens, DEFAULT_INPUT_TOKENS + DEFAULT_CHUNKS)
            self.assertTrue(all(chunk.usage is None for chunk in chunks[:-1]))

        return self.in_thread(call)

    def test_chat_tool_calls_json_and_stream_helper(self) -> Deferred[None]:
        """
        A tool call parses in a plain answer and through the SDK's streaming
        accumulator, which also parses strict tool arguments.
        """
        tool: Any = {
            "type": "function",
            "function": {"name": "weather", "parameters": STRICT_WEATHER_SCHEMA, "strict": True},
        }
        messages: Any = [{"role": "user", "content": "weather?"}]

        def call() -> None:
            with self.client() as c:
                plain = c.chat.completions.create(model="gpt-4o", messages=messages, tools=[tool])
                with c.chat.completions.stream(
                    model="gpt-4o",
                    messages=messages,
                    tools=[tool],
                    stream_options={"include_usage": True},
                ) as stream:
                    final = stream.get_final_completion()
            [plain_call] = plain.choices[0].message.tool_calls or []
            assert plain_call.type == "function"
            self.assertEqual(plain_call.function.name, "weather")
            self.assertEqual(json.loads(plain_call.function.arguments), WEATHER_ARGUMENTS)
            self.assertEqual(plain.choices[0].finish_reason, "tool_calls")
            [streamed_call] = final.choices[0].message.tool_calls or []
            self.assertEqual(streamed_call.function.parsed_arguments, WEATHER_ARGUMENTS)
            self.assertEqual(final.choices[0].finish_reason, "tool_calls")
            assert final.usage is not None
            self.assertEqual(final.usage.prompt_tokens, DEFAULT_INPUT_TOKENS)

        return self.in_thread(call)

    def test_completions(self) -> Deferred[None]:
        def call() -> None:
            with self.client() as c:
                plain = c.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi")
                chunks = list(
                    c.completions.create(
                        model="gpt-3.5-turbo-instruct",
                        prompt="hi",
                        stream=True,
                        stream_options={"include_usage": True},
                    )
                )
            self.assertEqual(plain.choices[0].text, fake_text())
            assert plain.usage is not None
            self.assertEqual(plain.usage.completion_tokens, DEFAULT_CHUNKS)
            self.assertEqual("".join(c.choices[0].text for c in chunks if c.choices), fake_text())
            assert chunks[-1].usage is not None
            self.assertEqual(chunks[-1].usage.prompt_tokens, DEFAULT_INPUT_TOKENS)

        return self.in_thread(call)

    def test_responses_json(self) -> Deferred[None]:
        def call() -> None:
            with self.client(**{"x-fake-reasoning-tokens": "3"}) as c:
                response = c.responses.create(model="gpt-4o", input="hi")
            self.assertEqual(response.output_text, fake_text())
            self.assertEqual(response.status, "completed")
            usage = response.usage
            assert usage is not None
            self.assertEqual(usage.input_tokens, DEFAULT_INPUT_TOKENS)
            self.assertEqual(usage.output_tokens, DEFAULT_CHUNKS + 3)
            self.assertEqual(usage.output_tokens_details.reasoning_tokens, 3)

        return self.in_thread(call)

    def test_responses_stream(self) -> Deferred[None]:
        """
        The raw typed events parse, and the SDK's accumulating stream helper
        rebuilds the final response from them.
        """

        def call() -> None:
            with self.client() as c:
                events = list(c.responses.create(model="gpt-4o", input="hi", stream=True))
                with c.responses.stream(model="gpt-4o", input="hi") as stream:
                    deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
                    final = stream.get_final_response()
            self.assertEqual(events[0].type, "response.created")
            self.assertEqual(events[-1].type, "response.completed")
            self.assertEqual([e.sequence_number for e in events], list(range(len(events))))
            self.assertEqual("".join(deltas), fake_text())
            self.assertEqual(final.output_text, fake_text())
            assert final.usage is not None
            self.assertEqual(final.usage.total_tokens, DEFAULT_INPUT_TOKENS + DEFAULT_CHUNKS)

        return self.in_thread(call)

    def test_responses_function_call(self) -> Deferred[None]:
        tool: Any = {
            "type": "function",
            "name": "weather",
            "parameters": STRICT_WEATHER_SCHEMA,
            "strict": True,
        }

        def call() -> None:
            with self.client() as c:
                plain = c.responses.create(model="gpt-4o", input="weather?", tools=[tool])
                with c.responses.stream(model="gpt-4o", input="weather?", tools=[tool]) as s:
                    final = s.get_final_response()
            for response in (plain, final):
                [item] = response.output
                assert item.type == "function_call"
                self.assertEqual(item.name, "weather")
                self.assertEqual(json.loads(item.arguments), WEATHER_ARGUMENTS)

        return self.in_thread(call)

    def test_embeddings(self) -> Deferred[None]:
        """
        The SDK asks for base64 when no format is given and decodes it; an
        explicit float request gets the same numbers.
        """

        def call() -> None:
            with self.client() as c:
                default = c.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
                floats = c.embeddings.create(
                    model="text-embedding-3-small", input=["a", "b"], encoding_format="float"
                )
            self.assertEqual(
                [d.embedding for d in default.data], [d.embedding for d in floats.data]
            )
            self.assertEqual(len(floats.data), 2)
            self.assertEqual(default.usage.prompt_tokens, DEFAULT_INPUT_TOKENS)

        def check(ignored: None) -> None:
            sent = [request.json().get("encoding_format") for request in self.fake.received]
            self.assertEqual(sent, ["base64", "float"])

        return self.in_thread(call).addCallback(check)

    def test_models(self) -> Deferred[None]:
        def call() -> None:
            with self.client() as c:
                names = [model.id for model in c.models.list()]
                one = c.models.retrieve("gpt-4o")
                with self.assertRaises(openai.NotFoundError):
                    c.models.retrieve("no-such-model")
            self.assertIn("gpt-4o", names)
            self.assertEqual(one.id, "gpt-4o")

        return self.in_thread(call)

    def test_error_statuses(self) -> Deferred[None]:
        classes: dict[int, type[openai.APIStatusError]] = {
            400: openai.BadRequestError,
            401: openai.AuthenticationError,
            429: openai.RateLimitError,
            500: openai.InternalServerError,
        }

        def call() -> None:
            for status, message in ERROR_CASES:
                headers = {"x-fake-status": str(status), "x-fake-error-message": message}
                with self.client(**headers) as c, self.assertRaises(classes[status]) as caught:
                    c.chat.completions.create(
                        model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
                    )
                self.assertEqual(caught.exception.status_code, status)
                self.assertIn(message, caught.exception.message)
                self.assertTrue(caught.exception.request_id)
            with (
                openai.OpenAI(
                    api_key="invalid-key", base_url=f"{self.base_url}/v1", max_retries=0
                ) as c,
                self.assertRaises(openai.AuthenticationError) as caught,
            ):
                c.models.list()
            body: Any = caught.exception.body
            self.assertEqual(body["code"], "invalid_api_key")

        return self.in_thread(call)

    def test_error_mid_stream(self) -> Deferred[None]:
        def call() -> None:
            with self.client(**{"x-fake-error-after": "2"}) as c:
                stream = c.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True
                )
                with self.assertRaises(openai.APIError) as caught:
                    list(stream)
            self.assertIn("error", caught.exception.message)

        return self.in_thread(call)


class AnthropicTests(_SDKTestCase):
    MESSAGES: Any = [{"role": "user", "content": "hi"}]

    def client(self, **headers: str) -> anthropic.Anthropic:
        return anthropic.Anthropic(
            api_key="sk-ant-test",
            base_url=self.base_url,
            max_retries=0,
            default_headers=headers or None,
        )

    def test_messages_json(self) -> Deferred[None]:
        def call() -> None:
            with self.client(**{"x-fake-cached-tokens": "30"}) as c:
                message = c.messages.create(
                    model="claude-sonnet-4-5", max_tokens=100, messages=self.MESSAGES
                )
            [block] = message.content
            assert block.type == "text"
            self.assertEqual(block.text, fake_text())
            self.assertEqual(message.stop_reason, "end_turn")
            self.assertEqual(message.usage.input_tokens, DEFAULT_INPUT_TOKENS)
            self.assertEqual(message.usage.cache_read_input_tokens, 30)
            self.assertEqual(message.usage.output_tokens, DEFAULT_CHUNKS)
            self.assertTrue(message._request_id)

        return self.in_thread(call)

    def test_messages_raw_stream(self) -> Deferred[None]:
        def call() -> None:
            with self.client() as c:
                events = list(
                    c.messages.create(
                        model="claude-sonnet-4-5",
                        max_tokens=100,
                        messages=self.MESSAGES,
                        stream=True,
                    )
                )
            kinds = [event.type for event in events]
            self.assertEqual(kinds[0], "message_start")
            self.assertEqual(kinds[-2:], ["message_delta", "message_stop"])
            self.assertNotIn("ping", kinds, "the SDK drops pings")

        return self.in_thread(call)

    def test_messages_stream_final_message(self) -> Deferred[None]:
        """
        The SDK's stream helper accumulates text and takes the cumulative
        usage of C{message_delta} over C{message_start}'s.
        """

        def call() -> None:
            headers = {
                "x-fake-chunks": "5",
                "x-fake-cache-write-tokens": "20",
                "x-fake-reasoning-tokens": "4",
            }
            with (
                self.client(**headers) as c,
                c.messages.stream(
                    model="claude-sonnet-4-5", max_tokens=100, messages=self.MESSAGES
                ) as stream,
            ):
                text = "".join(stream.text_stream)
                final = stream.get_final_message()
            self.assertEqual(text, fake_text(5))
            self.assertEqual(final.stop_reason, "end_turn")
            self.assertEqual(final.usage.input_tokens, DEFAULT_INPUT_TOKENS)
            self.assertEqual(final.usage.output_tokens, 5 + 4)
            self.assertEqual(final.usage.cache_creation_input_tokens, 20)
            assert final.usage.output_tokens_details is not None
            self.assertEqual(final.usage.output_tokens_details.thinking_tokens, 4)

        return self.in_thread(call)

    def test_tool_use(self) -> Deferred[None]:
        tools: Any = [{"name": "weather", "input_schema": STRICT_WEATHER_SCHEMA}]

        def call() -> None:
            with self.client() as c:
                plain = c.messages.create(
                    model="claude-sonnet-4-5", max_tokens=100, messages=self.MESSAGES, tools=tools
                )
                with c.messages.stream(
                    model="claude-sonnet-4-5", max_tokens=100, messages=self.MESSAGES, tools=tools
                ) as stream:
                    final = stream.get_final_message()
            for message in (plain, final):
                self.assertEqual(message.stop_reason, "tool_use")
                [block] = message.content
                assert block.type == "tool_use"
                self.assertEqual(block.name, "weather")
                self.assertEqual(block.input, WEATHER_ARGUMENTS)

        return self.in_thread(call)

    def test_beta_header_and_count_tokens(self) -> Deferred[None]:
        def call() -> int:
            with self.client() as c:
                message = c.beta.messages.create(
                    model="claude-sonnet-4-5",
                    max_tokens=100,
                    messages=self.MESSAGES,
                    betas=["fake-feature-2025-01-01"],
                )
                count = c.messages.count_tokens(model="claude-sonnet-4-5", messages=self.MESSAGES)
            self.assertEqual(message.content[0].type, "text")
            return count.input_tokens

        def check(tokens: int) -> None:
            self.assertEqual(tokens, DEFAULT_INPUT_TOKENS)
            beta, counted = self.fake.received
            self.assertEqual(beta.header("anthropic-beta"), b"fake-feature-2025-01-01")
            # anthropic 2.x sends the API key as a bearer token, not x-api-key.
            self.assertEqual(beta.header("authorization"), b"Bearer sk-ant-test")
            self.assertTrue(beta.header("anthropic-version"))
            self.assertTrue(counted.path.endswith(b"/v1/messages/count_tokens"))

        return self.in_thread(call).addCallback(check)

    def test_models(self) -> Deferred[None]:
        def call() -> None:
            with self.client() as c:
                names = [model.id for model in c.models.list()]
                one = c.models.retrieve("claude-sonnet-4-5")
            self.assertIn("claude-sonnet-4-5", names)
            self.assertEqual(one.id, "claude-sonnet-4-5")

        return self.in_thread(call)

    def test_error_statuses(self) -> Deferred[None]:
        classes: dict[int, type[anthropic.APIStatusError]] = {
            400: anthropic.BadRequestError,
            401: anthropic.AuthenticationError,
            429: anthropic.RateLimitError,
            500: anthropic.InternalServerError,
            529: anthropic.OverloadedError,
        }

        def call() -> None:
            for status, message in (*ERROR_CASES, (529, "overloaded")):
                headers = {"x-fake-status": str(status), "x-fake-error-message": message}
                with self.client(**headers) as c, self.assertRaises(classes[status]) as caught:
                    c.messages.create(
                        model="claude-sonnet-4-5", max_tokens=10, messages=self.MESSAGES
                    )
                self.assertEqual(caught.exception.status_code, status)
                self.assertIn(message, caught.exception.message)
                self.assertTrue(caught.exception.request_id)
            with (
                anthropic.Anthropic(api_key="invalid", base_url=self.base_url, max_retries=0) as c,
                self.assertRaises(anthropic.AuthenticationError),
            ):
                c.messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=self.MESSAGES)

        return self.in_thread(call)

    def test_error_mid_stream(self) -> Deferred[None]:
        def call() -> None:
            with self.client(**{"x-fake-error-after": "3"}) as c:
                stream = c.messages.create(
                    model="claude-sonnet-4-5",
                    max_tokens=10,
                    messages=self.MESSAGES,
                    stream=True,
                )
                with self.assertRaises(anthropic.APIStatusError) as caught:
                    list(stream)
            self.assertIn("Overloaded", caught.exception.message)

        return self.in_thread(call)


class GeminiTests(_SDKTestCase):
    CONTENTS = "hi"

    def client(self, api_key: str = "AIza-test", **headers: str) -> genai.Client:
        return genai.Client(
            api_key=api_key,
            http_options=genai_types.HttpOptions(
                base_url=self.base_url, api_version="v1beta", headers=headers or None
            ),
        )

    def test_generate_content(self) -> Deferred[None]:
        def call() -> None:
            headers = {"x-fake-reasoning-tokens": "6", "x-fake-cached-tokens": "4"}
            with self.client(**headers) as c:
                response = c.models.generate_content(
                    model="gemini-2.0-flash", contents=self.CONTENTS
                )
            self.assertEqual(response.text, fake_text())
            self.assertEqual(response.model_version, "gemini-2.0-flash")
            self.assertTrue(response.response_id)
            usage = response.usage_metadata
            assert usage is not None
            self.assertEqual(usage.prompt_token_count, DEFAULT_INPUT_TOKENS)
            self.assertEqual(usage.candidates_token_count, DEFAULT_CHUNKS)
            self.assertEqual(usage.thoughts_token_count, 6)
            self.assertEqual(usage.cached_content_token_count, 4)
            self.assertEqual(usage.total_token_count, DEFAULT_INPUT_TOKENS + DEFAULT_CHUNKS + 6)
            candidates = response.candidates or []
            self.assertEqual(candidates[0].finish_reason, genai_types.FinishReason.STOP)

        def check(ignored: None) -> None:
            [request] = self.fake.received
            self.assertEqual(request.header("x-goog-api-key"), b"AIza-test")
            self.assertTrue(
                request.path.endswith(b"/v1beta/models/gemini-2.0-flash:generateContent")
            )

        return self.in_thread(call).addCallback(check)

    def test_generate_content_stream(self) -> Deferred[None]:
        def call() -> None:
            with self.client(**{"x-fake-chunks": "4"}) as c:
                chunks = list(
                    c.models.generate_content_stream(
                        model="gemini-2.0-flash", contents=self.CONTENTS
                    )
                )
            self.assertEqual(len(chunks), 4)
            self.assertEqual("".join(chunk.text or "" for chunk in chunks), fake_text(4))
            usage = chunks[-1].usage_metadata
            assert usage is not None
            self.assertEqual(usage.candidates_token_count, 4)
            self.assertEqual(usage.total_token_count, DEFAULT_INPUT_TOKENS + 4)

        def check(ignored: None) -> None:
            [request] = self.fake.received
            self.assertEqual(request.query, b"alt=sse")

        return self.in_thread(call).addCallback(check)

    def test_function_call(self) -> Deferred[None]:
        declaration = genai_types.FunctionDeclaration(
            name="weather",
            parameters_json_schema=STRICT_WEATHER_SCHEMA,
        )
        config = genai_types.GenerateContentConfig(
            tools=[genai_types.Tool(function_declarations=[declaration])]
        )

        def call() -> None:
            with self.client() as c:
                response = c.models.generate_content(
                    model="gemini-2.0-flash", contents=self.CONTENTS, config=config
                )
            [function_call] = response.function_calls or []
            self.assertEqual(function_call.name, "weather")
            self.assertEqual(function_call.args, WEATHER_ARGUMENTS)

        return self.in_thread(call)

    def test_count_tokens_embed_and_models(self) -> Deferred[None]:
        def call() -> None:
            with self.client() as c:
                count = c.models.count_tokens(model="gemini-2.0-flash", contents=self.CONTENTS)
                embedded = c.models.embed_content(model="gemini-embedding-001", contents=["a", "b"])
                names = [model.name for model in c.models.list()]
                one = c.models.get(model="gemini-2.0-flash")
            self.assertEqual(count.total_tokens, DEFAULT_INPUT_TOKENS)
            self.assertEqual(len(embedded.embeddings or []), 2)
            self.assertIn("models/gemini-2.0-flash", names)
            self.assertEqual(one.name, "models/gemini-2.0-flash")

        return self.in_thread(call)

    def test_error_statuses(self) -> Deferred[None]:
        def call() -> None:
            for status, message in ERROR_CASES:
                headers = {"x-fake-status": str(status), "x-fake-error-message": message}
                expected = genai_errors.ServerError if status >= 500 else genai_errors.ClientError
                with self.client(**headers) as c, self.assertRaises(expected) as caught:
                    c.models.generate_content(model="gemini-2.0-flash", contents=self.CONTENTS)
                self.assertEqual(caught.exception.code, status)
                self.assertEqual(caught.exception.message, message)
            with (
                self.client(api_key="invalid-key") as c,
                self.assertRaises(genai_errors.ClientError) as caught,
            ):
                c.models.generate_content(model="gemini-2.0-flash", contents=self.CONTENTS)
            self.assertEqual(caught.exception.code, 400)
            self.assertEqual(caught.exception.status, "INVALID_ARGUMENT")

        return self.in_thread(call)
