# -*- test-case-name: llmproxy.test.test_status -*-
"""
Who may read C{/status} and C{/status.json}.

Without C{server.status.token}, only a client on this machine: a loopback
address (or a UNIX socket) whose request was not relayed by another proxy
(no C{Forwarded} / C{X-Forwarded-For} / C{X-Real-IP}: a front proxy on the
same host would otherwise make every internet client look local). With a
token, anyone who sends it, as C{Authorization: Bearer <token>} or
C{?token=<token>}, compared in constant time.
"""

from __future__ import annotations

import hmac
from ipaddress import ip_address

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.web.iweb import IRequest

RELAY_HEADERS = (b"forwarded", b"x-forwarded-for", b"x-real-ip")
"""Headers a reverse proxy adds: a request carrying one came from elsewhere."""


def is_local(request: IRequest) -> bool:
    """
    Whether the request comes straight from this machine.
    """
    for name in RELAY_HEADERS:
        if request.getHeader(name) is not None:
            return False
    address = request.getClientAddress()
    if isinstance(address, UNIXAddress):
        return True
    if not isinstance(address, IPv4Address | IPv6Address):
        return False
    try:
        ip = ip_address(address.host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def offered_token(request: IRequest) -> bytes | None:
    """
    The token the client sent: the bearer credential, else C{?token=}.
    """
    header: bytes | None = request.getHeader(b"authorization")
    if header is not None:
        scheme, _, credential = header.strip().partition(b" ")
        if scheme.lower() == b"bearer" and credential.strip():
            return credential.strip()
    args = getattr(request, "args", None) or {}
    values = args.get(b"token")
    if values:
        value: object = values[0]
        return value if isinstance(value, bytes) else str(value).encode("utf-8")
    return None


def verdict(request: IRequest, token: str | None) -> int | None:
    """
    L{None} when the request may see the status, else the status to refuse
    it with: 401 (a token is set and was not given, or is wrong), 403 (no
    token is set and the client is not local).
    """
    if token:
        offered = offered_token(request)
        if offered is not None and hmac.compare_digest(offered, token.encode("utf-8")):
            return None
        return 401
    return None if is_local(request) else 403
