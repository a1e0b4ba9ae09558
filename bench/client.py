"""
The load client for streaming (parts b and c) and large bodies (part d).

A separate process (the driver pins it next to the upstream, away from the
proxy) built on bare C{asyncio.Protocol}, timestamping bytes as they arrive
with C{time.perf_counter}.  It prints one JSON document on stdout; the driver
does the statistics.

Modes:
  - C{stream}: C{--concurrency} keep-alive connections, each sending
    C{--per-connection} streaming requests one after another; connections open
    spread over C{--ramp} seconds.  Per stream: status, time to the first SSE
    event and to the first content event, total time, event arrival times (as
    gaps) and whether C{[DONE]} came.
  - C{body}: C{--count} round trips of a C{--size}-byte JSON body on one
    connection; per trip: time and the byte count the upstream echoed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import socket
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import orjson

from bench import payloads


class ResponseReader:
    """
    An incremental HTTP/1.1 response parser that also cuts the body into SSE
    events (blank-line separated) and notes when each one completed.

    @ivar status: the status code, once the head arrived.
    @ivar event_times: C{perf_counter} time of each completed event.
    @ivar content_time: C{perf_counter} time of the first event that carries
        text (a non-empty C{"content"}): what a user waits for, as opposed
        to the opening events (the role) before it.
    @ivar done_seen: whether a C{data: [DONE]} event arrived.
    @ivar body: the decoded body, kept only when C{keep_body} is set.
    """

    def __init__(self, keep_body: bool) -> None:
        self._keep_body = keep_body
        self._buffer = bytearray()
        self._head_done = False
        self._chunked = False
        self._remaining = -1  # content-length left; -1 = until close
        self._chunk_left = 0
        self._in_trailer = False
        self._event_tail = b""
        self.status = 0
        self.close_after = False
        self.event_times: list[float] = []
        self.content_time: float | None = None
        self.done_seen = False
        self.body = bytearray()
        self.complete = False

    def feed(self, data: bytes, now: float) -> bytes:
        """
        Consume C{data}; return what is left over after a complete response.
        """
        self._buffer += data
        if not self._head_done:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return b""
            self._parse_head(bytes(self._buffer[:end]))
            del self._buffer[: end + 4]
            self._head_done = True
        if self._chunked:
            self._feed_chunked(now)
        else:
            self._feed_plain(now)
        if self.complete:
            leftover = bytes(self._buffer)
            self._buffer.clear()
            return leftover
        return b""

    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ")[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            lowered = name.strip().lower()
            value = value.strip().lower()
            if lowered == "content-length":
                self._remaining = int(value)
            elif lowered == "transfer-encoding" and "chunked" in value:
                self._chunked = True
            elif lowered == "connection" and "close" in value:
                self.close_after = True
        if self._chunked:
            self._remaining = -1
        elif self._remaining < 0:
            self.close_after = True

    def _feed_plain(self, now: float) -> None:
        if self._remaining < 0:
            self._body(bytes(self._buffer), now)
            self._buffer.clear()
            return
        take = min(self._remaining, len(self._buffer))
        self._body(bytes(self._buffer[:take]), now)
        del self._buffer[:take]
        self._remaining -= take
        if self._remaining == 0:
            self.complete = True

    def _feed_chunked(self, now: float) -> None:
        buffer = self._buffer
        while not self.complete:
            if self._in_trailer:
                end = buffer.find(b"\r\n")
                if end < 0:
                    return
                line = bytes(buffer[:end])
                del buffer[: end + 2]
                if not line:
                    self.complete = True
                continue
            if self._chunk_left == 0:
                end = buffer.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(buffer[:end]).split(b";")[0], 16)
                del buffer[: end + 2]
                if size == 0:
                    self._in_trailer = True
                    continue
                self._chunk_left = size + 2  # data + CRLF
            if not buffer:
                return
            take = min(self._chunk_left, len(buffer))
            data_part = min(take, max(0, self._chunk_left - 2))
            if data_part:
                self._body(bytes(buffer[:data_part]), now)
            del buffer[:take]
            self._chunk_left -= take

    def _body(self, data: bytes, now: float) -> None:
        if not data:
            return
        if self._keep_body:
            self.body += data
            return
        text = self._event_tail + data
        start = 0
        while True:
            end = text.find(b"\n\n", start)
            if end < 0:
                break
            self.event_times.append(now)
            if self.content_time is None:
                at = text.find(b'"content":"', start, end)
                if at >= 0 and text[at + 11 : at + 12] != b'"':
                    self.content_time = now
            if text.startswith(b"data: [DONE]", start):
                self.done_seen = True
            start = end + 2
        self._event_tail = text[start:]

    def finish_on_close(self) -> None:
        """
        The peer closed: a response delimited by the close is now complete.
        """
        if self._head_done and not self._chunked and self._remaining < 0:
            self.complete = True


class Connection(asyncio.Protocol):
    """
    One keep-alive client connection carrying one request at a time.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._reader: ResponseReader | None = None
        self._waiter: asyncio.Future[ResponseReader] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        reader, waiter = self._reader, self._waiter
        if reader is None or waiter is None:
            return
        reader.feed(data, now)
        if reader.complete and not waiter.done():
            self._reader = None
            waiter.set_result(reader)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        reader, waiter = self._reader, self._waiter
        if reader is not None and waiter is not None and not waiter.done():
            reader.finish_on_close()
            if reader.complete:
                waiter.set_result(reader)
            else:
                waiter.set_exception(ConnectionError("connection closed mid-response"))

    def send(self, request: bytes, keep_body: bool) -> asyncio.Future[ResponseReader]:
        """
        Write C{request}; the future fires with the complete response.
        """
        assert self.transport is not None
        self._reader = ResponseReader(keep_body)
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self._waiter


