"""
The cloud providers' official clients pointed directly at the fake upstream
(no proxy): C{openai.AzureOpenAI}, boto3's C{bedrock-runtime},
C{anthropic.AnthropicVertex} and google-genai in Vertex mode.  Every shape
the fake produces must parse, its errors must raise the client's own
exception, and its SigV4 check must accept exactly what boto3 signs with
the test credential.  A failure here is the fake's (or a client's change),
never the proxy's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import anthropic
import openai
from botocore.exceptions import ClientError, EventStreamError
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from llmproxy.testing.fake_upstream import (
    DEFAULT_CHUNKS,
    DEFAULT_INPUT_TOKENS,
    FakeUpstream,
    fake_text,
)
from tests.compat import cloud_clients
from tests.compat.cloud_clients import ANTHROPIC_BODY, BEDROCK_MODEL, CONVERSE_MESSAGES
from tests.e2e.harness import reactor, serve_fake

T = TypeVar("T")


class _SDKTestCase(TestCase):
    """
    A fake upstream listening on loopback for the test's SDK clients.
    """

    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        self.fake = FakeUpstream(reactor)
        self.base_url: str = yield serve_fake(self, self.fake)

    def in_thread(self, function: Callable[[], T]) -> Deferred[T]:
        result: Deferred[T] = deferToThread(function)
        return result


class AzureTests(_SDKTestCase):
    def test_chat_stream_embeddings(self) -> Deferred[None]:
        def call() -> None:
            with cloud_clients.azure(self.base_url) as client:
                chat = client.chat.completions.create(
                    model="prod-chat", messages=[{"role": "user", "content": "hi"}]
                )
                self.assertEqual(chat.choices[0].message.content, fake_text())
                chunks = list(
                    client.chat.completions.create(
                        model="prod-chat",
                        messages=[{"role": "user", "content": "hi"}],
                        stream=True,
                    )
                )
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                self.assertEqual(text, fake_text())
                vectors = client.embeddings.create(model="embed", input="x")
                self.assertEqual(len(vectors.data), 1)

        def check(ignored: None) -> None:
            chat = self.fake.received[0]
            self.assertEqual(
                chat.uri,
                b"/openai/deployments/prod-chat/chat/completions?api-version="
                + cloud_clients.AZURE_API_VERSION.encode(),
            )
            self.assertEqual(chat.header("api-key"), b"azure-key")

        return self.in_thread(call).addCallback(check)

    def test_wrong_key(self) -> Deferred[None]:
        def call() -> None:
            client = cloud_clients.azure(self.base_url, api_key="invalid-key")
            with client, self.assertRaises(openai.AuthenticationError):
                client.chat.completions.create(model="d", messages=[])

        return self.in_thread(call)


class BedrockTests(_SDKTestCase):
    def test_converse(self) -> Deferred[None]:
        def call() -> None:
            client = cloud_clients.bedrock(self.base_url)
            answer = client.converse(
                modelId=BEDROCK_MODEL,
                messages=CONVERSE_MESSAGES,
                additionalModelRequestFields={},
            )
            self.assertEqual(answer["output"]["message"]["content"][0]["text"], fake_text())
            self.assertEqual(answer["stopReason"], "end_turn")
            self.assertEqual(answer["usage"]["inputTokens"], DEFAULT_INPUT_TOKENS)
            self.assertEqual(answer["usage"]["outputTokens"], DEFAULT_CHUNKS)
            self.assertTrue(answer["ResponseMetadata"]["RequestId"])

        def check(ignored: None) -> None:
            [received] = self.fake.received
            # boto3 percent-encodes the ":" of the model id.
            self.assertEqual(
                received.path,
                b"/model/us.anthropic.claude-sonnet-4-20250514-v1%3A0/converse",
            )
            self.assertTrue((received.header("authorization") or b"").startswith(b"AWS4-HMAC"))

        return self.in_thread(call).addCallback(check)

    def test_converse_stream(self) -> Deferred[None]:
        def call() -> None:
            client = cloud_clients.bedrock(self.base_url)
            answer = client.converse_stream(
                modelId=BEDROCK_MODEL,
                messages=CONVERSE_MESSAGES,
                inferenceConfig={"maxTokens": 2},
            )
            events = list(answer["stream"])
            text = "".join(
                event["contentBlockDelta"]["delta"]["text"]
                for event in events
                if "contentBlockDelta" in event
            )
            self.assertEqual(text, fake_text(2))
            [stop] = [event["messageStop"] for event in events if "messageStop" in event]
            self.assertEqual(stop["stopReason"], "max_tokens")
            [metadata] = [event["metadata"] for event in events if "metadata" in event]
            self.assertEqual(metadata["usage"]["outputTokens"], 2)

        return self.in_thread(call)

    def test_converse_tool_use(self) -> Deferred[None]:
        def call() -> None:
            client = cloud_clients.bedrock(self.base_url)
            schema = {"type": "object", "properties": {"city": {"type": "string"}}}
            answer = client.converse(
                modelId=BEDROCK_MODEL,
                messages=CONVERSE_MESSAGES,
                toolConfig={
                    "tools": [{"toolSpec": {"name": "weather", "inputSchema": {"json": schema}}}]
                },
            )
            [content] = answer["output"]["message"]["content"]
            self.assertEqual(content["toolUse"]["name"], "weather")
            self.assertEqual(content["toolUse"]["input"], {"city": "fake"})
            self.assertEqual(answer["stopReason"], "tool_use")

        return self.in_thread(call)

    def test_invoke_model(self) -> Deferred[None]:
        def call() -> None:
            client = cloud_clients.bedrock(self.base_url)
            answer = client.invoke_model(modelId=BEDROCK_MODEL, body=json.dumps(ANTHROPIC_BODY))
            message = json.loads(answer["body"].read())
            self.assertEqual(message["content"][0]["text"], fake_text())
            self.assertEqual(message["model"], "claude-sonnet-4-20250514")
            headers = answer["ResponseMetadata"]["HTTPHeaders"]
            self.assertEqual(headers["x-amzn-bedrock-input-token-count"], str(DEFAULT_INPUT_TOKENS))

        return self.in_thread(call)

    def test_invoke_model_stream(self) -> Deferred[None]:
        def call() -> None:
            client = cloud_clients.bedrock(self.base_url)
            answer = client.invoke_model_with_response_stream(
                modelId=BEDROCK_MODEL, body=json.dumps(ANTHROPIC_BODY)
            )
            events = [json.loads(event["chunk"]["bytes"]) for event in answer["body"]]
            text = "".join(
                event["delta"].get("text", "")
                for event in events
                if event["type"] == "content_block_delta"
            )
            self.assertEqual(text, fake_text())
            metrics = events[-1]["amazon-bedrock-invocationMetrics"]
            self.assertEqual(metrics["outputTokenCount"], DEFAULT_CHUNKS)

        return self.in_thread(call)

    def test_errors(self) -> Deferred[None]:
        """
        An error status raises boto3's C{ClientError} with Bedrock's code;
        a stream's error raises C{EventStreamError}.
        """

        def call() -> None:
            for status, code in ((400, "ValidationException"), (429, "ThrottlingException")):
                client = cloud_clients.bedrock(self.base_url)
                cloud_clients.add_headers(client, {"x-fake-status": str(status)})
                with self.assertRaises(ClientError) as caught:
                    client.converse(modelId="m", messages=CONVERSE_MESSAGES)
                self.assertEqual(caught.exception.response["Error"]["Code"], code)
            client = cloud_clients.bedrock(self.base_url)
            cloud_clients.add_headers(client, {"x-fake-error-after": "2"})
            answer = client.converse_stream(modelId="m", messages=CONVERSE_MESSAGES)
            with self.assertRaises(EventStreamError) as stream_error:
                list(answer["stream"])
            self.assertEqual(
                stream_error.exception.response["Error"]["Code"], "modelStreamErrorException"
            )

        return self.in_thread(call)

    def test_signature_checked(self) -> Deferred[None]:
        """
        A request signed with another secret, or by another access key, is
        refused as AWS refuses it.
        """

        def call() -> None:
            wrong = cloud_clients.bedrock(self.base_url, secret_key="not-the-secret")
            with self.assertRaises(ClientError) as caught:
                wrong.converse(modelId="m", messages=CONVERSE_MESSAGES)
            self.assertEqual(
                caught.exception.response["Error"]["Code"], "InvalidSignatureException"
            )
            stranger = cloud_clients.bedrock(self.base_url, access_key="AKIDSOMEONEELSE")
            with self.assertRaises(ClientError) as caught:
                stranger.converse(modelId="m", messages=CONVERSE_MESSAGES)
            self.assertEqual(
                caught.exception.response["Error"]["Code"], "UnrecognizedClientException"
            )

        return self.in_thread(call)

    @inlineCallbacks
    def test_api_key(self) -> Any:
        """
        With C{AWS_BEARER_TOKEN_BEDROCK}, boto3 sends the key as a Bearer
        token (over TLS only); the fake accepts it, and refuses a wrong one.
        """
        description = cloud_clients.tls_description(self.mktemp())
        port = yield serverFromString(reactor, description).listen(self.fake.site())
        self.addCleanup(self.fake.disconnect_all)
        self.addCleanup(port.stopListening)
        url = f"https://127.0.0.1:{port.getHost().port}"

        def call() -> None:
            with cloud_clients.bedrock_api_key():
                answer = cloud_clients.bedrock(url).converse(
                    modelId="m", messages=CONVERSE_MESSAGES
                )
            self.assertEqual(answer["stopReason"], "end_turn")
            with cloud_clients.bedrock_api_key("invalid-key"), self.assertRaises(ClientError):
                cloud_clients.bedrock(url).converse(modelId="m", messages=CONVERSE_MESSAGES)

        yield self.in_thread(call)
        self.assertEqual(
            self.fake.received[0].header("authorization"),
            b"Bearer " + cloud_clients.BEDROCK_API_KEY.encode(),
        )


class VertexTests(_SDKTestCase):
    def test_anthropic_vertex(self) -> Deferred[None]:
        def call() -> None:
            with cloud_clients.anthropic_vertex(self.base_url + "/v1") as client:
                message = client.messages.create(
                    model="claude-sonnet-4@20250514",
                    max_tokens=100,
                    messages=[{"role": "user", "content": "hi"}],
                )
                self.assertEqual(message.content[0].text, fake_text())  # type: ignore[union-attr]
                with client.messages.stream(
                    model="claude-sonnet-4@20250514",
                    max_tokens=100,
                    messages=[{"role": "user", "content": "hi"}],
                ) as stream:
                    self.assertEqual("".join(stream.text_stream), fake_text())
                    final = stream.get_final_message()
                self.assertEqual(final.usage.input_tokens, DEFAULT_INPUT_TOKENS)

        def check(ignored: None) -> None:
            first, second = self.fake.received
            base = b"/v1/projects/fake-project/locations/us-east5/publishers/anthropic/models/"
            self.assertEqual(first.path, base + b"claude-sonnet-4@20250514:rawPredict")
            self.assertEqual(second.path, base + b"claude-sonnet-4@20250514:streamRawPredict")
            self.assertEqual(first.header("authorization"), b"Bearer vertex-oauth-token")

        return self.in_thread(call).addCallback(check)

    def test_anthropic_vertex_error(self) -> Deferred[None]:
        def call() -> None:
            client = cloud_clients.anthropic_vertex(self.base_url + "/v1")
            with client, self.assertRaises(anthropic.RateLimitError):
                client.messages.create(
                    model="claude-sonnet-4@20250514",
                    max_tokens=10,
                    messages=[{"role": "user", "content": "hi"}],
                    extra_headers={"x-fake-status": "429"},
                )

        return self.in_thread(call)

    def test_genai_vertex(self) -> Deferred[None]:
        def call() -> None:
            client = cloud_clients.genai_vertex(self.base_url)
            answer = client.models.generate_content(model="gemini-2.5-flash", contents="hi")
            self.assertEqual(answer.text, fake_text())
            assert answer.usage_metadata is not None
            self.assertEqual(answer.usage_metadata.prompt_token_count, DEFAULT_INPUT_TOKENS)
            pieces = [
                chunk.text or ""
                for chunk in client.models.generate_content_stream(
                    model="gemini-2.5-flash", contents="hi"
                )
            ]
            self.assertEqual("".join(pieces), fake_text())

        def check(ignored: None) -> None:
            first, second = self.fake.received
            base = b"/v1/projects/fake-project/locations/us-central1/publishers/google/models/"
            self.assertEqual(first.path, base + b"gemini-2.5-flash:generateContent")
            self.assertEqual(second.uri, base + b"gemini-2.5-flash:streamGenerateContent?alt=sse")
            self.assertEqual(first.header("authorization"), b"Bearer vertex-oauth-token")

        return self.in_thread(call).addCallback(check)
