"""
The daemon under systemd's protocols, without systemd as PID 1: socket
activation through C{systemd-socket-activate} and through a socket this
test holds (as systemd holds the C{.socket} unit's), sd_notify datagrams on
a socket of the test's own, the unit files through C{systemd-analyze
verify}, and a restart under load that refuses no connection and cuts no
stream.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
from treq.client import HTTPClient
from treq.content import content
from twisted.internet.defer import Deferred, DeferredList, DeferredQueue, inlineCallbacks
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from llmproxy.testing.fake_upstream import FakeUpstream
from llmproxy.testing.proxy_process import REPO_ROOT, ProxyProcess, _Protocol, twistd_command
from tests.e2e.harness import providers_yaml, reactor, serve_fake

UNITS = REPO_ROOT / "contrib" / "systemd"
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
NO_SYSTEMD = "needs {} (Debian package systemd; .ci/run installs it)"

CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
STREAM = b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}'


def daemon_environ(**extra: str) -> dict[str, str]:
    """
    The environment of a daemon started by these tests: this checkout first
    on the path, no C{PORT}, no systemd variables of the test's own.
    """
    environ = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PORT", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
        and not key.startswith("LISTEN_")
    }
    environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    environ.update(extra)
    return environ


def spawn(
    argv: Sequence[str],
    environ: Mapping[str, str],
    child_fds: Mapping[int, Any] | None = None,
    timeout: float = 30.0,
) -> Deferred[ProxyProcess]:
    """
    Run C{argv} (the daemon, possibly behind a wrapper) with the output
    handling of L{ProxyProcess}; fires once it logs that it listens.
    """
    proc = ProxyProcess(reactor)
    started: Deferred[ProxyProcess] = Deferred()
    proc._started = started
    proc._transport = reactor.spawnProcess(
        _Protocol(proc),
        argv[0],
        list(argv),
        env=dict(environ),
        path=str(REPO_ROOT),
        childFDs=dict(child_fds) if child_fds is not None else None,
    )
    timer = reactor.callLater(timeout, proc._start_timed_out)
    started.addBoth(lambda result: (timer.active() and timer.cancel(), result)[1])
    return started


def daemon_args(config_path: str | None, listen: str) -> list[str]:
    args = [*twistd_command(), "-n", "--pidfile=", "llmproxy", "--listen", listen]
    if config_path is not None:
        args += ["--config", config_path]
    return args


def with_inherited_socket(args: Sequence[str]) -> list[str]:
    """
    Wrap C{args} so C{LISTEN_PID} is the daemon's own pid, as systemd sets
    it: the shell exports its pid, then becomes the daemon.
    """
    return ["/bin/sh", "-c", 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"', "sh", *args]


def short_tempdir(test: TestCase) -> str:
    """
    A directory with a short path (a Unix socket path has at most 107 bytes).
    """
    directory = tempfile.mkdtemp(prefix="llmproxy-")
    test.addCleanup(shutil.rmtree, directory, True)
    return directory


class NotifyReceiver(DatagramProtocol):
    """
    Plays systemd's notify socket: records every datagram.
    """

    def __init__(self) -> None:
        self.states: DeferredQueue[bytes] = DeferredQueue()
        self.watchdogs = 0

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if datagram == b"WATCHDOG=1":
            self.watchdogs += 1
        else:
            self.states.put(datagram)

    @inlineCallbacks
    def next_state(self, timeout: float = 20.0) -> Any:
        """
        The next datagram other than C{WATCHDOG=1}, as a dict.
        """
        waiting = self.states.get()
        waiting.addTimeout(timeout, reactor)
        datagram: bytes = yield waiting
        return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


def listen_notify(test: TestCase) -> tuple[NotifyReceiver, str]:
    receiver = NotifyReceiver()
    path = os.path.join(short_tempdir(test), "notify")
    port = reactor.listenUNIXDatagram(path, receiver)
    test.addCleanup(port.stopListening)
    return receiver, path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_client(test: TestCase) -> HTTPClient:
    pool = HTTPConnectionPool(reactor, persistent=False)
    test.addCleanup(pool.closeCachedConnections)
    return HTTPClient(Agent(reactor, pool=pool, connectTimeout=10))


def json_headers(**fake: str) -> Headers:
    headers = Headers(
        {b"content-type": [b"application/json"], b"authorization": [b"Bearer sk-test"]}
    )
    for name, value in fake.items():
        headers.setRawHeaders(name.replace("_", "-").encode(), [value.encode()])
    return headers


class SocketActivationTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_systemd_socket_activate(self) -> Any:
        """
        Started by C{systemd-socket-activate} on the first connection, the
        daemon adopts the socket it was given (C{LISTEN_FDS},
        C{LISTEN_FDNAMES}) through the shipped C{--listen} description,
        answers that first connection, and tells the notify socket it is
        ready.
        """
        if SOCKET_ACTIVATE is None:
            raise self.skipTest(NO_SYSTEMD.format("systemd-socket-activate"))
        receiver, notify = listen_notify(self)
        port = free_port()
        argv = [
            SOCKET_ACTIVATE,
            "--listen",
            f"127.0.0.1:{port}",
            "--fdname=http",
            "-E",
            "PYTHONPATH",
            "-E",
            f"NOTIFY_SOCKET={notify}",
            *daemon_args(None, "systemd:domain=INET:index=0"),
        ]
        proc = ProxyProcess(reactor)
        proc._transport = reactor.spawnProcess(
            _Protocol(proc), argv[0], argv, env=daemon_environ(), path=str(REPO_ROOT)
        )
        self.addCleanup(proc.stop)
        # systemd-socket-activate says when it listens, then waits for a
        # connection before it starts the daemon.
        for _ in range(200):
            if b"Listening on" in proc.output or proc.exit_code is not None:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertIn(f"Listening on 127.0.0.1:{port}".encode(), proc.output)
        self.assertEqual(receiver.states.pending, [])
        http = http_client(self)
        response = yield http.get(f"http://127.0.0.1:{port}/health")
        self.assertEqual(response.code, 200)
        self.assertEqual(orjson.loads((yield content(response)))["status"], "healthy")
        self.assertEqual(proc.port, port, proc.output)
        ready = yield receiver.next_state()
        self.assertEqual(ready["READY"], "1", ready)
        exit_code = yield proc.stop()
        self.assertEqual(exit_code, 0, proc.output)


class NotifyTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_lifecycle(self) -> Any:
        """
        The daemon sends READY=1 once listening, RELOADING=1 with
        C{MONOTONIC_USEC} on SIGHUP then READY=1, WATCHDOG=1 every
        C{WATCHDOG_USEC}/2, and STOPPING=1 on SIGTERM; it exits 0.
        """
        receiver, notify = listen_notify(self)
        proc = yield ProxyProcess.start(
            reactor, env={"NOTIFY_SOCKET": notify, "WATCHDOG_USEC": "400000"}
        )
        self.addCleanup(proc.stop)
        ready = yield check_lifecycle(self, proc, receiver)
        self.assertIn(str(proc.port), ready["STATUS"])


@inlineCallbacks
def check_lifecycle(test: TestCase, proc: ProxyProcess, receiver: NotifyReceiver) -> Any:
    """
    Check what C{proc} (started with C{WATCHDOG_USEC=400000}) tells systemd:
    READY=1, then on SIGHUP RELOADING=1 with C{MONOTONIC_USEC} and READY=1,
    WATCHDOG=1 twice in 0.5 s, on SIGTERM STOPPING=1 and exit 0, and
    nothing else.

    @return: a Deferred that fires with the first READY=1 datagram.
    """
    ready = yield receiver.next_state()
    test.assertEqual(ready["READY"], "1")

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    proc.send_signal(signal.SIGHUP)
    reloading = yield receiver.next_state()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    test.assertEqual(reloading["RELOADING"], "1", reloading)
    test.assertTrue(before <= int(reloading["MONOTONIC_USEC"]) <= after, reloading)
    reloaded = yield receiver.next_state()
    test.assertEqual(reloaded, {"READY": "1", "STATUS": "configuration reloaded"})

    yield deferLater(reactor, 0.5, lambda: None)
    test.assertGreaterEqual(receiver.watchdogs, 2)

    proc.send_signal(signal.SIGTERM)
    stopping = yield receiver.next_state()
    test.assertEqual(stopping["STOPPING"], "1", stopping)
    exit_code = yield proc.wait_exit()
    test.assertEqual(exit_code, 0, proc.output[-2000:])
    test.assertEqual(receiver.states.pending, [])
    return ready


def _unit_lines(path: Path) -> list[str]:
    return [
        line
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def _setting(path: Path, key: str) -> str:
    [value] = [line.split("=", 1)[1] for line in _unit_lines(path) if line.startswith(key + "=")]
    return value


class UnitFileTests(TestCase):
    def test_systemd_analyze_verify(self) -> None:
        """
        C{systemd-analyze verify} accepts the units, without a warning.
        ExecStart must name an executable, so the copies verified point it
        at this virtualenv's twistd instead of C{/opt/llmproxy/.venv}.
        """
        if SYSTEMD_ANALYZE is None:
            raise self.skipTest(NO_SYSTEMD.format("systemd-analyze"))
        twistd = Path(sys.executable).with_name("twistd")
        self.assertTrue(twistd.exists(), twistd)
        directory = Path(short_tempdir(self))
        for unit in ("llmproxy.socket", "llmproxy.service", "llmproxy@.service"):
            text = (UNITS / unit).read_text()
            if unit.endswith(".service"):
                self.assertIn("/opt/llmproxy/.venv/bin/twistd", text)
            (directory / unit).write_text(
                text.replace("/opt/llmproxy/.venv/bin/twistd", str(twistd))
            )
        result = subprocess.run(
            [
                SYSTEMD_ANALYZE,
                "verify",
                "llmproxy.socket",
                "llmproxy.service",
                "llmproxy@handover.service",
            ],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"},
        )
        self.assertEqual(
            (result.returncode, result.stdout + result.stderr),
            (0, ""),
            "systemd-analyze verify found problems",
        )

    def test_units_agree(self) -> None:
        """
        The service adopts the socket the socket unit makes, stops only
        after the longest default drain, and the overlapping instance is the
        service plus C{Sockets=}.
        """
        service = UNITS / "llmproxy.service"
        exec_start = _setting(service, "ExecStart")
        self.assertIn("--listen systemd:domain=INET:index=0", exec_start)
        self.assertIn(" -n --pidfile= llmproxy ", exec_start)
        self.assertEqual(_setting(UNITS / "llmproxy.socket", "FileDescriptorName"), "http")
        self.assertTrue(_setting(UNITS / "llmproxy.socket", "ListenStream").startswith("0.0.0.0:"))
        self.assertEqual(_setting(service, "Type"), "notify")
        self.assertEqual(_setting(service, "ExecReload"), "/bin/kill -HUP $MAINPID")
        from llmproxy.config import ServerConfig

        server = ServerConfig()
        drain = server.drain_timeout_seconds + server.shutdown_grace_seconds
        self.assertGreater(int(_setting(service, "TimeoutStopSec")), drain)
        self.assertNotIn("MemoryDenyWriteExecute=yes", _unit_lines(service))

        template = UNITS / "llmproxy@.service"
        ours = _unit_lines(service)
        theirs = _unit_lines(template)
        service_only = [line for line in ours if line not in theirs]
        template_only = [line for line in theirs if line not in ours]
        self.assertEqual(
            [line.split("=", 1)[0] for line in service_only],
            ["Description", "[Install]", "WantedBy", "Also"],
        )
        self.assertEqual(
            [line.split("=", 1)[0] for line in template_only], ["Description", "Sockets"]
        )
        self.assertEqual(_setting(template, "Sockets"), "llmproxy.socket")


class Load:
    """
    Clients sending chat requests back to back on fresh connections until
    told to stop, counting what happened to each.
    """

    def __init__(self, http: HTTPClient, url: str, clients: int) -> None:
        self.http = http
        self.url = url
        self.ok = 0
        self.failures: list[str] = []
        self.running = True
        self.done = DeferredList([self._client() for _ in range(clients)])

    @inlineCallbacks
    def _client(self) -> Any:
        while self.running:
            try:
                response = yield self.http.post(
                    self.url + "/openai/v1/chat/completions",
                    data=CHAT,
                    headers=json_headers(),
                    timeout=15,
                )
                body = yield content(response)
            except Exception as error:
                self.failures.append(f"{type(error).__name__}: {error}")
            else:
                if response.code == 200 and b'"usage"' in body:
                    self.ok += 1
                else:
                    self.failures.append(f"{response.code}: {body[:200]!r}")
            yield deferLater(reactor, 0.005, lambda: None)

    def stop(self) -> Deferred[Any]:
        self.running = False
        return self.done


class ZeroDropRestartTests(TestCase):
    """
    A restart the way the socket unit allows it: the listening socket
    belongs to someone else (systemd; here the test), a new process starts
    on it while the old one drains.
    """

    timeout = 90

    @inlineCallbacks
    def test_restart_under_load(self) -> Any:
        """
        With a client sending requests continuously and 20 streams open,
        instance B starts on the socket of instance A and A is stopped:
        no connection is refused, no request fails, every stream ends with
        C{[DONE]}, and there is one cost record per request.
        """
        upstream = yield serve_fake(self, FakeUpstream(reactor))
        directory = short_tempdir(self)
        costs = os.path.join(directory, "costs.jsonl")
        config = os.path.join(directory, "config.yml")
        Path(config).write_text(
            "server:\n  drain_timeout_seconds: 30\n"
            + providers_yaml(upstream, ["openai"])
            + "features:\n  cost_tracking:\n    enabled: true\n    flush_interval_seconds: 1\n"
            f"    transports:\n      - type: file\n        file: {{path: {costs}}}\n"
        )

        listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen(1024)
        listening.set_inheritable(True)
        port = listening.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        argv = with_inherited_socket(daemon_args(config, "systemd:domain=INET:index=0"))
        environ = daemon_environ(LISTEN_FDS="1", LISTEN_FDNAMES="http")
        fds = {0: "w", 1: "r", 2: "r", 3: listening.fileno()}

        a = yield spawn(argv, environ, fds)
        self.addCleanup(a.stop)
        self.assertEqual(a.port, port)
        http = http_client(self)
        load = Load(http, url, clients=4)
        self.addCleanup(load.stop)
        streams = [
            http.post(
                url + "/openai/v1/chat/completions",
                data=STREAM,
                headers=json_headers(x_fake_chunks="30", x_fake_delay_ms="100"),
            )
            for _ in range(20)
        ]
        responses = yield DeferredList(streams, fireOnOneErrback=True, consumeErrors=True)
        bodies = [content(response) for _, response in responses]

        b = yield spawn(argv, environ, fds)
        self.addCleanup(b.stop)
        yield deferLater(reactor, 0.3, lambda: None)
        stopped_a = a.stop(kill_after=60)
        a_exit = yield stopped_a
        self.assertEqual(a_exit, 0, a.output)
        yield deferLater(reactor, 0.5, lambda: None)
        yield load.stop()
        b_exit = yield b.stop(kill_after=60)
        self.assertEqual(b_exit, 0, b.output)

        self.assertEqual(load.failures, [])
        for _, response in responses:
            self.assertEqual(response.code, 200)
        for body in (yield DeferredList(bodies, fireOnOneErrback=True, consumeErrors=True)):
            data: bytes = body[1]
            self.assertTrue(data.rstrip().endswith(b"data: [DONE]"), data[-200:])
            self.assertGreaterEqual(data.count(b"data: "), 31)

        served_by_a = a.output.count(b"POST /openai/v1/chat/completions 200")
        served_by_b = b.output.count(b"POST /openai/v1/chat/completions 200")
        self.assertEqual(served_by_a + served_by_b, load.ok + 20)
        self.assertGreater(served_by_b, 0, "B never accepted a connection")
        self.assertGreater(load.ok, 50)
        records = [orjson.loads(line) for line in Path(costs).read_bytes().splitlines()]
        self.assertEqual(len(records), load.ok + 20)
        self.assertEqual(len({record["request_id"] for record in records}), len(records))
        self.assertEqual(sum(record["is_streaming"] for record in records), 20)
