# -*- test-case-name: llmproxy.test.test_channel -*-
"""
One client connection (L{ProxyChannel}), and what it must not be allowed
to hold: a request head sent a byte at a time, a body that trickles, a
slot among the open connections that others need, or a request line or
header section larger than the parser's limits.

The rules, with the C{server.*} keys that set them (docs/operations.md,
"Limits that protect the proxy"):

  - a request head must be complete within C{header_timeout_seconds} of
    its first byte (of the connection's opening, for its first request);
  - a request body must be complete within C{body_timeout_seconds} plus
    one second for every C{min_body_rate_bytes_per_second} bytes it has
    delivered;
  - at most C{max_connections} connections are served; above that, idle
    keep-alive connections are closed to make room, and a few more
    (L{RESERVE}) are accepted only to answer C{/health} or to refuse with
    503; beyond those, connections are closed as they are accepted;
  - a request line over 16 KiB is answered 414, a header section over
    16 KiB (or 500 headers) 431, any other malformed head 400.

Every refusal is an answer in the error shape of the provider the path
names (OpenAI's otherwise), with C{X-LLM-Proxy-Error-Source: proxy} and
C{Connection: close}, and is counted in C{llmproxy_client_dropped_total}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, HTTPChannel

from llmproxy.httperrors import ERROR_SOURCE_HEADER, error_body

if TYPE_CHECKING:
    from llmproxy.site import ProxySite

log = Logger(namespace="llmproxy.channel")

RESERVE = 32
"""Connections accepted above C{server.max_connections}, only to answer C{/health} or 503."""

RESERVE_HEAD_SECONDS = 2.0
"""How long a connection in the reserve may take to send its request head."""

LINGER_SECONDS = 5.0
"""After a refusal, how long the rest of the client's bytes are read and
dropped (so it sees the answer rather than a reset) before the connection
is cut."""

HEALTH_PATHS = frozenset({b"/health", b"/health/"})


class ProxyChannel(HTTPChannel):
    """
    An HTTP/1.1 connection with deadlines, that its site counts.

    @ivar reserve: accepted above C{server.max_connections}: it may only
        ask for C{/health}.
    @ivar served: requests answered on this connection so far.
    """

    site: ProxySite
    reserve = False
    served = 0
    _refused = False
    _head_timer: IDelayedCall | None = None
    _body_timer: IDelayedCall | None = None
    _linger: IDelayedCall | None = None
    _head_pending = False
    _body_pending = False
    _body_started = 0.0
    _body_received = 0
    _secure: bool | None = None
    _host: IAddress | None = None

    # -- connections -----------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        site = self.site
        limit = site.server().max_connections
        if len(site.channels) >= limit:
            site.reclaim_idle()
        site.channels.add(self)
        open_now = len(site.channels)
        if open_now > limit + RESERVE:
            site.channels.discard(self)
            site.dropped("over_connection_limit")
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        if open_now > limit:
            self.reserve = True
            self._arm_head(RESERVE_HEAD_SECONDS)
        else:
            self._arm_head(site.server().header_timeout_seconds)

    def isSecure(self) -> bool:
        """
        Whether the connection is TLS: asked for every forwarded request
        (C{X-Forwarded-Proto}), answered once per connection, as a
        connection's transport never changes.
        """
        if self._secure is None:
            self._secure = bool(super().isSecure())
        return self._secure

    def getHost(self) -> IAddress:
        """
        The connection's local address: every request asks for it, and the
        transport makes a system call each time; it never changes.
        """
        if self._host is None:
            self._host = self.transport.getHost()  # type: ignore[union-attr]
        return self._host

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.site.channels.discard(self)
        self._head_timer = _cancelled(self._head_timer)
        self._body_timer = _cancelled(self._body_timer)
        self._linger = _cancelled(self._linger)
        super().connectionLost(reason)

    def idle(self) -> bool:
        """
        Between two requests of a keep-alive connection, with nothing of the
        next one received.
        """
        return (
            self.served > 0
            and not self.requests
            and self._head_timer is None
            and not self._buffered()
            and not getattr(self.transport, "disconnecting", True)
        )

    def _buffered(self) -> bool:
        """
        Whether bytes of a next request wait in the line parser's buffer.
        """
        return bool(vars(self).get("_buffer"))

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

    # -- the request head ------------------------------------------------------

    def _arm_head(self, delay: float) -> None:
        if self._head_timer is None:
            self._head_timer = self.callLater(delay, self._head_expired)

    def _head_expired(self) -> None:
        self._head_timer = None
        self.refuse(408, "Request head not received in time.", reason="header_timeout")

    def _awaiting_head(self) -> bool:
        return not self._handlingRequest and not self._body_pending and not self._refused

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self._awaiting_head():
            self._head_pending = True
        super().dataReceived(data)
        self._arm_unfinished()

    def _arm_unfinished(self) -> None:
        """
        Arm the deadline of what the last read left unfinished: a head and
        body that arrive in one read, as nearly all do, cost no timer (and
        a cancelled one would linger in the reactor's heap).
        """
        if self._refused:
            return
        if self._head_pending:
            self._arm_head(self.site.server().header_timeout_seconds)
        elif self._body_pending and self._body_timer is None:
            self._body_check()

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._head_too_large()
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._head_too_large()

    def _head_too_large(self) -> None:
        if "_command" not in self.__dict__:
            self.refuse(414, "Request line too long.", reason="uri_too_long")
        else:
            self.refuse(431, "Request headers too large.", reason="headers_too_large")

    def _respondToBadRequestAndDisconnect(self) -> None:
        if self._receivedHeaderCount > self.maxHeaders:
            self.refuse(431, "Too many request headers.", reason="headers_too_large")
        else:
            self.refuse(400, "Malformed HTTP request.", reason="bad_request")

    def allHeadersReceived(self) -> None:
        self._head_pending = False
        self._head_timer = _cancelled(self._head_timer)
        super().allHeadersReceived()
        if self.length != 0 and not self._refused:
            # Timed from here; the timer itself waits for the end of this read.
            self._body_pending = True
            self._body_started = self.site.state.clock.seconds()
            self._body_received = 0

    # -- the request body ------------------------------------------------------

    def body_received(self, size: int) -> None:
        """
        C{size} more bytes of the request body arrived.
        """
        self._body_received += size

    def _body_check(self) -> None:
        """
        The body's time is up unless the bytes it delivered bought more:
        one second per C{min_body_rate_bytes_per_second}.
        """
        self._body_timer = None
        server = self.site.server()
        deadline = (
            self._body_started
            + server.body_timeout_seconds
            + self._body_received / server.min_body_rate_bytes_per_second
        )
        left = deadline - self.site.state.clock.seconds()
        if left > 0:
            self._body_timer = self.callLater(left, self._body_check)
            return
        self.refuse(
            408,
            "Request body not received in time "
            f"(slower than {server.min_body_rate_bytes_per_second} bytes per second).",
            reason="body_too_slow",
            path=self.request_target(),
        )

    def allContentReceived(self) -> None:
        self._body_pending = False
        self._body_timer = _cancelled(self._body_timer)
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        self.served += 1
        super().requestDone(request)
        # Part of a pipelined request may already be buffered: its head has
        # its deadline too.
        if self.persistent and self._buffered() and self._awaiting_head():
            self._arm_head(self.site.server().header_timeout_seconds)

    # -- answers before the request is handed on --------------------------------

    def refuse(
        self,
        status: int,
        message: str,
        *,
        reason: str,
        path: bytes | None = None,
        origin: bytes | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        """
        Answer C{status} and close the connection, whatever state the
        request is in: written straight to the transport, because the
        request may not exist yet, or not have been handed its request line.
        Writing is half-closed and the client's further bytes are read and
        dropped for up to L{LINGER_SECONDS}, so it sees the answer rather
        than a reset.

        @param reason: counted in C{llmproxy_client_dropped_total}.
        @param path: the request target, when known: the error body takes
            the shape of the provider it names.
        """
        if self._refused:
            return
        self._refused = True
        self.persistent = False
        self._head_timer = _cancelled(self._head_timer)
        self._body_timer = _cancelled(self._body_timer)
        site = self.site
        site.dropped(reason)
        transport: Any = self.transport
        if transport is None:
            return
        fmt = site.error_format_for(path) if path else None
        body = error_body(fmt, status, message)
        lines = [
            b"HTTP/1.1 %d %s" % (status, RESPONSES.get(status, b"Error")),
            b"content-type: application/json",
            b"content-length: %d" % len(body),
            ERROR_SOURCE_HEADER + b": proxy",
            b"connection: close",
        ]
        lines += [name + b": " + value for name, value in headers]
        if fmt is not None:
            lines += [name + b": " + value for name, value in fmt.error_headers(status)]
        lines += [name + b": " + value for name, value in site.cors_headers(origin)]
        transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        lose_write = getattr(transport, "loseWriteConnection", None)
        if lose_write is not None:
            lose_write()
        else:
            transport.loseConnection()
        self._linger = self.callLater(LINGER_SECONDS, transport.abortConnection)
        log.info(
            "{status} {reason} from {peer}",
            status=status,
            reason=reason,
            peer=str(getattr(transport.getPeer(), "host", "?")),
        )


def _cancelled(timer: IDelayedCall | None) -> IDelayedCall | None:
    """
    Cancel C{timer} if it is pending; L{None}, to assign back.
    """
    if timer is not None and timer.active():
        timer.cancel()
    return None
