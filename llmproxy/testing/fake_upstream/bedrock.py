# -*- test-case-name: llmproxy.test.test_fake_upstream_bedrock -*-
"""
The Amazon Bedrock Runtime routes: Converse, ConverseStream, InvokeModel
and InvokeModelWithResponseStream, in the shapes boto3 parses, streams
framed as a binary event stream (L{llmproxy.eventstream}), one frame per
chunk written.

Usage from the knobs, Bedrock's way: C{inputTokens} = in (uncached),
C{cacheReadInputTokens} = cr, C{cacheWriteInputTokens} = cw,
C{outputTokens} = out + r.  InvokeModel speaks Anthropic's Messages body
(C{anthropic_version} in the request), its stream the Anthropic events in
base64 C{chunk} events with Bedrock's C{amazon-bedrock-invocationMetrics}
in the last; any other body gets a Llama-style answer.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import orjson
from attrs import evolve

from llmproxy.eventstream import event_frame
from llmproxy.testing.fake_upstream import anthropic
from llmproxy.testing.fake_upstream.call import Call, Handler, Reply
from llmproxy.testing.fake_upstream.dialects import BEDROCK
from llmproxy.testing.fake_upstream.text import Tool, generate

PADDING = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0"
"""Bedrock pads stream events with a C{p} field of varying length."""

_ANTHROPIC_ID = re.compile(r"^(?:[a-z]+\.)?anthropic\.(.+?)(?:-v\d+(?::\d+)?)?$")


def _padded(value: dict[str, Any], serial: int) -> bytes:
    return orjson.dumps({**value, "p": PADDING[: 1 + serial % len(PADDING)]})


def _metrics(input_tokens: int, output_tokens: int) -> dict[str, int]:
    """
    The C{amazon-bedrock-invocationMetrics} of a stream's last chunk.
    """
    return {
        "inputTokenCount": input_tokens,
        "outputTokenCount": output_tokens,
        "invocationLatency": 1,
        "firstByteLatency": 1,
    }


def _usage(call: Call, output_tokens: int) -> dict[str, int]:
    knobs = call.knobs
    usage = {
        "inputTokens": knobs.input_tokens,
        "outputTokens": output_tokens,
        "totalTokens": knobs.input_tokens
        + output_tokens
        + knobs.cached_tokens
        + knobs.cache_write_tokens,
    }
    if knobs.cached_tokens or knobs.cache_write_tokens:
        usage["cacheReadInputTokens"] = knobs.cached_tokens
        usage["cacheWriteInputTokens"] = knobs.cache_write_tokens
    return usage


def _tools(body: dict[str, Any]) -> list[Tool]:
    config = body.get("toolConfig")
    if not isinstance(config, dict) or not isinstance(config.get("tools"), list):
        return []
    found = []
    for tool in config["tools"]:
        spec = tool.get("toolSpec") if isinstance(tool, dict) else None
        if isinstance(spec, dict) and "name" in spec:
            schema = spec.get("inputSchema")
            found.append(
                Tool(str(spec["name"]), schema.get("json") if isinstance(schema, dict) else None)
            )
    return found


def converse(call: Call) -> Reply:
    """
    C{POST .../model/<modelId>/converse} and C{converse-stream}.
    """
    body = call.body
    if not isinstance(body.get("messages"), list):
        return BEDROCK.error(call, 400, "The messages field is required.")
    knobs = call.knobs
    config = body.get("inferenceConfig")
    max_tokens = config.get("maxTokens") if isinstance(config, dict) else None
    generation = generate(knobs, _tools(body), max_tokens)
    if knobs.finish_reason is not None:
        stop = knobs.finish_reason
    elif generation.tool is not None:
        stop = "tool_use"
    else:
        stop = "max_tokens" if generation.truncated else "end_turn"
    output_tokens = generation.visible_tokens + knobs.reasoning_tokens
    tool_id = call.ident("tooluse_")
    if call.params["operation"] == "converse":
        if generation.tool is not None:
            content: dict[str, Any] = {
                "toolUse": {
                    "toolUseId": tool_id,
                    "name": generation.tool.name,
                    "input": orjson.loads(generation.arguments),
                }
            }
        else:
            content = {"text": generation.text}
        value: dict[str, Any] = {
            "output": {"message": {"role": "assistant", "content": [content]}},
            "stopReason": stop,
            "metrics": {"latencyMs": 1},
        }
        if knobs.usage:
            value["usage"] = _usage(call, output_tokens)
        return BEDROCK.json(call, value)

    def frames() -> Iterator[bytes]:
        serial = 0
        yield event_frame("messageStart", _padded({"role": "assistant"}, serial))
        if generation.tool is not None:
            start = {"toolUse": {"toolUseId": tool_id, "name": generation.tool.name}}
            yield event_frame(
                "contentBlockStart",
                _padded({"contentBlockIndex": 0, "start": start}, serial),
            )
            deltas: list[dict[str, Any]] = [
                {"toolUse": {"input": piece}} for piece in generation.argument_pieces
            ]
        else:
            deltas = [{"text": piece} for piece in generation.pieces]
        for delta in deltas:
            serial += 1
            yield event_frame(
                "contentBlockDelta", _padded({"contentBlockIndex": 0, "delta": delta}, serial)
            )
        yield event_frame("contentBlockStop", _padded({"contentBlockIndex": 0}, serial))
        yield event_frame("messageStop", _padded({"stopReason": stop}, serial))
        metadata: dict[str, Any] = {"metrics": {"latencyMs": 1}}
        if knobs.usage:
            metadata["usage"] = _usage(call, output_tokens)
        yield event_frame("metadata", _padded(metadata, serial))

    return BEDROCK.stream(call, frames())


def anthropic_model(model_id: str) -> str:
    """
    Anthropic's name for a Bedrock model id
    (C{us.anthropic.claude-sonnet-4-20250514-v1:0} -> C{claude-sonnet-4-20250514}).
    """
    found = _ANTHROPIC_ID.match(model_id.rsplit("/", 1)[-1])
    return found.group(1) if found else model_id


def invoke(call: Call) -> Reply:
    """
    C{POST .../model/<modelId>/invoke} and C{invoke-with-response-stream}.
    """
    body = call.body
    streaming = call.params["operation"] == "invoke-with-response-stream"
    if "anthropic_version" not in body:
        return _invoke_other(call, streaming)
    if body.get("anthropic_version") != "bedrock-2023-05-31":
        return BEDROCK.error(call, 400, "anthropic_version: unsupported value")
    model = anthropic_model(call.params["model"])
    messages_call = evolve(call, body={**body, "model": model, "stream": streaming})
    answer = anthropic.messages(messages_call)
    if answer.status != 200:
        return BEDROCK.error(call, 400, "Malformed input request.")
    knobs = call.knobs
    counts = [
        (b"X-Amzn-Bedrock-Input-Token-Count", knobs.input_tokens),
        (b"X-Amzn-Bedrock-Cache-Read-Input-Token-Count", knobs.cached_tokens),
        (b"X-Amzn-Bedrock-Cache-Write-Input-Token-Count", knobs.cache_write_tokens),
    ]
    if not streaming:
        [raw] = list(answer.chunks)
        message = orjson.loads(raw)
        message.pop("id", None)
        message["id"] = call.ident("msg_bdrk_")
        output = message.get("usage", {}).get("output_tokens", 0)
        headers = [*BEDROCK.headers(call, BEDROCK.json_type)]
        if knobs.usage:
            headers += [(name, str(value).encode()) for name, value in counts]
            headers.append((b"X-Amzn-Bedrock-Output-Token-Count", str(output).encode()))
        return Reply(status=200, headers=headers, chunks=[orjson.dumps(message)])

    def frames() -> Iterator[bytes]:
        output = 0
        for serial, sse in enumerate(answer.chunks):
            data = sse.split(b"\ndata: ", 1)[1].rstrip(b"\n")
            event = orjson.loads(data)
            kind = event.get("type")
            if kind == "message_delta":
                output = event.get("usage", {}).get("output_tokens", output)
            if kind == "message_stop" and knobs.usage:
                event["amazon-bedrock-invocationMetrics"] = _metrics(knobs.input_tokens, output)
            encoded = base64.b64encode(orjson.dumps(event)).decode("ascii")
            yield event_frame("chunk", _padded({"bytes": encoded}, serial))

    return BEDROCK.stream(call, frames())


def _invoke_other(call: Call, streaming: bool) -> Reply:
    """
    A body that is not Anthropic's: a Llama-style answer, usage in the
    headers (and in the stream's last chunk).
    """
    knobs = call.knobs
    generation = generate(knobs, [], call.body.get("max_gen_len"))
    output = generation.visible_tokens
    stop = knobs.finish_reason or ("length" if generation.truncated else "stop")
    if not streaming:
        headers = [*BEDROCK.headers(call, BEDROCK.json_type)]
        if knobs.usage:
            headers += [
                (b"X-Amzn-Bedrock-Input-Token-Count", str(knobs.input_tokens).encode()),
                (b"X-Amzn-Bedrock-Output-Token-Count", str(output).encode()),
            ]
        value = {
            "generation": generation.text,
            "prompt_token_count": knobs.input_tokens,
            "generation_token_count": output,
            "stop_reason": stop,
        }
        return Reply(status=200, headers=headers, chunks=[orjson.dumps(value)])

    def frames() -> Iterator[bytes]:
        pieces = list(generation.pieces)
        for serial, piece in enumerate(pieces):
            event: dict[str, Any] = {"generation": piece, "stop_reason": None}
            if serial == len(pieces) - 1:
                event["stop_reason"] = stop
                if knobs.usage:
                    event["amazon-bedrock-invocationMetrics"] = _metrics(knobs.input_tokens, output)
            encoded = base64.b64encode(orjson.dumps(event)).decode("ascii")
            yield event_frame("chunk", _padded({"bytes": encoded}, serial))

    return BEDROCK.stream(call, frames())


OPERATIONS: dict[str, Handler] = {
    "converse": converse,
    "converse-stream": converse,
    "invoke": invoke,
    "invoke-with-response-stream": invoke,
}
"""Bedrock Runtime operations by the last segment of their path."""

PATH = re.compile(r"/model/([^/]+)/(converse|converse-stream|invoke|invoke-with-response-stream)$")


def model_from(raw: str) -> str:
    """
    The model id of a path segment (percent-decoded: an ARN's C{/} too).
    """
    return unquote(raw)
