"""
The reference point issue 9 measures against: a naive streaming proxy on
Twisted and treq, with none of llmproxy's work (no routing table, no
metering, no records, no access log, no timeouts, no error shapes).

It forwards every request to one upstream, path and body unchanged, and
copies the answer back chunk by chunk with C{treq.collect}. Run in the same
bench run as llmproxy, it says how much of llmproxy's cost is the stack
(Twisted's HTTP server and client, treq) and how much is llmproxy's own.

    python -m bench.naive_proxy --port 9100 --upstream http://127.0.0.1:8080
"""

from __future__ import annotations

import argparse
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import react
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

_SKIP = frozenset({b"host", b"content-length", b"connection", b"accept-encoding"})


class NaiveProxy(Resource):
    isLeaf = True

    def __init__(self, upstream: bytes) -> None:
        super().__init__()
        self._upstream = upstream
        self._client = treq.client.HTTPClient(_agent())

    def render(self, request: Request) -> Any:
        headers = Headers()
        for name, values in request.requestHeaders.getAllRawHeaders():
            if name.lower() not in _SKIP:
                headers.setRawHeaders(name, values)
        body = request.content.read() if request.content is not None else b""
        sent = self._client.request(
            request.method.decode("ascii"),
            self._upstream + request.uri,
            headers=headers,
            data=body or None,
            unbuffered=True,
        )

        def answer(response: Any) -> Any:
            request.setResponseCode(response.code)
            for name, values in response.headers.getAllRawHeaders():
                if name.lower() not in (b"content-length", b"connection", b"content-encoding"):
                    request.responseHeaders.setRawHeaders(name, values)
            return treq.collect(response, request.write)

        def failed(failure: Any) -> None:
            request.setResponseCode(502)

        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def finish(_: object) -> None:
            if not gone:
                request.finish()

        sent.addCallback(answer).addErrback(failed).addBoth(finish)
        return NOT_DONE_YET


def _agent() -> Any:
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor)
    pool.maxPersistentPerHost = 64
    return Agent(reactor, pool=pool)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8080")
    arguments = parser.parse_args()
    site = Site(NaiveProxy(arguments.upstream.rstrip("/").encode("ascii")))
    site.noisy = False

    def serve(reactor: Any) -> Deferred[None]:
        TCP4ServerEndpoint(reactor, arguments.port, interface="127.0.0.1").listen(site)
        return Deferred()  # until killed

    react(serve)


if __name__ == "__main__":
    main()
