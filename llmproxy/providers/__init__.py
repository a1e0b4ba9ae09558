# -*- test-case-name: llmproxy.test.test_providers_format -*-
"""
One module per provider wire format; L{format_for} picks one by config
C{kind}.

The shared machinery: L{llmproxy.providers.format} (what a format offers
the request path), L{llmproxy.providers.meters} (reading usage from a
response body), L{llmproxy.providers.keyscan}, L{llmproxy.providers.prompt}
and L{llmproxy.providers.wire} (bounded helpers for untrusted bytes).
"""

from __future__ import annotations

from collections.abc import Mapping

from llmproxy.config import ProviderConfig
from llmproxy.providers.anthropic import AnthropicFormat
from llmproxy.providers.azure import AzureOpenAIFormat
from llmproxy.providers.bedrock import BedrockFormat
from llmproxy.providers.format import Inspection, ProviderFormat, RequestFacts
from llmproxy.providers.gemini import GeminiFormat
from llmproxy.providers.meters import Meter
from llmproxy.providers.openai import OpenAIFormat
from llmproxy.providers.vertex import VertexFormat

__all__ = [
    "Inspection",
    "Meter",
    "ProviderFormat",
    "RequestFacts",
    "format_for",
    "provider_format",
]

_FORMATS: Mapping[str, ProviderFormat] = {
    format.kind: format
    for format in (
        OpenAIFormat(),
        AnthropicFormat(),
        GeminiFormat(),
        AzureOpenAIFormat({}),
        BedrockFormat(),
        VertexFormat(),
    )
}


def format_for(kind: str) -> ProviderFormat:
    """
    The wire format for a provider C{kind} (one of
    L{llmproxy.config.PROVIDER_KINDS}), without any provider's settings.
    Formats hold no per-request state, so one of each is shared.

    @raise KeyError: for any other kind.
    """
    return _FORMATS[kind]


def provider_format(provider: ProviderConfig) -> ProviderFormat:
    """
    The wire format of one configured provider: L{format_for} its kind,
    except where the format reads the provider's settings (an Azure
    deployment map).
    """
    if provider.kind == "azure_openai" and provider.deployments:
        return AzureOpenAIFormat(provider.deployments)
    return format_for(provider.kind)
