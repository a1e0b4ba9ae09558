"""
Tests for L{llmproxy.providers.format} and L{llmproxy.providers.format_for}.
"""

from __future__ import annotations

import tracemalloc

import attrs
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.providers import Inspection, RequestFacts, format_for
from llmproxy.providers.anthropic import AnthropicFormat
from llmproxy.providers.format import MAX_NAME_CHARS, PARSE_LIMIT
from llmproxy.providers.gemini import GeminiFormat
from llmproxy.providers.keyscan import MAX_SCAN_STRINGS, MAX_SLOW_STRINGS
from llmproxy.providers.openai import OpenAIFormat
from llmproxy.usage import Usage


class FormatForTests(SynchronousTestCase):
    """
    L{format_for} picks a format by config kind.
    """

    def test_kinds(self) -> None:
        self.assertIsInstance(format_for("openai"), OpenAIFormat)
        self.assertIsInstance(format_for("anthropic"), AnthropicFormat)
        self.assertIsInstance(format_for("gemini"), GeminiFormat)
        for kind in ("openai", "anthropic", "gemini"):
            self.assertEqual(format_for(kind).kind, kind)

    def test_unknown(self) -> None:
        self.assertRaises(KeyError, format_for, "cohere")


class RequestFactsTests(SynchronousTestCase):
    """
    L{RequestFacts} is a plain value; a request no format can read gets
    the defaults.
    """

    def test_defaults(self) -> None:
        facts = RequestFacts()
        self.assertEqual(facts.method, "POST")
        self.assertEqual(facts.endpoint, "other")
        self.assertEqual((facts.model, facts.streaming, facts.user), (None, False, None))

    def test_unreadable(self) -> None:
        """
        A body that is not JSON keeps the body as it is and says nothing
        about prompt text.
        """
        for kind in ("openai", "anthropic", "gemini"):
            inspection = format_for(kind).inspect(b"POST", b"/v1/x", b"", b"\x00")
            self.assertEqual(inspection.body, b"\x00")
            self.assertFalse(inspection.strip_usage_chunk)
            self.assertIsNone(inspection.facts.prompt_chars)

    def test_sample_limit(self) -> None:
        """
        Prompt text is counted only in bodies up to the sample limit.
        """
        body = b'{"model": "m", "messages": [{"role": "user", "content": "hello"}]}'
        fmt = format_for("openai")
        counted = fmt.inspect(b"POST", b"/v1/chat/completions", b"", body, sample_limit=len(body))
        self.assertEqual(counted.facts.prompt_chars, 5)
        skipped = fmt.inspect(
            b"POST", b"/v1/chat/completions", b"", body, sample_limit=len(body) - 1
        )
        self.assertIsNone(skipped.facts.prompt_chars)
        self.assertEqual(skipped.facts.model, "m")


