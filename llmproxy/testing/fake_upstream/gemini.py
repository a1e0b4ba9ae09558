# -*- test-case-name: llmproxy.test.test_fake_upstream_gemini -*-
"""
The Gemini routes: generateContent (whole, as SSE, or as a streamed JSON
array), countTokens, the embedding methods and models, in the shapes the
official google-genai SDK parses.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import orjson

from llmproxy.testing.fake_upstream.call import Call, Reply, sse_data
from llmproxy.testing.fake_upstream.dialects import GEMINI
from llmproxy.testing.fake_upstream.text import (
    EMBEDDING_DIMENSIONS,
    Tool,
    fake_embedding,
    generate,
)

GEMINI_MODELS = (
    "gemini-2.5-pro",
    "gemini-2.5-flash",
    "gemini-2.0-flash",
    "gemini-embedding-001",
)
"""The models C{GET .../v1beta/models} lists."""


def _usage(call: Call, candidates: int | None) -> dict[str, Any]:
    """
    C{usageMetadata}; with C{candidates=None}, the prompt-only form the
    real API puts on stream chunks before the last.
    """
    knobs = call.knobs
    usage: dict[str, Any] = {
        "promptTokenCount": knobs.input_tokens,
        "totalTokenCount": knobs.input_tokens,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": knobs.input_tokens}],
    }
    if candidates is not None:
        usage["candidatesTokenCount"] = candidates
        usage["totalTokenCount"] = knobs.input_tokens + candidates + knobs.reasoning_tokens
    if knobs.reasoning_tokens and candidates is not None:
        usage["thoughtsTokenCount"] = knobs.reasoning_tokens
    if knobs.cached_tokens:
        usage["cachedContentTokenCount"] = knobs.cached_tokens
        usage["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": knobs.cached_tokens}]
    return usage


def _field(value: dict[str, Any], camel: str) -> Any:
    """
    A field of a Gemini request, spelt in camelCase or snake_case: the API
    takes both (proto3 JSON), and google-genai sends some fields snake_case
    (C{parameters_json_schema}).
    """
    if camel in value:
        return value[camel]
    return value.get(re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), camel))


def _tools(body: dict[str, Any]) -> list[Tool]:
    config = _field(body, "toolConfig")
    if isinstance(config, dict):
        calling = _field(config, "functionCallingConfig")
        if isinstance(calling, dict) and calling.get("mode") == "NONE":
            return []
    found: list[Tool] = []
    tools = body.get("tools")
    if not isinstance(tools, list):
        return found
    for tool in tools:
        declarations = _field(tool, "functionDeclarations") if isinstance(tool, dict) else None
        if not isinstance(declarations, list):
            continue
        for declaration in declarations:
            if isinstance(declaration, dict):
                schema = declaration.get("parameters") or _field(
                    declaration, "parametersJsonSchema"
                )
                found.append(Tool(str(declaration.get("name")), schema))
    return found


def _max_tokens(body: dict[str, Any]) -> object:
    config = _field(body, "generationConfig")
    return _field(config, "maxOutputTokens") if isinstance(config, dict) else None


def generate_content(call: Call) -> Reply:
    """
    C{:generateContent} and C{:streamGenerateContent} (SSE with
    C{alt=sse}, else a JSON array written element by element).
    """
    body = call.body
    if "contents" not in body:
        return GEMINI.error(
            call, 400, "* GenerateContentRequest.contents: contents is not specified"
        )
    knobs = call.knobs
    model = knobs.model or call.params["model"]
    generation = generate(call.knobs, _tools(body), _max_tokens(body))
    if knobs.finish_reason is not None:
        finish = knobs.finish_reason
    else:
        finish = "MAX_TOKENS" if generation.truncated else "STOP"
    response_id = call.ident("resp-")

    def candidate(parts: list[Any], finish_reason: str | None) -> dict[str, Any]:
        value: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
        if finish_reason is not None:
            value["finishReason"] = finish_reason
        return value

    def response(parts: list[Any], finish_reason: str | None, last: bool) -> dict[str, Any]:
        value: dict[str, Any] = {"candidates": [candidate(parts, finish_reason)]}
        if knobs.usage:
            value["usageMetadata"] = _usage(call, generation.visible_tokens if last else None)
        value["modelVersion"] = model
        value["responseId"] = response_id
        return value

    def responses() -> Iterator[dict[str, Any]]:
        if generation.tool is not None:
            yield whole
            return
        count = len(generation.pieces)
        if count == 0:
            yield response([{"text": ""}], finish, True)
            return
        for index, piece in enumerate(generation.pieces):
            last = index == count - 1
            yield response([{"text": piece}], finish if last else None, last)

    if generation.tool is not None:
        call_part = {
            "functionCall": {
                "name": generation.tool.name,
                "args": orjson.loads(generation.arguments),
            }
        }
        whole = response([call_part], finish, True)
    else:
        whole = response([{"text": generation.text}], finish, True)

    method = call.params["method"]
    if method == "generateContent":
        return GEMINI.json(call, whole)
    if call.query.get("alt") == "sse":
        return GEMINI.stream(call, (sse_data(value, b"\r\n\r\n") for value in responses()))

    def array() -> Iterator[bytes]:
        separator = b"["
        for value in responses():
            yield separator + orjson.dumps(value)
            separator = b",\r\n"
        yield b"]" if separator != b"[" else b"[]"

    return GEMINI.stream(call, array(), GEMINI.json_type)


def count_tokens(call: Call) -> Reply:
    """
    C{:countTokens}: the input tokens knob.
    """
    tokens = call.knobs.input_tokens
    value: dict[str, Any] = {
        "totalTokens": tokens,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": tokens}],
    }
    if call.knobs.cached_tokens:
        value["cachedContentTokenCount"] = call.knobs.cached_tokens
    return GEMINI.json(call, value)


def _dimensions(request: Any) -> int:
    if isinstance(request, dict):
        dimensions = _field(request, "outputDimensionality")
        if isinstance(dimensions, int) and dimensions > 0:
            return dimensions
    return EMBEDDING_DIMENSIONS


def embed(call: Call) -> Reply:
    """
    C{:embedContent} and C{:batchEmbedContents}.
    """
    body = call.body
    if call.params["method"] == "embedContent":
        if "content" not in body:
            return GEMINI.error(
                call, 400, "* EmbedContentRequest.content: content is not specified"
            )
        return GEMINI.json(call, {"embedding": {"values": fake_embedding(0, _dimensions(body))}})
    requests = body.get("requests")
    if not isinstance(requests, list) or not requests:
        return GEMINI.error(call, 400, "* BatchEmbedContentsRequest.requests: is empty")
    return GEMINI.json(
        call,
        {
            "embeddings": [
                {"values": fake_embedding(index, _dimensions(request))}
                for index, request in enumerate(requests)
            ]
        },
    )


def _model_object(name: str) -> dict[str, Any]:
    embedding = "embedding" in name
    return {
        "name": f"models/{name}",
        "version": "001",
        "displayName": name.replace("-", " ").title(),
        "description": "A model served by the fake upstream.",
        "inputTokenLimit": 1048576 if not embedding else 2048,
        "outputTokenLimit": 65536 if not embedding else 1,
        "supportedGenerationMethods": (
            ["embedContent", "countTokens"]
            if embedding
            else ["generateContent", "countTokens", "createCachedContent"]
        ),
    }


def models(call: Call) -> Reply:
    """
    C{GET .../models}: the model list.
    """
    return GEMINI.json(call, {"models": [_model_object(m) for m in GEMINI_MODELS]})


def model_get(call: Call) -> Reply:
    """
    C{GET .../models/{id}}: one model, or a 404.
    """
    name = call.params["model"]
    if name not in GEMINI_MODELS:
        return GEMINI.error(call, 404, f"models/{name} is not found for API version v1beta.")
    return GEMINI.json(call, _model_object(name))
