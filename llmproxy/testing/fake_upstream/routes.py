# -*- test-case-name: llmproxy.test.test_fake_upstream_routes -*-
"""
Routing: which provider and handler answer a request, chosen from the end
of its raw path (so the fake answers the same under any prefix) and, where
providers share a path, from its headers and query.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import parse_qsl, unquote

from llmproxy.testing.fake_upstream import anthropic, gemini, openai
from llmproxy.testing.fake_upstream.call import Call, Handler, Reply
from llmproxy.testing.fake_upstream.dialects import ANTHROPIC, GEMINI, OPENAI, Dialect
from llmproxy.testing.fake_upstream.records import ReceivedRequest

_GEMINI_METHOD = re.compile(r"/models/([^/:]+):([A-Za-z]+)$")
_MODEL_ID = re.compile(r"/models/([^/]+)$")
_GEMINI_METHODS: dict[str, Handler] = {
    "generateContent": gemini.generate_content,
    "streamGenerateContent": gemini.generate_content,
    "countTokens": gemini.count_tokens,
    "embedContent": gemini.embed,
    "batchEmbedContents": gemini.embed,
}


def route(
    request: ReceivedRequest, query: Mapping[str, str]
) -> tuple[Dialect, Handler | None, dict[str, str]]:
    """
    Pick the provider and handler for a request from the end of its path.
    """
    path = request.path.decode("latin-1")
    method = request.method
    gemini_method = _GEMINI_METHOD.search(path)
    if gemini_method is not None:
        model = _percent_decode(gemini_method.group(1))
        name = gemini_method.group(2)
        handler = _GEMINI_METHODS.get(name) if method == b"POST" else None
        return GEMINI, handler, {"model": model, "method": name}
    model_id = _MODEL_ID.search(path)
    is_gemini = (
        "/v1beta/" in path + "/"
        or "/v1alpha/" in path + "/"
        or "key" in query
        or request.header(b"x-goog-api-key") is not None
    )
    is_anthropic = request.header(b"anthropic-version") is not None
    if method == b"GET" and (path.endswith("/models") or model_id is not None):
        params = {"model": _percent_decode(model_id.group(1))} if model_id else {}
        if is_gemini:
            return GEMINI, gemini.model_get if model_id else gemini.models, params
        if is_anthropic:
            return ANTHROPIC, anthropic.model_get if model_id else anthropic.models, params
        return OPENAI, openai.model_get if model_id else openai.models, params
    if path.endswith("/messages/count_tokens"):
        return ANTHROPIC, anthropic.count_tokens if method == b"POST" else None, {}
    if path.endswith("/messages"):
        return ANTHROPIC, anthropic.messages if method == b"POST" else None, {}
    if is_gemini:
        return GEMINI, None, {}
    posts: dict[str, Handler] = {
        "/chat/completions": openai.chat_completions,
        "/completions": openai.completions,
        "/responses": openai.responses,
        "/embeddings": openai.embeddings,
    }
    for suffix, handler in posts.items():
        if path.endswith(suffix):
            return OPENAI, handler if method == b"POST" else None, {}
    return OPENAI, None, {}


def _percent_decode(text: str) -> str:
    return unquote(text)


def parse_query(query: bytes) -> dict[str, str]:
    """
    A raw query string as a dict (the last value of a repeated name wins).
    """
    return dict(parse_qsl(query.decode("latin-1"), keep_blank_values=True))


def not_found(dialect: Dialect, call: Call) -> Reply:
    """
    The provider's 404 for a path (or method) the fake does not serve.
    """
    request = call.request
    if dialect is OPENAI:
        message = f"Invalid URL ({request.method.decode()} {request.path.decode('latin-1')})"
    elif dialect is ANTHROPIC:
        message = "Not Found"
    else:
        message = "The requested URL was not found on this server."
    return dialect.error(call, 404, message)
