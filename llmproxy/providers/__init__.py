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

from llmproxy.providers.anthropic import AnthropicFormat
from llmproxy.providers.format import Inspection, ProviderFormat, RequestFacts
from llmproxy.providers.gemini import GeminiFormat
from llmproxy.providers.meters import Meter
from llmproxy.providers.openai import OpenAIFormat

__all__ = ["Inspection", "Meter", "ProviderFormat", "RequestFacts", "format_for"]

_FORMATS: Mapping[str, ProviderFormat] = {
    format.kind: format for format in (OpenAIFormat(), AnthropicFormat(), GeminiFormat())
}


def format_for(kind: str) -> ProviderFormat:
    """
    The wire format for a provider C{kind}: C{"openai"}, C{"anthropic"} or
    C{"gemini"}.  Formats hold no per-request state, so one of each is
    shared.

    @raise KeyError: for any other kind.
    """
    return _FORMATS[kind]