def build_request(url: str, body: bytes) -> tuple[str, int, bytes]:
    """
    (host, port, raw POST request bytes) for C{url} with a JSON C{body}.
    """
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    target = parts.path + ("?" + parts.query if parts.query else "")
    head = (
        f"POST {target} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Content-Type: application/json\r\nAuthorization: Bearer sk-bench-not-a-key\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return host, port, head.encode("latin-1") + body


async def _connect(host: str, port: int) -> Connection:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(Connection, host, port)
    return protocol


async def run_streams(
    url: str, concurrency: int, per_connection: int, ramp: float, timeout: float
) -> list[dict[str, Any]]:
    """
    Run C{concurrency * per_connection} streams; one record per stream.
    """
    host, port, request = build_request(url, payloads.STREAM_REQUEST)
    records: list[dict[str, Any]] = []

    async def worker(index: int) -> None:
        await asyncio.sleep(ramp * index / max(1, concurrency))
        connection: Connection | None = None
        for _ in range(per_connection):
            record: dict[str, Any] = {"status": 0, "error": None}
            try:
                if connection is None or connection.closed:
                    connection = await asyncio.wait_for(_connect(host, port), timeout)
                started = time.perf_counter()
                reader = await asyncio.wait_for(connection.send(request, False), timeout)
                ended = time.perf_counter()
            except (OSError, TimeoutError) as error:
                record["error"] = type(error).__name__
                if connection is not None and connection.transport is not None:
                    connection.transport.abort()
                connection = None
                records.append(record)
                continue
            times = reader.event_times
            record.update(
                status=reader.status,
                done=reader.done_seen,
                events=len(times),
                ttfe_ms=(times[0] - started) * 1000.0 if times else None,
                ttfc_ms=(
                    (reader.content_time - started) * 1000.0
                    if reader.content_time is not None
                    else None
                ),
                total_ms=(ended - started) * 1000.0,
                gaps_ms=[round((b - a) * 1000.0, 3) for a, b in itertools.pairwise(times)],
            )
            records.append(record)
            if reader.close_after:
                connection = None
        if connection is not None and connection.transport is not None:
            connection.transport.close()

    await asyncio.gather(*(worker(index) for index in range(concurrency)))
    return records


async def run_bodies(url: str, size: int, count: int, timeout: float) -> list[dict[str, Any]]:
    """
    C{count} sequential round trips of a C{size}-byte body on one connection.
    """
    host, port, request = build_request(url, payloads.big_request(size))
    records: list[dict[str, Any]] = []
    connection: Connection | None = None
    for _ in range(count):
        record: dict[str, Any] = {"status": 0, "error": None}
        try:
            if connection is None or connection.closed:
                connection = await asyncio.wait_for(_connect(host, port), timeout)
            started = time.perf_counter()
            reader = await asyncio.wait_for(connection.send(request, True), timeout)
            record["ms"] = (time.perf_counter() - started) * 1000.0
        except (OSError, TimeoutError) as error:
            record["error"] = type(error).__name__
            connection = None
            records.append(record)
            continue
        record["status"] = reader.status
        try:
            record["echoed"] = orjson.loads(bytes(reader.body)).get("bytes")
        except orjson.JSONDecodeError:
            record["echoed"] = None
        record["sent"] = size
        records.append(record)
        if reader.close_after:
            connection = None
    if connection is not None and connection.transport is not None:
        connection.transport.close()
    return records


def main() -> None:
    """
    Command-line entry point: run one batch and print its records as JSON.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["stream", "body"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--per-connection", type=int, default=1)
    parser.add_argument("--ramp", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--size", type=int, default=5 * 2**20)
    parser.add_argument("--count", type=int, default=5)
    arguments = parser.parse_args()
    started = time.perf_counter()
    if arguments.mode == "stream":
        records = asyncio.run(
            run_streams(
                arguments.url,
                arguments.concurrency,
                arguments.per_connection,
                arguments.ramp,
                arguments.timeout,
            )
        )
    else:
        records = asyncio.run(
            run_bodies(arguments.url, arguments.size, arguments.count, arguments.timeout)
        )
    wall = time.perf_counter() - started
    sys.stdout.buffer.write(orjson.dumps({"wall_s": wall, "records": records}) + b"\n")


if __name__ == "__main__":
    main()
