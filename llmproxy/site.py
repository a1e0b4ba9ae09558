# -*- test-case-name: llmproxy.test.test_call -*-
"""
The HTTP server side: the L{ProxySite}, its request class (body cap and
413 before the body is read, absolute-form targets, an access line per
request) and its channel (so shutdown can find and close idle
connections).
"""

from __future__ import annotations

import re
from io import BytesIO
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource

from llmproxy.accesslog import AccessLine
from llmproxy.cors import cors_headers
from llmproxy.httperrors import ERROR_SOURCE_HEADER, error_body
from llmproxy.providers import ProviderFormat

if TYPE_CHECKING:
    from llmproxy.runtime import ProxyState

log = Logger(namespace="llmproxy.access")

LINGER_SECONDS = 5.0
"""After a 413, how long the rest of an upload is read and dropped before the
connection is cut."""

_ABSOLUTE_FORM = re.compile(rb"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")


class ProxyChannel(HTTPChannel):
    """
    An HTTP/1.1 connection that its site keeps track of while it is open.
    """

    site: ProxySite
    _secure: bool | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.channels.add(self)

    def isSecure(self) -> bool:
        """
        Whether the connection is TLS: asked for every forwarded request
        (C{X-Forwarded-Proto}), answered once per connection, as a
        connection's transport never changes.
        """
        if self._secure is None:
            self._secure = bool(super().isSecure())
        return self._secure

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.site.channels.discard(self)
        super().connectionLost(reason)

    def request_target(self) -> bytes:
        """
        The target of the request whose headers were just received.

        Twisted hands it to the request only once the body is in; the proxy
        needs it earlier, to answer 413 before reading the body in the
        format of the provider the path names. There is no public way:
        this one method reads the channel's private copy.
        """
        target: bytes = getattr(self, "_path", b"") or b""
        return target


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
    _linger: IDelayedCall | None = None

    def __init__(self, channel: ProxyChannel, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        self.access = AccessLine()
        self._chunks: list[bytes] = []

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()
        if length is not None and length > self.channel.site.max_body_bytes():
            self._reject_too_large()

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
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
        the path names, then stop reading.

        The response is written straight to the transport because the
        request line has not been handed to this request yet. Writing is
        half-closed, and the rest of the upload is read and discarded until
        the client closes (or a few seconds pass), so the client sees the 413
        instead of a reset.
        """
        if self._rejected:
            return
        self._rejected = True
        site = self.channel.site
        path = origin_form(self.channel.request_target())
        limit = site.max_body_bytes()
        message = f"Request body is larger than the limit of {limit} bytes."
        fmt = site.error_format_for(path)
        body = error_body(fmt, 413, message)
        headers = [
            b"HTTP/1.1 413 Payload Too Large",
            b"content-type: application/json",
            b"content-length: %d" % len(body),
            ERROR_SOURCE_HEADER + b": proxy",
            b"connection: close",
        ]
        if fmt is not None:
            headers.extend(name + b": " + value for name, value in fmt.error_headers(413))
        origin = self.requestHeaders.getRawHeaders(b"origin", [None])[0]
        for name, value in site.cors_headers(origin):
            headers.append(name + b": " + value)
        # No "100 Continue" for a request we refuse.
        self.requestHeaders.removeHeader(b"expect")
        transport: Any = self.channel.transport
        transport.write(b"\r\n".join(headers) + b"\r\n\r\n" + body)
        lose_write = getattr(transport, "loseWriteConnection", None)
        if lose_write is not None:
            lose_write()
        else:
            transport.loseConnection()
        self._linger = site.state.clock.callLater(LINGER_SECONDS, transport.abortConnection)
        log.info(
            "413 {path} request body over {limit} bytes",
            path=path.split(b"?", 1)[0].decode("latin-1"),
            limit=limit,
            status=413,
        )

    def connectionLost(self, reason: Failure) -> None:
        linger = self._linger
        if linger is not None and linger.active():
            linger.cancel()
        super().connectionLost(reason)

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
    open connections, so shutdown can close idle keep-alive ones.

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

    def max_body_bytes(self) -> int:
        return self.state.runtime.config.server.max_body_bytes

    def error_format_for(self, target: bytes) -> ProviderFormat | None:
        """
        The wire format of the provider C{target} addresses, if any.
        """
        found = self.state.runtime.routes.match(target)
        return found.upstream.format if found is not None else None

    def cors_headers(self, origin: bytes | None) -> list[tuple[bytes, bytes]]:
        return cors_headers(self.state.runtime.config.server.cors.allow_origins, origin)


def make_site(state: ProxyState, resource: IResource, request_timeout: float = 60.0) -> ProxySite:
    """
    Build the Site. C{request_timeout} bounds how long a connection may sit
    idle or dribble a request; Twisted switches it off while a response is
    being written, so long streams are unaffected.
    """
    site = ProxySite(resource, state, reactor=state.clock)
    site.timeOut = request_timeout
    site.noisy = False
    return site
