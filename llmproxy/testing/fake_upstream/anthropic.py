# -*- test-case-name: llmproxy.test.test_fake_upstream_anthropic -*-
"""
The Anthropic routes: messages, token counting and models, in the shapes
the official SDK parses.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import orjson

from llmproxy.testing.fake_upstream.call import Call, Reply, sse_event
from llmproxy.testing.fake_upstream.dialects import ANTHROPIC
from llmproxy.testing.fake_upstream.text import Tool, generate

ANTHROPIC_MODELS = (
    "claude-sonnet-4-5",
    "claude-opus-4-1",
    "claude-haiku-4-5",
)
"""The models C{GET .../models} lists."""


def _usage(call: Call, output_tokens: int) -> dict[str, Any]:
    knobs = call.knobs
    usage: dict[str, Any] = {
        "input_tokens": knobs.input_tokens,
        "cache_creation_input_tokens": knobs.cache_write_tokens,
        "cache_read_input_tokens": knobs.cached_tokens,
        "cache_creation": {
            "ephemeral_5m_input_tokens": knobs.cache_write_tokens,
            "ephemeral_1h_input_tokens": 0,
        },
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }
    return usage


def _tools(body: dict[str, Any]) -> list[Tool]:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not isinstance(tools, list) or (isinstance(choice, dict) and choice.get("type") == "none"):
        return []
    found = [
        Tool(str(tool.get("name")), tool.get("input_schema"))
        for tool in tools
        if isinstance(tool, dict) and "input_schema" in tool
    ]
    if isinstance(choice, dict) and choice.get("type") == "tool":
        found = [tool for tool in found if tool.name == choice.get("name")] or found
    return found


def _require(call: Call, *names: str) -> Reply | None:
    for name in names:
        if name not in call.body:
            return ANTHROPIC.error(call, 400, f"{name}: Field required")
    return None


def messages(call: Call) -> Reply:
    """
    C{POST .../messages}: a message, whole or as the event stream.
    """
    missing = _require(call, "model", "max_tokens", "messages")
    if missing is not None:
        return missing
    body = call.body
    knobs = call.knobs
    model = knobs.model or str(body["model"])
    generation = generate(call.knobs, _tools(body), body.get("max_tokens"))
    if knobs.finish_reason is not None:
        stop = knobs.finish_reason
    elif generation.tool is not None:
        stop = "tool_use"
    else:
        stop = "max_tokens" if generation.truncated else "end_turn"
    output_tokens = generation.visible_tokens + knobs.reasoning_tokens
    tool_id = call.ident("toolu_")
    message_id = call.ident("msg_")

    def final_usage() -> dict[str, Any]:
        usage = _usage(call, output_tokens)
        if knobs.reasoning_tokens:
            usage["output_tokens_details"] = {"thinking_tokens": knobs.reasoning_tokens}
        return usage

    if body.get("stream") is not True:
        if generation.tool is not None:
            content: list[Any] = [
                {
                    "type": "tool_use",
                    "id": tool_id,
                    "name": generation.tool.name,
                    "input": orjson.loads(generation.arguments),
                }
            ]
        else:
            content = [{"type": "text", "text": generation.text}]
        value: dict[str, Any] = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
        }
        if knobs.usage:
            value["usage"] = final_usage()
        return ANTHROPIC.json(call, value)

    def chunks() -> Iterator[bytes]:
        start: dict[str, Any] = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
        }
        if knobs.usage:
            start["usage"] = _usage(call, 1)
        yield sse_event("message_start", {"type": "message_start", "message": start})
        if generation.tool is not None:
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": tool_id,
                "name": generation.tool.name,
                "input": {},
            }
        else:
            block = {"type": "text", "text": ""}
        yield sse_event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": block},
        )
        yield sse_event("ping", {"type": "ping"})
        deltas: Iterable[dict[str, str]]
        if generation.tool is not None:
            deltas = (
                {"type": "input_json_delta", "partial_json": piece}
                for piece in generation.argument_pieces
            )
        else:
            deltas = ({"type": "text_delta", "text": piece} for piece in generation.pieces)
        for delta in deltas:
            yield sse_event(
                "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
            )
        yield sse_event("content_block_stop", {"type": "content_block_stop", "index": 0})
        message_delta: dict[str, Any] = {
            "type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": None},
        }
        if knobs.usage:
            usage = final_usage()
            message_delta["usage"] = {
                key: usage[key]
                for key in (
                    "input_tokens",
                    "cache_creation_input_tokens",
                    "cache_read_input_tokens",
                    "output_tokens",
                    "output_tokens_details",
                )
                if key in usage
            }
        yield sse_event("message_delta", message_delta)
        yield sse_event("message_stop", {"type": "message_stop"})

    return ANTHROPIC.stream(call, chunks())


def count_tokens(call: Call) -> Reply:
    """
    C{POST .../messages/count_tokens}: the input tokens knob.
    """
    missing = _require(call, "model", "messages")
    if missing is not None:
        return missing
    return ANTHROPIC.json(call, {"input_tokens": call.knobs.input_tokens})


def _model_object(name: str) -> dict[str, Any]:
    return {
        "type": "model",
        "id": name,
        "display_name": name.replace("-", " ").title(),
        "created_at": "2025-05-14T00:00:00Z",
    }


def models(call: Call) -> Reply:
    """
    C{GET .../models}: the model list.
    """
    return ANTHROPIC.json(
        call,
        {
            "data": [_model_object(m) for m in ANTHROPIC_MODELS],
            "has_more": False,
            "first_id": ANTHROPIC_MODELS[0],
            "last_id": ANTHROPIC_MODELS[-1],
        },
    )


def model_get(call: Call) -> Reply:
    """
    C{GET .../models/{id}}: one model, or a 404.
    """
    name = call.params["model"]
    if name not in ANTHROPIC_MODELS:
        return ANTHROPIC.error(call, 404, f"model: {name}")
    return ANTHROPIC.json(call, _model_object(name))
