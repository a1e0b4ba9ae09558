# -*- test-case-name: tests.e2e.test_demo -*-
"""
C{make demo}: llmproxy working, with no provider key.

    python -m llmproxy.testing.demo [--port 9002] [--seconds N] [--rate 4]

starts the fake upstream (L{llmproxy.testing.fake_upstream}) on a free
loopback port, the real daemon (C{twistd -n llmproxy}) with OpenAI,
Anthropic and Gemini mounted on the fake, cost records, and rate limits
with one tight per-user limit, and one proxy key with a budget (the
provider keys of the rest pass through), then sends a little steady
traffic through the proxy: the three dialects, streamed and not, several
users and keys, prompt-cache hits, and now and then an upstream failure or
a 429. It
prints the status page's address and runs until Ctrl-C (or C{--seconds}).

The pieces (L{Demo}, L{demo_config}, L{Traffic}) are what the demo's
tests and the status page's browser test run.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from llmproxy.testing.fake_upstream import FakeUpstream, listen
from llmproxy.testing.proxy_process import REPO_ROOT, ProxyProcess

log = Logger(namespace="llmproxy.demo")

USERS = ("alice", "bob", "carol")
KEYS = ("sk-demo-team-a", "sk-demo-team-b", "sk-demo-batch")
LIMITED_USER = "dave"
"""A user with a tight per-minute limit, so the page shows 429s and a busy scope."""

BUDGET_KEY = "llmp-demo-budget-7Rk2Vx9Qm4Tz1Wc8Hn5Lp3"
"""
A proxy key (C{auth.mode: mixed}) with a budget, so the page shows a budget
filling up: every fifth request uses it (about $1 an hour at 4 requests/s,
so its day's budget runs out within the hour and it gets 402s).
"""

BUDGET_KEY_ID = "demo-budget"

MAX_IN_FLIGHT = 16
"""The traffic skips a tick rather than pile up more requests than this."""


def demo_config(fake_url: str, workdir: Path, listen: str) -> str:
    """
    The daemon's configuration: the price table of C{configs/base.yml}
    (when the checkout has it), every provider on the fake, the budgeted
    proxy key, cost records in C{workdir}, and rate limits.
    """
    digest = hashlib.sha256(BUDGET_KEY.encode("ascii")).hexdigest()
    base = REPO_ROOT / "configs" / "base.yml"
    extends = f"extends: {base}\n" if base.exists() else ""
    return (
        f"{extends}"
        "server:\n"
        f'  listen: ["{listen}"]\n'
        "logging:\n"
        "  level: warn\n"
        "providers:\n"
        f"  openai: {{base_url: '{fake_url}'}}\n"
        f"  anthropic: {{base_url: '{fake_url}'}}\n"
        f"  gemini: {{base_url: '{fake_url}'}}\n"
        "auth:\n"
        "  mode: mixed\n"
        "  keys:\n"
        f"    - {{id: {BUDGET_KEY_ID}, hash: 'sha256:{digest}',"
        " budget: {daily_usd: 1, monthly_usd: 20}}\n"
        "  credentials:\n"
        "    openai: {Authorization: 'Bearer sk-demo-swapped'}\n"
        "    anthropic: {x-api-key: sk-demo-swapped}\n"
        "    gemini: {x-goog-api-key: sk-demo-swapped}\n"
        "features:\n"
        "  rate_limiting:\n"
        "    enabled: true\n"
        "    limits: {requests_per_minute: 600}\n"
        "    overrides:\n"
        f"      per_user: {{{LIMITED_USER}: {{requests_per_minute: 8}}}}\n"
        "  cost_tracking:\n"
        "    enabled: true\n"
        "    flush_interval_seconds: 1\n"
        "    transports:\n"
        f"      - {{type: file, file: {{path: '{workdir / 'cost-records.jsonl'}'}}}}\n"
    )


@attrs.frozen
class DemoRequest:
    """
    One request of the demo's traffic.
    """

    path: bytes
    headers: dict[bytes, list[bytes]]
    body: bytes


def _openai(model: str, stream: bool) -> bytes:
    streaming = ', "stream": true' if stream else ""
    return (
        f'{{"model": "{model}"{streaming}, '
        '"messages": [{"role": "user", "content": "Say hello to the demo."}]}'
    ).encode()


ANTHROPIC_BODY = (
    b'{"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": true, '
    b'"messages": [{"role": "user", "content": "Say hello to the demo."}]}'
)
GEMINI_BODY = b'{"contents": [{"parts": [{"text": "Say hello to the demo."}]}]}'


def scenarios() -> Iterator[DemoRequest]:
    """
    The traffic, forever: each round sends every dialect, streamed and
    not, for a user and key in turn (one request in 5 with the budgeted
    proxy key), with prompt-cache hits on some; one request in 15 makes the
    upstream fail.
    """
    for n in itertools.count():
        user = LIMITED_USER if n % 20 == 19 else USERS[n % len(USERS)]
        key = (BUDGET_KEY if n % 5 == 2 else KEYS[n % len(KEYS)]).encode()
        knobs = {
            b"x-fake-input-tokens": [b"%d" % (200 + 37 * (n % 11))],
            b"x-fake-cached-tokens": [b"%d" % (120 if n % 3 else 0)],
            b"x-fake-delay-ms": [b"150"],
            b"x-fake-chunks": [b"%d" % (4 + n % 5)],
        }
        if n % 15 == 14:
            knobs[b"x-fake-status"] = [b"503" if n % 2 else b"500"]
        prefix = b"/meta/" + user.encode()
        kind = n % 4
        json = [b"application/json"]
        if kind == 0:
            headers = {b"authorization": [b"Bearer " + key], b"content-type": json}
            yield DemoRequest(
                prefix + b"/openai/v1/chat/completions",
                {**headers, **knobs},
                _openai("gpt-4o-mini", stream=n % 8 == 0),
            )
        elif kind == 1:
            headers = {
                b"x-api-key": [key],
                b"anthropic-version": [b"2023-06-01"],
                b"content-type": json,
            }
            yield DemoRequest(
                prefix + b"/anthropic/v1/messages", {**headers, **knobs}, ANTHROPIC_BODY
            )
        elif kind == 2:
            headers = {b"x-goog-api-key": [key], b"content-type": json}
            yield DemoRequest(
                prefix + b"/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                {**headers, **knobs},
                GEMINI_BODY,
            )
        else:
            headers = {b"authorization": [b"Bearer " + key], b"content-type": json}
            yield DemoRequest(
                prefix + b"/openai/v1/chat/completions",
                {**headers, **knobs},
                _openai("gpt-4.1-mini", stream=True),
            )


class Traffic:
    """
    Sends L{scenarios} to the proxy, C{rate} requests a second, with no
    more than L{MAX_IN_FLIGHT} at once.

    @ivar sent: requests sent.
    @ivar answered: responses received in full, by status.
    """

    def __init__(self, reactor: Any, proxy_url: str, rate: float) -> None:
        self._reactor = reactor
        self._url = proxy_url.encode()
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = MAX_IN_FLIGHT
        self._http = HTTPClient(Agent(reactor, pool=self._pool))
        self._scenarios = scenarios()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor
        self._interval = 1.0 / rate
        self._pending: set[Deferred[Any]] = set()
        self.sent = 0
        self.answered: dict[int, int] = {}

    def start(self) -> None:
        self._loop.start(self._interval, now=True)

    def send(self, request: DemoRequest) -> Deferred[int]:
        """
        Send one request; fires with its status once its body is in.
        """
        self.sent += 1
        sending: Deferred[Any] = self._http.post(
            self._url + request.path, data=request.body, headers=Headers(request.headers)
        )
        self._pending.add(sending)

        def read(response: Any) -> Deferred[int]:
            return response.content().addCallback(lambda _: response.code)  # type: ignore[no-any-return]

        def done(status: int) -> int:
            self.answered[status] = self.answered.get(status, 0) + 1
            return status

        def settled(result: object) -> object:
            self._pending.discard(sending)
            return result

        return sending.addCallback(read).addCallback(done).addBoth(settled)

    def _tick(self) -> None:
        if len(self._pending) >= MAX_IN_FLIGHT:
            return
        self.send(next(self._scenarios)).addErrback(
            lambda failure: log.warn(
                "demo request failed: {error}", error=failure.getErrorMessage()
            )
        )

    @inlineCallbacks
    def stop(self) -> Any:
        """
        Send no more; let the requests under way finish (10 s at most),
        then close the connections.
        """
        if self._loop.running:
            self._loop.stop()
        if self._pending:
            waiting = DeferredList(list(self._pending), consumeErrors=True)
            waiting.addTimeout(10, self._reactor)
            try:
                yield waiting
            except DeferredTimeoutError:
                for pending in list(self._pending):
                    pending.cancel()
        yield self._pool.closeCachedConnections()


@attrs.define
class Demo:
    """
    The fake upstream, the daemon and the traffic, running.
    """

    fake_port: IListeningPort
    proxy: ProxyProcess
    traffic: Traffic
    workdir: Path

    @property
    def status_url(self) -> str:
        return self.proxy.url + "/status"

    @classmethod
    @inlineCallbacks
    def start(
        cls, reactor: Any, workdir: Path, port: int = 0, rate: float = 4.0
    ) -> Any:  # Deferred[Demo]
        """
        Start everything; fires with the L{Demo} once the daemon listens and
        the traffic flows.
        """
        fake = FakeUpstream(reactor)
        fake.record_requests = False
        fake.record_bodies = False
        fake_port = yield listen(fake, reactor)
        fake_url = f"http://127.0.0.1:{fake_port.getHost().port}"
        config = workdir / "demo.yml"
        port = port or free_port()
        config.write_text(demo_config(fake_url, workdir, f"tcp:{port}:interface=127.0.0.1"))
        # Warnings only (the port is known, so no "listening on" line is
        # needed): the demo may run for hours and keeps the daemon's output.
        proxy = yield ProxyProcess.start(reactor, [str(config)], listen=(), wait_for_port=False)
        proxy.port = port
        try:
            yield wait_for_health(reactor, proxy)
        except BaseException:
            yield proxy.stop()
            yield fake_port.stopListening()
            raise
        traffic = Traffic(reactor, proxy.url, rate)
        traffic.start()
        return cls(fake_port, proxy, traffic, workdir)

    @inlineCallbacks
    def stop(self) -> Any:
        """
        Stop the traffic, then the daemon (it drains and flushes its cost
        records), then the fake.
        """
        yield self.traffic.stop()
        yield self.proxy.stop()
        yield self.fake_port.stopListening()


def free_port() -> int:
    """
    A TCP port free on 127.0.0.1 just now.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@inlineCallbacks
def wait_for_health(reactor: Any, proxy: ProxyProcess, timeout: float = 30.0) -> Any:
    """
    Poll the daemon's C{/health} until it answers 200; fail with its output
    if it exits or does not answer within C{timeout} seconds.
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    http = HTTPClient(Agent(reactor, pool=pool, connectTimeout=1))
    waited = 0.0
    while True:
        if proxy.exit_code is not None:
            raise RuntimeError(
                f"llmproxy exited with {proxy.exit_code}:\n"
                + proxy.output.decode("utf-8", "replace")
            )
        try:
            response = yield http.get(proxy.url + "/health")
            yield response.content()
            if response.code == 200:
                return
        except Exception:
            pass
        if waited >= timeout:
            raise RuntimeError(
                "llmproxy did not answer /health in time:\n"
                + proxy.output.decode("utf-8", "replace")
            )
        yield deferLater(reactor, 0.1, lambda: None)
        waited += 0.1


def _options(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llmproxy.testing.demo",
        description="Run llmproxy against a fake upstream with steady traffic (no key needed).",
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "9002")))
    parser.add_argument("--rate", type=float, default=4.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=0, help="stop after this long (0: never)")
    parser.add_argument(
        "--workdir", help="where the config and cost records go (default: a temp dir)"
    )
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> None:
    from twisted.internet.task import react

    options = _options(sys.argv[1:] if argv is None else argv)
    workdir = Path(options.workdir or tempfile.mkdtemp(prefix="llmproxy-demo-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    @inlineCallbacks
    def run(reactor: Any) -> Any:
        demo = yield Demo.start(reactor, workdir, options.port, options.rate)
        url = demo.proxy.url
        print(
            f"\nllmproxy demo: the daemon serves {url} with a fake OpenAI, Anthropic and Gemini.\n"
            f"  status page    {url}/status\n"
            f"  metrics        {url}/metrics\n"
            f"  health         {url}/health\n"
            f"  cost records   {workdir / 'cost-records.jsonl'}\n"
            f"Sending about {options.rate:g} requests/s. Ctrl-C stops it.\n",
            flush=True,
        )
        stopped: Deferred[None] = Deferred()

        def stop(*ignored: object) -> None:
            if not stopped.called:
                stopped.callback(None)

        # Ctrl-C and SIGTERM end the demo cleanly: traffic, daemon, fake.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *ignored: reactor.callFromThread(stop))
        if options.seconds:
            reactor.callLater(options.seconds, stop)
        yield stopped
        print("stopping the demo ...", flush=True)
        yield demo.stop()
        print(f"sent {demo.traffic.sent} requests; answers by status: {demo.traffic.answered}")

    react(run)


if __name__ == "__main__":
    main()
