"""
Tests for L{llmproxy.providers.keyscan}.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.providers.keyscan import KeyScanner


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
