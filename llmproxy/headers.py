# -*- test-case-name: llmproxy.test.test_call -*-
"""
Which headers cross the proxy: the client's request headers going
upstream, and the upstream's response headers coming back, less what is
hop-by-hop, framing the proxy recomputes, or (for CORS) the proxy's own.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest, IResponse

log = Logger(namespace="llmproxy.headers")

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
"""RFC 9110 7.6.1, plus the legacy C{Proxy-Connection}."""

REQUEST_DROP = frozenset({b"host", b"content-length", b"accept-encoding", b"expect"})
"""
Request headers set by the client side of the proxy instead: C{Host} by the
agent from the URL, C{Content-Length} from the body producer,
C{Accept-Encoding} by treq (gzip, which it decodes: the client receives
the decoded body, see docs/requests.md).
"""

RESPONSE_DROP = frozenset({b"content-length", b"content-encoding"})
"""
Response framing headers we compute ourselves. C{Content-Encoding} survives
only when the body is passed through undecoded (see L{copy_response_headers}).
"""


MAX_RELAYED_HEADERS = 100
"""Most upstream response header lines relayed to the client."""

MAX_RELAYED_HEADER_BYTES = 32 << 10
"""Most bytes of upstream response headers (names and values) relayed."""

ALWAYS_RELAYED = frozenset(
    {b"content-type", b"content-disposition", b"retry-after", b"x-request-id", b"request-id"}
)
"""
Headers a client needs to read the answer, relayed ahead of the caps (their
first value each), however many other headers an upstream sends first.
"""


_REQUEST_SKIP = HOP_BY_HOP | REQUEST_DROP
_RESPONSE_SKIP = HOP_BY_HOP | RESPONSE_DROP


def _skipped(headers: Headers, always: frozenset[bytes]) -> frozenset[bytes]:
    """
    C{always}, plus the headers a C{Connection} header names (rare: the
    common case costs one lookup).
    """
    named = headers.getRawHeaders(b"connection")
    if not named:
        return always
    return always | frozenset(
        token.strip().lower() for value in named for token in value.split(b",") if token.strip()
    )


def forward_request_headers(
    incoming: Headers, client_ip: str | None, secure: bool, forwarded: bool
) -> Headers:
    """
    The headers to send upstream: everything the client sent except
    hop-by-hop headers (and those C{Connection} names), C{Host},
    C{Content-Length} and C{Accept-Encoding}; plus C{X-Forwarded-For} (appended) and
    C{X-Forwarded-Proto} when C{forwarded}.
    """
    skip = _skipped(incoming, _REQUEST_SKIP)
    outgoing = Headers()
    for name, values in incoming.getAllRawHeaders():
        if name.lower() not in skip:
            outgoing.setRawHeaders(name, list(values))
    if forwarded:
        chain = b", ".join(incoming.getRawHeaders(b"x-forwarded-for", []))
        if client_ip:
            ip = client_ip.encode("ascii")
            chain = chain + b", " + ip if chain else ip
        if chain:
            outgoing.setRawHeaders(b"x-forwarded-for", [chain])
        outgoing.setRawHeaders(b"x-forwarded-proto", [b"https" if secure else b"http"])
    return outgoing


def copy_response_headers(response: IResponse, request: IRequest) -> bool:
    """
    Copy the upstream's response headers to C{request}, less hop-by-hop,
    framing and CORS headers (the proxy owns CORS), and beyond
    L{ALWAYS_RELAYED}, at most L{MAX_RELAYED_HEADERS} lines or
    L{MAX_RELAYED_HEADER_BYTES} (the rest is dropped, with a warning).
    Returns whether the body is still encoded: gzip is decoded below treq
    (L{llmproxy.decoding}), which removes C{Content-Encoding}, so one still
    present is an encoding we pass through untouched.
    """
    headers = response.headers
    skip = _skipped(headers, _RESPONSE_SKIP)
    copied = request.responseHeaders
    lines = size = dropped = 0
    for name, values in headers.getAllRawHeaders():
        lower = name.lower()
        if lower in skip or lower.startswith(b"access-control-"):
            continue
        if lower in ALWAYS_RELAYED:
            copied.setRawHeaders(name, values[:1])
            dropped += len(values) - 1
            continue
        kept = []
        for value in values:
            lines += 1
            size += len(name) + len(value)
            if lines > MAX_RELAYED_HEADERS or size > MAX_RELAYED_HEADER_BYTES:
                dropped += 1
            else:
                kept.append(value)
        if kept:
            copied.setRawHeaders(name, kept)
    if dropped:
        log.warn(
            "dropped {dropped} upstream response headers over the limit of "
            "{lines} lines or {size} bytes",
            dropped=dropped,
            lines=MAX_RELAYED_HEADERS,
            size=MAX_RELAYED_HEADER_BYTES,
        )
    encodings = content_codings(headers)
    if encodings:
        copied.setRawHeaders(b"content-encoding", [b", ".join(encodings)])
        return True
    return False


def content_codings(headers: Headers) -> list[bytes]:
    """
    The content codings a response body is still encoded with: gzip is
    decoded below treq and removed, so one still named here is passed
    through untouched (and not metered). Twisted's decoding agent leaves an
    empty C{Content-Encoding} on every response that had none; only a real
    coding counts.
    """
    return [
        token.strip()
        for value in headers.getRawHeaders(b"content-encoding", [])
        for token in value.split(b",")
        if token.strip() and token.strip().lower() != b"identity"
    ]
