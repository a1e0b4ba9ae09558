"""
Tests for L{llmproxy.providers.base} and L{llmproxy.providers.format_for}.
"""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.providers import format_for
from llmproxy.providers.anthropic import AnthropicFormat
from llmproxy.providers.base import (
    SCAN_WINDOW,
    JSONBodyMeter,
    KeyScanner,
    RequestInfo,
    Tally,
    as_int,
    decode_path,
    dig,
    media_type,
    parse_json_body,
    query_values,
    text_chars,
)
from llmproxy.providers.gemini import GeminiFormat
from llmproxy.providers.openai import EXTRACTOR, OpenAIFormat
from llmproxy.usage import Usage


def scan(text: bytes, keys: tuple[str, ...], *cuts: int) -> KeyScanner:
    """
    Run a scanner over C{text} split at C{cuts}.
    """
    scanner = KeyScanner(keys)
    last = 0
    for cut in sorted(cuts):
        scanner.feed(text[last:cut])
        last = cut
    scanner.feed(text[last:])
    return scanner


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
        self.assertRaises(KeyError, format_for, "bedrock")


class HelperTests(SynchronousTestCase):
    """
    The total helpers never raise on odd wire data.
    """

    def test_asInt(self) -> None:
        self.assertEqual(
            [as_int(v) for v in (5, 0, -3, True, 2.0, "7", None, float("nan"), 1e300)],
            [5, 0, 0, 0, 2, 0, 0, 0, 0],
        )

    def test_dig(self) -> None:
        value = {"a": [{"b": 1}]}
        self.assertEqual(dig(value, "a", 0, "b"), 1)
        self.assertIsNone(dig(value, "a", 1, "b"))
        self.assertIsNone(dig(value, "a", "b"))
        self.assertIsNone(dig([1], "a"))
        self.assertIsNone(dig(None, 0))

    def test_parseJsonBody(self) -> None:
        self.assertEqual(parse_json_body(b' \n{"a": 1}'), {"a": 1})
        self.assertEqual(parse_json_body(b"[1]"), [1])
        self.assertIsNone(parse_json_body(b""))
        self.assertIsNone(parse_json_body(b"--boundary\r\n"))
        self.assertIsNone(parse_json_body(b'{"a": '))
        self.assertIsNone(parse_json_body(b'{"a": "\xff"}'))
        self.assertIsNone(parse_json_body(b"[" * 5000 + b"]" * 5000))

    def test_decodePath(self) -> None:
        self.assertEqual(
            decode_path(b"/v1beta/models/gemini-2.5-flash%3AgenerateContent"),
            ["v1beta", "models", "gemini-2.5-flash:generateContent"],
        )
        self.assertEqual(decode_path(b"//a/%2F/%ff"), ["a", "\ufffd"])

    def test_queryValues(self) -> None:
        self.assertEqual(query_values(b"alt=sse&key=k%3D&alt=json", "alt"), ["sse", "json"])
        self.assertEqual(query_values(b"a+b=c+d", "a b"), ["c d"])
        self.assertEqual(query_values(b"", "alt"), [])

    def test_mediaType(self) -> None:
        self.assertEqual(media_type(b"Text/Event-Stream; charset=utf-8"), b"text/event-stream")
        self.assertIsNone(media_type(None))

    def test_textChars(self) -> None:
        """
        Strings count, binary payloads and structure do not; keys count
        only when asked.
        """
        message = {
            "role": "user",
            "content": [
                {"type": "text", "text": "hello"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "image", "source": {"type": "base64", "data": "QUFB"}},
                {"inlineData": {"mimeType": "image/png", "data": "QUFB"}},
                "data:text/plain;base64,AAAA",
            ],
        }
        self.assertEqual(text_chars([message]), 5)
        self.assertEqual(text_chars([{"ab": "cd"}], count_keys=True), 4)
        self.assertEqual(text_chars([None, 3, 2.5, True]), 0)


class TallyTests(SynchronousTestCase):
    """
    L{Tally} falls back to the request's model and the body's id.
    """

    def test_fallbacks(self) -> None:
        tally = Tally(request_model="m", body_id="b")
        self.assertEqual(tally.usage(), Usage(model="m", upstream_request_id="b"))
        tally.header_request_id = "h"
        tally.model = "n"
        self.assertEqual(tally.usage(), Usage(model="n", upstream_request_id="h"))

    def test_copyIsIndependent(self) -> None:
        tally = Tally()
        copy = tally.copy()
        copy.set_tokens(1, 2)
        self.assertFalse(tally.reported)
        self.assertTrue(copy.reported)


