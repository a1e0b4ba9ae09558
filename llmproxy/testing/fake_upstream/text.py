# -*- test-case-name: llmproxy.test.test_fake_upstream_text -*-
"""
The fake model: deterministic answer text, made-up tool calls and
embedding vectors.

The routes of all three providers answer with what L{generate} makes, so
the same knobs give the same content whatever the wire format, and a test
predicts it with L{text_pieces} and L{fake_text}.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
from attrs import frozen

from llmproxy.testing.fake_upstream.knobs import DEFAULT_CHUNKS, Knobs

_WORDS = ("Hello", " from", " the", " fake", " upstream", ".")
_FILLER_PIECE = ("filler " * 1171)[:8192]

EMBEDDING_DIMENSIONS = 8
"""The length of an embedding vector when the request does not ask for one."""


def text_pieces(chunks: int) -> list[str]:
    """
    The text pieces the fake answers with for C{x-fake-chunks: chunks}, one
    per stream content event.
    """
    return [_WORDS[i % len(_WORDS)] for i in range(chunks)]


def fake_text(chunks: int = DEFAULT_CHUNKS) -> str:
    """
    The whole answer text for C{x-fake-chunks: chunks}.
    """
    return "".join(text_pieces(chunks))


@frozen
class Tool:
    """
    A tool a request offers the model.

    @ivar schema: its parameters' JSON schema, as the request gave it.
    """

    name: str
    schema: Any


@frozen
class Generation:
    """
    What the fake model "generated" for one request.

    @ivar pieces: the text pieces (empty for a tool call).
    @ivar tool: the tool called, if any.
    @ivar arguments: the tool call's arguments as JSON text.
    @ivar argument_pieces: C{arguments} cut for streaming.
    @ivar truncated: the text was cut by the request's max tokens.
    @ivar visible_tokens: output tokens excluding reasoning.
    """

    pieces: Sequence[str]
    tool: Tool | None
    arguments: str
    argument_pieces: list[str]
    truncated: bool
    visible_tokens: int

    @property
    def text(self) -> str:
        """
        The whole answer text.
        """
        return "".join(self.pieces)


class _Filler(Sequence[str]):
    """
    C{count} filler pieces without C{count} list slots.
    """

    def __init__(self, count: int) -> None:
        self._count = count

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return _Filler(len(range(*index.indices(self._count))))
        if not -self._count <= index < self._count:
            raise IndexError(index)
        return _FILLER_PIECE

    def __iter__(self) -> Iterator[str]:
        return itertools.repeat(_FILLER_PIECE, self._count)


def _split(text: str, parts: int) -> list[str]:
    """
    Cut C{text} into at most C{parts} non-empty consecutive pieces.
    """
    if not text:
        return []
    parts = max(1, min(parts, len(text)))
    size = math.ceil(len(text) / parts)
    return [text[i : i + size] for i in range(0, len(text), size)]


def _fake_value(schema: Any) -> Any:
    """
    A value that satisfies a (simple) JSON schema: the made-up arguments of
    a tool call.
    """
    if not isinstance(schema, dict):
        return "fake"
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    kind = str(kind).lower() if kind is not None else "object"
    if kind == "object":
        properties = schema.get("properties")
        if not isinstance(properties, dict):
            return {}
        return {str(key): _fake_value(value) for key, value in properties.items()}
    return {
        "string": "fake",
        "integer": 1,
        "number": 1.5,
        "boolean": True,
        "array": [],
        "null": None,
    }.get(kind, "fake")


def generate(knobs: Knobs, tools: Sequence[Tool], max_tokens: object) -> Generation:
    """
    What the fake model answers: a call to the first of C{tools} if any (the
    routes drop the tools a request's tool choice rules out), else the text
    pieces the knobs ask for, cut to C{max_tokens} when that is an integer
    below their count.
    """
    if tools:
        tool = tools[0]
        value = _fake_value(tool.schema)
        # Every provider wants an object of arguments, whatever the schema says.
        arguments = orjson.dumps(value if isinstance(value, dict) else {}).decode()
        argument_pieces = _split(arguments, max(1, knobs.chunks))
        visible = knobs.output_tokens
        return Generation(
            pieces=[],
            tool=tool,
            arguments=arguments,
            argument_pieces=argument_pieces,
            truncated=False,
            visible_tokens=len(argument_pieces) if visible is None else visible,
        )
    pieces: Sequence[str]
    if knobs.total_bytes is not None:
        pieces = _Filler(max(1, math.ceil(knobs.total_bytes / len(_FILLER_PIECE))))
    else:
        pieces = text_pieces(knobs.chunks)
    truncated = False
    if (
        isinstance(max_tokens, int)
        and not isinstance(max_tokens, bool)
        and 0 <= max_tokens < len(pieces)
    ):
        pieces = pieces[:max_tokens]
        truncated = True
    visible = knobs.output_tokens
    return Generation(
        pieces=pieces,
        tool=None,
        arguments="",
        argument_pieces=[],
        truncated=truncated,
        visible_tokens=len(pieces) if visible is None else visible,
    )


def fake_embedding(index: int, dimensions: int) -> list[float]:
    """
    The C{index}th input's embedding: a deterministic vector whose values
    survive a float32 round trip exactly (so base64 answers decode to the
    same numbers).
    """
    return [((index + j) % 8) / 8.0 - 0.5 for j in range(dimensions)]
