# -*- test-case-name: llmproxy.test.test_fake_upstream_openai -*-
"""
The OpenAI routes: chat completions, completions, responses, embeddings
and models, in the shapes the official SDK parses.
"""

from __future__ import annotations

import base64
import itertools
import struct
from collections.abc import Iterator
from typing import Any

from llmproxy.testing.fake_upstream.call import Call, Reply, sse_data, sse_event
from llmproxy.testing.fake_upstream.dialects import OPENAI
from llmproxy.testing.fake_upstream.text import (
    EMBEDDING_DIMENSIONS,
    Generation,
    Tool,
    fake_embedding,
    generate,
)

_FINGERPRINT = "fp_fake0001"
_MODEL_CREATED = 1700000000

OPENAI_MODELS = (
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "o3-mini",
    "gpt-3.5-turbo-instruct",
    "text-embedding-3-small",
    "text-embedding-3-large",
)
"""The models C{GET .../models} lists."""


def _usage(call: Call, generation: Generation) -> dict[str, Any]:
    knobs = call.knobs
    completion = generation.visible_tokens + knobs.reasoning_tokens
    prompt_details: dict[str, Any] = {"cached_tokens": knobs.cached_tokens, "audio_tokens": 0}
    if knobs.cache_write_tokens:
        prompt_details["cache_write_tokens"] = knobs.cache_write_tokens
    return {
        "prompt_tokens": knobs.input_tokens,
        "completion_tokens": completion,
        "total_tokens": knobs.input_tokens + completion,
        "prompt_tokens_details": prompt_details,
        "completion_tokens_details": {
            "reasoning_tokens": knobs.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _chat_tools(body: dict[str, Any]) -> list[Tool]:
    tools = body.get("tools")
    if not isinstance(tools, list) or body.get("tool_choice") == "none":
        return []
    found = [
        Tool(str(tool["function"].get("name")), tool["function"].get("parameters"))
        for tool in tools
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict)
    ]
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        wanted = choice["function"].get("name")
        found = [tool for tool in found if tool.name == wanted] or found
    return found


def _model(call: Call) -> str:
    return call.knobs.model or str(call.body.get("model"))


def _require(call: Call, *names: str) -> Reply | None:
    for name in names:
        if name not in call.body:
            return OPENAI.error(call, 400, f"Missing required parameter: '{name}'.")
    return None


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def chat_completions(call: Call) -> Reply:
    """
    C{POST .../chat/completions}: a chat completion, whole or streamed
    (with the C{include_usage} chunk when asked for).
    """
    missing = _require(call, "model", "messages")
    if missing is not None:
        return missing
    body = call.body
    knobs = call.knobs
    model = _model(call)
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    generation = generate(call.knobs, _chat_tools(body), limit)
    if knobs.finish_reason is not None:
        finish = knobs.finish_reason
    elif generation.tool is not None:
        finish = "tool_calls"
    else:
        finish = "length" if generation.truncated else "stop"
    call_id = call.ident("call_")
    if body.get("stream") is not True:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": None if generation.tool else generation.text,
            "refusal": None,
            "annotations": [],
        }
        if generation.tool is not None:
            message["tool_calls"] = [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": generation.tool.name, "arguments": generation.arguments},
                }
            ]
        value: dict[str, Any] = {
            "id": call.ident("chatcmpl-"),
            "object": "chat.completion",
            "created": call.now,
            "model": model,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            ],
            "service_tier": "default",
            "system_fingerprint": _FINGERPRINT,
        }
        if knobs.usage:
            value["usage"] = _usage(call, generation)
        return OPENAI.json(call, value)

    include_usage = _include_usage(body)

    def chunks() -> Iterator[bytes]:
        base = {
            "id": call.ident("chatcmpl-"),
            "object": "chat.completion.chunk",
            "created": call.now,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": _FINGERPRINT,
        }

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            value = dict(base)
            value["choices"] = [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ]
            if include_usage:
                value["usage"] = None
            return sse_data(value)

        if generation.tool is not None:
            yield chunk(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": call_id,
                            "type": "function",
                            "function": {"name": generation.tool.name, "arguments": ""},
                        }
                    ],
                    "refusal": None,
                }
            )
            for piece in generation.argument_pieces:
                yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        else:
            yield chunk({"role": "assistant", "content": "", "refusal": None})
            for piece in generation.pieces:
                yield chunk({"content": piece})
        yield chunk({}, finish)
        if include_usage and knobs.usage:
            value = dict(base)
            value["choices"] = []
            value["usage"] = _usage(call, generation)
            yield sse_data(value)
        yield b"data: [DONE]\n\n"

    return OPENAI.stream(call, chunks())