class KeyScannerTests(SynchronousTestCase):
    """
    L{KeyScanner} finds values by key in JSON text of any size.
    """

    document = (
        b'{"id": "x1", "data": [{"id": "inner", "v": [1, 2, 3]}],'
        b' "model" :\n "m\\"odel", "n": -12.5e3, "flag": true, "none": null, "empty": "",'
        b' "usage": {"a": {"b": [1, {"c": "}"}]}, "d": 2}}'
    )
    keys = ("id", "model", "n", "flag", "none", "empty", "usage")

    def test_values(self) -> None:
        scanner = scan(self.document, self.keys)
        self.assertEqual(
            scanner.first,
            {
                "id": "x1",
                "model": 'm"odel',
                "n": -12500.0,
                "flag": True,
                "usage": {"a": {"b": [1, {"c": "}"}]}, "d": 2},
            },
        )
        self.assertEqual(scanner.last["id"], "inner")

    def test_anySplit(self) -> None:
        """
        Every split point gives the same result.
        """
        whole = scan(self.document, self.keys)
        for cut in range(len(self.document) + 1):
            split = scan(self.document, self.keys, cut)
            self.assertEqual((split.first, split.last), (whole.first, whole.last))

    def test_keyNotValue(self) -> None:
        """
        A key's name appearing as a string value, or inside another
        string, is not a key.
        """
        scanner = scan(b'{"role": "model", "text": "say \\"model\\": 1", "x": "model"}', ("model",))
        self.assertEqual(scanner.first, {})

    def test_boundedWindow(self) -> None:
        """
        A value larger than the window is given up, the scanner's buffer
        stays bounded, and later keys are still found.
        """
        scanner = KeyScanner(("usage", "model"), window=1024)
        scanner.feed(b'{"usage": {"big": "')
        for _ in range(100):
            scanner.feed(b"z" * 1000)
            self.assertLess(len(scanner._buf), 3000)
        scanner.feed(b'"}, "model": "m", "usage": {"n": 1}}')
        self.assertEqual(scanner.last, {"model": "m", "usage": {"n": 1}})

    def test_manyClosers(self) -> None:
        """
        An object with too many candidate ends is given up after a bounded
        number of attempts.
        """
        text = b'{"usage": {' + b'"k": {},' * 1000 + b'"end": 1}, "model": "m"}'
        scanner = scan(text, ("usage", "model"))
        self.assertNotIn("usage", scanner.last)
        self.assertEqual(scanner.last["model"], "m")

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=5))
    def test_garbage(self, text: bytes, cuts: list[int]) -> None:
        """
        Any bytes, any split: no exception.
        """
        scan(b'{"usage": ' + text, ("usage", "model"), *[c for c in cuts if c < len(text)])


class JSONBodyMeterTests(SynchronousTestCase):
    """
    L{JSONBodyMeter} parses small bodies whole and scans big ones.
    """

    def test_bigBodyBounded(self) -> None:
        """
        A body over the limit is scanned, never held: the buffers stay under
        the limit plus the scanner window, and the usage at its end is read.
        """
        vectors = [
            {"object": "embedding", "index": i, "embedding": [0.125] * 512} for i in range(128)
        ]
        body = orjson.dumps(
            {
                "object": "list",
                "data": vectors,
                "model": "text-embedding-3-small",
                "usage": {"prompt_tokens": 1280, "total_tokens": 1280},
            }
        )
        self.assertGreater(len(body), 300_000)
        meter = JSONBodyMeter(Tally(request_model="x"), EXTRACTOR, limit=100_000)
        for i in range(0, len(body), 4096):
            chunk = body[i : i + 4096]
            self.assertIs(meter.feed(chunk), chunk)
            held = len(meter._buf) + (len(meter._scanner._buf) if meter._scanner else 0)
            self.assertLessEqual(held, 100_000 + SCAN_WINDOW + 4096)
        self.assertEqual(meter.finish(), b"")
        self.assertEqual(
            meter.usage(),
            Usage(model="text-embedding-3-small", input_tokens=1280, reported=True),
        )

    def test_usageCached(self) -> None:
        """
        Asking twice without new bytes parses once.
        """
        meter = JSONBodyMeter(Tally(), EXTRACTOR)
        meter.feed(b'{"model": "m", "usage": {"prompt_tokens": 3}}')
        self.assertIs(meter.usage(), meter.usage())

    def test_partialBody(self) -> None:
        """
        A body cut short still gives what its text shows.
        """
        meter = JSONBodyMeter(Tally(request_model="r"), EXTRACTOR)
        meter.feed(b'{"id": "chatcmpl-1", "model": "gpt-4o", "choices": [{"mess')
        self.assertEqual(meter.usage(), Usage(model="gpt-4o", upstream_request_id="chatcmpl-1"))


class RequestInfoTests(SynchronousTestCase):
    """
    L{RequestInfo} is a plain value.
    """

    def test_defaults(self) -> None:
        info = RequestInfo("m", False, None, "other", None)
        self.assertEqual(info.method, "POST")
        self.assertEqual(info, RequestInfo("m", False, None, "other", None, "POST"))


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
        info = fmt.inspect_request(b"POST", path, b"alt=sse", request_body)
        fmt.prompt_text_chars(info)
        meter = fmt.new_meter(info, media, {}, strip)
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
        info = fmt.inspect_request(method, path, query, body)
        self.assertIsInstance(info, RequestInfo)
        chars = fmt.prompt_text_chars(info)
        self.assertTrue(chars is None or chars >= 0)
        new_body, strip = fmt.rewrite_request(info, body, True)
        self.assertIsInstance(new_body, bytes)
        fmt.new_meter(info, b"text/event-stream", {}, strip).finish()
