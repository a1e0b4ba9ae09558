"""
C{make bench}: measure the proxy against a direct connection to the same fake
upstream, in one run, interleaved and repeated.

Parts (C{--only a,b,...}; see C{bench/README.md}):
  - a: small non-streaming requests/s at concurrency 1, 16, 64; p50/p99 at 1 (wrk);
  - b: streaming, 50 chunks x 10 ms at concurrency 1 and 100: time to first
    event, total time, inter-chunk gaps, share of streams delivered incrementally;
  - c: 1,000 concurrent slow streams: how many complete, the proxy's peak RSS;
  - d: a 5 MB request body round trip;
  - e: (a) at concurrency 16 with rate limiting (memory, Redis) and cost tracking;
  - w: one worker against two (C{--workers 2}): requests/s, CPU per request,
    each worker's share (L{bench.workers}).

Nothing is installed: a missing wrk, nginx or redis-server is reported with
the command that installs it, and the parts that need it are skipped or fall
back.  Every process the run starts is stopped when it ends, however it ends.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import pstats
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import orjson
from attrs import define, field

from bench import payloads
from bench.procs import (
    BenchError,
    Pinning,
    Processes,
    core_times,
    cpu_seconds,
    free_port,
    http_request,
    proc_status,
    wait_for_port,
)
from bench.stats import (
    Budget,
    FeatureRow,
    Row,
    budget_table,
    features_table,
    median,
    naive_table,
    percentile,
    ratio,
    rows_table,
)
from bench.workers import part_w, workers_section
from llmproxy.testing.redis_server import REDIS_SERVER, redis_server_command

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PARTS = ("a", "b", "c", "d", "e", "w")
INSTALL_HINT = "apt-get install -y wrk nginx redis-server"


@define
class Settings:
    """
    How long and how hard each part runs.  C{--quick} shrinks everything
    so a smoke run takes about a minute and a half.
    """

    quick: bool
    reps: int
    wrk_seconds: float
    warmup_seconds: float
    b_chunks: int
    b_delay_ms: float
    b_c1_streams: int
    b_c100_rounds: int
    c_streams: int
    c_chunks: int
    c_delay_ms: float
    c_ramp_seconds: float
    d_size: int
    d_count: int
    log_level: str

    @classmethod
    def make(cls, quick: bool, log_level: str) -> Settings:
        if quick:
            return cls(
                quick=True,
                reps=1,
                wrk_seconds=2.0,
                warmup_seconds=1.0,
                b_chunks=50,
                b_delay_ms=10.0,
                b_c1_streams=4,
                b_c100_rounds=1,
                c_streams=1000,
                c_chunks=10,
                c_delay_ms=200.0,
                c_ramp_seconds=1.0,
                d_size=5 * 2**20,
                d_count=3,
                log_level=log_level,
            )
        return cls(
            quick=False,
            reps=3,
            wrk_seconds=5.0,
            warmup_seconds=1.0,
            b_chunks=50,
            b_delay_ms=10.0,
            b_c1_streams=8,
            b_c100_rounds=2,
            c_streams=1000,
            c_chunks=20,
            c_delay_ms=500.0,
            c_ramp_seconds=1.0,
            d_size=5 * 2**20,
            d_count=5,
            log_level=log_level,
        )


@define
class Proxy:
    """
    One running proxy.

    @ivar broken: why it cannot be measured (forwarding check failed), or C{None}.
    """

    name: str
    port: int
    process: subprocess.Popen[bytes]
    broken: str | None = None
    static_prefix: str = "/openai"
    stream_prefix: str = "/stream"


@define
class Harness:
    """
    The upstreams and proxies of one run, and what the report must mention.
    """

    settings: Settings
    tmp: Path
    procs: Processes
    pin: Pinning
    notes: list[str] = field(factory=list)
    static_port: int = 0
    static_kind: str = ""
    stream_port: int = 0
    redis_port: int | None = None
    proxies: dict[str, Proxy] = field(factory=dict)
    failed: list[str] = field(factory=list)
    body_file: Path | None = None
    profile: Path | None = None
    interference: list[float] = field(factory=list)
    naive: dict[str, Proxy] = field(factory=dict)

    # ----------------------------------------------------------------- upstreams

    def start_upstreams(self) -> None:
        """
        The Python upstream (streams, echo) always; nginx for static JSON if
        installed, else the Python upstream serves that too.
        """
        self.stream_port = free_port()
        process = self.procs.start(
            "upstream",
            self.pin.wrap(
                self.pin.load,
                [sys.executable, "-m", "bench.upstream", "--port", str(self.stream_port)],
            ),
            cwd=REPO,
        )
        wait_for_port(self.stream_port, time.monotonic() + 15, process)
        nginx = shutil.which("nginx") or (
            "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None
        )
        if nginx is None:
            self.static_port = self.stream_port
            self.static_kind = "bench/upstream.py (nginx missing)"
            self.notes.append(
                "nginx is not installed, so static JSON comes from the Python upstream and "
                "DIRECT throughput in parts (a) and (e) is bounded by it. Install: "
                "apt-get install -y nginx"
            )
            return
        self.static_port = free_port()
        prefix = self.tmp / "nginx"
        for sub in ("", "body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (prefix / sub).mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(_nginx_conf(prefix, self.static_port))
        process = self.procs.start(
            "nginx",
            self.pin.wrap(self.pin.load, [nginx, "-p", str(prefix), "-c", str(conf)]),
        )
        try:
            wait_for_port(self.static_port, time.monotonic() + 10, process)
        except BenchError as error:
            raise BenchError(f"nginx: {error}\n{self.procs.log_tail('nginx')}") from None
        self.static_kind = _first_line([nginx, "-v"]) or "nginx"

    def start_redis(self) -> bool:
        """
        A private redis-server on a free port, no persistence.  C{False}
        (and a note) when it is not installed.
        """
        if REDIS_SERVER is None:
            self.notes.append(
                "redis-server is not installed: the Redis rate-limiting row of part (e) is "
                "skipped. Install: apt-get install -y redis-server"
            )
            return False
        port = free_port()
        process = self.procs.start(
            "redis",
            self.pin.wrap(self.pin.load, redis_server_command(REDIS_SERVER, port, str(self.tmp))),
        )
        wait_for_port(port, time.monotonic() + 10, process)
        self.redis_port = port
        return True

    # ------------------------------------------------------------------- proxies

    def start_proxies(
        self,
        wanted: Sequence[tuple[str, Sequence[str]]],
        extra_args: Sequence[str] = (),
        cpus: str | None = None,
    ) -> None:
        """
        Start one proxy per (name, config overlays), all at once, then wait
        for each one's /health and check that it forwards.

        @param extra_args: more C{llmproxy} options for each of them.
        @param cpus: pin them to these CPUs instead of the proxy's.
        """
        started: list[Proxy] = []
        for name, overlays in wanted:
            port = free_port()
            argv = [*self.proxy_argv(port, overlays), *extra_args]
            if name == "base" and self.profile is not None:
                # twistd's own profiler options; the stats are written when it stops.
                argv[1:1] = [f"--profile={self.profile}", "--profiler=cprofile", "--savestats"]
            env = dict(os.environ)
            # The checkout first, as the compat editable install does: twistd then finds
            # twisted/plugins/llmproxy_plugin.py and this tree's llmproxy even before
            # `make install` has run.
            path = env.get("PYTHONPATH")
            env["PYTHONPATH"] = f"{REPO}{os.pathsep}{path}" if path else str(REPO)
            env.update(
                BENCH_STATIC_PORT=str(self.static_port),
                BENCH_STREAM_PORT=str(self.stream_port),
                BENCH_REDIS_PORT=str(self.redis_port or 0),
                BENCH_TMP=str(self.tmp),
                BENCH_VARIANT=name,
                BENCH_LOG_LEVEL=self.settings.log_level,
                # Only read with tracing on (bench/configs/tracing.yml): a sink that
                # answers 200 to whatever it is sent.
                OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"http://127.0.0.1:{self.stream_port}/echo",
                OTEL_EXPORTER_OTLP_METRICS_ENDPOINT=f"http://127.0.0.1:{self.stream_port}/echo",
            )
            process = self.procs.start(
                f"proxy-{name}", self.pin.wrap(cpus or self.pin.proxy, argv), env=env, cwd=REPO
            )
            started.append(Proxy(name, port, process))
        for proxy in started:
            proxy.broken = self._await_health(proxy) or check_forwarding(proxy.port)
            if proxy.broken is not None:
                self.failed.append(proxy.name)
                self.notes.append(
                    f"proxy '{proxy.name}' cannot be measured, its PROXY figures are missing: "
                    f"{proxy.broken}"
                )
                _say(f"bench: proxy '{proxy.name}' cannot be measured: {proxy.broken}")
            self.proxies[proxy.name] = proxy

    def start_naive(self) -> None:
        """
        The reference proxies (L{bench.naive_proxy}), one per upstream, on
        the proxy's core: the naive treq proxy issue 9 compares against.
        """
        for name, upstream in (("static", self.static_port), ("stream", self.stream_port)):
            port = free_port()
            argv = [
                sys.executable,
                "-m",
                "bench.naive_proxy",
                "--port",
                str(port),
                "--upstream",
                f"http://127.0.0.1:{upstream}",
            ]
            process = self.procs.start(
                f"naive-{name}", self.pin.wrap(self.pin.proxy, argv), cwd=REPO
            )
            try:
                wait_for_port(port, time.monotonic() + 30, process)
            except BenchError as error:
                self.notes.append(f"the naive reference proxy did not start: {error}")
                return
            self.naive[name] = Proxy(f"naive-{name}", port, process, None, "", "")

    def proxy_argv(self, port: int, overlays: Sequence[str]) -> list[str]:
        """
        The proxy's command line: C{twistd -n --pidfile= llmproxy}, the base
        config plus C{overlays}, listening on 127.0.0.1:C{port}.
        """
        twistd = Path(sys.executable).with_name("twistd")
        argv = (
            [str(twistd)]
            if twistd.exists()
            else [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
        )
        argv += ["-n", "--pidfile=", "llmproxy"]
        for path in ("base.yml", *overlays):
            argv += ["--config", str(BENCH / "configs" / path)]
        return [*argv, "--listen", f"tcp:{port}:interface=127.0.0.1"]

    def _await_health(self, proxy: Proxy) -> str | None:
        """
        Wait for C{GET /health} to answer 200; the reason if it never does.
        """
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proxy.process.poll() is not None:
                tail = self.procs.log_tail(f"proxy-{proxy.name}", lines=3).replace("\n", " / ")
                return f"twistd exited with status {proxy.process.returncode} ({tail.strip()})"
            try:
                status, _ = http_request(proxy.port, "GET", "/health", timeout=2)
                if status == 200:
                    return None
            except OSError:
                pass
            time.sleep(0.1)
        return "no 200 from /health within 60 s"

    def stop_proxy(self, name: str) -> None:
        proxy = self.proxies.pop(name, None)
        if proxy is not None:
            self.procs.stop(proxy.process)

    def proxy(self, name: str) -> Proxy | None:
        """
        The named proxy if it forwards, else C{None}.
        """
        proxy = self.proxies.get(name)
        return proxy if proxy is not None and proxy.broken is None else None

    # ---------------------------------------------------------------------- load

    def wrk(self, target: Proxy | None, connections: int, seconds: float) -> dict[str, Any] | None:
        """
        One wrk run (one thread, POST of L{payloads.CHAT_REQUEST}) DIRECT
        (C{target} C{None}) or through C{target}: wrk's summary plus C{rps} and,
        through a proxy, C{cpu_us} (the proxy's CPU time per request), or
        C{None} (and a note) if the run was not clean.

        Through a pinned proxy it also notes which share of the proxy core's
        time went to anything but the proxy (other processes, interrupts,
        hypervisor steal): the run's noise, reported in the header.
        """
        url = self.static_url(target)
        core = int(self.pin.proxy) if self.pin.proxy is not None else None
        pid = target.process.pid if target is not None else None
        core_before = core_times(core) if core is not None and pid is not None else None
        cpu_before = cpu_seconds(pid) if pid is not None else 0.0
        if self.body_file is None:
            self.body_file = self.tmp / "chat-request.json"
            self.body_file.write_bytes(payloads.CHAT_REQUEST)
        argv = self.pin.wrap(
            self.pin.load,
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--timeout",
                "10s",
                "--latency",
                "-s",
                str(BENCH / "post.lua"),
                url,
            ],
        )
        env = dict(os.environ, BENCH_BODY_FILE=str(self.body_file))
        status, out, err = self.procs.run(argv, timeout=seconds + 30, env=env)
        summary: dict[str, Any] | None = None
        for line in out.splitlines():
            if line.startswith("BENCH_JSON "):
                summary = orjson.loads(line[len("BENCH_JSON ") :])
        if status != 0 or summary is None:
            detail = (err.strip() or out.strip())[:200]
            self.notes.append(f"wrk failed on {url} (status {status}): {detail}")
            return None
        bad = summary["status"] + summary["timeout"]
        if bad or summary["requests"] == 0:
            self.notes.append(
                f"wrk -c{connections} {url}: {summary['status']} non-2xx, "
                f"{summary['timeout']} timeouts of {summary['requests']}: sample dropped"
            )
            return None
        socket_errors = summary["connect"] + summary["read"] + summary["write"]
        if socket_errors:
            self.notes.append(f"wrk -c{connections} {url}: {socket_errors} socket errors")
        summary["rps"] = summary["requests"] / (summary["duration_us"] / 1e6)
        if pid is not None:
            used = cpu_seconds(pid) - cpu_before
            summary["cpu_us"] = used / summary["requests"] * 1e6
            if core is not None and core_before is not None:
                busy, total = (a - b for a, b in zip(core_times(core), core_before, strict=True))
                if total > 0:
                    self.interference.append(max(0.0, busy - used) / total)
        return summary

    def client(self, arguments: Sequence[str], timeout: float) -> list[dict[str, Any]] | None:
        """
        One run of L{bench.client}; its records, or C{None} (and a note).
        """
        argv = self.pin.wrap(self.pin.load, [sys.executable, "-m", "bench.client", *arguments])
        status, out, err = self.procs.run(argv, timeout=timeout)
        if status != 0:
            self.notes.append(f"client {' '.join(arguments[:3])} failed: {err.strip()[-300:]}")
            return None
        records: list[dict[str, Any]] = orjson.loads(out)["records"]
        return records

    # ---------------------------------------------------------------------- urls

    def static_url(self, proxy: Proxy | None) -> str:
        if proxy is None:
            return f"http://127.0.0.1:{self.static_port}/v1/chat/completions"
        return f"http://127.0.0.1:{proxy.port}{proxy.static_prefix}/v1/chat/completions"

    def stream_url(self, proxy: Proxy | None, chunks: int, delay_ms: float) -> str:
        query = f"?chunks={chunks}&delay_ms={delay_ms:g}"
        if proxy is None:
            return f"http://127.0.0.1:{self.stream_port}/v1/chat/completions{query}"
        return f"http://127.0.0.1:{proxy.port}{proxy.stream_prefix}/v1/chat/completions{query}"

    def echo_url(self, proxy: Proxy | None) -> str:
        if proxy is None:
            return f"http://127.0.0.1:{self.stream_port}/v1/echo"
        return f"http://127.0.0.1:{proxy.port}/stream/v1/echo"


def _nginx_conf(prefix: Path, port: int) -> str:
    """
    One worker, no master, no access log, keep-alive without a request cap;
    any request gets the static chat completion (C{return} discards a body).
    """
    body = payloads.CHAT_RESPONSE.decode()
    assert "'" not in body and "$" not in body
    return f"""daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""


def check_forwarding(port: int) -> str | None:
    """
    C{None} if the proxy on C{port} forwards a chat completion, a stream and
    an echo; otherwise what went wrong.
    """
    checks: list[tuple[str, bytes, Callable[[bytes], bool]]] = [
        (
            "/openai/v1/chat/completions",
            payloads.CHAT_REQUEST,
            lambda body: body == payloads.CHAT_RESPONSE,
        ),
        (
            "/stream/v1/chat/completions?chunks=3&delay_ms=1",
            payloads.STREAM_REQUEST,
            lambda body: body.endswith(b"data: [DONE]\n\n") and body.count(b"\n\n") == 5,
        ),
        ("/stream/v1/echo", payloads.big_request(1000), lambda body: body == b'{"bytes":1000}'),
    ]
    for path, request, good in checks:
        try:
            status, body = http_request(port, "POST", path, request)
        except OSError as error:
            return f"POST {path}: {error}"
        if status != 200 or not good(body):
            return f"POST {path}: {status} {body[:160]!r}"
    return None


def _first_line(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = (done.stdout or done.stderr).decode(errors="replace").strip()
    return text.splitlines()[0] if text else ""


# ------------------------------------------------------------------------ parts


def part_a(h: Harness, rows: list[Row]) -> dict[str, Row]:
    """
    Non-streaming throughput at concurrency 1, 16, 64 and latency at 1.
    """
    s = h.settings
    proxy = h.proxy("base")
    rps = {c: Row("a", f"requests/s, concurrency {c}", "req/s", digits=0) for c in (1, 16, 64)}
    p50 = Row("a", "p50 latency, concurrency 1", "ms", digits=3, difference=True)
    p99 = Row("a", "p99 latency, concurrency 1", "ms", digits=3, difference=True)
    cpu = Row("a", "proxy CPU time per request, concurrency 16", "µs", digits=0)
    targets: list[Proxy | None] = [None] if proxy is None else [None, proxy]
    naive = h.naive.get("static")
    if naive is not None:
        targets.append(naive)
    for target in targets:
        h.wrk(target, 16, s.warmup_seconds)
    for rep in range(s.reps):
        for connections in (1, 16, 64):
            for target in targets if rep % 2 == 0 else list(reversed(targets)):
                summary = h.wrk(target, connections, s.wrk_seconds)
                if summary is None:
                    continue
                side = _side(target)
                getattr(rps[connections], side).append(summary["rps"])
                if connections == 1:
                    getattr(p50, side).append(summary["p50_us"] / 1000.0)
                    getattr(p99, side).append(summary["p99_us"] / 1000.0)
                if connections == 16 and target is not None:
                    getattr(cpu, side).append(summary["cpu_us"])
    new = {
        "rps1": rps[1],
        "rps16": rps[16],
        "rps64": rps[64],
        "p50": p50,
        "p99": p99,
        "cpu": cpu,
    }
    rows.extend(new.values())
    return new


def _side(target: Proxy | None) -> str:
    """
    Which column of a L{Row} a sample of C{target} goes to.
    """
    if target is None:
        return "direct"
    return "naive" if target.name.startswith("naive-") else "proxy"


def _stream_stats(records: list[dict[str, Any]], chunks: int) -> dict[str, float]:
    """
    Aggregate one batch of streams: only complete ones (200, all events,
    [DONE]) count for timings; C{ok} counts them.
    """
    good = [
        r
        for r in records
        if r.get("status") == 200 and r.get("done") and r.get("events", 0) >= chunks + 2
    ]
    ttfe = [r["ttfe_ms"] for r in good]
    ttfc = [r["ttfc_ms"] for r in good if r.get("ttfc_ms") is not None]
    total = [r["total_ms"] for r in good]
    gaps = [gap for r in good for gap in r["gaps_ms"][: chunks - 1]]
    incremental = [r for r in good if r["ttfe_ms"] < 0.5 * r["total_ms"]]
    return {
        "ok": float(len(good)),
        "all": float(len(records)),
        "ttfe_p50": percentile(ttfe, 50),
        "ttfe_p99": percentile(ttfe, 99),
        "ttfc_p50": percentile(ttfc, 50),
        "ttfc_p99": percentile(ttfc, 99),
        "total_p50": percentile(total, 50),
        "gap_p50": percentile(gaps, 50),
        "gap_p99": percentile(gaps, 99),
        "incremental": 100.0 * len(incremental) / len(records) if records else math.nan,
    }


def part_b(h: Harness, rows: list[Row]) -> dict[str, Row]:
    """
    Streaming at concurrency 1 and 100.
    """
    s = h.settings
    proxy = h.proxy("base")
    nominal = (s.b_chunks - 1) * s.b_delay_ms
    spec = f"{s.b_chunks} x {s.b_delay_ms:g} ms"
    new: dict[str, Row] = {
        "ttfe1": Row("b", f"first event p50, c1, {spec}", "ms", digits=2, difference=True),
        "ttfc1": Row("b", "first content event p50, c1", "ms", digits=2, difference=True),
        "total1": Row("b", f"stream total p50, c1 (nominal {nominal:g})", "ms", difference=True),
        "ttfe100_50": Row("b", "first event p50, c100", "ms", digits=2, difference=True),
        "ttfe100": Row("b", "first event p99, c100", "ms", digits=2, difference=True),
        "ttfc100_50": Row("b", "first content event p50, c100", "ms", digits=2, difference=True),
        "ttfc100": Row("b", "first content event p99, c100", "ms", digits=2, difference=True),
        "total100": Row("b", "stream total p50, c100", "ms", difference=True),
        "gap50": Row(
            "b",
            f"inter-chunk gap p50, c100 (nominal {s.b_delay_ms:g})",
            "ms",
            digits=2,
            difference=True,
        ),
        "gap99": Row("b", "inter-chunk gap p99, c100", "ms", digits=2, difference=True),
        "inc100": Row("b", "streams delivered incrementally, c100", "%"),
        "ok100": Row("b", "streams complete, c100", "%"),
    }
    targets: list[Proxy | None] = [None] if proxy is None else [None, proxy]
    naive = h.naive.get("stream")
    if naive is not None:
        targets.append(naive)
    stream_timeout = nominal / 1000.0 + 30
    for rep in range(s.reps):
        for target in targets if rep % 2 == 0 else list(reversed(targets)):
            side = _side(target)
            url = h.stream_url(target, s.b_chunks, s.b_delay_ms)
            records = h.client(
                ["stream", "--url", url, "--per-connection", str(s.b_c1_streams)],
                timeout=stream_timeout * s.b_c1_streams + 30,
            )
            if records:
                one = _stream_stats(records, s.b_chunks)
                getattr(new["ttfe1"], side).append(one["ttfe_p50"])
                getattr(new["ttfc1"], side).append(one["ttfc_p50"])
                getattr(new["total1"], side).append(one["total_p50"])
            if side == "naive":
                continue  # the reference is measured at concurrency 1 only
            records = h.client(
                [
                    "stream",
                    "--url",
                    url,
                    "--concurrency",
                    "100",
                    "--per-connection",
                    str(s.b_c100_rounds),
                    "--ramp",
                    "0.2",
                ],
                timeout=stream_timeout * s.b_c100_rounds + 60,
            )
            if records:
                many = _stream_stats(records, s.b_chunks)
                getattr(new["ttfe100_50"], side).append(many["ttfe_p50"])
                getattr(new["ttfe100"], side).append(many["ttfe_p99"])
                getattr(new["ttfc100_50"], side).append(many["ttfc_p50"])
                getattr(new["ttfc100"], side).append(many["ttfc_p99"])
                getattr(new["total100"], side).append(many["total_p50"])
                getattr(new["gap50"], side).append(many["gap_p50"])
                getattr(new["gap99"], side).append(many["gap_p99"])
                getattr(new["inc100"], side).append(many["incremental"])
                getattr(new["ok100"], side).append(100.0 * many["ok"] / many["all"])
    rows.extend(new.values())
    return new


class _RssSampler(threading.Thread):
    """
    Samples a process's VmRSS every 100 ms until stopped; keeps the peak.
    """

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_kb = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            rss = proc_status(self.pid).get("VmRSS", 0)
            self.peak_kb = max(self.peak_kb, rss)
            self._stop_event.wait(0.1)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def part_c(h: Harness, rows: list[Row]) -> dict[str, Row]:
    """
    1,000 concurrent slow streams through a fresh proxy (so its VmHWM is
    this part's own peak).
    """
    s = h.settings
    spec = f"{s.c_streams} streams of {s.c_chunks} x {s.c_delay_ms:g} ms"
    new = {
        "ok": Row("c", f"streams complete of {s.c_streams} ({spec})", "streams", digits=0),
        "ttfe": Row("c", "first event p99", "ms", digits=1, difference=True),
        "total": Row("c", "stream total p50", "ms", digits=0, difference=True),
        "idle": Row("c", "proxy RSS before the load", "MB"),
        "rss": Row("c", "proxy peak RSS (VmHWM)", "MB"),
    }
    h.start_proxies([("rss", ())])
    proxy = h.proxy("rss")
    nominal_s = (s.c_chunks - 1) * s.c_delay_ms / 1000.0
    targets: list[Proxy | None] = [None] if proxy is None else [None, proxy]
    for target in targets:
        side = "direct" if target is None else "proxy"
        sampler: _RssSampler | None = None
        if target is not None:
            new["idle"].proxy.append(proc_status(target.process.pid).get("VmRSS", 0) / 1024.0)
            sampler = _RssSampler(target.process.pid)
            sampler.start()
        records = h.client(
            [
                "stream",
                "--url",
                h.stream_url(target, s.c_chunks, s.c_delay_ms),
                "--concurrency",
                str(s.c_streams),
                "--ramp",
                str(s.c_ramp_seconds),
                "--timeout",
                str(nominal_s + 30),
            ],
            timeout=nominal_s + s.c_ramp_seconds + 90,
        )
        if sampler is not None and target is not None:
            sampler.stop()
            hwm = proc_status(target.process.pid).get("VmHWM", 0)
            new["rss"].proxy.append(max(hwm, sampler.peak_kb) / 1024.0)
        if records is not None:
            stats = _stream_stats(records, s.c_chunks)
            getattr(new["ok"], side).append(stats["ok"])
            getattr(new["ttfe"], side).append(stats["ttfe_p99"])
            getattr(new["total"], side).append(stats["total_p50"])
            failures = [r for r in records if r.get("error")]
            if failures:
                kinds = sorted({str(r["error"]) for r in failures})
                h.notes.append(
                    f"part (c) {side.upper()}: {len(failures)} streams failed ({', '.join(kinds)})"
                )
    h.stop_proxy("rss")
    rows.extend(new.values())
    return new


def part_d(h: Harness, rows: list[Row]) -> dict[str, Row]:
    """
    A 5 MB JSON body, round trip (the upstream answers with the byte count).
    """
    s = h.settings
    proxy = h.proxy("base")
    megabytes = s.d_size / 2**20
    row = Row("d", f"{megabytes:g} MB request body round trip, median", "ms", difference=True)
    targets: list[Proxy | None] = [None] if proxy is None else [None, proxy]
    for rep in range(s.reps):
        for target in targets if rep % 2 == 0 else list(reversed(targets)):
            records = h.client(
                [
                    "body",
                    "--url",
                    h.echo_url(target),
                    "--size",
                    str(s.d_size),
                    "--count",
                    str(s.d_count),
                ],
                timeout=120,
            )
            if records is None:
                continue
            good = [
                r["ms"] for r in records if r.get("status") == 200 and r.get("echoed") == s.d_size
            ]
            if len(good) < len(records):
                side = "DIRECT" if target is None else "PROXY"
                h.notes.append(
                    f"part (d) {side}: {len(records) - len(good)} of {len(records)} round trips "
                    f"failed or echoed the wrong length: {records[0]}"
                )
            if good:
                getattr(row, "direct" if target is None else "proxy").append(median(good))
    rows.append(row)
    return {"body": row}


FEATURES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("base", "proxy baseline (features off)", ()),
    ("rl-memory", "rate limiting, memory", ("ratelimit-memory.yml",)),
    ("rl-redis", "rate limiting, Redis", ("ratelimit-redis.yml",)),
    ("cost", "cost tracking (file sink)", ("cost.yml",)),
    (
        "rl-memory+cost",
        "rate limiting (memory) + cost tracking",
        ("ratelimit-memory.yml", "cost.yml"),
    ),
    ("status-off", "status page aggregates off (the baseline has them on)", ("status-off.yml",)),
    (
        "resilience-off",
        "resilience off: one attempt, no stream gate (the baseline has them on)",
        ("resilience-off.yml",),
    ),
    ("tracing", "tracing (OpenTelemetry, OTLP/HTTP to a local sink)", ("tracing.yml",)),
)


def part_e(h: Harness) -> tuple[list[float], list[FeatureRow]]:
    """
    Requests/s at concurrency 16 with each feature on. Each feature run is
    paired with a baseline run right before or after it (alternating), and
    the feature's price is the median of the per-pair ratios: the machine's
    speed drifts over minutes (other tenants of the host), and a ratio of
    two back-to-back runs cancels that drift where a ratio of two medians
    taken minutes apart does not.
    """
    s = h.settings
    wanted = [(name, overlays) for name, _, overlays in FEATURES if name != "base"]
    if h.redis_port is None:
        wanted = [(name, overlays) for name, overlays in wanted if name != "rl-redis"]
    h.start_proxies(wanted)
    direct: list[float] = []
    rows = {name: FeatureRow(label) for name, label, _ in FEATURES}
    base = h.proxy("base")
    features: list[tuple[str, Proxy]] = []
    for name, _, _ in FEATURES[1:]:
        proxy = h.proxy(name)
        if proxy is not None:
            features.append((name, proxy))
    for target in [base, *(proxy for _, proxy in features)]:
        if target is not None:
            h.wrk(target, 16, s.warmup_seconds)

    def measure(name: str, target: Proxy | None) -> dict[str, Any] | None:
        summary = h.wrk(target, 16, s.wrk_seconds)
        if summary is not None:
            if target is None:
                direct.append(summary["rps"])
            else:
                rows[name].samples.append(summary["rps"])
                rows[name].cpu_us.append(summary["cpu_us"])
        return summary

    for rep in range(s.reps):
        measure("direct", None)
        shift = rep % len(features) if features else 0
        for index, (name, proxy) in enumerate(features[shift:] + features[:shift]):
            if base is None:
                measure(name, proxy)
                continue
            pair = [("base", base), (name, proxy)]
            if (rep + index) % 2:
                pair.reverse()
            results = {label: measure(label, target) for label, target in pair}
            with_feature, without = results[name], results["base"]
            if with_feature is not None and without is not None:
                rows[name].paired.append(with_feature["rps"] / without["rps"])
                rows[name].paired_cpu.append(without["cpu_us"] / with_feature["cpu_us"])
    for name, _ in wanted:
        h.stop_proxy(name)
    measured = {"base", *(name for name, _ in wanted)}
    return direct, [rows[name] for name, _, _ in FEATURES if name in measured]


# ----------------------------------------------------------------------- budget


def budgets(found: dict[str, Row], features: list[FeatureRow]) -> list[Budget]:
    """
    The issue's budget, checked against this run's medians.
    """
    items: list[Budget] = []

    def add(
        item: str,
        target: str,
        value: float,
        unit: str,
        good: Callable[[float], bool],
        digits: int = 2,
    ) -> None:
        met = None if math.isnan(value) else good(value)
        items.append(Budget(item, target, value, unit, met, digits))

    def proxy(key: str) -> float:
        return median(found[key].proxy) if key in found else math.nan

    def over(key: str) -> float:
        return found[key].overhead() if key in found else math.nan

    add("requests/s, concurrency 16", "≥ 3,000", proxy("rps16"), "req/s", lambda v: v >= 3000, 0)
    add("p50 overhead, concurrency 1", "≤ 0.5 ms", over("p50"), "ms", lambda v: v <= 0.5)
    add("p99 overhead, concurrency 1", "≤ 2 ms", over("p99"), "ms", lambda v: v <= 2.0)
    add("first-event overhead p50, c1", "≤ 1 ms", over("ttfe1"), "ms", lambda v: v <= 1.0)
    add(
        "first-content-event overhead p50, c1",
        "≤ 1 ms",
        over("ttfc1"),
        "ms",
        lambda v: v <= 1.0,
    )
    add("first-event overhead p99, c100", "≤ 3 ms", over("ttfe100"), "ms", lambda v: v <= 3.0)
    add("streams incremental, c100", "100%", proxy("inc100"), "%", lambda v: v >= 100.0, 1)
    add("inter-chunk gap p50 vs DIRECT", "within ±1 ms", over("gap50"), "ms", lambda v: abs(v) <= 1)
    add("slow streams complete", "1,000 of 1,000", proxy("ok"), "", lambda v: v >= 1000, 0)
    add("peak RSS, 1,000 streams", "≤ 80 MB", proxy("rss"), "MB", lambda v: v <= 80, 1)
    body = ratio(found["body"].proxy, found["body"].direct) if "body" in found else math.nan
    add("5 MB body vs DIRECT", "≤ 2x", body, "x", lambda v: v <= 2.0)
    named = {row.variant: row for row in features}
    both = named.get("rate limiting (memory) + cost tracking")
    add(
        "rate limiting (memory) + cost tracking, requests/s (paired)",
        "≥ 0.85x baseline",
        median(both.paired) if both else math.nan,
        "x",
        lambda v: v >= 0.85,
    )
    add(
        "the same, from CPU per request (baseline/with, paired)",
        "≥ 0.85x",
        median(both.paired_cpu) if both else math.nan,
        "x",
        lambda v: v >= 0.85,
    )
    return items


# ----------------------------------------------------------------------- report


def machine() -> list[str]:
    """
    What the figures were measured on.
    """
    import twisted

    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    return [
        f"- machine: {os.cpu_count()} CPUs ({model}), {memory} memory, "
        f"{platform.system()} {platform.release()}; load average at start {load}",
        f"- Python {platform.python_version()} ({platform.python_implementation()}), "
        f"Twisted {twisted.__version__}",
    ]


def git_revision() -> str:
    """
    Short revision, with C{+dirty} when tracked files differ from it.
    """
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def render(
    h: Harness,
    rows: list[Row],
    features: tuple[list[float], list[FeatureRow]] | None,
    budget: list[Budget],
    revision: str,
    started: datetime.datetime,
    elapsed: float,
    parts: Sequence[str],
    header: list[str],
    workers: list[str] | None = None,
) -> str:
    s = h.settings
    kind = "quick smoke run" if s.quick else "full run"
    if h.profile is not None:
        kind += ", profiled"
    lines = [
        f"# llmproxy benchmark — {started:%Y-%m-%d %H:%M} UTC, {revision} ({kind})",
        "",
        *header,
        f"- upstream: static JSON from {h.static_kind}; streams and echo from bench/upstream.py",
        f"- pinning: {h.pin.note}",
        f"- parts: {', '.join(parts)}; repetitions: {s.reps}; wrk runs of {s.wrk_seconds:g} s; "
        f"proxy log level {s.log_level}; run took {elapsed:.0f} s",
        "- values: median over repetitions (min..max); ratios are PROXY/DIRECT of the medians",
    ]
    if h.interference:
        lines.append(
            "- noise: share of the proxy core's time not spent in the proxy during the wrk runs "
            f"(other processes, interrupts, steal): median {100 * median(h.interference):.0f}%, "
            f"max {100 * max(h.interference):.0f}%; above a few % the PROXY throughput is "
            "understated, while CPU per request is not"
        )
    lines.append("")
    if rows:
        lines += [*rows_table(rows), ""]
    reference = naive_table(rows)
    if reference:
        lines += [
            "Reference: the same measurements through a naive streaming proxy on Twisted and "
            "treq (`bench/naive_proxy.py`: no routing table, metering, records, access log or "
            "timeouts), the yardstick issue 9 names:",
            "",
            *reference,
            "",
        ]
    if features is not None:
        lines += ["Part (e), the price of each feature:", ""]
        lines += [*features_table(*features), ""]
    if workers:
        lines += workers
    if budget:
        lines += ["Budget (issue 9), from this run's medians:", ""]
        lines += [*budget_table(budget), ""]
    if h.notes:
        lines += ["Notes:", ""] + [f"- {note}" for note in h.notes] + [""]
    return "\n".join(lines)


# ------------------------------------------------------------------------- main


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="short smoke run (about 90 s)")
    parser.add_argument(
        "--only",
        default=",".join(PARTS),
        help="comma-separated parts to run (default a,b,c,d,e,w)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warn", "error"],
        help="the proxies' logging.level (default info: one access line per request)",
    )
    parser.add_argument("--reps", type=int, default=None, help="override the repetitions")
    parser.add_argument("--keep-tmp", action="store_true", help="keep logs and configs")
    parser.add_argument("--no-save", action="store_true", help="print only; write no results")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the baseline proxy under cProfile (twistd --profiler=cprofile) and write "
        "bench/results/profile-*.pstats and a top-functions .txt; its figures are then slower",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    arguments = parse_arguments(argv)
    parts = [part.strip() for part in arguments.only.split(",") if part.strip()]
    unknown = [part for part in parts if part not in PARTS]
    if unknown:
        sys.stderr.write(f"unknown part(s) {unknown}; choose from {','.join(PARTS)}\n")
        return 2
    settings = Settings.make(arguments.quick, arguments.log_level)
    if arguments.reps is not None:
        settings.reps = max(1, arguments.reps)
    if shutil.which("wrk") is None and ({"a", "e", "w"} & set(parts)):
        sys.stderr.write(
            f"wrk is not installed: parts (a), (e) and (w) are skipped. Install: {INSTALL_HINT}\n"
        )
        parts = [part for part in parts if part not in ("a", "e", "w")]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    # Installed explicitly: a driver started in the background inherits SIGINT ignored.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    started = datetime.datetime.now(datetime.UTC)
    clock = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="llmproxy-bench-"))
    procs = Processes(tmp)
    h = Harness(settings, tmp, procs, Pinning.detect())
    if h.pin.load is not None:
        os.sched_setaffinity(0, {int(h.pin.load)})
    if shutil.which("wrk") is None:
        h.notes.append(
            f"wrk is not installed: parts (a), (e) and (w) skipped. Install: {INSTALL_HINT}"
        )
    if arguments.profile:
        h.profile = tmp / "proxy-base.pstats"
        h.notes.append(
            "profiled run: the baseline proxy ran under cProfile, so its figures (and the "
            "part (e) ratios to it) are slower than an unprofiled run's"
        )
    header = machine()
    revision = git_revision()
    rows: list[Row] = []
    found: dict[str, Row] = {}
    features: tuple[list[float], list[FeatureRow]] | None = None
    workers: list[str] = []
    status = 0
    try:
        _say(f"bench: {', '.join(parts)} ({'quick' if settings.quick else 'full'}); tmp {tmp}")
        h.start_upstreams()
        if "e" in parts:
            h.start_redis()
        if {"a", "b", "d", "e"} & set(parts):
            h.start_proxies([("base", ())])
        if {"a", "b"} & set(parts):
            h.start_naive()
        for part, run in (("a", part_a), ("b", part_b), ("c", part_c), ("d", part_d)):
            if part in parts:
                _say(f"bench: part ({part}) ...")
                found.update(run(h, rows))
        if "e" in parts:
            _say("bench: part (e) ...")
            features = part_e(h)
        if "w" in parts:
            _say("bench: part (w) ...")
            workers = workers_section(h, part_w(h))
    except KeyboardInterrupt:
        sys.stderr.write("bench: interrupted; stopping every process it started\n")
        status = 130
    except BenchError as error:
        sys.stderr.write(f"bench: {error}\n")
        status = 1
    finally:
        procs.stop_all()
        if h.profile is not None and h.profile.exists() and not arguments.no_save:
            _say(save_profile(h.profile, f"{started:%Y-%m-%dT%H%MZ}-{revision.replace('+', '-')}"))
        if not arguments.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            sys.stderr.write(f"bench: logs kept in {tmp}\n")
    if status == 130:
        return status
    broken = h.failed
    budget = budgets(found, features[1] if features else []) if set(parts) == set(PARTS) else []
    elapsed = time.monotonic() - clock
    report = render(h, rows, features, budget, revision, started, elapsed, parts, header, workers)
    sys.stdout.write(report + "\n")
    if not arguments.no_save and (rows or features or workers):
        results = BENCH / "results"
        results.mkdir(exist_ok=True)
        suffix = "-quick" if settings.quick else ("" if set(parts) == set(PARTS) else "-partial")
        if arguments.profile:
            suffix += "-profiled"
        name = f"{started:%Y-%m-%dT%H%MZ}-{revision.replace('+', '-')}{suffix}.md"
        (results / name).write_text(report + "\n")
        if not suffix:
            (results / "latest.md").write_text(report + "\n")
        _say(f"bench: saved bench/results/{name}")
    if broken and status == 0:
        status = 1
    return status


def save_profile(stats_file: Path, stamp: str) -> str:
    """
    Keep the proxy's cProfile stats under C{bench/results/} (ignored by git),
    with a text summary: the top functions by own time and by cumulative time.
    """
    results = BENCH / "results"
    results.mkdir(exist_ok=True)
    kept = results / f"profile-{stamp}.pstats"
    shutil.copyfile(stats_file, kept)
    summary = results / f"profile-{stamp}.txt"
    with summary.open("w") as out:
        stats = pstats.Stats(str(kept), stream=out)
        stats.strip_dirs()
        out.write("# by own time (tottime)\n")
        stats.sort_stats("tottime").print_stats(40)
        out.write("# by cumulative time\n")
        stats.sort_stats("cumulative").print_stats(40)
    return f"bench: profile saved: {kept.relative_to(REPO)}, summary {summary.relative_to(REPO)}"


def _say(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    # `make bench BENCH_ARGS="--quick --only a"`: make puts command-line variables in
    # the recipe's environment, and the Makefile target passes no arguments itself.
    sys.exit(main([*shlex.split(os.environ.get("BENCH_ARGS", "")), *sys.argv[1:]]))
