"""
Tests for L{llmproxy.providers.azure}.
"""

from __future__ import annotations

import orjson
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.config import ProviderConfig
from llmproxy.providers import provider_format
from llmproxy.providers.azure import AzureOpenAIFormat

DEPLOYMENTS = {"prod-chat": "gpt-4o", "embed": "text-embedding-3-small"}

# An Azure chat completion as the service returns it (2024-10-21 API
# version): the model is Azure's versioned name, content filter results
# ride along.
CHAT_JSON = orjson.dumps(
    {
        "id": "chatcmpl-AzR1",
        "object": "chat.completion",
        "created": 1733000000,
        "model": "gpt-4o-2024-11-20",
        "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}],
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": "Hi"},
                "content_filter_results": {},
            }
        ],
        "usage": {
            "prompt_tokens": 19,
            "completion_tokens": 4,
            "total_tokens": 23,
            "prompt_tokens_details": {"cached_tokens": 8},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    }
)


class AzureTests(SynchronousTestCase):
    fmt = AzureOpenAIFormat(DEPLOYMENTS)

    def facts(self, path: bytes, body: object, query: bytes = b"api-version=2024-10-21") -> object:
        return self.fmt.inspect(b"POST", path, query, orjson.dumps(body)).facts

    def test_deployment_path(self) -> None:
        """
        The path's deployment names the model (through the map), whatever
        the body says; an unmapped deployment is its own model name.
        """
        inspection = self.fmt.inspect(
            b"POST",
            b"/openai/deployments/prod-chat/chat/completions",
            b"api-version=2024-10-21",
            orjson.dumps({"model": "ignored", "messages": [], "stream": True}),
        )
        facts = inspection.facts
        self.assertEqual(
            (facts.model, facts.endpoint, facts.streaming), ("gpt-4o", "chat.completions", True)
        )
        self.assertTrue(inspection.strip_usage_chunk)
        other = self.fmt.inspect(b"POST", b"/openai/deployments/dev/embeddings", b"", b"{}")
        self.assertEqual((other.facts.model, other.facts.endpoint), ("dev", "embeddings"))

    def test_v1_path(self) -> None:
        """
        The C{/openai/v1/} form names the deployment in the body's model.
        """
        inspection = self.fmt.inspect(
            b"POST", b"/openai/v1/chat/completions", b"", b'{"model": "embed", "input": "x"}'
        )
        self.assertEqual(inspection.facts.model, "text-embedding-3-small")

    def test_meter_names_mapped_model(self) -> None:
        """
        Records and prices use the mapped model, not Azure's versioned name
        in the body; without a mapping, the body's model as for OpenAI.
        """
        facts = self.fmt.inspect(
            b"POST", b"/openai/deployments/prod-chat/chat/completions", b"", b"{}"
        ).facts
        meter = self.fmt.new_meter(facts, b"application/json", {"apim-request-id": "apim-1"})
        self.assertEqual(meter.feed(CHAT_JSON), CHAT_JSON)
        self.assertEqual(meter.finish(), b"")
        usage = meter.usage()
        self.assertEqual(
            (usage.model, usage.input_tokens, usage.cache_read_tokens), ("gpt-4o", 19, 8)
        )
        self.assertEqual((usage.upstream_request_id, usage.finish_reason), ("apim-1", "stop"))
        plain = AzureOpenAIFormat({})
        facts = plain.inspect(b"POST", b"/openai/deployments/x/chat/completions", b"", b"{}").facts
        meter = plain.new_meter(facts, b"application/json", {})
        meter.feed(CHAT_JSON)
        self.assertEqual(meter.usage().model, "gpt-4o-2024-11-20")

    def test_errors_are_openai(self) -> None:
        self.assertEqual(
            orjson.loads(self.fmt.error_body(429, "slow"))["error"]["code"], "rate_limit_exceeded"
        )

    def test_provider_format(self) -> None:
        config = ProviderConfig(
            name="azure",
            kind="azure_openai",
            base_url="https://x.openai.azure.com",
            deployments=DEPLOYMENTS,
        )
        fmt = provider_format(config)
        assert isinstance(fmt, AzureOpenAIFormat)
        self.assertEqual(fmt.deployments, DEPLOYMENTS)
