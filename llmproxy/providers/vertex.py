# -*- test-case-name: llmproxy.test.test_providers_vertex -*-
"""
Google Vertex AI (C{kind: vertex}): the publisher model paths
C{/v1/projects/<project>/locations/<location>/publishers/<publisher>/models/<model>:<method>}.

  - C{publishers/google}: Gemini, C{:generateContent},
    C{:streamGenerateContent} (SSE with C{alt=sse}, else a streamed JSON
    array), C{:countTokens}, ...; read and metered exactly as the Gemini API
    (L{llmproxy.providers.gemini}).
  - C{publishers/anthropic}: Claude, C{:rawPredict} and C{:streamRawPredict}
    with an Anthropic Messages body (no C{model} in it: the path names it,
    as C{claude-sonnet-4@20250514}); read and metered as Anthropic
    (L{llmproxy.providers.anthropic}).  C{count-tokens:rawPredict} counts
    tokens and is not metered.
  - C{endpoints/openapi/chat/completions}: Vertex's OpenAI-compatible
    endpoint, read as OpenAI.

Errors the proxy makes are Google's C{{"error": {"code", "message",
"status"}}}, which both the google-genai and the AnthropicVertex SDKs read;
a Claude stream that fails midway ends with Anthropic's own C{error} event.
"""

from __future__ import annotations

from attrs import evolve

from llmproxy.providers.anthropic import AnthropicFormat
from llmproxy.providers.format import ProviderFormat, RequestFacts, StreamError
from llmproxy.providers.gemini import GeminiFormat
from llmproxy.providers.meters import Meter, Tally
from llmproxy.providers.openai import describe_openai

CLAUDE_ENDPOINTS = frozenset({"messages"})
"""Endpoints served by the Anthropic publisher and metered as Anthropic."""

_CLAUDE_METHODS = {"rawPredict": "messages", "streamRawPredict": "messages"}


def publisher(segments: list[str]) -> str | None:
    """
    The publisher a C{.../publishers/<publisher>/models/...} path names.
    """
    if "publishers" in segments[:-1]:
        return segments[segments.index("publishers") + 1]
    return None


class VertexFormat(ProviderFormat):
    """
    Vertex AI, Gemini and Claude publisher models.
    """

    kind = "vertex"
    id_headers = ("x-request-id",)
    unmetered_endpoints = frozenset({"count_tokens"})

    def __init__(self) -> None:
        self._gemini = GeminiFormat()
        self._claude = AnthropicFormat()

    def describe(
        self, method: str, segments: list[str], query: bytes, body: object | None
    ) -> RequestFacts:
        if "openapi" in segments:
            return describe_openai(method, segments, body)
        if publisher(segments) != "anthropic":
            return self._gemini.describe(method, segments, query, body)
        resource, _, action = segments[-1].rpartition(":")
        facts = self._claude.describe(method, segments, query, body)
        if method != "POST" or action not in _CLAUDE_METHODS:
            return evolve(facts, endpoint="other", model=resource or None)
        if resource == "count-tokens":
            return evolve(facts, endpoint="count_tokens")
        return evolve(
            facts,
            endpoint="messages",
            model=resource or facts.model,
            streaming=facts.streaming or action == "streamRawPredict",
        )

    def prompt_chars(self, facts: RequestFacts, body: object | None) -> int | None:
        if facts.endpoint in CLAUDE_ENDPOINTS:
            return self._claude.prompt_chars(facts, body)
        return self._gemini.prompt_chars(facts, body)

    def meter_for(self, facts: RequestFacts, tally: Tally, sse: bool, strip: bool) -> Meter:
        if facts.endpoint in CLAUDE_ENDPOINTS:
            return self._claude.meter_for(facts, tally, sse, strip)
        return self._gemini.meter_for(facts, tally, sse, strip)

    def stream_error(
        self, facts: RequestFacts, content_type: bytes | None, meter: Meter | None
    ) -> StreamError | None:
        if facts.endpoint in CLAUDE_ENDPOINTS:
            return self._claude.stream_error(facts, content_type, meter)
        return super().stream_error(facts, content_type, meter)

    def error_body(self, status: int, message: str) -> bytes:
        return self._gemini.error_body(status, message)

    def sse_error_event(self, status: int, message: str) -> bytes:
        return self._gemini.sse_error_event(status, message)