def completions(call: Call) -> Reply:
    """
    C{POST .../completions}: a legacy text completion, whole or streamed.
    """
    missing = _require(call, "model", "prompt")
    if missing is not None:
        return missing
    body = call.body
    knobs = call.knobs
    model = _model(call)
    generation = generate(call.knobs, [], body.get("max_tokens"))
    finish = knobs.finish_reason or ("length" if generation.truncated else "stop")
    usage = _usage(call, generation)
    if body.get("stream") is not True:
        value: dict[str, Any] = {
            "id": call.ident("cmpl-"),
            "object": "text_completion",
            "created": call.now,
            "model": model,
            "choices": [
                {"text": generation.text, "index": 0, "logprobs": None, "finish_reason": finish}
            ],
            "system_fingerprint": _FINGERPRINT,
        }
        if knobs.usage:
            value["usage"] = usage
        return OPENAI.json(call, value)

    include_usage = _include_usage(body)

    def chunks() -> Iterator[bytes]:
        def chunk(text: str, finish_reason: str | None) -> bytes:
            value: dict[str, Any] = {
                "id": call.ident("cmpl-"),
                "object": "text_completion",
                "created": call.now,
                "choices": [
                    {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
                ],
                "model": model,
                "system_fingerprint": _FINGERPRINT,
            }
            if include_usage:
                value["usage"] = None
            return sse_data(value)

        for piece in generation.pieces:
            yield chunk(piece, None)
        yield chunk("", finish)
        if include_usage and knobs.usage:
            yield sse_data(
                {
                    "id": call.ident("cmpl-"),
                    "object": "text_completion",
                    "created": call.now,
                    "choices": [],
                    "model": model,
                    "system_fingerprint": _FINGERPRINT,
                    "usage": usage,
                }
            )
        yield b"data: [DONE]\n\n"

    return OPENAI.stream(call, chunks())


def responses(call: Call) -> Reply:
    """
    C{POST .../responses}: a Responses API answer, whole or as the typed
    event stream.
    """
    missing = _require(call, "model")
    if missing is not None:
        return missing
    body = call.body
    knobs = call.knobs
    model = _model(call)
    tools = body.get("tools")
    offered = []
    if isinstance(tools, list) and body.get("tool_choice") != "none":
        offered = [
            Tool(str(tool.get("name")), tool.get("parameters"))
            for tool in tools
            if isinstance(tool, dict) and tool.get("type") == "function"
        ]
    generation = generate(call.knobs, offered, body.get("max_output_tokens"))
    completion = generation.visible_tokens + knobs.reasoning_tokens
    usage = {
        "input_tokens": knobs.input_tokens,
        "input_tokens_details": {
            "cached_tokens": knobs.cached_tokens,
            "cache_write_tokens": knobs.cache_write_tokens,
        },
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": knobs.reasoning_tokens},
        "total_tokens": knobs.input_tokens + completion,
    }
    item_id = call.ident("fc_" if generation.tool else "msg_")
    final_status = "incomplete" if generation.truncated else "completed"

    def item(status: str, done: bool) -> dict[str, Any]:
        if generation.tool is not None:
            return {
                "id": item_id,
                "type": "function_call",
                "status": status,
                "arguments": generation.arguments if done else "",
                "call_id": call.ident("call_"),
                "name": generation.tool.name,
            }
        return {
            "id": item_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": [part(generation.text)] if done else [],
        }

    def part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def response(status: str, output: list[Any], with_usage: bool) -> dict[str, Any]:
        return {
            "id": call.ident("resp_"),
            "object": "response",
            "created_at": call.now,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": (
                {"reason": "max_output_tokens"} if status == "incomplete" else None
            ),
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "store": body.get("store", True),
            "temperature": body.get("temperature", 1.0),
            "text": {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": tools if isinstance(tools, list) else [],
            "top_p": body.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": usage if with_usage and knobs.usage else None,
            "user": None,
            "metadata": body.get("metadata") or {},
        }

    if body.get("stream") is not True:
        return OPENAI.json(call, response(final_status, [item(final_status, True)], True))

    def chunks() -> Iterator[bytes]:
        sequence = itertools.count()

        def event(kind: str, **fields: Any) -> bytes:
            return sse_event(kind, {"type": kind, "sequence_number": next(sequence), **fields})

        yield event("response.created", response=response("in_progress", [], False))
        yield event("response.in_progress", response=response("in_progress", [], False))
        yield event("response.output_item.added", output_index=0, item=item("in_progress", False))
        where = {"item_id": item_id, "output_index": 0}
        if generation.tool is not None:
            for piece in generation.argument_pieces:
                yield event("response.function_call_arguments.delta", delta=piece, **where)
            yield event(
                "response.function_call_arguments.done",
                arguments=generation.arguments,
                name=generation.tool.name,
                **where,
            )
        else:
            text_where = {**where, "content_index": 0}
            yield event("response.content_part.added", part=part(""), **text_where)
            for piece in generation.pieces:
                yield event("response.output_text.delta", delta=piece, logprobs=[], **text_where)
            text = generation.text
            yield event("response.output_text.done", text=text, logprobs=[], **text_where)
            yield event("response.content_part.done", part=part(text), **text_where)
        yield event("response.output_item.done", output_index=0, item=item(final_status, True))
        yield event(
            f"response.{final_status}",
            response=response(final_status, [item(final_status, True)], True),
        )

    return OPENAI.stream(call, chunks())


def embeddings(call: Call) -> Reply:
    """
    C{POST .../embeddings}: one vector per input, as floats or base64.
    """
    missing = _require(call, "model", "input")
    if missing is not None:
        return missing
    body = call.body
    raw = body["input"]
    if isinstance(raw, list) and raw and not all(isinstance(x, int) for x in raw):
        count = len(raw)
    else:
        count = 1
    dimensions = body.get("dimensions")
    if not isinstance(dimensions, int) or dimensions <= 0:
        dimensions = EMBEDDING_DIMENSIONS
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        return OPENAI.error(call, 400, f"Invalid encoding_format: {encoding!r}.")
    data = []
    for index in range(count):
        vector = fake_embedding(index, dimensions)
        embedding: Any = vector
        if encoding == "base64":
            embedding = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    value: dict[str, Any] = {"object": "list", "data": data, "model": _model(call)}
    if call.knobs.usage:
        value["usage"] = {
            "prompt_tokens": call.knobs.input_tokens,
            "total_tokens": call.knobs.input_tokens,
        }
    return OPENAI.json(call, value)


def _model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": _MODEL_CREATED, "owned_by": "system"}


def models(call: Call) -> Reply:
    """
    C{GET .../models}: the model list.
    """
    return OPENAI.json(call, {"object": "list", "data": [_model_object(m) for m in OPENAI_MODELS]})


def model_get(call: Call) -> Reply:
    """
    C{GET .../models/{id}}: one model, or a 404.
    """
    name = call.params["model"]
    if name not in OPENAI_MODELS:
        return OPENAI.error(call, 404, f"The model '{name}' does not exist", "model_not_found")
    return OPENAI.json(call, _model_object(name))