class LargeBodyTests(SynchronousTestCase):
    """
    Bodies above L{PARSE_LIMIT} are read by a bounded scan of their top
    level: the same facts as a parse (prompt text aside), memory within a
    small multiple of the body, and the stream usage asked for in place.
    """

    filler = [{"role": "user", "content": "x" * 1000}] * (PARSE_LIMIT // 1000)

    def big(self, **members: object) -> bytes:
        decoy = {"type": "tool_use", "input": {"model": "decoy", "stream": False, "user": "d"}}
        return orjson.dumps({"messages": [*self.filler, decoy], **members})

    def test_sameFacts(self) -> None:
        """
        The facts of a large body equal those of the same members in a small
        one, whatever nested keys of the same names come first.
        """
        cases: list[tuple[str, bytes, dict[str, object]]] = [
            (
                "openai",
                b"/v1/chat/completions",
                {"model": "gpt-4o", "stream": True, "user": "u", "max_completion_tokens": 77},
            ),
            ("openai", b"/v1/responses", {"model": "gpt-5", "max_output_tokens": 9}),
            (
                "anthropic",
                b"/v1/messages",
                {"model": "claude-haiku-4-5", "max_tokens": 64, "metadata": {"user_id": "a"}},
            ),
            (
                "gemini",
                b"/v1beta/models/gemini-2.5-flash:generateContent",
                {"generationConfig": {"maxOutputTokens": 12}},
            ),
        ]
        for kind, path, members in cases:
            fmt = format_for(kind)
            body = self.big(**members)
            self.assertGreater(len(body), PARSE_LIMIT)
            scanned = fmt.inspect(b"POST", path, b"", body, inject_stream_usage=False)
            parsed = fmt.inspect(
                b"POST", path, b"", orjson.dumps(members), inject_stream_usage=False
            )
            self.assertEqual(
                scanned.facts, attrs.evolve(parsed.facts, prompt_chars=None), (kind, path)
            )
            self.assertIsNotNone(scanned.facts.max_output_tokens)
            self.assertIs(scanned.body, body)

    def test_streamUsageInPlace(self) -> None:
        """
        A large streaming chat body asks for usage like a small one does:
        inserted when it has no C{stream_options}, merged into the client's
        own, untouched when it already asks.
        """
        fmt = format_for("openai")
        cases: list[tuple[dict[str, object], dict[str, object]]] = [
            ({}, {"include_usage": True}),
            (
                {"stream_options": {"include_obfuscation": False}},
                {"include_obfuscation": False, "include_usage": True},
            ),
            ({"stream_options": {"include_usage": False}}, {"include_usage": True}),
        ]
        for extra, expected in cases:
            body = self.big(model="gpt-4o", stream=True, **extra)
            inspection = fmt.inspect(b"POST", b"/v1/chat/completions", b"", body)
            self.assertTrue(inspection.strip_usage_chunk)
            sent = orjson.loads(inspection.body)
            self.assertEqual(sent["stream_options"], expected)
            self.assertEqual(sent["messages"], orjson.loads(body)["messages"])
        body = self.big(model="gpt-4o", stream=True, stream_options={"include_usage": True})
        inspection = fmt.inspect(b"POST", b"/v1/chat/completions", b"", body)
        self.assertEqual((inspection.body, inspection.strip_usage_chunk), (body, False))

    def test_boundedMemory(self) -> None:
        """
        A body of millions of tiny JSON values (which a parser turns into
        twenty times their size in objects) is read in less than three times
        its own size.
        """
        body = b'{"messages": [' + b"{}," * (2 * PARSE_LIMIT) + b'{}], "model": "m"}'
        tracemalloc.start()
        try:
            facts = format_for("openai").inspect(b"POST", b"/v1/chat/completions", b"", body).facts
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertEqual(facts.model, "m")
        self.assertLess(peak, 3 * len(body))

    def test_tooComplex(self) -> None:
        """
        A large body with more strings, or more strings holding brackets,
        than the scan walks past is refused with a reason, not misread.
        """
        pad = b', "pad": "' + b"x" * PARSE_LIMIT + b'", "model": "m"}'
        for body in (
            b'{"input": [' + b'"a",' * MAX_SCAN_STRINGS + b'"a"]' + pad,
            b'{"input": [' + b'"{",' * (MAX_SLOW_STRINGS + 1) + b'"a"]' + pad,
        ):
            inspection = format_for("openai").inspect(b"POST", b"/v1/embeddings", b"", body)
            self.assertIn("too complex", str(inspection.refusal))
        body = b'{"input": [' + b'"{",' * 1000 + b'"a"]' + pad
        inspection = format_for("openai").inspect(b"POST", b"/v1/embeddings", b"", body)
        self.assertEqual((inspection.refusal, inspection.facts.model), (None, "m"))

    def test_namesCut(self) -> None:
        """
        Model and user names from a body are cut to L{MAX_NAME_CHARS}.
        """
        body = orjson.dumps({"model": "m" * 5000, "user": "u" * 5000})
        facts = format_for("openai").inspect(b"POST", b"/v1/chat/completions", b"", body).facts
        self.assertEqual((len(facts.model or ""), len(facts.user or "")), (MAX_NAME_CHARS,) * 2)


# Every format, endpoint and media type, fed garbage: bytes that are not
# JSON, JSON cut anywhere, SSE with broken data, binary.
_GARBAGE_PIECES = [
    b'data: {"usage": {"prompt_tokens": "x"}, "choices": []}\n\n',
    b'data: {"type":"message_start","message":{"usage":[1,2]}}\n\n',
    b'event: message_delta\ndata: {"usage": null, "delta": 5}\n\n',
    b'data: {"usageMetadata": {"promptTokenCount": -1}, "candidates": {}}\r\n\r\n',
    b'event: response.completed\ndata: {"response": []}\n\n',
    b'{"model": 1, "usage": {"input_tokens": 1e999}, "choices": [null]}',
    b'[{"usageMetadata": "x"},',
    b'"usage": {',
    b"data: [DONE]\n\n",
    b"\r",
    b"\xff\xfe\x00",
]
_garbage = st.lists(
    st.one_of(st.binary(max_size=40), st.sampled_from(_GARBAGE_PIECES)), max_size=12
).map(b"".join)
_REQUESTS = [
    ("openai", b"/v1/chat/completions", b'{"model": "m", "stream": true}'),
    ("openai", b"/v1/responses", b'{"model": "m", "stream": true}'),
    ("openai", b"/v1/embeddings", b"{}"),
    ("anthropic", b"/v1/messages", b'{"model": "m", "stream": true}'),
    ("anthropic", b"/v1/chat/completions", b"{}"),
    ("gemini", b"/v1beta/models/m:streamGenerateContent", b"{}"),
    ("gemini", b"/v1beta/models/m:generateContent", b"\x00"),
]
_MEDIA = [b"text/event-stream", b"application/json", None, b"audio/wav", b"\xff;;"]


class GarbageTests(SynchronousTestCase):
    """
    No input makes a format or a meter raise.
    """

    @settings(max_examples=300, deadline=None)
    @given(
        st.sampled_from(_REQUESTS),
        st.sampled_from(_MEDIA),
        st.booleans(),
        _garbage,
        st.lists(st.integers(0, 400), max_size=6),
    )
    def test_meters(
        self,
        target: tuple[str, bytes, bytes],
        media: bytes | None,
        strip: bool,
        body: bytes,
        cuts: list[int],
    ) -> None:
        kind, path, request_body = target
        fmt = format_for(kind)
        facts = fmt.inspect(b"POST", path, b"alt=sse", request_body).facts
        meter = fmt.new_meter(facts, media, {}, strip)
        out = b""
        last = 0
        for cut in sorted(c for c in cuts if c <= len(body)):
            out += meter.feed(body[last:cut])
            meter.usage()
            last = cut
        out += meter.feed(body[last:]) + meter.finish()
        self.assertIsInstance(meter.usage(), Usage)
        if strip:
            self.assertLessEqual(len(out), len(body))
        else:
            self.assertEqual(out, body)

    @settings(max_examples=200, deadline=None)
    @given(
        st.sampled_from(["openai", "anthropic", "gemini"]),
        st.binary(max_size=8),
        st.binary(max_size=60),
        st.binary(max_size=20),
        st.one_of(_garbage, st.sampled_from([b'{"model": {}, "messages": "x", "tools": 5}'])),
    )
    def test_requests(
        self, kind: str, method: bytes, path: bytes, query: bytes, body: bytes
    ) -> None:
        fmt = format_for(kind)
        inspection = fmt.inspect(method, path, query, body)
        self.assertIsInstance(inspection, Inspection)
        chars = inspection.facts.prompt_chars
        self.assertTrue(chars is None or chars >= 0)
        self.assertIsInstance(inspection.body, bytes)
        fmt.new_meter(
            inspection.facts, b"text/event-stream", {}, inspection.strip_usage_chunk
        ).finish()
