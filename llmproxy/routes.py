# -*- test-case-name: llmproxy.test.test_routes -*-
"""
Which provider a request target addresses.

One L{RouteTable} per runtime (built with it, replaced on reload) answers
for every part of the proxy that needs to know: dispatch, the body-size
check that answers 413 in the provider's own error format before the body
is read, and the C{/meta/<user>/<provider>/} form. The target is parsed
once, raw: the path after the mount stays percent-encoded (C{%2F}
included), because it is forwarded exactly as the client sent it.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import unquote_to_bytes

from attrs import frozen

from llmproxy.upstream import Upstream

META = b"meta"
"""The first segment of C{/meta/<user>/<provider>/...}."""

MAX_USER_LENGTH = 256
"""Longest user name taken from a path (longer ones are cut)."""


@frozen
class Target:
    """
    Where one request goes.

    @ivar name: the provider's mount name (C{openai} for C{/openai/...}).
    @ivar upstream: that provider.
    @ivar user: the user named by C{/meta/<user>/}, if any.
    @ivar path: the raw path after the mount prefix, always starting with
        C{/} (C{b"/v1/files/a%2Fb"}).
    @ivar query: the raw query string without C{?}, possibly C{b""}.
    """

    name: str
    upstream: Upstream
    user: str | None
    path: bytes
    query: bytes


class RouteTable:
    """
    The provider mounts of one configuration.
    """

    def __init__(self, upstreams: Mapping[str, Upstream]) -> None:
        self._mounts = {name.encode("ascii"): (name, up) for name, up in upstreams.items()}

    def match(self, target: bytes) -> Target | None:
        """
        The provider C{target} (an origin-form request target: path and
        query) addresses, or L{None} when it names none.
        """
        path, _, query = target.partition(b"?")
        if not path.startswith(b"/"):
            return None
        first, _, rest = path[1:].partition(b"/")
        user = None
        if first == META:
            raw_user, _, after_user = rest.partition(b"/")
            first, _, rest = after_user.partition(b"/")
            user = _decoded(raw_user)[:MAX_USER_LENGTH]
            if not user:
                return None
        mount = self._mounts.get(first)
        if mount is None and b"%" in first:
            mount = self._mounts.get(unquote_to_bytes(first))
        if mount is None:
            return None
        name, upstream = mount
        return Target(name=name, upstream=upstream, user=user, path=b"/" + rest, query=query)


def _decoded(segment: bytes) -> str:
    return unquote_to_bytes(segment).decode("utf-8", "replace")
