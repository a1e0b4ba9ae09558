# -*- test-case-name: llmproxy.test.test_call -*-
"""
CORS: the proxy owns it. Preflights are answered here and never
forwarded, every answer carries the proxy's CORS headers, and an
upstream's own C{Access-Control-*} headers are dropped
(L{llmproxy.headers.copy_response_headers}).
"""

from __future__ import annotations

from collections.abc import Sequence

ALLOW_METHODS = b"GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"
EXPOSE_HEADERS = (
    b"Retry-After, X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset, "
    b"X-RateLimit-Scope, X-RateLimit-Metric, X-RateLimit-Window, X-RateLimit-Reason, "
    b"X-LLM-Proxy-Budget-Scope, X-LLM-Proxy-Budget-Period, X-LLM-Proxy-Budget-Limit-USD, "
    b"X-LLM-Proxy-Budget-Remaining-USD, X-LLM-Proxy-Budget-Reset, "
    b"X-LLM-Proxy-Error-Source, X-LLM-Proxy-Request-ID, x-request-id, request-id"
)
DEFAULT_ALLOW_HEADERS = (
    b"authorization, content-type, x-api-key, x-goog-api-key, anthropic-version, "
    b"anthropic-beta, openai-beta, openai-organization, openai-project, x-user-id"
)
PREFLIGHT_MAX_AGE = b"86400"


def cors_headers(allow_origins: Sequence[str], origin: bytes | None) -> list[tuple[bytes, bytes]]:
    """
    The CORS headers for a response to a request from C{origin}, given the
    configured C{server.cors.allow_origins}.
    """
    headers: list[tuple[bytes, bytes]] = []
    if "*" in allow_origins:
        headers.append((b"Access-Control-Allow-Origin", b"*"))
    elif origin is not None and origin.decode("latin-1") in allow_origins:
        headers.append((b"Access-Control-Allow-Origin", origin))
        headers.append((b"Vary", b"Origin"))
    else:
        return headers
    headers.append((b"Access-Control-Expose-Headers", EXPOSE_HEADERS))
    return headers


def preflight_headers(requested_headers: bytes | None) -> list[tuple[bytes, bytes]]:
    """
    The headers of the 204 answering a preflight, which asked for
    C{requested_headers} (its C{Access-Control-Request-Headers}).
    """
    return [
        (b"Access-Control-Allow-Methods", ALLOW_METHODS),
        (b"Access-Control-Allow-Headers", requested_headers or DEFAULT_ALLOW_HEADERS),
        (b"Access-Control-Max-Age", PREFLIGHT_MAX_AGE),
    ]
