"""
The official SDKs raise their usual exceptions on the errors the proxy makes.

Each SDK talks to an in-memory transport that answers with
L{ProviderFormat.error_body} or streams that end in
L{ProviderFormat.sse_error_event}; nothing touches the network.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import anthropic
import httpx2
import openai
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.providers import format_for
from llmproxy.providers.openai import error_fields
from llmproxy.test.test_providers_anthropic import CONTENT, MESSAGE_START
from llmproxy.test.test_providers_anthropic import stream as anthropic_stream
from llmproxy.test.test_providers_gemini import SSE_CHUNKS
from llmproxy.test.test_providers_openai import CHAT_CHUNKS, sse

STATUSES = (400, 404, 413, 429, 500, 502, 503, 504)


def transport(status: int, body: bytes, content_type: str) -> httpx2.Client:
    """
    An HTTP client whose every request gets this answer.
    """

    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(status, content=body, headers={"content-type": content_type})

    return httpx2.Client(transport=httpx2.MockTransport(answer))


def raised(call: Callable[[], object]) -> BaseException:
    """
    The exception C{call} raised; fails the test if it raised none.
    """
    try:
        call()
    except Exception as error:
        return error
    raise AssertionError("no exception raised")


class OpenAISDKTests(SynchronousTestCase):
    """
    The C{openai} SDK.
    """

    classes: dict[int, type[openai.APIStatusError]] = {
        400: openai.BadRequestError,
        404: openai.NotFoundError,
        429: openai.RateLimitError,
        500: openai.InternalServerError,
        502: openai.InternalServerError,
        503: openai.InternalServerError,
        504: openai.InternalServerError,
    }

    def client(self, status: int, body: bytes, content_type: str) -> openai.OpenAI:
        return openai.OpenAI(
            api_key="sk-test",
            base_url="http://proxy.invalid/openai/v1",
            max_retries=0,
            http_client=transport(status, body, content_type),
        )

    def test_errorBody(self) -> None:
        fmt = format_for("openai")
        for status in STATUSES:
            client = self.client(status, fmt.error_body(status, "refused"), "application/json")
            error = raised(partial(client.chat.completions.create, model="m", messages=[]))
            self.assertIsInstance(error, self.classes.get(status, openai.APIStatusError))
            assert isinstance(error, openai.APIStatusError)
            self.assertEqual(error.status_code, status)
            self.assertEqual((error.type, error.code), error_fields(status))
            self.assertIn("refused", error.message)

    def test_streamError(self) -> None:
        """
        Chat Completions and Responses streams both raise C{APIError}
        with the message, after the chunks before it.
        """
        event = format_for("openai").sse_error_event(504, "upstream idle")
        client = self.client(200, sse(*CHAT_CHUNKS[:2]) + event, "text/event-stream")
        chunks: list[object] = []

        def consume() -> None:
            for chunk in client.chat.completions.create(model="m", messages=[], stream=True):
                chunks.append(chunk)

        error = raised(consume)
        self.assertIsInstance(error, openai.APIError)
        assert isinstance(error, openai.APIError)
        self.assertEqual((error.message, len(chunks)), ("upstream idle", 2))

        client = self.client(200, event, "text/event-stream")
        error = raised(lambda: list(client.responses.create(model="m", input="x", stream=True)))
        self.assertIsInstance(error, openai.APIError)


class AnthropicSDKTests(SynchronousTestCase):
    """
    The C{anthropic} SDK.
    """

    classes: dict[int, type[anthropic.APIStatusError]] = {
        400: anthropic.BadRequestError,
        404: anthropic.NotFoundError,
        413: anthropic.ContentTooLargeError,
        429: anthropic.RateLimitError,
        500: anthropic.InternalServerError,
        502: anthropic.InternalServerError,
        503: anthropic.ServiceUnavailableError,
        504: anthropic.GatewayTimeoutError,
    }

    def client(self, status: int, body: bytes, content_type: str) -> anthropic.Anthropic:
        return anthropic.Anthropic(
            api_key="test",
            base_url="http://proxy.invalid/anthropic",
            max_retries=0,
            http_client=transport(status, body, content_type),
        )

    def test_errorBody(self) -> None:
        fmt = format_for("anthropic")
        for status in STATUSES:
            client = self.client(status, fmt.error_body(status, "refused"), "application/json")
            error = raised(partial(client.messages.create, model="m", max_tokens=1, messages=[]))
            self.assertIs(type(error), self.classes[status])
            assert isinstance(error, anthropic.APIStatusError)
            self.assertEqual(error.status_code, status)
            self.assertIn("refused", str(error))

    def test_streamError(self) -> None:
        event = format_for("anthropic").sse_error_event(504, "upstream idle")
        body = anthropic_stream(MESSAGE_START, *CONTENT[:2]) + event
        client = self.client(200, body, "text/event-stream")
        events: list[object] = []

        def consume() -> None:
            for item in client.messages.create(model="m", max_tokens=1, messages=[], stream=True):
                events.append(item)

        error = raised(consume)
        self.assertIsInstance(error, anthropic.APIStatusError)
        self.assertIn("upstream idle", str(error))
        # message_start and content_block_start; the SDK drops the ping.
        self.assertEqual(len(events), 2)


class GeminiSDKTests(SynchronousTestCase):
    """
    The C{google-genai} SDK.
    """

    def client(self, status: int, body: bytes, content_type: str) -> genai.Client:
        options = genai_types.HttpOptions(
            base_url="http://proxy.invalid/gemini",
            httpx_client=transport(status, body, content_type),
        )
        return genai.Client(api_key="test", http_options=options)

    def test_errorBody(self) -> None:
        fmt = format_for("gemini")
        for status in STATUSES:
            client = self.client(status, fmt.error_body(status, "refused"), "application/json")
            error = raised(
                partial(client.models.generate_content, model="gemini-2.5-flash", contents="x")
            )
            expected = genai_errors.ClientError if status < 500 else genai_errors.ServerError
            self.assertIsInstance(error, expected)
            assert isinstance(error, genai_errors.APIError)
            self.assertEqual((error.code, error.message), (status, "refused"))

    def test_streamError(self) -> None:
        event = format_for("gemini").sse_error_event(504, "upstream idle")
        body = b"".join(b"data: " + chunk + b"\r\n\r\n" for chunk in SSE_CHUNKS[:2]) + event
        client = self.client(200, body, "text/event-stream")
        chunks: list[object] = []

        def consume() -> None:
            for chunk in client.models.generate_content_stream(model="m", contents="x"):
                chunks.append(chunk)

        error = raised(consume)
        self.assertIsInstance(error, genai_errors.ServerError)
        assert isinstance(error, genai_errors.APIError)
        self.assertEqual(
            (error.status, error.message, len(chunks)), ("DEADLINE_EXCEEDED", "upstream idle", 2)
        )
