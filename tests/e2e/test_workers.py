"""
A group of workers (C{--workers N}): the real master and worker processes,
on loopback, against the fake upstream in this process.

What must stay true with several workers: rate limits exact across them
(budgets: L{tests.e2e.test_workers_budgets}), one C{/metrics}, C{/health}
and C{/status} for the group, one cost-record file with whole lines, a
drain that loses nothing, a dead worker replaced at once, SIGHUP and
systemd handled by the master.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path
from typing import Any

import orjson
from treq.client import HTTPClient
from treq.content import content
from twisted.internet.defer import Deferred, DeferredList, gatherResults, inlineCallbacks
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from llmproxy.testing.fake_upstream import FakeUpstream
from llmproxy.testing.proxy_process import ProxyProcess
from llmproxy.testing.redis_server import REDIS_SERVER, REDIS_SERVER_MISSING, RedisServer
from tests.e2e.harness import (
    RawClient,
    providers_yaml,
    raw_request,
    reactor,
    serve_fake,
    split_response,
    temp_directory,
)
from tests.e2e.test_redis_fleet import metric
from tests.e2e.test_systemd import (
    Load,
    check_lifecycle,
    daemon_args,
    daemon_environ,
    listen_notify,
    short_tempdir,
    spawn,
    with_inherited_socket,
)

CHAT_PATH = "/openai/v1/chat/completions"
CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hi"}]}'
STREAM = b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say hi"}]}'
HEADERS = {"content-type": "application/json", "authorization": "Bearer sk-workers-1"}


def headers(**fake: str) -> Headers:
    found = Headers({name: [value] for name, value in HEADERS.items()})
    for name, value in fake.items():
        found.setRawHeaders(name.replace("_", "-"), [value])
    return found


class WorkersTestCase(TestCase):
    """
    The fake upstream on loopback, a directory for configs and records, and
    a treq client that opens a connection per request (so requests spread
    over the workers as separate clients' would).
    """

    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        self.fake = FakeUpstream(reactor)
        self.upstream: str = yield serve_fake(self, self.fake)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=pool, connectTimeout=10))
        self.directory = temp_directory(self)

    def config_text(self, extra: str = "") -> str:
        return providers_yaml(self.upstream, ["openai"]) + extra

    def config(self, extra: str = "", name: str = "config.yml") -> str:
        path = os.path.join(self.directory, name)
        Path(path).write_text(self.config_text(extra))
        return path

    @inlineCallbacks
    def start(self, *paths: str, workers: int = 2, **kwargs: Any) -> Any:
        """
        Start a group; once its workers serve, wait for its spare too, so
        that the spare's start (a second of CPU) does not skew what the
        test measures.
        """
        proc = yield ProxyProcess.start(reactor, paths, workers=workers, **kwargs)
        self.addCleanup(proc.stop)
        if kwargs.get("wait_for_port", True):
            while (yield self.health(proc))[1]["spare_worker"] is None:
                yield deferLater(reactor, 0.05, lambda: None)
        return proc

    @inlineCallbacks
    def post(self, proc: ProxyProcess, body: bytes = CHAT, **fake: str) -> Any:
        """
        POST a chat request; (status, body).
        """
        response = yield self.http.post(proc.url + CHAT_PATH, data=body, headers=headers(**fake))
        received = yield content(response)
        return response.code, received

    @inlineCallbacks
    def health(self, proc: ProxyProcess) -> Any:
        response = yield self.http.get(proc.url + "/health")
        body = yield content(response)
        return response.code, orjson.loads(body)

    @inlineCallbacks
    def scrape(self, proc: ProxyProcess) -> Any:
        response = yield self.http.get(proc.url + "/metrics")
        body = yield content(response)
        return body.decode("utf-8")

    @inlineCallbacks
    def wait_for_streams(self, proc: ProxyProcess, count: int) -> Any:
        """
        Wait until the group relays C{count} streams; its C{/health} then.
        """
        while True:
            _, body = yield self.health(proc)
            if body["providers"]["openai"]["active_streams"] >= count:
                return body
            yield deferLater(reactor, 0.05, lambda: None)

    @inlineCallbacks
    def served(self, proc: ProxyProcess) -> Any:
        """
        The number of requests each worker has received, by index, from
        C{/health} (the C{/health} request itself included).
        """
        _, body = yield self.health(proc)
        return [worker["requests"] for worker in body["workers"]]


class LimitTests(WorkersTestCase):
    @inlineCallbacks
    def test_exact_limit_across_workers(self) -> Any:
        """
        Two workers, the memory backend, C{requests_per_minute: 100}: 300
        concurrent requests admit exactly 100, although both workers take
        requests: the counters are the master's.
        """
        path = self.config(
            "features:\n  rate_limiting:\n    enabled: true\n"
            "    limits: {requests_per_minute: 100}\n"
        )
        proc = yield self.start(path)
        before = yield self.served(proc)
        results = yield gatherResults([self.post(proc) for _ in range(300)])
        statuses = [status for status, _ in results]
        self.assertEqual((statuses.count(200), statuses.count(429)), (100, 200), set(statuses))
        self.assertEqual(len(self.fake.received), 100)
        after = yield self.served(proc)
        served = [b - a for a, b in zip(before, after, strict=True)]
        self.assertEqual(sum(served), 301, served)
        self.assertTrue(all(count > 1 for count in served), served)


class GroupViewTests(WorkersTestCase):
    @inlineCallbacks
    def test_metrics_health_and_records_are_the_groups(self) -> Any:
        """
        After 400 concurrent requests served by both workers: every scrape
        of C{/metrics} (whichever worker answers) counts all 400, C{/health}
        and C{/status.json} sum both workers' counters, and the one
        cost-record file holds 400 whole lines, one per request.
        """
        costs = os.path.join(self.directory, "costs.jsonl")
        path = self.config(
            "features:\n  cost_tracking:\n    enabled: true\n    flush_interval_seconds: 0.05\n"
            f"    transports: [{{type: file, file: {{path: {costs}}}}}]\n"
        )
        proc = yield self.start(path)
        results = yield gatherResults([self.post(proc) for _ in range(400)])
        self.assertEqual({status for status, _ in results}, {200})
        served = yield self.served(proc)
        self.assertTrue(all(count > 1 for count in served), served)
        for _ in range(6):
            text = yield self.scrape(proc)
            total = metric(
                text,
                "llmproxy_requests_total",
                provider="openai",
                model="gpt-4o-mini",
                status="200",
            )
            self.assertEqual(total, 400)
            self.assertEqual(metric(text, "llmproxy_tokens_total", type="input"), 400 * 10, text)
        code, body = yield self.health(proc)
        self.assertEqual(code, 200)
        self.assertEqual(body["status"], "healthy")
        self.assertEqual(body["providers"]["openai"]["requests"], 400)
        # The charts end with the last whole second.
        yield deferLater(reactor, 1.1, lambda: None)
        for _ in range(6):
            response = yield self.http.get(proc.url + "/status.json")
            self.assertEqual(response.code, 200)
            status = orjson.loads((yield content(response)))
            self.assertNotIn("group", status)
            self.assertEqual(status["today"]["totals"]["requests"], 400)
            self.assertEqual(status["providers"]["openai"]["requests"], 400)
            self.assertEqual(status["totals"]["ttfb_ms"]["samples"], 400)
            self.assertEqual(round(sum(status["timeline"]["requests_per_second"]) * 5), 400)
            self.assertEqual(status["totals"]["in_flight"], 0)
            self.assertEqual([w["status"] for w in status["workers"]], ["serving", "serving"])
        self.assertEqual([w["status"] for w in body["workers"]], ["serving", "serving"])
        self.assertEqual(len({w["pid"] for w in body["workers"]}), 2)

        exit_code = yield proc.stop()
        self.assertEqual(exit_code, 0, proc.output[-2000:])
        lines = Path(costs).read_bytes().split(b"\n")
        self.assertEqual(lines[-1], b"")
        records = [orjson.loads(line) for line in lines[:-1]]
        self.assertEqual(len(records), 400)
        self.assertEqual(len({record["request_id"] for record in records}), 400)


class DrainTests(WorkersTestCase):
    @inlineCallbacks
    def test_sigterm_with_streams_open(self) -> Any:
        """
        SIGTERM to the master with 20 to 40 streams open on both workers: C{/health}
        answers 503, new connections are then refused, every stream completes,
        every record is written once, and the master exits 0.
        """
        costs = os.path.join(self.directory, "costs.jsonl")
        path = self.config(
            "server: {drain_timeout_seconds: 20}\n"
            "features:\n  cost_tracking:\n    enabled: true\n    flush_interval_seconds: 5\n"
            f"    transports: [{{type: file, file: {{path: {costs}}}}}]\n"
        )
        proc = yield self.start(path)
        directory = _group_directory(proc)
        self.assertTrue(os.path.exists(os.path.join(directory, "state.sock")))
        # Open streams until both workers hold some (the first to wake may
        # take a whole burst), 20 at least, 40 at most.
        streams: list[Deferred[Any]] = []
        while len(streams) < 40:
            streams += [
                self.post(proc, STREAM, x_fake_chunks="40", x_fake_delay_ms="100")
                for _ in range(20 if not streams else 5)
            ]
            body = yield self.wait_for_streams(proc, len(streams))
            holding = [worker["active_streams"] for worker in body["workers"]]
            if all(count > 0 for count in holding):
                break
        self.assertTrue(all(count > 0 for count in holding), holding)

        proc.send_signal(signal.SIGTERM)
        yield deferLater(reactor, 0.3, lambda: None)
        yield self.assertFailure(self.http.get(proc.url + "/health"), ConnectionRefusedError)
        results = yield gatherResults(streams)
        self.assertEqual(len(results), sum(holding))
        for status, received in results:
            self.assertEqual(status, 200)
            self.assertTrue(received.rstrip().endswith(b"data: [DONE]"), received[-200:])
            # 40 content events, the usage chunk, [DONE]: none cut.
            self.assertGreaterEqual(received.count(b"data: "), 42)
            self.assertEqual(received.count(b"\n\ndata: ") + 1, received.count(b"data: "))
        self.assertEqual(len({received.count(b"data: ") for _, received in results}), 1)
        exit_code = yield proc.wait_exit()
        self.assertEqual(exit_code, 0, proc.output[-2000:])
        records = [orjson.loads(line) for line in Path(costs).read_bytes().splitlines()]
        self.assertEqual(len(records), len(streams))
        self.assertEqual(len({record["request_id"] for record in records}), len(streams))
        self.assertTrue(all(record["is_streaming"] for record in records))
        for worker in body["workers"]:
            drained = b"worker %d (pid %d) exited with status 0" % (worker["index"], worker["pid"])
            self.assertTrue(drained in proc.output, proc.output[-2000:])
        self.assertFalse(os.path.exists(directory))


def _group_directory(proc: ProxyProcess) -> str:
    """
    The master's private directory, from its log.
    """
    match = re.search(rb"state socket and metrics are in (\S+)", proc.output)
    assert match is not None, proc.output[-2000:]
    return match.group(1).decode()


class ReplacementTests(WorkersTestCase):
    timeout = 90

    @inlineCallbacks
    def test_kill_9_under_load(self) -> Any:
        """
        A worker killed with SIGKILL while clients send requests back to back
        and 10 streams are open: the only requests that fail are those it
        held (its streams and at most one request per client), no
        connection is refused, and a replacement (the spare, booted
        meanwhile) serves within 1 s.
        """
        proc = yield self.start(self.config())
        streams = [
            self.post(proc, STREAM, x_fake_chunks="30", x_fake_delay_ms="100") for _ in range(10)
        ]
        yield self.wait_for_streams(proc, 10)
        load = Load(self.http, proc.url, clients=4)
        self.addCleanup(load.stop)
        yield deferLater(reactor, 0.5, lambda: None)
        _, body = yield self.health(proc)
        # Streams last 3 s: the victim's count holds until the kill.
        victim = max(body["workers"], key=lambda worker: worker["active_streams"])
        survivor = next(w for w in body["workers"] if w["index"] != victim["index"])
        held_by_victim = victim["active_streams"]
        self.assertEqual(held_by_victim + survivor["active_streams"], 10, body)

        killed_at = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)
        replaced_after = None
        while time.monotonic() - killed_at < 5:
            _, body = yield self.health(proc)
            [entry] = [w for w in body["workers"] if w["index"] == victim["index"]]
            if entry["status"] == "serving" and entry["pid"] != victim["pid"]:
                replaced_after = time.monotonic() - killed_at
                break
            yield deferLater(reactor, 0.02, lambda: None)
        assert replaced_after is not None, proc.output[-2000:]
        self.assertLess(replaced_after, 1.0)
        yield deferLater(reactor, 0.5, lambda: None)
        yield load.stop()

        outcomes = yield DeferredList(streams, consumeErrors=True)
        cut = [result for ok, result in outcomes if not ok or result[0] != 200]
        self.assertEqual(len(cut), held_by_victim, cut)
        for ok, result in outcomes:
            if ok and result[0] == 200:
                self.assertTrue(result[1].rstrip().endswith(b"data: [DONE]"), result[1][-200:])
        refused = [failure for failure in load.failures if "ConnectionRefused" in failure]
        self.assertEqual(refused, [])
        self.assertLessEqual(len(load.failures), 4, load.failures)
        self.assertGreater(load.ok, 20)
        _, body = yield self.health(proc)
        self.assertEqual([w["status"] for w in body["workers"]], ["serving", "serving"])
        self.assertIn(survivor["pid"], [w["pid"] for w in body["workers"]])
        promoted = b"(pid %d) was killed by signal 9; the spare (pid %d) takes its place" % (
            victim["pid"],
            entry["pid"],
        )
        self.assertTrue(promoted in proc.output, proc.output[-2000:])


class ReloadTests(WorkersTestCase):
    @inlineCallbacks
    def sighup(self, proc: ProxyProcess, outcome: bytes) -> Any:
        """
        Send SIGHUP to the master and wait until it has logged C{outcome}
        once more.
        """
        line = b"[llmproxy.group#" + outcome
        before = proc.output.count(line)
        proc.send_signal(signal.SIGHUP)
        for _ in range(200):
            if proc.output.count(line) > before:
                return
            yield deferLater(reactor, 0.05, lambda: None)
        self.fail(f"no {outcome!r} after SIGHUP:\n" + proc.output[-2000:].decode())

    @inlineCallbacks
    def test_sighup_reloads_every_worker(self) -> Any:
        """
        SIGHUP to the master: an invalid file changes nothing (the workers
        are not even asked); a valid one raises the limit for the whole
        group at once.
        """
        limits = (
            "features:\n  rate_limiting:\n    enabled: true\n"
            "    limits: {{requests_per_minute: {}}}\n"
        )
        path = self.config(limits.format(2))
        proc = yield self.start(path)
        statuses = yield gatherResults([self.post(proc) for _ in range(3)])
        self.assertEqual(sorted(status for status, _ in statuses), [200, 200, 429])

        Path(path).write_text(
            Path(path).read_text().replace("requests_per_minute: 2", "requests_per_minute: ten")
        )
        yield self.sighup(proc, b"error] configuration reload failed; keeping the running")
        self.assertTrue(b"requests_per_minute: expected" in proc.output, proc.output[-2000:])
        self.assertFalse(b"[llmproxy.service#info] SIGHUP" in proc.output)
        status, _ = yield self.post(proc)
        self.assertEqual(status, 429)

        Path(path).write_text(self.config_text(limits.format(5)))
        yield self.sighup(proc, b"info] configuration reloaded")
        self.assertGreaterEqual(
            proc.output.count(b"[llmproxy.service#info] configuration reloaded"), 2
        )
        statuses = yield gatherResults([self.post(proc) for _ in range(4)])
        self.assertEqual(sorted(status for status, _ in statuses), [200, 200, 200, 429])
        served = yield self.served(proc)
        self.assertTrue(all(count > 0 for count in served), served)


class SystemdTests(WorkersTestCase):
    @inlineCallbacks
    def test_notify_from_the_master_only(self) -> Any:
        """
        Under systemd's notify protocol the master alone speaks: READY=1 once
        both workers serve, RELOADING=1 then READY=1 on SIGHUP, WATCHDOG=1,
        STOPPING=1 on SIGTERM, then exit 0, and not one datagram more.
        """
        receiver, notify = listen_notify(self)
        proc = yield self.start(
            self.config(), env={"NOTIFY_SOCKET": notify, "WATCHDOG_USEC": "400000"}
        )
        ready = yield check_lifecycle(self, proc, receiver)
        self.assertIn(f"port={proc.port}", ready["STATUS"])
        self.assertIn("with 2 workers", ready["STATUS"])

    @inlineCallbacks
    def test_socket_activation(self) -> Any:
        """
        C{--listen systemd:domain=INET:index=0 --workers 2} on a socket the
        test holds as systemd would: the master adopts it, both workers
        accept on it, and the group stops cleanly.
        """
        listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen(128)
        listening.set_inheritable(True)
        port = listening.getsockname()[1]
        args = [*daemon_args(self.config(), "systemd:domain=INET:index=0"), "--workers", "2"]
        environ = daemon_environ(LISTEN_FDS="1", LISTEN_FDNAMES="http")
        proc = yield spawn(
            with_inherited_socket(args), environ, {0: "w", 1: "r", 2: "r", 3: listening.fileno()}
        )
        self.addCleanup(proc.stop)
        self.assertEqual(proc.port, port)
        while b"2 workers serving on" not in proc.output:
            yield deferLater(reactor, 0.05, lambda: None)
        results = yield gatherResults([self.post(proc) for _ in range(50)])
        self.assertEqual({status for status, _ in results}, {200})
        served = yield self.served(proc)
        self.assertEqual(sum(served), 51, served)
        exit_code = yield proc.stop()
        self.assertEqual(exit_code, 0, proc.output[-2000:])


class UnixListenerTests(WorkersTestCase):
    @inlineCallbacks
    def test_a_worker_leaving_keeps_the_socket_file(self) -> Any:
        """
        With a C{unix:} listener, a worker that drains on its own (SIGTERM
        to it, not to the master) leaves the socket file to the others: the
        spare takes its place and requests over the file (and over TCP)
        still succeed. The master removes the file when the group stops.
        """
        directory = short_tempdir(self)
        path = os.path.join(directory, "proxy.sock")
        proc = yield self.start(self.config(), listen=("tcp:0:interface=127.0.0.1", f"unix:{path}"))
        status, _ = yield self.unix_post(path)
        self.assertEqual(status, 200)
        _, body = yield self.health(proc)
        leaving = body["workers"][0]
        os.kill(leaving["pid"], signal.SIGTERM)
        left = b"worker 0 (pid %d) exited with status 0; the spare" % leaving["pid"]
        while left not in proc.output:
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(os.path.exists(path))
        results = yield gatherResults(
            [self.unix_post(path) for _ in range(20)] + [self.post(proc) for _ in range(20)]
        )
        self.assertEqual({status for status, _ in results}, {200})
        exit_code = yield proc.stop()
        self.assertEqual(exit_code, 0, proc.output[-2000:])
        self.assertFalse(os.path.exists(path))

    @inlineCallbacks
    def unix_post(self, path: str) -> Any:
        request = raw_request(
            b"POST", CHAT_PATH.encode(), {k.encode(): v.encode() for k, v in HEADERS.items()}, CHAT
        )
        client = RawClient(request)
        yield connectProtocol(UNIXClientEndpoint(reactor, path), client)
        received = yield client.done
        status, _, body = split_response(received)
        return status, body


class RedisWorkersTests(WorkersTestCase):
    @inlineCallbacks
    def test_two_groups_share_one_redis_exactly(self) -> Any:
        """
        The Redis backend with workers: two masters of two workers each on
        one Redis, C{requests_per_minute: 100}: 300 concurrent requests
        spread over both groups admit exactly 100. Each worker talks to
        Redis itself.
        """
        if REDIS_SERVER is None:
            raise SkipTest(REDIS_SERVER_MISSING)
        redis = RedisServer()
        redis.start()
        self.addCleanup(redis.cleanup)
        path = self.config(
            "features:\n  rate_limiting:\n    enabled: true\n    backend: redis\n"
            f"    redis: {{url: '{redis.url()}', timeout_ms: 1000}}\n"
            "    limits: {requests_per_minute: 100}\n"
        )
        first, second = yield gatherResults([self.start(path), self.start(path)])
        results = yield gatherResults([self.post(first if n % 2 else second) for n in range(300)])
        statuses = [status for status, _ in results]
        self.assertEqual((statuses.count(200), statuses.count(429)), (100, 200), set(statuses))
        self.assertEqual(len(self.fake.received), 100)
        for proc in (first, second):
            served = yield self.served(proc)
            self.assertTrue(all(count > 1 for count in served), served)


class BootFailureTests(WorkersTestCase):
    @inlineCallbacks
    def test_workers_that_cannot_start_stop_the_group(self) -> Any:
        """
        Workers that exit before serving, again and again (here: their
        configuration file vanished after the master read it), stop the
        group: the master exits with status 1 rather than spin.
        """
        path = self.config()
        proc = yield self.start(path, wait_for_port=False)
        while b"starting 2 workers" not in proc.output:
            yield deferLater(reactor, 0.01, lambda: None)
        os.remove(path)
        exit_code = yield proc.wait_exit()
        self.assertEqual(exit_code, 1, proc.output[-2000:])
        self.assertTrue(
            b"exited 5 times in a row before serving; stopping" in proc.output,
            proc.output[-2000:],
        )
        self.assertTrue(b"invalid configuration" in proc.output, proc.output[-2000:])
        self.assertFalse(b"workers serving" in proc.output)


class MasterGoneTests(WorkersTestCase):
    @inlineCallbacks
    def test_workers_drain_when_the_master_dies(self) -> Any:
        """
        The master killed with SIGKILL: its workers (and the spare) notice
        their connection to it close, drain, finish the stream in flight and
        exit; no process of the group is left behind.
        """
        proc = yield self.start(self.config())
        _, body = yield self.health(proc)
        pids = [worker["pid"] for worker in body["workers"]] + [body["spare_worker"]["pid"]]
        stream = self.post(proc, STREAM, x_fake_chunks="10", x_fake_delay_ms="100")
        yield self.wait_for_streams(proc, 1)
        proc.send_signal(signal.SIGKILL)
        status, received = yield stream
        self.assertEqual(status, 200)
        self.assertTrue(received.rstrip().endswith(b"data: [DONE]"), received[-200:])
        for _ in range(200):
            if not any(os.path.exists(f"/proc/{pid}") for pid in pids):
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual([pid for pid in pids if os.path.exists(f"/proc/{pid}")], [])
        self.assertTrue(b"the master is gone; draining" in proc.output, proc.output[-2000:])
