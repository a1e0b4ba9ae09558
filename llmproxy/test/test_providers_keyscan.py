"""
Tests for L{llmproxy.providers.keyscan}.
"""

from __future__ import annotations

import contextlib

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.providers.keyscan import KeyScanner, TooComplexError, top_level


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


_KEYS = ("model", "stream", "user", "metadata")
_json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.text(alphabet=st.sampled_from('ab"\\{}[],: \n\u00e9'), max_size=8),
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from([*_KEYS, "x", 'k"ey', "{"]), inner, max_size=4),
    ),
    max_leaves=20,
)


class TopLevelTests(SynchronousTestCase):
    """
    L{top_level} reads members of a JSON object's top level only, whatever
    the nesting and strings around them, with bounded work.
    """

    def test_topLevelOnly(self) -> None:
        """
        Keys nested in members before the top-level ones (a tool input, a
        schema) are not taken for them; the last of a repeated key wins, as
        parsers keep.
        """
        text = (
            b' {"messages": [{"role": "user", "content": "a \\"model\\": \\"evil\\" {["},'
            b' {"type": "tool_use", "input": {"model": "evil", "stream": true, "user": "u2"}}],'
            b' "tools": [{"input_schema": {"properties": {"model": {"type": "string"}}}}],'
            b' "model": "first", "metadata": {"user_id": "u1", "model": "x"},'
            b' "model" : "claude-haiku-4-5", "stream":false}'
        )
        found = top_level(text, _KEYS)
        assert found is not None
        self.assertEqual(
            found.values,
            {
                "model": "claude-haiku-4-5",
                "metadata": {"user_id": "u1", "model": "x"},
                "stream": False,
            },
        )
        start, end = found.spans["metadata"]
        self.assertEqual(orjson.loads(text[start:end]), {"user_id": "u1", "model": "x"})
        self.assertEqual(text[found.inside - 1 : found.inside], b"{")

    def test_notAnObject(self) -> None:
        for text in (b"", b"   ", b"[1]", b'"model"', b"\x00{", b"null"):
            self.assertIsNone(top_level(text, _KEYS), text)

    def test_tooManyStrings(self) -> None:
        text = b'{"a": [' + b'"x",' * 100 + b'"y"], "model": "m"}'
        self.assertEqual(top_level(text, _KEYS, max_strings=200).values, {"model": "m"})  # type: ignore[union-attr]
        self.assertRaises(TooComplexError, top_level, text, _KEYS, max_strings=50)

    def test_unterminatedStrings(self) -> None:
        """
        Escaped quotes and strings cut short by the end of the text are
        walked past once (a scan restarting at every quote would be
        quadratic): the scan ends, and reads nothing from inside them.
        """
        text = b'{"a": "' + b'\\",\\"model\\":1' * 20000
        self.assertEqual(top_level(text, _KEYS).values, {})  # type: ignore[union-attr]
        text = b'{"model": "m", "a": [' + b'{"x": "\\"' * 20000
        self.assertEqual(top_level(text, _KEYS).values, {"model": "m"})  # type: ignore[union-attr]

    def test_longValue(self) -> None:
        """
        A value longer than the window is not read, but its span is known.
        """
        text = b'{"model": "' + b"m" * 5000 + b'", "user": "u"}'
        found = top_level(text, _KEYS, window=1024)
        assert found is not None
        self.assertEqual(found.values, {"model": None, "user": "u"})

    @settings(max_examples=300, deadline=None)
    @given(st.dictionaries(st.sampled_from([*_KEYS, "x", "messages"]), _json_values, max_size=6))
    def test_agreesWithParser(self, document: dict[str, object]) -> None:
        """
        For any JSON object, the scan finds what a parser finds.
        """
        text = orjson.dumps(document)
        found = top_level(text, _KEYS)
        assert found is not None
        expected = {key: value for key, value in document.items() if key in _KEYS}
        self.assertEqual(found.values, expected)
        for key, (start, end) in found.spans.items():
            self.assertEqual(orjson.loads(text[start:end]), document[key])

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200), st.sampled_from([b"{", b' {"model": "m", "x": ', b'{"a": "']))
    def test_garbage(self, text: bytes, prefix: bytes) -> None:
        """
        Any bytes: a result or L{TooComplexError}, never another exception.
        """
        with contextlib.suppress(TooComplexError):
            top_level(prefix + text, _KEYS, window=64)
