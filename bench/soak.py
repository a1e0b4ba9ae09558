"""
C{make soak}: a long mixed load against one proxy, watching that it holds.

The fake upstream and the proxy (C{twistd -n llmproxy}) run as child
processes; this driver sends a steady mix of requests for C{--seconds}
(30 minutes by default): JSON and SSE answers of the three providers, gzip
bodies, clients that leave mid-stream, upstream faults (5xx, a stream cut,
a stream gone silent, an unreachable upstream), a user over its rate limit,
unknown paths. Every C{--sample-seconds} it records the proxy's resident
memory and open files. At the end it stops the proxy (SIGTERM: the drain
flushes every record) and counts its access lines and cost records.

It passes (exit 0) when:
  - every request sent has its access line;
  - every request the proxy forwarded has its cost record (the proxy's own
    refusals, 404 and 429 here, have none);
  - after the warm-up (the first fifth of the run), resident memory stays
    within 10% of its post-warm-up median, and open files within 10% plus
    two per client (each request in flight holds a client and an upstream
    connection).

The report (Markdown) is printed, and saved to
C{bench/results/soak-<UTC time>-<git rev>.md} unless C{--no-save}.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

import orjson
from attrs import define, field

from bench.procs import BenchError, Processes, free_port, proc_status, wait_for_port

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hi at length"}]}'
CHAT_STREAM = (
    b'{"model":"gpt-4o-mini","stream":true,'
    b'"messages":[{"role":"user","content":"Say hi at length"}]}'
)
MESSAGES = (
    b'{"model":"claude-haiku-4-5","max_tokens":256,"stream":true,'
    b'"messages":[{"role":"user","content":"Say hi at length"}]}'
)
GEMINI = b'{"contents":[{"role":"user","parts":[{"text":"Say hi at length"}]}]}'
OPENAI = {"authorization": "Bearer sk-soak-not-a-key", "content-type": "application/json"}
ANTHROPIC = {
    "x-api-key": "sk-ant-soak-not-a-key",
    "anthropic-version": "2023-06-01",
    "content-type": "application/json",
}
GOOGLE = {"x-goog-api-key": "AIza-soak-not-a-key", "content-type": "application/json"}


@define
class Scenario:
    """
    One kind of request in the mix.

    @ivar refused: the proxy answers it itself (no cost record).
    @ivar leave_after: the client disconnects after this many body bytes.
    """

    name: str
    weight: int
    path: str
    body: bytes
    headers: dict[str, str]
    refused: bool = False
    leave_after: int | None = None


SCENARIOS = [
    Scenario("openai json", 20, "/openai/v1/chat/completions", CHAT, OPENAI),
    Scenario(
        "openai sse",
        20,
        "/openai/v1/chat/completions",
        CHAT_STREAM,
        {**OPENAI, "x-fake-chunks": "20", "x-fake-delay-ms": "5"},
    ),
    Scenario(
        "anthropic sse",
        10,
        "/anthropic/v1/messages",
        MESSAGES,
        {**ANTHROPIC, "x-fake-chunks": "10", "x-fake-delay-ms": "5"},
    ),
    Scenario(
        "gemini json",
        8,
        "/gemini/v1beta/models/gemini-2.5-flash:generateContent",
        GEMINI,
        GOOGLE,
    ),
    Scenario(
        "gzip sse", 6, "/openai/v1/chat/completions", CHAT_STREAM, {**OPENAI, "x-fake-gzip": "1"}
    ),
    Scenario(
        "client leaves",
        6,
        "/openai/v1/chat/completions",
        CHAT_STREAM,
        {**OPENAI, "x-fake-chunks": "50", "x-fake-delay-ms": "20"},
        leave_after=300,
    ),
    Scenario(
        "upstream 500",
        4,
        "/openai/v1/chat/completions",
        CHAT,
        {**OPENAI, "x-fake-status": "500"},
    ),
    Scenario(
        "stream cut",
        4,
        "/openai/v1/chat/completions",
        CHAT_STREAM,
        {**OPENAI, "x-fake-die-after": "3"},
    ),
    Scenario(
        "stream silent",
        2,
        "/openai/v1/chat/completions",
        CHAT_STREAM,
        {**OPENAI, "x-fake-stall-after": "2"},
    ),
    Scenario("unreachable", 2, "/down/v1/chat/completions", CHAT, OPENAI),
    Scenario("over limit", 6, "/meta/limited/openai/v1/chat/completions", CHAT, OPENAI),
    Scenario("unknown path", 2, "/nowhere/at/all", CHAT, OPENAI, refused=True),
]


def config_text(upstream: str, down: str, costs: Path) -> str:
    providers = "".join(
        f"  {name}:\n    base_url: {upstream}\n"
        "    timeouts: {connect_seconds: 2, first_byte_seconds: 10, idle_seconds: 1}\n"
        for name in ("openai", "anthropic", "gemini")
    )
    providers += (
        f"  down:\n    kind: openai\n    base_url: {down}\n"
        "    timeouts: {connect_seconds: 1, first_byte_seconds: 5, idle_seconds: 5}\n"
    )
    return (
        "logging: {format: json}\n"
        f"providers:\n{providers}"
        "features:\n"
        "  rate_limiting:\n"
        "    enabled: true\n"
        "    limits: {requests_per_minute: 0}\n"
        "    overrides: {per_user: {limited: {requests_per_minute: 30}}}\n"
        "  cost_tracking:\n"
        "    enabled: true\n"
        "    flush_interval_seconds: 1\n"
        f"    transports: [{{type: file, file: {{path: {costs}}}}}]\n"
    )


@define
class Sample:
    at: float
    requests: int
    rss_kb: int
    fds: int


@define
class Tally:
    """
    What the driver sent and saw.
    """

    sent: int = 0
    refused: int = 0
    statuses: Counter[str] = field(factory=Counter)
    scenarios: Counter[str] = field(factory=Counter)
    errors: Counter[str] = field(factory=Counter)


def run_load(port: int, seconds: float, concurrency: int, tick: Callable[[int], None]) -> Tally:
    """
    Send the mix for C{seconds} with C{concurrency} clients (on a Twisted
    reactor, in this process); C{tick(sent)} is called every second.
    """
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol
    from twisted.internet.task import LoopingCall

    tally = Tally()
    weights = [scenario.weight for scenario in SCENARIOS]
    deadline = time.monotonic() + seconds
    chooser = random.Random(19)

    class Exchange(Protocol):
        """
        One request on its own connection: read the answer to its end, or
        leave after C{leave_after} bytes of it.
        """

        def __init__(self, request: bytes, leave_after: int | None) -> None:
            self.request = request
            self.leave_after = leave_after
            self.received = bytearray()
            self.done: Deferred[bytes] = Deferred()

        def connectionMade(self) -> None:
            assert self.transport is not None
            self.transport.write(self.request)

        def dataReceived(self, data: bytes) -> None:
            self.received += data
            if self.leave_after is not None and len(self.received) > self.leave_after:
                self.leave_after = None
                self.transport.abortConnection()  # type: ignore[union-attr]

        def connectionLost(self, reason: Any = None) -> None:
            if not self.done.called:
                self.done.callback(bytes(self.received))

    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10)

    @inlineCallbacks
    def client() -> Any:
        while time.monotonic() < deadline:
            scenario = chooser.choices(SCENARIOS, weights)[0]
            head = [f"POST {scenario.path} HTTP/1.1", "Host: soak", "Connection: close"]
            head += [f"{name}: {value}" for name, value in scenario.headers.items()]
            head.append(f"Content-Length: {len(scenario.body)}")
            request = ("\r\n".join(head) + "\r\n\r\n").encode() + scenario.body
            exchange = Exchange(request, scenario.leave_after)
            try:
                yield connectProtocol(endpoint, exchange)
            except Exception as error:
                tally.errors[type(error).__name__] += 1
                continue
            tally.sent += 1
            tally.scenarios[scenario.name] += 1
            received = yield exchange.done
            status = received[9:12].decode("latin-1") if received else "none"
            tally.statuses[status if scenario.leave_after is None else "left"] += 1
            # 429: over a limit; 503: every upstream's circuit is open (the
            # unreachable provider's opens soon). Neither reaches an upstream.
            if scenario.refused or status in ("429", "503"):
                tally.refused += 1

    ticking = LoopingCall(lambda: tick(tally.sent))
    ticking.start(1.0, now=False)
    finished = gatherResults([client() for _ in range(concurrency)])

    def stop(result: object) -> object:
        if ticking.running:
            ticking.stop()
        reactor.stop()
        return result

    finished.addBoth(stop)
    reactor.run()
    return tally


def count_lines(path: Path, keep: Callable[[dict[str, Any]], bool]) -> int:
    count = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.startswith(b"{"):
                continue
            try:
                if keep(orjson.loads(line)):
                    count += 1
            except orjson.JSONDecodeError:
                continue
    return count


def flat(values: list[int]) -> tuple[float, float]:
    """
    The largest deviation of C{values} from their median, as a fraction of
    it; and that median.
    """
    middle = float(median(values))
    if middle == 0:
        return 0.0, middle
    return max(abs(value - middle) for value in values) / middle, middle


def git_commit() -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()


def report(
    options: argparse.Namespace,
    commit: str,
    tally: Tally,
    samples: list[Sample],
    access: int,
    records: int,
    exit_code: int,
) -> tuple[str, bool]:
    warm = [s for s in samples if s.at >= options.seconds * 0.2]
    rss_spread, rss_median = flat([s.rss_kb for s in warm]) if warm else (0.0, 0.0)
    fd_spread, fd_median = flat([s.fds for s in warm]) if warm else (0.0, 0.0)
    fd_allowed = 0.10 + (2 * options.concurrency / fd_median if fd_median else 0.0)
    forwarded = tally.sent - tally.refused
    checks = {
        "every request has its access line": access == tally.sent,
        "every forwarded request has its cost record": records == forwarded,
        "RSS within 10% of its median after warm-up": rss_spread <= 0.10,
        "open files within 10% (+2 per client) of their median after warm-up": fd_spread
        <= fd_allowed,
        "the proxy exited 0 on SIGTERM": exit_code == 0,
    }
    lines = [
        f"# Soak: {options.seconds:.0f} s, {options.concurrency} clients (commit {commit})",
        "",
        f"Machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}. Mix: "
        + ", ".join(f"{s.name} {s.weight}" for s in SCENARIOS)
        + " (weights).",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| requests sent | {tally.sent:,} ({tally.sent / options.seconds:.0f}/s) |",
        f"| access lines | {access:,} |",
        f"| refused by the proxy (404, 429, 503: no record expected) | {tally.refused:,} |",
        f"| cost records | {records:,} (expected {forwarded:,}) |",
        f"| RSS after warm-up: median, spread | {rss_median / 1024:.1f} MiB, "
        f"{rss_spread * 100:.1f}% |",
        f"| open files after warm-up: median, spread | {fd_median:.0f}, {fd_spread * 100:.1f}% |",
        f"| proxy exit status after SIGTERM | {exit_code} |",
        "",
        "Statuses seen by the clients: "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(tally.statuses.items()))
        + (
            "; connect errors: " + ", ".join(f"{k} {v}" for k, v in tally.errors.items())
            if tally.errors
            else ""
        )
        + ".",
        "",
        "| t (s) | requests | RSS (MiB) | open files |",
        "|---:|---:|---:|---:|",
    ]
    lines += [f"| {s.at:.0f} | {s.requests:,} | {s.rss_kb / 1024:.1f} | {s.fds} |" for s in samples]
    lines += ["", *(f"- [{'x' if ok else ' '}] {name}" for name, ok in checks.items())]
    passed = all(checks.values())
    lines += ["", "PASSED: nothing lost, flat." if passed else "FAILED (see the checks)."]
    return "\n".join(lines) + "\n", passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=1800.0, help="how long (default 1800)")
    parser.add_argument("--concurrency", type=int, default=16, help="clients (default 16)")
    parser.add_argument("--sample-seconds", type=float, default=30.0, help="sampling period")
    parser.add_argument("--no-save", action="store_true", help="print the report only")
    options = parser.parse_args(argv)
    # The code the proxy runs is the checkout's at its start.
    commit = git_commit()
    tmp = Path(tempfile.mkdtemp(prefix="llmproxy-soak-"))
    processes = Processes(tmp)
    environ = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        fake_port, proxy_port, down_port = free_port(), free_port(), free_port()
        fake = processes.start(
            "upstream",
            [sys.executable, "-m", "llmproxy.testing.fake_upstream", "--port", str(fake_port)],
            env=environ,
        )
        wait_for_port(fake_port, time.monotonic() + 20, fake)
        costs = tmp / "costs.jsonl"
        config = tmp / "soak.yml"
        config.write_text(
            config_text(f"http://127.0.0.1:{fake_port}", f"http://127.0.0.1:{down_port}", costs)
        )
        twistd = Path(sys.executable).with_name("twistd")
        proxy = processes.start(
            "proxy",
            [
                sys.executable,
                str(twistd),
                "-n",
                "--pidfile=",
                "llmproxy",
                "--config",
                str(config),
                "--listen",
                f"tcp:{proxy_port}:interface=127.0.0.1",
            ],
            env=environ,
            cwd=REPO,
        )
        wait_for_port(proxy_port, time.monotonic() + 30, proxy)
        samples: list[Sample] = []
        started = time.monotonic()
        next_sample = [0.0]

        def tick(sent: int) -> None:
            at = time.monotonic() - started
            if at < next_sample[0]:
                return
            next_sample[0] = at + options.sample_seconds
            status = proc_status(proxy.pid)
            fds = len(os.listdir(f"/proc/{proxy.pid}/fd"))
            samples.append(Sample(at, sent, status.get("VmRSS", 0), fds))
            print(
                f"soak: {at:6.0f} s  {sent:8,} requests  "
                f"RSS {status.get('VmRSS', 0) / 1024:6.1f} MiB  {fds} files",
                flush=True,
            )

        tally = run_load(proxy_port, options.seconds, options.concurrency, tick)
        time.sleep(2.0)  # the access log's and the cost sink's timers
        proxy.send_signal(signal.SIGTERM)
        exit_code = proxy.wait(timeout=60)
        access = count_lines(tmp / "proxy.log", lambda e: e.get("namespace") == "llmproxy.access")
        records = count_lines(costs, lambda e: True) if costs.exists() else 0
        text, passed = report(options, commit, tally, samples, access, records, exit_code)
        print(text)
        if not options.no_save:
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            RESULTS.mkdir(exist_ok=True)
            path = RESULTS / f"soak-{stamp}-{commit}.md"
            path.write_text(text)
            print(f"soak: saved {path.relative_to(REPO)}")
        return 0 if passed else 1
    except BenchError as error:
        print(f"soak: {error}", file=sys.stderr)
        return 1
    finally:
        processes.stop_all()


if __name__ == "__main__":
    sys.exit(main())
