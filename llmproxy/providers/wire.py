# -*- test-case-name: llmproxy.test.test_providers_wire -*-
"""
Small, total helpers for reading untrusted wire data (JSON values, raw
paths and query strings, media types). None of them raises, whatever the
input: a provider module turns bytes into facts and must never fail a
request because a client or an upstream sent something odd.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

import orjson


def as_int(value: object) -> int:
    """
    A token count from JSON: a non-negative number, else 0.
    """
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value if value > 0 else 0
    if isinstance(value, float) and value > 0 and value < 1e18:
        return int(value)
    return 0


def as_count(value: object) -> int | None:
    """
    A count the client asked for (C{max_tokens}): a non-negative integer,
    else L{None}.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def as_str(value: object) -> str | None:
    """
    A non-empty JSON string, else L{None}.
    """
    return value if isinstance(value, str) and value else None


def dig(value: object, *path: str | int) -> object:
    """
    C{value[p0][p1]...} through dicts and lists, or L{None} where the path
    does not exist.
    """
    for step in path:
        if isinstance(step, str):
            if not isinstance(value, dict):
                return None
            value = value.get(step)
        else:
            if not isinstance(value, list) or not -len(value) <= step < len(value):
                return None
            value = value[step]
    return value


def loads(data: bytes | bytearray) -> object:
    """
    Parse JSON, or L{None} when it is not JSON.
    """
    try:
        return orjson.loads(data)
    except (ValueError, TypeError):
        return None


_JSON_START = frozenset(b"{[")
_JSON_SPACE = frozenset(b" \t\r\n")


def parse_json_body(body: bytes) -> object | None:
    """
    Parse a request body that looks like a JSON object or array; anything
    else (multipart uploads, binary) is not even tried.
    """
    i = 0
    n = len(body)
    while i < n and body[i] in _JSON_SPACE:
        i += 1
    if i == n or body[i] not in _JSON_START:
        return None
    return loads(body)


def decode_path(path: bytes) -> list[str]:
    """
    The non-empty, percent-decoded segments of a raw request path.
    """
    try:
        text = unquote_to_bytes(path).decode("utf-8", "replace")
    except Exception:
        return []
    return [segment for segment in text.split("/") if segment]


def query_values(query: bytes, name: str) -> list[str]:
    """
    Every value of C{name} in a raw query string, percent-decoded.
    """
    values = []
    for part in query.split(b"&"):
        key, _, value = part.partition(b"=")
        try:
            if unquote_to_bytes(key.replace(b"+", b" ")).decode("utf-8", "replace") == name:
                values.append(
                    unquote_to_bytes(value.replace(b"+", b" ")).decode("utf-8", "replace")
                )
        except Exception:
            continue
    return values


def media_type(content_type: bytes | None) -> bytes | None:
    """
    C{b"text/event-stream"} from C{b"Text/Event-Stream; charset=utf-8"}.
    """
    if content_type is None:
        return None
    return content_type.split(b";", 1)[0].strip().lower()


def is_json_type(media: bytes | None) -> bool:
    """
    Whether a response media type may carry JSON worth metering.  A missing
    type counts: the JSON meter copes with anything.
    """
    return (
        media is None
        or media in (b"", b"application/json", b"text/json")
        or media.endswith(b"+json")
    )


def json_string(raw: bytes) -> str | None:
    """
    Decode the body of a JSON string literal found by a regular expression
    (the bytes between its quotes).
    """
    if b"\\" not in raw:
        try:
            return raw.decode("utf-8") or None
        except UnicodeDecodeError:
            return None
    value = loads(b'"' + raw + b'"')
    return value if isinstance(value, str) and value else None
