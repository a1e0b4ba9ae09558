# -*- test-case-name: llmproxy.test.test_auth -*-
"""
Provider credentials the proxy holds (C{auth.credentials}), and the swap
that puts them on a request in place of the proxy key the client sent.

The swap removes every header and query parameter a provider SDK carries
a key in, so neither the proxy key nor anything else the client sent as a
credential reaches the provider; then it sets the configured headers for
the mount the attempt goes to.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from urllib.parse import unquote_to_bytes

from twisted.web.http_headers import Headers

Header = tuple[bytes, bytes]

CLIENT_CREDENTIAL_HEADERS = (b"authorization", b"x-api-key", b"x-goog-api-key", b"api-key")
"""Where the SDKs send a key: OpenAI, Anthropic, Gemini and Azure OpenAI."""


class CredentialSwap:
    """
    The provider credentials of one configuration, by mount name.

    Its C{repr} names the mounts only: the values are secrets.
    """

    __slots__ = ("_headers",)

    def __init__(self, credentials: Mapping[str, Mapping[str, str]]) -> None:
        """
        @param credentials: C{auth.credentials}: mount -> header -> value.
        """
        self._headers: dict[str, tuple[Header, ...]] = {
            mount: tuple(
                (name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()
            )
            for mount, headers in credentials.items()
        }

    def __repr__(self) -> str:
        return f"<CredentialSwap for {sorted(self._headers)}>"

    def apply(self, outgoing: Headers, mount: str) -> None:
        """
        Replace the client's credential headers in C{outgoing} with the
        configured ones of C{mount} (none when it has none configured: an
        upstream's own headers may still add one).
        """
        for name in CLIENT_CREDENTIAL_HEADERS:
            outgoing.removeHeader(name)
        for name, value in self._headers.get(mount, ()):
            outgoing.setRawHeaders(name, [value])

    def secrets(self) -> Iterator[str]:
        """
        Every configured header value, for the log redaction.
        """
        for headers in self._headers.values():
            for _, value in headers:
                yield value.decode("latin-1")


def without_query_key(query: bytes) -> bytes:
    """
    C{query} without its C{key} parameters (Gemini's C{?key=}), every other
    parameter kept as sent.
    """
    if b"key" not in query:
        return query
    kept = [
        part
        for part in query.split(b"&")
        if unquote_to_bytes(part.partition(b"=")[0].replace(b"+", b" ")) != b"key"
    ]
    return b"&".join(kept)
