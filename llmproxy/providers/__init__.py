# -*- test-case-name: llmproxy.test.test_providers_base -*-
"""
One module per provider wire format; L{format_for} picks one by config
C{kind}.
"""

from __future__ import annotations

from collections.abc import Mapping

from llmproxy.providers.anthropic import AnthropicFormat
from llmproxy.providers.base import Meter, ProviderFormat, RequestInfo
from llmproxy.providers.gemini import GeminiFormat
from llmproxy.providers.openai import OpenAIFormat

__all__ = ["Meter", "ProviderFormat", "RequestInfo", "format_for"]

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
