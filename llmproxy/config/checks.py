# -*- test-case-name: llmproxy.test.test_config_checks -*-
"""
The machinery for validating configuration: a L{Checker} that collects
every error instead of stopping at the first, and the parsers for single
values (numbers, strings, choices, URLs) and for mappings of known keys.

It knows nothing about which keys the configuration has; that is
L{llmproxy.config.validate}, which is written in terms of these parsers.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from llmproxy.config.errors import KeyPath, Locate, error_line, segment, show


class _Missing:
    """The value of a key that is absent: shown as C{nothing} in messages."""

    def __repr__(self) -> str:
        return "nothing"


MISSING = _Missing()


class Invalid:
    """Returned by a parser that has recorded an error for its value."""


INVALID = Invalid()


class Expanded(str):
    """
    A string value that came out of a C{${VAR}} reference.

    Environment variables are always strings, so a numeric or boolean key
    accepts one of these when its text reads as a YAML number or boolean
    (C{requests_per_minute: ${RPM:-60}}); a literal string never does.
    """


class Checker:
    """
    Collects validation errors instead of stopping at the first one.
    """

    def __init__(self, locate: Locate) -> None:
        self._locate = locate
        self.errors: list[str] = []

    def fail(self, path: KeyPath, expected: str, value: object) -> Invalid:
        """
        Record that the value at C{path} is not what was expected.

        @return: L{INVALID}, so a parser can C{return ck.fail(...)}.
        """
        return self.note(path, f"{expected}, got {show(value)}")

    def note(self, path: KeyPath, message: str) -> Invalid:
        """
        Record a problem with the key at C{path} that has no single value to
        show (an unknown key, a missing transport).
        """
        self.errors.append(error_line(self._locate(path), path, message))
        return INVALID


Parser = Callable[[Checker, KeyPath, object], Any]
"""
Parses the value at a path: returns what goes into the attrs value, or
L{INVALID} once it has told the checker what is wrong.
"""


def _scalar(value: object) -> object:
    """
    Read an expanded environment value as a YAML scalar (C{"60"} -> C{60},
    C{"true"} -> C{True}); any other value is returned unchanged.
    """
    if isinstance(value, Expanded):
        try:
            loaded = yaml.safe_load(str(value))
        except yaml.YAMLError:
            return value
        if isinstance(loaded, bool | int | float):
            return loaded
    return value


def boolean(ck: Checker, path: KeyPath, value: object) -> bool | Invalid:
    """
    C{true} or C{false}.
    """
    value = _scalar(value)
    if isinstance(value, bool):
        return value
    return ck.fail(path, "expected true or false", value)


def _integer(minimum: int) -> Parser:
    """
    A parser for an integer >= C{minimum}; booleans are not integers here,
    even though Python says they are.
    """
    expected = "expected an integer > 0" if minimum == 1 else f"expected an integer >= {minimum}"

    def parse(ck: Checker, path: KeyPath, value: object) -> int | Invalid:
        value = _scalar(value)
        if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
            return value
        return ck.fail(path, expected, value)

    return parse


def _number(positive: bool) -> Parser:
    """
    A parser for a finite number that is > 0 (C{positive}) or >= 0; an
    integer is accepted and returned as a float.
    """
    expected = "expected a number > 0" if positive else "expected a number >= 0"

    def parse(ck: Checker, path: KeyPath, value: object) -> float | Invalid:
        value = _scalar(value)
        if (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and (value > 0 if positive else value >= 0)
        ):
            return float(value)
        return ck.fail(path, expected, value)

    return parse


count = _integer(0)
positive_count = _integer(1)
amount = _number(positive=False)
positive_amount = _number(positive=True)


def string(ck: Checker, path: KeyPath, value: object) -> str | Invalid:
    """
    A non-empty string.
    """
    if isinstance(value, str) and value:
        return str(value)
    return ck.fail(path, "expected a non-empty string", value)


def string_list(ck: Checker, path: KeyPath, value: object) -> tuple[str, ...] | Invalid:
    """
    A list of non-empty strings, each reported by its index.
    """
    if not isinstance(value, list):
        return ck.fail(path, "expected a list of non-empty strings", value)
    items = [string(ck, (*path, index), item) for index, item in enumerate(value)]
    if any(isinstance(item, Invalid) for item in items):
        return INVALID
    return tuple(str(item) for item in items)


def one_of(choices: Iterable[str]) -> str:
    """
    What a L{choice} expects: C{expected one of 'a', 'b'}.
    """
    return "expected one of " + ", ".join(repr(option) for option in choices)


def choice(*choices: str) -> Parser:
    """
    A parser for a string that must be one of C{choices}.
    """
    expected = one_of(choices)

    def parse(ck: Checker, path: KeyPath, value: object) -> str | Invalid:
        if isinstance(value, str) and value in choices:
            return str(value)
        return ck.fail(path, expected, value)

    return parse


def fields(
    ck: Checker, path: KeyPath, value: object, allowed: Iterable[str]
) -> dict[str, object] | None:
    """
    Check that C{value} is a mapping whose keys are all in C{allowed}.

    @return: the known keys and their values, or L{None} if C{value} is not a
        mapping at all.  Unknown keys are reported and left out.
    """
    if not isinstance(value, Mapping):
        ck.fail(path, "expected a mapping", value)
        return None
    known = list(allowed)
    result: dict[str, object] = {}
    for key, item in value.items():
        if isinstance(key, str) and key in known:
            result[key] = item
            continue
        hint = ""
        if isinstance(key, str):
            close = difflib.get_close_matches(key, known, n=1)
            if close:
                hint = f" (did you mean {close[0]!r}?)"
        ck.note((*path, segment(key)), f"unknown key{hint}, expected one of {', '.join(known)}")
    return result


_T = TypeVar("_T")


def section(
    ck: Checker,
    path: KeyPath,
    value: object,
    cls: Callable[..., _T],
    parsers: Mapping[str, Parser],
    **fixed: Any,
) -> _T:
    """
    Build an attrs value from a mapping, one parser per key.

    Keys the mapping leaves out (or whose values are invalid) take the
    class's defaults, or the values in C{fixed}; an invalid value has been
    reported already, so the result only matters when there were no errors.
    """
    kwargs: dict[str, Any] = dict(fixed)
    given = fields(ck, path, value, parsers)
    for key, item in (given or {}).items():
        parsed = parsers[key](ck, (*path, key), item)
        if not isinstance(parsed, Invalid):
            kwargs[key] = parsed
    return cls(**kwargs)


def nested(
    cls: Callable[..., _T], parsers: Mapping[str, Parser]
) -> Callable[[Checker, KeyPath, object], _T]:
    """
    A parser for a section whose keys are each parsed on their own:
    L{section} with C{cls} and C{parsers} fixed.
    """

    def parse(ck: Checker, path: KeyPath, value: object) -> _T:
        return section(ck, path, value, cls, parsers)

    return parse


def named(
    ck: Checker, path: KeyPath, value: object, what: str
) -> list[tuple[str, KeyPath, object]]:
    """
    The entries of a mapping keyed by non-empty string names (models, users,
    scopes), each with its path.
    """
    if not isinstance(value, Mapping):
        ck.fail(path, f"expected a mapping of {what} to settings", value)
        return []
    entries = []
    for key, item in value.items():
        entry = (*path, segment(key))
        if isinstance(key, str) and key:
            entries.append((key, entry, item))
        else:
            ck.fail(entry, f"expected a non-empty string as the {what}", key)
    return entries


# -- URLs ---------------------------------------------------------------------


def base_url(ck: Checker, path: KeyPath, value: object) -> str | Invalid:
    """
    An upstream base URL: http or https, a host, an optional port and an
    optional path prefix, returned without a trailing slash (the forwarded
    path always starts with one).
    """
    expected = "expected an http(s) URL: scheme, host, optional port and path prefix"
    if not isinstance(value, str):
        return ck.fail(path, expected, value)
    problem = _url_problem(value, ("http", "https"))
    if problem is None:
        parts = urlsplit(value)
        if parts.username is not None or "@" in parts.netloc:
            problem = "credentials do not belong in base_url"
        else:
            path_part = parts.path.rstrip("/")
            return f"{parts.scheme.lower()}://{parts.netloc}{path_part}"
    return ck.fail(path, f"{expected} ({problem})", value)


def redis_url(ck: Checker, path: KeyPath, value: object) -> str | Invalid:
    """
    A Redis URL: redis or rediss, a host, and at most a database number as
    its path.
    """
    expected = "expected a redis:// or rediss:// URL with a host"
    if not isinstance(value, str):
        return ck.fail(path, expected, value)
    problem = _url_problem(value, ("redis", "rediss"))
    if problem is None:
        db = urlsplit(value).path
        if db not in ("", "/") and not re.fullmatch(r"/[0-9]+", db):
            problem = "the path may only be a database number"
    if problem is not None:
        return ck.fail(path, f"{expected} ({problem})", value)
    return str(value)


def _url_problem(value: str, schemes: tuple[str, ...]) -> str | None:
    """
    What is wrong with C{value} as an absolute URL with one of C{schemes}, a
    host and no query or fragment, or L{None}.
    """
    if not value or any(char.isspace() for char in value):
        return "empty or contains whitespace"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as error:
        return str(error)
    if parts.scheme.lower() not in schemes:
        return "scheme must be " + " or ".join(schemes)
    if not parts.hostname:
        return "no host"
    if "?" in value or "#" in value:
        return "no query or fragment allowed"
    return None
