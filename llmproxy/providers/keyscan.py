# -*- test-case-name: llmproxy.test.test_providers_keyscan -*-
"""
Finding a few keys in JSON that is too big, or too incomplete, to parse:
usage objects at the end of a large body, or in an event cut short.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

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
                done, value, end, resume, attempts = self._value(buf, start, resume, attempts)
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

    def _value(
        self, buf: bytearray, start: int, resume: int, attempts: int
    ) -> tuple[bool, object, int, int, int]:
        """
        Try to read the value at C{buf[start]}.

        @return: C{(done, value, end, resume, attempts)}: not done means wait
            for more text; done with C{end < 0} means there is no usable
            value here.
        """
        first = buf[start]
        closer = _OPEN.get(first)
        if closer is not None:
            candidate = buf.find(closer, max(resume, start + 1))
            while candidate >= 0:
                if candidate - start > self._window or attempts > _MAX_ATTEMPTS:
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
