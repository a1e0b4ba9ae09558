# -*- test-case-name: llmproxy.test.test_providers_keyscan -*-
"""
Finding a few keys in JSON that is too big, or too incomplete, to parse:
usage objects at the end of a large body, or in an event cut short
(L{KeyScanner}); the model, stream flag and user at the top level of a
request body too large to parse whole (L{top_level}).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from attrs import frozen

from llmproxy.providers.wire import loads

SCAN_WINDOW = 64 << 10
"""Largest single value (a C{usage} object, a model name) a L{KeyScanner} reads."""

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_SCALAR = re.compile(rb"-?[0-9][0-9.eE+-]*|true|false|null")
_OPEN = {0x7B: b"}", 0x5B: b"]"}
_MAX_ATTEMPTS = 256


class KeyScanner:
    """
    Finds C{"key": value} pairs in a stream of JSON text without parsing
    the whole of it.

    A key's value is read when it is complete: strings and numbers directly,
    objects and arrays by trying to parse up to each candidate closing
    bracket (at most 256 tries).  A value longer than the window is given up.
    Keys are matched at any depth: callers pick keys that only occur where
    they mean it, and prefer L{first} or L{last} accordingly.  C{null} and
    empty strings are not recorded.

    Memory: the window plus one chunk.

    @ivar first: the first value seen for each key.
    @ivar last: the last value seen for each key.
    """

    def __init__(self, keys: Iterable[str], window: int = SCAN_WINDOW) -> None:
        names = sorted({key.encode() for key in keys}, key=len, reverse=True)
        self._pattern = re.compile(
            rb'"(' + b"|".join(re.escape(name) for name in names) + rb')"[ \t\r\n]*:[ \t\r\n]*'
        )
        self._keep = max(len(name) for name in names) + 64
        self._window = window
        self._buf = bytearray()
        self._pos = 0
        self._pending: tuple[str, int, int, int] | None = None
        self.first: dict[str, object] = {}
        self.last: dict[str, object] = {}

    def feed(self, data: bytes | bytearray) -> None:
        """
        Scan some more JSON text.
        """
        self._buf += data
        buf = self._buf
        keep_from: int | None = None
        while True:
            if self._pending is not None:
                key, start, resume, attempts = self._pending
                done, value, end, resume, attempts = read_value(
                    buf, start, resume, attempts, self._window
                )
                if not done:
                    if len(buf) - start > self._window or attempts > _MAX_ATTEMPTS:
                        self._pending = None
                        self._pos = start
                        continue
                    self._pending = (key, start, resume, attempts)
                    keep_from = start
                    break
                self._pending = None
                if end < 0:
                    self._pos = start
                    continue
                self._pos = end
                if value is not None and value != "":
                    self.first.setdefault(key, value)
                    self.last[key] = value
                continue
            match = self._pattern.search(buf, self._pos)
            if match is None:
                break
            if match.end() >= len(buf):
                keep_from = match.start()
                break
            key = match.group(1).decode()
            self._pending = (key, match.end(), match.end(), 0)
        if keep_from is None:
            keep_from = max(self._pos, len(buf) - self._keep)
        if keep_from > 0:
            del buf[:keep_from]
            self._pos = max(0, self._pos - keep_from)
            if self._pending is not None:
                key, start, resume, attempts = self._pending
                self._pending = (key, start - keep_from, resume - keep_from, attempts)


def read_value(
    buf: bytes | bytearray, start: int, resume: int, attempts: int, window: int
) -> tuple[bool, object, int, int, int]:
    """
    Try to read the JSON value at C{buf[start]}: strings and numbers
    directly, objects and arrays by parsing up to each candidate closing
    bracket in turn (at most C{window} bytes and 256 tries in all).

    @param resume: where to look for the next closing bracket (C{start} on
        the first call).
    @param attempts: closing brackets already tried.
    @return: C{(done, value, end, resume, attempts)}: not done means wait
        for more text; done with C{end < 0} means there is no usable value
        here.
    """
    first = buf[start]
    closer = _OPEN.get(first)
    if closer is not None:
        candidate = buf.find(closer, max(resume, start + 1))
        while candidate >= 0:
            if candidate - start > window or attempts > _MAX_ATTEMPTS:
                return True, None, -1, resume, attempts
            attempts += 1
            value = loads(buf[start : candidate + 1])
            if value is not None:
                return True, value, candidate + 1, resume, attempts
            candidate = buf.find(closer, candidate + 1)
        return False, None, -1, len(buf), attempts
    if first == 0x22:
        match = _STRING.match(buf, start)
        if match is None:
            return False, None, -1, resume, attempts
        if match.end() - start > window:
            return True, None, -1, resume, attempts
        return True, loads(match.group()), match.end(), resume, attempts
    match = _SCALAR.match(buf, start)
    if match is None:
        if len(buf) - start < 5:
            # Perhaps the start of a literal ("tr", "-"): wait for more.
            return False, None, -1, resume, attempts
        return True, None, -1, resume, attempts
    if match.end() >= len(buf):
        return False, None, -1, resume, attempts
    return True, loads(match.group()), match.end(), resume, attempts


# -- the top level of a large body ---------------------------------------------

MAX_SCAN_STRINGS = 1_000_000
"""Most JSON strings L{top_level} walks past in one body."""

MAX_SLOW_STRINGS = 50_000
"""
Most strings with an escape or a bracket in them, or longer than 1 KiB,
it walks past: each costs Python work, where other strings are skipped by
the regular expression engine.
"""

MAX_SCAN_KEYS = 10_000
"""Most occurrences, at any depth, of the keys asked for."""

# A run of text outside strings and of short strings with neither an
# escape nor a bracket in them.
_PLAIN = re.compile(rb'(?:[^"]++|"[^"\\{}\[\]]{0,1024}+")*+')
_SPACE = b" \t\r\n"
_LOOK_BACK = 64
"""Most white space between a member's key and the brace or comma before it."""


