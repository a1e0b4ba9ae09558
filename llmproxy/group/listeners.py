# -*- test-case-name: llmproxy.test.test_group_listeners -*-
"""
The listening sockets of a group: opened once by the master, accepted on by
every worker.

The master parses the same endpoint descriptions a single process would
(C{tcp:}, C{ssl:}, C{unix:}, C{systemd:}, ...) and listens with them, then
stops reading from the sockets: it never accepts a connection itself. Each
worker is spawned with the sockets as file descriptors 3, 4, ... and
adopts them (C{adoptStreamPort}). All workers wait on the same sockets, so
the kernel hands each new connection to whichever worker accepts first: a
busy worker accepts less. A worker that dies takes only the connections it
had accepted; the ones waiting in the socket's queue go to the others.

A worker builds the same factory a single process would: for a
description other than C{systemd:}, it parses the description again with a
stand-in reactor (L{_AdoptingReactor}) whose C{listenTCP}, C{listenSSL}
and C{listenUNIX} adopt the inherited socket instead of binding a new one,
so C{ssl:} keeps its TLS wrapping. A C{systemd:} description names a socket
systemd gave the master, so the worker adopts its copy directly.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from attrs import frozen
from twisted.internet import tcp, unix
from twisted.internet.defer import Deferred, execute
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

FIRST_FD = 3
"""The first worker file descriptor that holds a listening socket."""


@frozen
class Inherited:
    """
    One listening socket as a worker receives it.

    @ivar description: the endpoint description it was opened from.
    @ivar fd: its file descriptor in the worker.
    @ivar family: its address family (C{socket.AF_INET}, ...).
    """

    description: str
    fd: int
    family: int

    def to_json(self) -> list[Any]:
        return [self.description, self.fd, self.family]

    @classmethod
    def from_json(cls, value: list[Any]) -> Inherited:
        description, fd, family = value
        return cls(str(description), int(fd), int(family))


class _Refuse(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


def refusing_factory() -> Factory[_Refuse]:
    """
    The master's factory for its listeners: it never accepts (it stops
    reading the sockets at once), and would close anything it did.
    """
    factory = Factory.forProtocol(_Refuse)
    factory.noisy = False
    return factory


def hold(ports: Sequence[IListeningPort]) -> None:
    """
    Stop accepting on the master's listening ports, keeping them open.
    """
    for port in ports:
        port.stopReading()  # type: ignore[attr-defined]


def passed(
    ports: Sequence[IListeningPort], descriptions: Sequence[str]
) -> tuple[list[Inherited], dict[int, int]]:
    """
    How the master's ports reach a worker: what the worker is told, and the
    C{childFDs} entries that put each socket at its descriptor.
    """
    inherited = []
    child_fds = {}
    for offset, (port, description) in enumerate(zip(ports, descriptions, strict=True)):
        fd = FIRST_FD + offset
        inherited.append(Inherited(description, fd, port.addressFamily))  # type: ignore[attr-defined]
        child_fds[fd] = port.fileno()  # type: ignore[attr-defined]
    return inherited, child_fds


ACCEPTS_PER_WAKEUP = 1
"""
Connections a worker accepts each time its socket is ready. Twisted
accepts up to 100 or more at once, so a burst of connections would all
go to whichever worker woke first; one at a time, the workers take turns,
and a busy worker (one that is slow to come back for more) takes fewer.
"""


class _TakeTurns:
    """
    Mixed into a worker's listening port: see L{ACCEPTS_PER_WAKEUP}.
    """

    @property
    def numberAccepts(self) -> int:
        return ACCEPTS_PER_WAKEUP

    @numberAccepts.setter
    def numberAccepts(self, value: int) -> None:
        pass  # Twisted adapts it after each wakeup; a worker keeps its own


class _WorkerTCPPort(_TakeTurns, tcp.Port):
    """
    A worker's copy of a TCP listening socket.
    """


class _WorkerUNIXPort(_TakeTurns, unix.Port):
    """
    A worker's copy of a Unix listening socket: closing it leaves the
    socket and its file to the master and the other workers (Twisted would
    shut the socket down for every process holding it, and remove the
    file).
    """

    _shouldShutdown = False

    def connectionLost(self, reason: Any) -> None:
        tcp.Port.connectionLost(self, reason)


def _adopt(reactor: Any, fd: int, family: int, factory: IProtocolFactory) -> IListeningPort:
    """
    Listen on the inherited socket C{fd} with C{factory}, then close C{fd}
    itself: the port holds a copy, so stopping the port really closes this
    process's hold on the socket.
    """
    port: IListeningPort
    if family == socket.AF_UNIX:
        port = _WorkerUNIXPort._fromListeningDescriptor(reactor, fd, factory)
    else:
        port = _WorkerTCPPort._fromListeningDescriptor(reactor, fd, family, factory)
    port.startListening()
    os.close(fd)
    return port


class _AdoptingReactor:
    """
    The reactor, except that listening adopts one inherited socket.
    """

    def __init__(self, reactor: Any, inherited: Inherited) -> None:
        self._reactor = reactor
        self._inherited = inherited
        self.adopted = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def _adopt(self, factory: IProtocolFactory) -> IListeningPort:
        if self.adopted:
            raise RuntimeError(f"{self._inherited.description!r} listens more than once")
        self.adopted = True
        return _adopt(self._reactor, self._inherited.fd, self._inherited.family, factory)

    def listenTCP(self, port: int, factory: IProtocolFactory, *args: Any, **kw: Any) -> Any:
        return self._adopt(factory)

    def listenUNIX(self, address: str, factory: IProtocolFactory, *args: Any, **kw: Any) -> Any:
        return self._adopt(factory)

    def listenSSL(
        self, port: int, factory: IProtocolFactory, contextFactory: Any, *args: Any, **kw: Any
    ) -> Any:
        return self._adopt(TLSMemoryBIOFactory(contextFactory, False, factory))


@implementer(IStreamServerEndpoint)
class AdoptingEndpoint:
    """
    A worker's endpoint for one inherited listening socket.
    """

    def __init__(self, reactor: Any, inherited: Inherited) -> None:
        self._reactor = reactor
        self._inherited = inherited

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        inherited = self._inherited
        if inherited.description.startswith("systemd:"):
            return execute(_adopt, self._reactor, inherited.fd, inherited.family, protocolFactory)
        stand_in = _AdoptingReactor(self._reactor, inherited)
        listening: Deferred[IListeningPort] = serverFromString(
            stand_in, inherited.description
        ).listen(protocolFactory)
        if not stand_in.adopted:
            raise RuntimeError(
                f"{inherited.description!r} cannot be shared by workers: its endpoint "
                "does not listen through listenTCP, listenSSL or listenUNIX"
            )
        return listening


def adopting_endpoints(
    reactor: Any, inherited: Sequence[Inherited]
) -> Callable[[str], IStreamServerEndpoint]:
    """
    The C{endpoint_for} of a worker's service: each description in turn
    gets the endpoint of the socket inherited for it.
    """
    remaining: Iterator[Inherited] = iter(inherited)

    def endpoint_for(description: str) -> IStreamServerEndpoint:
        found = next(remaining)
        if found.description != description:
            raise RuntimeError(f"expected {found.description!r}, got {description!r}")
        return AdoptingEndpoint(reactor, found)

    return endpoint_for
