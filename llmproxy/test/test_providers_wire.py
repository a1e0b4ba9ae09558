"""
Tests for L{llmproxy.providers.wire} and L{llmproxy.providers.prompt}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from llmproxy.providers.prompt import text_chars
from llmproxy.providers.wire import (
    as_int,
    decode_path,
    dig,
    first_limit,
    media_type,
    parse_json_body,
    query_values,
)


class HelperTests(SynchronousTestCase):
    """
    The total helpers never raise on odd wire data.
    """

    def test_asInt(self) -> None:
        self.assertEqual(
            [as_int(v) for v in (5, 0, -3, True, 2.0, "7", None, float("nan"), 1e300)],
            [5, 0, 0, 0, 2, 0, 0, 0, 0],
        )

    def test_firstLimit(self) -> None:
        body = {"max_tokens": 0, "max_completion_tokens": 100, "generationConfig": {"n": 7.0}}
        self.assertEqual(first_limit(body, ("max_tokens",), ("max_completion_tokens",)), 100)
        self.assertEqual(first_limit(body, ("generationConfig", "n")), 7)
        for bad in (True, "5", -1, 2.5, None, 1e300):
            self.assertIsNone(first_limit({"m": bad}, ("m",)), bad)
        self.assertIsNone(first_limit(None, ("m",)))

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
