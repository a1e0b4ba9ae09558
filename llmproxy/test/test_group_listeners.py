"""
Tests for L{llmproxy.group.listeners} and L{llmproxy.group.spec}: sockets
opened the way the master opens them, handed over (here: a duplicate
descriptor in this process, as a worker's inherited one would be) and
adopted by a worker's endpoint, over real loopback and Unix sockets.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from functools import partial
from typing import Any

import twisted.test
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    UNIXClientEndpoint,
    connectProtocol,
    serverFromString,
    wrapClientTLS,
)
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llmproxy.group.listeners import (
    ACCEPTS_PER_WAKEUP,
    AdoptingEndpoint,
    Inherited,
    adopting_endpoints,
    hold,
    passed,
    refusing_factory,
)
from llmproxy.group.spec import SYSTEMD_VARIABLES, WorkerSpec, worker_environment
from llmproxy.service import listen_all

reactor: Any = _reactor
CERT = FilePath(twisted.test.__file__).sibling("server.pem").path


class Hello(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"hello")
        self.transport.loseConnection()


class Reader(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.data)


class AdoptionTests(TestCase):
    """
    The master's side (L{listen_all} with a refusing factory, then L{hold})
    and a worker's (L{AdoptingEndpoint}) in one process.
    """

    def master(self, *descriptions: str) -> list[IListeningPort]:
        ports = listen_all(descriptions, partial(serverFromString, reactor), refusing_factory())
        hold(ports)
        for port in ports:
            self.addCleanup(port.stopListening)
        return ports

    @inlineCallbacks
    def adopt(self, ports: list[IListeningPort], descriptions: list[str]) -> Any:
        """
        Hand the ports over as a worker gets them (duplicates at the
        numbers L{passed} names become fresh descriptors here) and adopt
        them with a factory that greets every client.
        """
        inherited, child_fds = passed(ports, descriptions)
        adopted = []
        for item in inherited:
            fd = os.dup(child_fds[item.fd])
            mine = Inherited(item.description, fd, item.family)
            port = yield AdoptingEndpoint(reactor, mine).listen(Factory.forProtocol(Hello))
            self.addCleanup(port.stopListening)
            self.assertRaises(OSError, os.fstat, fd)
            adopted.append(port)
        return adopted

    @inlineCallbacks
    def test_tcp(self) -> Any:
        """
        The master holds the socket without accepting; the worker's copy
        accepts one connection per wakeup, and its port knows the address.
        """
        ports = self.master("tcp:0:interface=127.0.0.1")
        [port] = yield self.adopt(ports, ["tcp:0:interface=127.0.0.1"])
        self.assertEqual(port.getHost(), ports[0].getHost())
        self.assertEqual(port.numberAccepts, ACCEPTS_PER_WAKEUP)
        number = ports[0].getHost().port  # type: ignore[attr-defined]
        for _ in range(3):
            reader = Reader()
            yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", number), reader)
            self.assertEqual((yield reader.done), b"hello")

    @inlineCallbacks
    def test_unix_keeps_the_file(self) -> Any:
        """
        A worker's Unix port serves on the master's socket, and stopping it
        neither removes the file nor shuts the socket down for the others.
        """
        directory = tempfile.mkdtemp(prefix="llmproxy-test-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "s.sock")
        ports = self.master(f"unix:{path}")
        [first] = yield self.adopt(ports, [f"unix:{path}"])
        yield self.adopt(ports, [f"unix:{path}"])
        yield first.stopListening()
        self.assertTrue(os.path.exists(path))
        reader = Reader()
        yield connectProtocol(UNIXClientEndpoint(reactor, path), reader)
        self.assertEqual((yield reader.done), b"hello")

    @inlineCallbacks
    def test_ssl_keeps_tls(self) -> Any:
        """
        C{ssl:} is parsed again in the worker, so the adopted socket speaks
        TLS with the description's certificate.
        """
        description = f"ssl:0:interface=127.0.0.1:privateKey={CERT}"
        ports = self.master(description)
        yield self.adopt(ports, [description])
        number = ports[0].getHost().port  # type: ignore[attr-defined]
        reader = Reader()
        options = CertificateOptions(verify=False)
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", number))
        yield connectProtocol(endpoint, reader)
        self.assertEqual((yield reader.done), b"hello")

    @inlineCallbacks
    def test_systemd(self) -> Any:
        """
        A C{systemd:} description is adopted as is: the worker has no
        C{LISTEN_FDS} of its own to parse.
        """
        ports = self.master("tcp:0:interface=127.0.0.1")
        number = ports[0].getHost().port  # type: ignore[attr-defined]
        inherited, child_fds = passed(ports, ["systemd:domain=INET:index=0"])
        mine = Inherited(inherited[0].description, os.dup(child_fds[3]), socket.AF_INET)
        port = yield AdoptingEndpoint(reactor, mine).listen(Factory.forProtocol(Hello))
        self.addCleanup(port.stopListening)
        reader = Reader()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", number), reader)
        self.assertEqual((yield reader.done), b"hello")


class HandOverTests(SynchronousTestCase):
    def test_passed(self) -> None:
        """
        The sockets go to descriptors 3, 4, ... in listen order, with their
        families.
        """

        class Port:
            def __init__(self, fd: int, family: int) -> None:
                self.fd = fd
                self.addressFamily = family

            def fileno(self) -> int:
                return self.fd

        ports: Any = [Port(11, socket.AF_INET6), Port(12, socket.AF_UNIX)]
        inherited, child_fds = passed(ports, ["tcp6:0", "unix:/x"])
        self.assertEqual(
            inherited,
            [Inherited("tcp6:0", 3, socket.AF_INET6), Inherited("unix:/x", 4, socket.AF_UNIX)],
        )
        self.assertEqual(child_fds, {3: 11, 4: 12})

    def test_endpoints_in_order(self) -> None:
        """
        A worker's service asks for its endpoints in listen order; anything
        else is a bug, said at once.
        """
        endpoint_for = adopting_endpoints(
            reactor, [Inherited("tcp:1", 3, socket.AF_INET), Inherited("tcp:2", 4, socket.AF_INET)]
        )
        self.assertIsInstance(endpoint_for("tcp:1"), AdoptingEndpoint)
        self.assertRaises(RuntimeError, endpoint_for, "tcp:3")

    def test_spec_round_trip(self) -> None:
        spec = WorkerSpec(
            index=-1,
            configs=("a.yml", "b.yml"),
            listeners=(Inherited("tcp:0", 3, socket.AF_INET),),
            state="/tmp/d/state.sock",
            metrics="/tmp/d/metrics",
        )
        self.assertEqual(WorkerSpec.from_json(spec.to_json()), spec)

    def test_environment(self) -> None:
        """
        A worker sees the master's environment without systemd's variables,
        with the group's metrics directory and this llmproxy on its path.
        """
        environ = {name: "x" for name in SYSTEMD_VARIABLES}
        environ.update(HOME="/home/u", PYTHONPATH="/elsewhere", OPENAI_KEY="k")
        env = worker_environment(environ, "/tmp/d/metrics")
        self.assertEqual(env["HOME"], "/home/u")
        self.assertEqual(env["OPENAI_KEY"], "k")
        self.assertEqual(env["PROMETHEUS_MULTIPROC_DIR"], "/tmp/d/metrics")
        for name in SYSTEMD_VARIABLES:
            self.assertNotIn(name, env)
        first, rest = env["PYTHONPATH"].split(os.pathsep, 1)
        self.assertTrue(os.path.isdir(os.path.join(first, "llmproxy")))
        self.assertEqual(rest, "/elsewhere")
