# -*- test-case-name: llmproxy.test.test_call -*-
"""
The HTTP server side: the L{ProxySite} and its request class (body cap and
413 before the body is read, absolute-form targets, an access line per
request). Its connections are L{llmproxy.channel.ProxyChannel}s, which the
site counts (for shutdown, and for C{server.max_connections}).
"""

from __future__ import annotations

import re
from io import BytesIO
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import IResource

from llmproxy.accesslog import AccessLine
from llmproxy.channel import HEALTH_PATHS, ProxyChannel
from llmproxy.config import ServerConfig
from llmproxy.cors import cors_headers
from llmproxy.providers import ProviderFormat

if TYPE_CHECKING:
    from llmproxy.runtime import ProxyState

log = Logger(namespace="llmproxy.access")

_ABSOLUTE_FORM = re.compile(rb"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")


class ProxyRequest(server.Request):
    """
    A request that:
      - keeps its body in memory (it is capped, and a temporary file would be
        synchronous disk I/O on the request path);
      - answers 413 as soon as the declared length, or the bytes received of
        a chunked upload, exceed C{server.max_body_bytes};
      - serves an absolute-form target (RFC 9112 3.2.2) by its path alone, so
        the authority in it never selects a host;
      - carries its L{AccessLine}.
    """

    defaultContentType = None
    channel: ProxyChannel
    _received = 0
    _rejected = False

    def __init__(self, channel: ProxyChannel, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        self.access = AccessLine()
        self._chunks: list[bytes] = []

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()
        channel = self.channel
        if channel.reserve:
            # Accepted above server.max_connections: /health, or 503.
            channel.persistent = False
            if origin_form(channel.request_target()).split(b"?", 1)[0] not in HEALTH_PATHS:
                self._rejected = True
                channel.refuse(
                    503,
                    "Too many open connections; try again shortly.",
                    reason="over_connection_limit",
                    path=origin_form(channel.request_target()),
                    origin=self.requestHeaders.getRawHeaders(b"origin", [None])[0],
                    headers=((b"retry-after", b"1"),),
                )
                return
            self.responseHeaders.setRawHeaders(b"connection", [b"close"])
        if length is not None and length > channel.site.max_body_bytes():
            self._reject_too_large()

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
        self.channel.body_received(len(data))
        self._received += len(data)
        if self._received > self.channel.site.max_body_bytes():
            self._chunks = []
            self._reject_too_large()
            return
        # Kept as received and joined once in requestReceived: a growing
        # BytesIO reallocates, and its read() then copies the whole body again.
        self._chunks.append(data)

    def take_body(self) -> bytes:
        """
        The body, once: it lives on in whoever took it (until it is sent),
        not in the request for as long as the response streams.
        """
        content = self.content
        self.content = BytesIO()
        return content.read() if content is not None else b""

    def _reject_too_large(self) -> None:
        """
        Answer 413 before the body is read, in the format of the provider
        the path names, then stop reading (L{ProxyChannel.refuse}).
        """
        if self._rejected:
            return
        self._rejected = True
        channel = self.channel
        path = origin_form(channel.request_target())
        limit = channel.site.max_body_bytes()
        # No "100 Continue" for a request we refuse.
        self.requestHeaders.removeHeader(b"expect")
        channel.refuse(
            413,
            f"Request body is larger than the limit of {limit} bytes.",
            reason="body_too_large",
            path=path,
            origin=self.requestHeaders.getRawHeaders(b"origin", [None])[0],
        )
        log.info(
            "413 {path} request body over {limit} bytes",
            path=path.split(b"?", 1)[0].decode("latin-1"),
            limit=limit,
            status=413,
        )

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._rejected:
            return
        if self._chunks:
            # BytesIO shares an initial bytes object, and read() of all of it
            # returns that same object: the body is copied once, here.
            self.content = BytesIO(b"".join(self._chunks))
            self._chunks = []
        super().requestReceived(command, origin_form(path), version)


def origin_form(target: bytes) -> bytes:
    """
    Reduce an absolute-form request target to its path and query.
    """
    match = _ABSOLUTE_FORM.match(target)
    if match is None:
        return target
    rest = target[match.end() :]
    return rest if rest.startswith(b"/") else b"/" + rest


class ProxySite(server.Site):
    """
    The Site: our request and channel classes, no Combined Log Format lines
    (they would carry C{?key=} credentials; the access log is ours), and the
    open connections, so shutdown can close idle keep-alive ones and
    C{server.max_connections} can be kept.

    @ivar channels: the open connections.
    """

    requestFactory = ProxyRequest
    protocol = ProxyChannel  # type: ignore[assignment]

    def __init__(self, resource: IResource, state: ProxyState, reactor: Any = None) -> None:
        # Never parse form or multipart bodies: the proxy forwards them
        # untouched (file uploads are multipart), and deciding would cost a
        # Content-Type parse with the email package on every request.
        super().__init__(resource, reactor=reactor, parsePOSTFormSubmission=False)
        self.state = state
        self.channels: set[ProxyChannel] = set()

    def log(self, request: object) -> None:
        """
        Twisted's access log is replaced by ours (L{llmproxy.accesslog}).
        """

    def server(self) -> ServerConfig:
        return self.state.runtime.config.server

    def max_body_bytes(self) -> int:
        return self.server().max_body_bytes

    def error_format_for(self, target: bytes) -> ProviderFormat | None:
        """
        The wire format of the provider C{target} addresses, if any.
        """
        found = self.state.runtime.routes.match(target)
        return found.upstream.format if found is not None else None

    def cors_headers(self, origin: bytes | None) -> list[tuple[bytes, bytes]]:
        return cors_headers(self.server().cors.allow_origins, origin)

    def reclaim_idle(self) -> bool:
        """
        Close one keep-alive connection that waits for its next request, to
        make room for a new one; whether there was one.
        """
        for channel in self.channels:
            if channel.idle() and channel.transport is not None:
                self.channels.discard(channel)
                channel.transport.loseConnection()
                return True
        return False

    def dropped(self, reason: str) -> None:
        """
        A connection was refused or cut for what its client did (or did not).
        """
        self.state.metrics.client_dropped(reason)


def make_site(state: ProxyState, resource: IResource, request_timeout: float = 60.0) -> ProxySite:
    """
    Build the Site. C{request_timeout} bounds how long a connection may sit
    idle or dribble a request; Twisted switches it off while a response is
    being written, so long streams are unaffected.
    """
    site = ProxySite(resource, state, reactor=state.clock)
    site.timeOut = request_timeout
    site.noisy = False
    state.open_connections = lambda: len(site.channels)
    return site
