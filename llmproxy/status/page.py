# -*- test-case-name: llmproxy.test.test_status -*-
"""
C{/status} and C{/status.json}: the page (one hand-written HTML file with
its CSS and script inline, read once at import) and its data, behind the
access rule of L{llmproxy.status.access}.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib.resources import files

import orjson
from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest

from llmproxy.group.status import group_status
from llmproxy.httperrors import ERROR_SOURCE_HEADER, error_body
from llmproxy.runtime import ProxyState
from llmproxy.status.access import verdict

PAGE = files("llmproxy.status").joinpath("page.html").read_bytes()
"""The page, as served."""


def _script_hash(page: bytes) -> str:
    """
    The CSP source of the page's one inline script: its SHA-256, so no
    other script (an injected one included) can run.
    """
    match = re.search(rb"<script>(.*?)</script>", page, re.DOTALL)
    assert match is not None, "page.html has no inline script"
    digest = hashlib.sha256(match.group(1)).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


CONTENT_SECURITY_POLICY = (
    "default-src 'none'; "
    f"script-src {_script_hash(PAGE)}; "
    "style-src 'unsafe-inline'; "
    "connect-src 'self'; "
    "img-src data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
).encode("ascii")

_REFUSALS = {
    401: "The status page needs server.status.token: send Authorization: Bearer <token> "
    "or ?token=<token>.",
    403: "The status page answers only clients on this machine unless server.status.token is set.",
}


def _refuse(request: IRequest, status: int) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(ERROR_SOURCE_HEADER, b"proxy")
    if status == 401:
        request.setHeader(b"www-authenticate", b'Bearer realm="llmproxy status"')
    return error_body(None, status, _REFUSALS[status])


def _allowed(request: IRequest, state: ProxyState) -> int | None:
    return verdict(request, state.runtime.config.server.status.token)


def render_page(request: IRequest, state: ProxyState) -> bytes:
    """
    The HTML page (it fetches its data from C{/status.json} every second).
    """
    refused = _allowed(request, state)
    if refused is not None:
        return _refuse(request, refused)
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"content-security-policy", CONTENT_SECURITY_POLICY)
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"referrer-policy", b"no-referrer")
    return PAGE


def render_data(request: IRequest, state: ProxyState) -> bytes | Deferred[bytes]:
    """
    The page's data as JSON: this process's, or, in a worker of a group,
    the whole group's (gathered through the master).
    """
    refused = _allowed(request, state)
    if refused is not None:
        return _refuse(request, refused)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    if state.group is not None:
        return group_status(state.group, state, asking=1).addCallback(orjson.dumps)
    return orjson.dumps(state.status.snapshot(state, asking=1))
