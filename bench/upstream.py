"""
The fake LLM upstream for the parts nginx cannot play: timed SSE streams and a
request-body echo.  It also answers non-streaming chat requests with the static
JSON, so the suite still runs (with a slower DIRECT baseline) where nginx is
missing.

It is a bare C{asyncio.Protocol} HTTP/1.1 server, not Twisted, so the upstream
shares nothing with the code under test; it only has to keep its timing
accurate.  Each stream's events are scheduled on an absolute timeline
(C{start + i * delay}), so a late tick does not push every later event back.

Routes (any method, keep-alive, Content-Length or chunked request bodies):
  - C{.../chat/completions} with C{"stream": true} in the body: C{chunks} content
    events (query C{?chunks=N&delay_ms=D}, defaults 50 and 10), the first at
    once, then a usage chunk and C{[DONE]} right after the last one;
  - C{.../chat/completions} otherwise: the static completion;
  - C{.../echo}: C{{"bytes": <request body length>}}.

Run: C{python -m bench.upstream --port N [--ready-file PATH]}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import socket
from urllib.parse import parse_qs, urlsplit

from bench import payloads

_STREAM_FLAG = re.compile(rb'"stream"\s*:\s*true')
_HEAD_END = b"\r\n\r\n"


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _response(status: bytes, content_type: bytes, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\ncontent-type: "
        + content_type
        + b"\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


_STATIC = _response(b"200 OK", b"application/json", payloads.CHAT_RESPONSE)
_NOT_FOUND = _response(b"404 Not Found", b"application/json", b'{"error":"no such route"}')
_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


class UpstreamProtocol(asyncio.Protocol):
    """
    One client connection: parse requests one after another and answer them.

    While a stream is being sent, further requests on the connection wait
    (HTTP/1.1 has no interleaving); the timers are cancelled if the peer goes.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._streaming = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._serve()

    def _serve(self) -> None:
        while not self._streaming and self._transport is not None:
            request = self._take_request()
            if request is None:
                return
            target, body = request
            self._answer(target, body)

    def _take_request(self) -> tuple[str, bytes] | None:
        """
        Cut one complete request off the buffer: (request target, body), or
        C{None} while it is incomplete.
        """
        end = self._buffer.find(_HEAD_END)
        if end < 0:
            return None
        head = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
        target = head[0].split(" ")[1] if " " in head[0] else "/"
        length = 0
        chunked = False
        for line in head[1:]:
            name, _, value = line.partition(":")
            lowered = name.strip().lower()
            if lowered == "content-length":
                length = int(value.strip())
            elif lowered == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        start = end + len(_HEAD_END)
        if not chunked:
            if len(self._buffer) - start < length:
                return None
            body = bytes(self._buffer[start : start + length])
            del self._buffer[: start + length]
            return target, body
        parsed = _dechunk(self._buffer, start)
        if parsed is None:
            return None
        body, consumed = parsed
        del self._buffer[:consumed]
        return target, body

    def _answer(self, target: str, body: bytes) -> None:
        assert self._transport is not None
        url = urlsplit(target)
        if url.path.endswith("/echo"):
            self._transport.write(
                _response(b"200 OK", b"application/json", b'{"bytes":%d}' % len(body))
            )
        elif url.path.endswith("/chat/completions"):
            if _STREAM_FLAG.search(body) is None:
                self._transport.write(_STATIC)
            else:
                query = parse_qs(url.query)
                chunks = max(2, int(query.get("chunks", ["50"])[0]))
                delay = float(query.get("delay_ms", ["10"])[0]) / 1000.0
                self._start_stream(chunks, delay)
        else:
            self._transport.write(_NOT_FOUND)

    def _start_stream(self, chunks: int, delay: float) -> None:
        assert self._transport is not None
        self._streaming = True
        self._transport.write(_STREAM_HEAD)
        self._send(0, chunks, delay, self._loop.time())

    def _send(self, index: int, chunks: int, delay: float, start: float) -> None:
        self._timer = None
        transport = self._transport
        if transport is None:
            return
        data = _chunked(payloads.content_event(index, chunks))
        if index == chunks - 1:
            transport.write(data + _chunked(payloads.tail_events(chunks)) + b"0\r\n\r\n")
            self._streaming = False
            self._serve()
            return
        transport.write(data)
        self._timer = self._loop.call_at(
            start + (index + 1) * delay, self._send, index + 1, chunks, delay, start
        )


def _dechunk(buffer: bytearray, start: int) -> tuple[bytes, int] | None:
    """
    Decode a chunked body beginning at C{start}: (body, bytes consumed from
    the buffer's beginning), or C{None} while it is incomplete.  Trailers are
    not expected and not supported.
    """
    parts: list[bytes] = []
    position = start
    while True:
        line_end = buffer.find(b"\r\n", position)
        if line_end < 0:
            return None
        size = int(bytes(buffer[position:line_end]).split(b";")[0], 16)
        data_start = line_end + 2
        if size == 0:
            if len(buffer) < data_start + 2:
                return None
            return b"".join(parts), data_start + 2
        if len(buffer) < data_start + size + 2:
            return None
        parts.append(bytes(buffer[data_start : data_start + size]))
        position = data_start + size + 2


async def serve(port: int, ready_file: str | None) -> None:
    """
    Listen on 127.0.0.1:C{port} until SIGTERM or SIGINT.
    """
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: UpstreamProtocol(loop), "127.0.0.1", port, backlog=4096, reuse_address=True
    )
    if ready_file is not None:
        with open(ready_file, "w") as handle:
            handle.write("ready\n")
    stop: asyncio.Future[None] = loop.create_future()

    def finish() -> None:
        if not stop.done():
            stop.set_result(None)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, finish)
    async with server:
        await stop


def main() -> None:
    """
    Command-line entry point.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ready-file", default=None)
    arguments = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(arguments.port, arguments.ready_file))


if __name__ == "__main__":
    main()