class TooComplexError(ValueError):
    """
    A body holds more JSON values than a bounded scan walks past.
    """


@frozen
class TopLevel:
    """
    The members of a JSON object's top level that a scan was asked for.

    @ivar values: each key's value (the last one, when the key repeats, as
        JSON parsers keep); L{None} for a value longer than the window.
    @ivar spans: where each of those values lies in the text, C{(start,
        end)}.
    @ivar inside: the offset just after the object's opening brace.
    """

    values: dict[str, object]
    spans: dict[str, tuple[int, int]]
    inside: int


class _Depth:
    """
    Counts brackets outside strings without copying the text: the regular
    expression engine skips plain text and short plain strings; other
    strings (up to L{MAX_SLOW_STRINGS}) are stepped over quote by quote,
    at C{bytes.find} speed.
    """

    def __init__(self, text: bytes) -> None:
        self._text = text
        self._left = MAX_SLOW_STRINGS

    def change(self, start: int, end: int) -> int:
        """
        How many more brackets C{text[start:end]} opens than it closes,
        outside strings.
        """
        text = self._text
        change = 0
        at = start
        while at < end:
            plain = _PLAIN.match(text, at, end)
            stop = plain.end() if plain is not None else at
            change += (
                text.count(b"{", at, stop)
                + text.count(b"[", at, stop)
                - text.count(b"}", at, stop)
                - text.count(b"]", at, stop)
            )
            if stop >= end:
                break
            self._left -= 1
            if self._left < 0:
                raise TooComplexError(
                    f"more than {MAX_SLOW_STRINGS} long strings or strings with escapes or brackets"
                )
            at = _string_end(text, stop, end)
        return change


def _string_end(text: bytes, start: int, end: int) -> int:
    """
    Where the string opening at C{text[start]} ends (after its closing
    quote), or C{end} if it does not end before.
    """
    at = start + 1
    while True:
        quote = text.find(b'"', at, end)
        if quote < 0:
            return end
        if _backslashes_before(text, quote, start + 1) % 2 == 0:
            return quote + 1
        at = quote + 1


def _backslashes_before(text: bytes, at: int, floor: int) -> int:
    """
    How many backslashes directly precede C{text[at]} (not before C{floor}).
    """
    size = 16
    while True:
        low = max(floor, at - size)
        window = text[low:at]
        run = len(window) - len(window.rstrip(b"\\"))
        if run < len(window) or low == floor:
            return run
        size *= 4


def top_level(
    text: bytes,
    keys: Iterable[str],
    *,
    window: int = SCAN_WINDOW,
    max_strings: int = MAX_SCAN_STRINGS,
) -> TopLevel | None:
    """
    Read a few members of the top-level object of JSON text too large to
    parse, without building the rest of it.

    The keys are found with one regular expression over the text; whether
    an occurrence is a member of the top level is decided by counting the
    brackets before it, outside strings (L{_Depth}). Only a key right after
    C{{} or C{,} (and at most 64 bytes of white space) counts: in valid
    JSON such a key can never sit inside a string. Text that is not valid
    JSON may be misread, but never makes the scan fail or slow down.

    Work: a few passes over the text in C, plus Python work for each
    occurrence of the keys and each long or escaped string, both bounded.
    Memory: the values read, nothing in proportion to the text.

    @return: the members found, or L{None} when the text is not a JSON
        object.
    @raise TooComplexError: for more than C{max_strings} strings, more than
        L{MAX_SLOW_STRINGS} long or escaped ones, or more than
        L{MAX_SCAN_KEYS} occurrences of the keys.
    """
    start = 0
    while start < len(text) and text[start] in _SPACE:
        start += 1
    if start == len(text) or text[start] != 0x7B:
        return None
    if text.count(b'"', start) > 2 * max_strings:
        raise TooComplexError(f"more than {max_strings} strings")
    names = sorted({key.encode() for key in keys}, key=len, reverse=True)
    pattern = re.compile(
        rb'"(' + b"|".join(re.escape(name) for name in names) + rb')"[ \t\r\n]*:[ \t\r\n]*'
    )
    values: dict[str, object] = {}
    spans: dict[str, tuple[int, int]] = {}
    brackets = _Depth(text)
    depth = 0  # open brackets before `at`
    at = start
    for seen, match in enumerate(pattern.finditer(text, start)):
        if seen >= MAX_SCAN_KEYS:
            raise TooComplexError(f"more than {MAX_SCAN_KEYS} occurrences of {', '.join(keys)}")
        # A member's key follows the object's brace or a comma (and a
        # little space): then, in valid JSON, it cannot be inside a string.
        here = match.start()
        before = text[max(start, here - _LOOK_BACK) : here].rstrip(_SPACE)
        if not before or before[-1] not in b"{,":
            continue
        opener = here - (min(here - start, _LOOK_BACK) - len(before)) - 1
        depth += brackets.change(at, opener)
        at = opener
        if depth + (text[opener] == 0x7B) != 1 or match.end() >= len(text):
            continue
        key = match.group(1).decode()
        done, value, end, _, _ = read_value(text, match.end(), match.end(), 0, window)
        values[key] = value if done and end >= 0 else None
        spans[key] = (match.end(), end if done and end >= 0 else match.end())
    return TopLevel(values, spans, start + 1)
