"""
The SDK scenarios of the compatibility suites, each written once and run
twice: by L{tests.compat.test_fake_vs_sdks} against the fake upstream
directly, and by L{tests.compat.test_sdks_through_proxy} through the proxy.

A scenario is a test method of L{OpenAIScenarios}, L{AnthropicScenarios} or
L{GeminiScenarios}, mixed into a test case that provides C{fake} (the
L{FakeUpstream} that answers) and C{provider_url} (where a provider's API
is: the fake itself, or the proxy's mount for that provider).  The SDKs are
synchronous, so each scenario calls them in a worker thread
(L{_Scenarios.in_thread}) and checks what the fake received back in the
reactor thread.  Clients never retry, so 429 and 5xx answers come back at
once; knobs for the fake (C{x-fake-*}) are client headers, which the proxy
forwards like any other header.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import anthropic
import openai
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from llmproxy.testing.fake_upstream import (
    DEFAULT_CHUNKS,
    DEFAULT_INPUT_TOKENS,
    FakeUpstream,
    fake_text,
)

T = TypeVar("T")

SDK_TIMEOUT = 20.0
"""Seconds an SDK call may take: a hang fails the call instead of holding a thread."""

OPENAI_MODEL = "gpt-4o"
ANTHROPIC_MODEL = "claude-sonnet-4-5"
GEMINI_MODEL = "gemini-2.0-flash"
MESSAGES: Any = [{"role": "user", "content": "hi"}]

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


def error_knobs(status: int, message: str) -> dict[str, str]:
    """
    Headers that make the fake answer C{status} with C{message}.
    """
    return {"x-fake-status": str(status), "x-fake-error-message": message}


if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object


class _Scenarios(_Base):
    """
    What every scenario mixin needs from the test case it is mixed into.

    @ivar fake: the fake upstream that answers the SDK's requests.
    @ivar provider_url: the base URL of a provider's API (C{"openai"},
        C{"anthropic"} or C{"gemini"}), without the API version.
    """

    timeout = 60
    fake: FakeUpstream
    provider_url: Callable[[str], str]

    def in_thread(self, function: Callable[[], T]) -> Deferred[T]:
        """
        Run C{function}, which calls a (synchronous) SDK, in a worker thread.
        """
        result: Deferred[T] = deferToThread(function)
        return result


class OpenAIScenarios(_Scenarios):
    """
    The C{openai} SDK: chat completions (JSON, streams, tool calls), legacy
    completions, responses, embeddings, models and errors.
    """

    def client(self, api_key: str = "sk-test", **headers: str) -> openai.OpenAI:
        return openai.OpenAI(
            api_key=api_key,
            base_url=self.provider_url("openai") + "/v1",
            max_retries=0,
            timeout=SDK_TIMEOUT,
            default_headers=headers or None,
        )

    def test_chat_json(self) -> Deferred[None]:
        def call() -> None:
            with self.client(**{"x-fake-cached-tokens": "4", "x-fake-reasoning-tokens": "2"}) as c:
                completion = c.chat.completions.create(model=OPENAI_MODEL, messages=MESSAGES)
            self.assertEqual(completion.choices[0].message.content, fake_text())
            self.assertEqual(completion.choices[0].finish_reason, "stop")
            self.assertEqual(completion.model, OPENAI_MODEL)
            usage = completion.usage
            assert usage is not None
            self.assertEqual(usage.prompt_tokens, DEFAULT_INPUT_TOKENS)
            self.assertEqual(usage.completion_tokens, DEFAULT_CHUNKS + 2)
            assert usage.prompt_tokens_details is not None
            self.assertEqual(usage.prompt_tokens_details.cached_tokens, 4)
            assert usage.completion_tokens_details is not None
            self.assertEqual(usage.completion_tokens_details.reasoning_tokens, 2)
            self.assertTrue(completion._request_id)

        def check(ignored: None) -> None:
            [received] = self.fake.received
            self.assertEqual(received.path, b"/v1/chat/completions")
            self.assertEqual(received.header("authorization"), b"Bearer sk-test")

        return self.in_thread(call).addCallback(check)

    def test_chat_stream_without_usage(self) -> Deferred[None]:
        """
        A stream asked for without C{stream_options.include_usage}: every
        chunk has a choice, none carries usage, and the text is whole.
        """

        def call() -> None:
            with self.client(**{"x-fake-chunks": "5"}) as c:
                chunks = list(
                    c.chat.completions.create(model=OPENAI_MODEL, messages=MESSAGES, stream=True)
                )
            self.assertEqual(chunks[0].choices[0].delta.role, "assistant")
            self.assertTrue(all(chunk.choices for chunk in chunks), chunks[-1])
            self.assertTrue(all(chunk.usage is None for chunk in chunks))
            text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
            self.assertEqual(text, fake_text(5))
            self.assertEqual(chunks[-1].choices[0].finish_reason, "stop")

        return self.in_thread(call)

    def test_chat_stream_with_usage(self) -> Deferred[None]:
        def call() -> None:
            with self.client() as c:
                chunks = list(
                    c.chat.completions.create(
                        model=OPENAI_MODEL,
                        messages=MESSAGES,
                        stream=True,
                        stream_options={"include_usage": True},
                    )
                )
            last = chunks[-1]
            self.assertEqual(last.choices, [])
            assert last.usage is not None
            self.assertEqual(last.usage.prompt_tokens, DEFAULT_INPUT_TOKENS)
            self.assertEqual(last.usage.completion_tokens, DEFAULT_CHUNKS)
            self.assertEqual(last.usage.total_tokens, DEFAULT_INPUT_TOKENS + DEFAULT_CHUNKS)
            self.assertTrue(all(chunk.usage is None for chunk in chunks[:-1]))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            self.assertEqual(text, fake_text())

        return self.in_thread(call)

    def test_chat_tool_calls_json_and_stream_helper(self) -> Deferred[None]:
        """
        A tool call parses in a plain answer and through the SDK's streaming
        accumulator (with and without usage), which also parses strict tool
        arguments.
        """
        tool: Any = {
            "type": "function",
            "function": {"name": "weather", "parameters": STRICT_WEATHER_SCHEMA, "strict": True},
        }
        messages: Any = [{"role": "user", "content": "weather?"}]

        def call() -> None:
            with self.client() as c:
                plain = c.chat.completions.create(
                    model=OPENAI_MODEL, messages=messages, tools=[tool]
                )
                with c.chat.completions.stream(
                    model=OPENAI_MODEL, messages=messages, tools=[tool]
                ) as stream:
                    final = stream.get_final_completion()
                with c.chat.completions.stream(
                    model=OPENAI_MODEL,
                    messages=messages,
                    tools=[tool],
                    stream_options={"include_usage": True},
                ) as stream:
                    counted = stream.get_final_completion()
            [plain_call] = plain.choices[0].message.tool_calls or []
            assert plain_call.type == "function"
            self.assertEqual(plain_call.function.name, "weather")
            self.assertEqual(json.loads(plain_call.function.arguments), WEATHER_ARGUMENTS)
            self.assertEqual(plain.choices[0].finish_reason, "tool_calls")
            for streamed in (final, counted):
                [streamed_call] = streamed.choices[0].message.tool_calls or []
                self.assertEqual(streamed_call.function.parsed_arguments, WEATHER_ARGUMENTS)
                self.assertEqual(streamed.choices[0].finish_reason, "tool_calls")
            assert counted.usage is not None
            self.assertEqual(counted.usage.prompt_tokens, DEFAULT_INPUT_TOKENS)

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
                response = c.responses.create(model=OPENAI_MODEL, input="hi")
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
                events = list(c.responses.create(model=OPENAI_MODEL, input="hi", stream=True))
                with c.responses.stream(model=OPENAI_MODEL, input="hi") as stream:
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
                plain = c.responses.create(model=OPENAI_MODEL, input="weather?", tools=[tool])
                with c.responses.stream(model=OPENAI_MODEL, input="weather?", tools=[tool]) as s:
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
            self.assertEqual(len(default.data), 2)
            self.assertEqual(len(floats.data), 2)
            self.assertEqual(
                [d.embedding for d in default.data], [d.embedding for d in floats.data]
            )
            self.assertEqual(default.usage.prompt_tokens, DEFAULT_INPUT_TOKENS)

        def check(ignored: None) -> None:
            sent = [request.json().get("encoding_format") for request in self.fake.received]
            self.assertEqual(sent, ["base64", "float"])

        return self.in_thread(call).addCallback(check)

    def test_models(self) -> Deferred[None]:
        def call() -> None:
            with self.client() as c:
                names = [model.id for model in c.models.list()]
                one = c.models.retrieve(OPENAI_MODEL)
                with self.assertRaises(openai.NotFoundError):
                    c.models.retrieve("no-such-model")
            self.assertIn(OPENAI_MODEL, names)
            self.assertEqual(one.id, OPENAI_MODEL)

        return self.in_thread(call)

    def test_error_statuses(self) -> Deferred[None]:
        """
        Each error status raises the SDK's own class with the message and a
        request id; none of them is marked as made by the proxy (through
        the proxy, they are the upstream's).  A wrong key is OpenAI's
        C{invalid_api_key}.
        """
        classes: dict[int, type[openai.APIStatusError]] = {
            400: openai.BadRequestError,
            401: openai.AuthenticationError,
            429: openai.RateLimitError,
            500: openai.InternalServerError,
        }

        def call() -> None:
            for status, message in ERROR_CASES:
                with (
                    self.client(**error_knobs(status, message)) as c,
                    self.assertRaises(classes[status]) as caught,
                ):
                    c.chat.completions.create(model=OPENAI_MODEL, messages=MESSAGES)
                self.assertEqual(caught.exception.status_code, status)
                self.assertIn(message, caught.exception.message)
                self.assertTrue(caught.exception.request_id)
                self.assertNotIn("x-llm-proxy-error-source", caught.exception.response.headers)
            with (
                self.client(api_key="invalid-key") as c,
                self.assertRaises(openai.AuthenticationError) as denied,
            ):
                c.models.list()
            body: Any = denied.exception.body
            self.assertEqual(body["code"], "invalid_api_key")

        return self.in_thread(call)

    def test_error_mid_stream(self) -> Deferred[None]:
        def call() -> None:
            with self.client(**{"x-fake-error-after": "2"}) as c:
                stream = c.chat.completions.create(
                    model=OPENAI_MODEL, messages=MESSAGES, stream=True
                )
                with self.assertRaises(openai.APIError) as caught:
                    list(stream)
            self.assertIn("error", caught.exception.message)

        return self.in_thread(call)


class AnthropicScenarios(_Scenarios):
    """
    The C{anthropic} SDK: messages (JSON, raw stream, stream helper, tool
    use), beta headers, token counting, models and errors.
    """

    def client(self, api_key: str = "sk-ant-test", **headers: str) -> anthropic.Anthropic:
        return anthropic.Anthropic(
            api_key=api_key,
            base_url=self.provider_url("anthropic"),
            max_retries=0,
            timeout=SDK_TIMEOUT,
            default_headers=headers or None,
        )

    def test_messages_json(self) -> Deferred[None]:
        def call() -> None:
            with self.client(**{"x-fake-cached-tokens": "30"}) as c:
                message = c.messages.create(
                    model=ANTHROPIC_MODEL, max_tokens=100, messages=MESSAGES
                )
            [block] = message.content
            assert block.type == "text"
            self.assertEqual(block.text, fake_text())
            self.assertEqual(message.stop_reason, "end_turn")
            self.assertEqual(message.usage.input_tokens, DEFAULT_INPUT_TOKENS)
            self.assertEqual(message.usage.cache_read_input_tokens, 30)
            self.assertEqual(message.usage.output_tokens, DEFAULT_CHUNKS)
            self.assertTrue(message._request_id)

        def check(ignored: None) -> None:
            [received] = self.fake.received
            self.assertEqual(received.path, b"/v1/messages")
            self.assertTrue(received.header("anthropic-version"))

        return self.in_thread(call).addCallback(check)

    def test_messages_raw_stream(self) -> Deferred[None]:
        def call() -> None:
            with self.client() as c:
                events = list(
                    c.messages.create(
                        model=ANTHROPIC_MODEL, max_tokens=100, messages=MESSAGES, stream=True
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
                    model=ANTHROPIC_MODEL, max_tokens=100, messages=MESSAGES
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
                    model=ANTHROPIC_MODEL, max_tokens=100, messages=MESSAGES, tools=tools
                )
                with c.messages.stream(
                    model=ANTHROPIC_MODEL, max_tokens=100, messages=MESSAGES, tools=tools
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
        def call() -> None:
            with self.client() as c:
                message = c.beta.messages.create(
                    model=ANTHROPIC_MODEL,
                    max_tokens=100,
                    messages=MESSAGES,
                    betas=["fake-feature-2025-01-01"],
                )
                count = c.messages.count_tokens(model=ANTHROPIC_MODEL, messages=MESSAGES)
            self.assertEqual(message.content[0].type, "text")
            self.assertEqual(count.input_tokens, DEFAULT_INPUT_TOKENS)

        def check(ignored: None) -> None:
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
                one = c.models.retrieve(ANTHROPIC_MODEL)
            self.assertIn(ANTHROPIC_MODEL, names)
            self.assertEqual(one.id, ANTHROPIC_MODEL)

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
                with (
                    self.client(**error_knobs(status, message)) as c,
                    self.assertRaises(classes[status]) as caught,
                ):
                    c.messages.create(model=ANTHROPIC_MODEL, max_tokens=10, messages=MESSAGES)
                self.assertEqual(caught.exception.status_code, status)
                self.assertIn(message, caught.exception.message)
                self.assertTrue(caught.exception.request_id)
            with (
                self.client(api_key="invalid") as c,
                self.assertRaises(anthropic.AuthenticationError),
            ):
                c.messages.create(model=ANTHROPIC_MODEL, max_tokens=10, messages=MESSAGES)

        return self.in_thread(call)

    def test_error_mid_stream(self) -> Deferred[None]:
        def call() -> None:
            with self.client(**{"x-fake-error-after": "3"}) as c:
                stream = c.messages.create(
                    model=ANTHROPIC_MODEL, max_tokens=10, messages=MESSAGES, stream=True
                )
                with self.assertRaises(anthropic.APIStatusError) as caught:
                    list(stream)
            self.assertIn("Overloaded", caught.exception.message)

        return self.in_thread(call)


class GeminiScenarios(_Scenarios):
    """
    The C{google-genai} SDK (API version C{v1beta}): generateContent (JSON,
    SSE, function calls), token counting, embeddings, models and errors.
    """

    def client(self, api_key: str = "AIza-test", **headers: str) -> genai.Client:
        return genai.Client(
            api_key=api_key,
            http_options=genai_types.HttpOptions(
                base_url=self.provider_url("gemini"),
                api_version="v1beta",
                headers=headers or None,
                retry_options=None,
                timeout=int(SDK_TIMEOUT * 1000),
            ),
        )

    def test_generate_content(self) -> Deferred[None]:
        def call() -> None:
            headers = {"x-fake-reasoning-tokens": "6", "x-fake-cached-tokens": "4"}
            with self.client(**headers) as c:
                response = c.models.generate_content(model=GEMINI_MODEL, contents="hi")
            self.assertEqual(response.text, fake_text())
            self.assertEqual(response.model_version, GEMINI_MODEL)
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
            [received] = self.fake.received
            self.assertEqual(received.header("x-goog-api-key"), b"AIza-test")
            self.assertEqual(
                received.path, f"/v1beta/models/{GEMINI_MODEL}:generateContent".encode()
            )

        return self.in_thread(call).addCallback(check)

    def test_generate_content_stream(self) -> Deferred[None]:
        def call() -> None:
            with self.client(**{"x-fake-chunks": "4"}) as c:
                chunks = list(c.models.generate_content_stream(model=GEMINI_MODEL, contents="hi"))
            self.assertEqual(len(chunks), 4)
            self.assertEqual("".join(chunk.text or "" for chunk in chunks), fake_text(4))
            usage = chunks[-1].usage_metadata
            assert usage is not None
            self.assertEqual(usage.candidates_token_count, 4)
            self.assertEqual(usage.total_token_count, DEFAULT_INPUT_TOKENS + 4)

        def check(ignored: None) -> None:
            [received] = self.fake.received
            self.assertEqual(received.query, b"alt=sse")
            self.assertEqual(received.header("x-goog-api-key"), b"AIza-test")

        return self.in_thread(call).addCallback(check)

    def test_function_call(self) -> Deferred[None]:
        declaration = genai_types.FunctionDeclaration(
            name="weather", parameters_json_schema=STRICT_WEATHER_SCHEMA
        )
        config = genai_types.GenerateContentConfig(
            tools=[genai_types.Tool(function_declarations=[declaration])]
        )

        def call() -> None:
            with self.client() as c:
                response = c.models.generate_content(
                    model=GEMINI_MODEL, contents="hi", config=config
                )
            [function_call] = response.function_calls or []
            self.assertEqual(function_call.name, "weather")
            self.assertEqual(function_call.args, WEATHER_ARGUMENTS)

        return self.in_thread(call)

    def test_count_tokens_embed_and_models(self) -> Deferred[None]:
        def call() -> None:
            with self.client() as c:
                count = c.models.count_tokens(model=GEMINI_MODEL, contents="hi")
                embedded = c.models.embed_content(model="gemini-embedding-001", contents=["a", "b"])
                names = [model.name for model in c.models.list()]
                one = c.models.get(model=GEMINI_MODEL)
            self.assertEqual(count.total_tokens, DEFAULT_INPUT_TOKENS)
            self.assertEqual(len(embedded.embeddings or []), 2)
            self.assertIn(f"models/{GEMINI_MODEL}", names)
            self.assertEqual(one.name, f"models/{GEMINI_MODEL}")

        return self.in_thread(call)

    def test_error_statuses(self) -> Deferred[None]:
        """
        Each error status raises the SDK's client or server error with the
        code and message, for JSON and for SSE; a wrong key is Gemini's 400
        C{INVALID_ARGUMENT}.
        """

        def call() -> None:
            for status, message in ERROR_CASES:
                expected = genai_errors.ServerError if status >= 500 else genai_errors.ClientError
                with self.client(**error_knobs(status, message)) as c:
                    with self.assertRaises(expected) as caught:
                        c.models.generate_content(model=GEMINI_MODEL, contents="hi")
                    self.assertEqual(caught.exception.code, status)
                    self.assertEqual(caught.exception.message, message)
                    with self.assertRaises(expected) as caught:
                        list(c.models.generate_content_stream(model=GEMINI_MODEL, contents="hi"))
                    self.assertEqual(caught.exception.code, status)
            with (
                self.client(api_key="invalid-key") as c,
                self.assertRaises(genai_errors.ClientError) as caught,
            ):
                c.models.generate_content(model=GEMINI_MODEL, contents="hi")
            self.assertEqual(caught.exception.code, 400)
            self.assertEqual(caught.exception.status, "INVALID_ARGUMENT")

        return self.in_thread(call)
