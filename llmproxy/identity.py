# -*- test-case-name: llmproxy.test.test_identity -*-
"""
Who is calling: the key id (a short hash of the credential, never the
credential) and the user a request is attributed to.

Both feed rate-limit scopes and cost records, so both must be stable across
processes (a keyed hash would split one client into several scopes) and must
never let a credential through.
"""

from __future__ import annotations

import hashlib
import re
from urllib.parse import parse_qsl

from attrs import field, frozen
from twisted.web.http_headers import Headers

_KEY_HEADERS = (b"x-api-key", b"x-goog-api-key", b"api-key")

_SIGV4 = b"aws4-hmac-sha256"
_SIGV4_CREDENTIAL = re.compile(rb"Credential=([A-Za-z0-9]+)/")

PROXY_KEY_PREFIX = b"llmp-"
"""How every key the proxy issues begins (C{python -m llmproxy new-key})."""


@frozen
class Presented:
    """
    The credential a client sent, reduced to what recognising a proxy key
    needs: the key itself is not kept.

    @ivar digest: its SHA-256, compared with C{auth.keys[].hash}.
    @ivar proxy_form: it begins with L{PROXY_KEY_PREFIX}, so it was meant
        for the proxy, never for a provider.
    """

    digest: bytes = field(repr=False)
    proxy_form: bool


def presented(secret: bytes | None) -> Presented | None:
    """
    What key recognition needs of C{secret} (see L{Presented}).
    """
    if secret is None:
        return None
    return Presented(hashlib.sha256(secret).digest(), secret.startswith(PROXY_KEY_PREFIX))


def credential(headers: Headers, query: bytes) -> bytes | None:
    """
    The credential the client sent, from whichever of C{Authorization:
    Bearer}, C{x-api-key}, C{x-goog-api-key}, C{api-key} (Azure) or
    C{?key=} is present, in that order.  A request signed with AWS SigV4
    is known by its access key id (the secret key never travels).
    """
    for value in headers.getRawHeaders(b"authorization", []):
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() == b"bearer" and token.strip():
            return token.strip()
        if scheme.lower() == _SIGV4:
            match = _SIGV4_CREDENTIAL.search(token)
            if match:
                return match.group(1)
    for name in _KEY_HEADERS:
        for value in headers.getRawHeaders(name, []):
            if value.strip():
                return value.strip()
    if b"key=" in query:
        for param, param_value in parse_qsl(query.decode("latin-1")):
            if param == "key" and param_value:
                return param_value.encode("latin-1")
    return None


def key_id(secret: bytes | None) -> str | None:
    """
    A short, stable, one-way id for a credential: the first 16 hex digits of
    its SHA-256. 64 bits keep collisions out of reach for any realistic
    number of keys, and the credential cannot be recovered from it.
    """
    if secret is None:
        return None
    return hashlib.sha256(b"llmproxy-key:" + secret).hexdigest()[:16]


def user_id(meta_user: str | None, headers: Headers, body_user: str | None) -> str | None:
    """
    The user a request is attributed to: C{/meta/<user>/...}, else the
    C{X-User-ID} header, else the user named in the body, else none.
    """
    if meta_user:
        return meta_user
    for value in headers.getRawHeaders(b"x-user-id", []):
        text = value.decode("utf-8", "replace").strip()
        if text:
            return text[:256]
    if body_user:
        return body_user[:256]
    return None
