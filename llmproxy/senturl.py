# -*- test-case-name: llmproxy.test.test_senturl -*-
"""
The upstream URL handed to treq, in the form it is sent.

treq turns whatever URL it is given into a hyperlink URL, then back into
text through C{to_uri()}, which percent-encodes the path again and runs the
host through IDNA: for the proxy, whose URLs are a configured base URL and
the client's own request target (already percent-encoded, as HTTP requires),
that round trip changes nothing and costs about a tenth of the proxy's CPU
per request. A L{SentURL} is already in URI form, so it answers C{to_uri()}
with itself and C{to_text()} with the text it was made from; treq then sends
exactly the bytes the proxy built, as a proxy should.

Only a URL made of the characters a URI allows qualifies (L{for_treq});
anything else (a C{"} or C{|} a client left raw, say) goes through treq's
own encoding, as before.

Parsing the text into hyperlink's fields is itself a few percent of a
request's CPU, and a mount sends to a handful of URLs: the parsed URLs
(immutable) are kept, a bounded number of them, except any that carries a
credential in its query (C{?key=}), which is never kept.
"""

from __future__ import annotations

import re
from typing import cast

from hyperlink import EncodedURL

_URI_CHARACTERS = re.compile(rb"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")
"""What RFC 3986 allows in a URI: unreserved, reserved and C{%}."""


class SentURL(EncodedURL):
    """
    A URL already in the form it goes on the wire.

    treq asks it for C{to_uri().to_text()} only (and for its host when there
    are cookies to scope, which the proxy never passes); the hyperlink
    fields are still those of the text, for anything else that looks.
    """

    _sent = ""

    def to_uri(self) -> SentURL:
        return self

    def to_text(self, with_password: bool = False) -> str:
        return self._sent


KEPT = 512
"""Parsed URLs kept; past that the store starts again (clients choose paths)."""

_kept: dict[bytes, SentURL] = {}


def for_treq(url: bytes) -> SentURL | bytes:
    """
    C{url} as treq should get it: a L{SentURL} when it has only the
    characters a URI allows (what treq's encoding would leave as they
    are), else the bytes themselves.
    """
    found = _kept.get(url)
    if found is not None:
        return found
    if _URI_CHARACTERS.fullmatch(url) is None:
        return url
    text = url.decode("ascii")
    # Parsed as treq would (hyperlink builds the subclass), so every field
    # is the text's; only the way back to text is short-cut.
    sent = cast(SentURL, SentURL.from_text(text))
    sent._sent = text
    if b"key=" not in url:
        if len(_kept) >= KEPT:
            _kept.clear()
        _kept[url] = sent
    return sent
