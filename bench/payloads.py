"""
The bytes every part of the benchmark sends and answers with, in one place so
the fake upstreams, the clients and the driver agree on them.

Shapes follow OpenAI's Chat Completions: a small request, a complete
non-streaming answer, and a stream of C{chat.completion.chunk} events that ends
with a usage-only chunk and C{data: [DONE]}.
"""

from __future__ import annotations

import orjson

MODEL = "bench-model"

#: A small non-streaming chat request (what part (a) and (e) POST).
CHAT_REQUEST: bytes = orjson.dumps(
    {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say hello in one short sentence."},
        ],
        "max_tokens": 16,
    }
)

#: The static answer to L{CHAT_REQUEST}.
CHAT_RESPONSE: bytes = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 21, "completion_tokens": 9, "total_tokens": 30},
    }
)


#: A streaming chat request.  C{stream_options.include_usage} is set so the
#: proxy passes the final usage chunk through instead of injecting and stripping
#: it: the stream is then the same bytes direct and proxied.  The chunk count and
#: delay are not in the body; the upstream reads them from the query string,
#: which the proxy forwards verbatim.
STREAM_REQUEST: bytes = orjson.dumps(
    {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count slowly."}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
)


def big_request(size: int) -> bytes:
    """
    A valid chat request of about C{size} bytes: one long user message, so a
    proxy that parses the body to find C{model} and C{stream} has to parse it all.
    """
    head = b'{"model":"' + MODEL.encode() + b'","messages":[{"role":"user","content":"'
    tail = b'"}]}'
    return head + b"x" * max(0, size - len(head) - len(tail)) + tail


def _event(payload: object) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _chunk(delta: dict[str, str], finish: str | None) -> bytes:
    return _event(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
    )


#: The first event of a stream (carries the role).
FIRST_EVENT: bytes = _chunk({"role": "assistant", "content": ""}, None)
#: Every middle event.
TOKEN_EVENT: bytes = _chunk({"content": "tok "}, None)
#: The last content event.
LAST_EVENT: bytes = _chunk({}, "stop")


def tail_events(chunks: int) -> bytes:
    """
    The usage-only chunk and the terminator, sent right after the last
    content event.
    """
    usage = _event(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": MODEL,
            "choices": [],
            "usage": {
                "prompt_tokens": 12,
                "completion_tokens": chunks,
                "total_tokens": 12 + chunks,
            },
        }
    )
    return usage + b"data: [DONE]\n\n"


def content_event(index: int, chunks: int) -> bytes:
    """
    Content event number C{index} (0-based) of a stream of C{chunks} events.
    """
    if index == 0:
        return FIRST_EVENT
    if index == chunks - 1:
        return LAST_EVENT
    return TOKEN_EVENT
