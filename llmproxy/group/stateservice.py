# -*- test-case-name: llmproxy.test.test_group_channel -*-
"""
The master's state service: a Unix socket in the master's private
directory, one L{Channel} per connected worker, and one handler per kind of
state.

The directory is made by the master with mode 0700 (C{tempfile.mkdtemp}),
and the socket is created with mode 0600: only the proxy's own user can
connect. What a handler holds is exact for the whole group because the
master's reactor runs one request at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory

from llmproxy.group.channel import Channel, Handler


class StateService(Service):
    """
    Serves the workers' channels while it runs.

    @ivar channels: the connected channels.
    """

    def __init__(
        self,
        reactor: Any,
        path: str,
        handlers: Mapping[int, Handler],
        on_lost: Callable[[Channel], object] | None = None,
    ) -> None:
        self._reactor = reactor
        self.path = path
        self._handlers = handlers
        self._on_lost = on_lost
        self._port: IListeningPort | None = None
        self.channels: set[Channel] = set()

    def _build(self) -> Channel:
        channel = Channel(self._handlers, self._reactor, self._lost)
        self.channels.add(channel)
        return channel

    def _lost(self, channel: Channel) -> None:
        self.channels.discard(channel)
        if self._on_lost is not None:
            self._on_lost(channel)

    def privilegedStartService(self) -> None:
        """
        Listen before the workers start: they connect as their first act.
        """
        super().privilegedStartService()
        factory = Factory.forProtocol(self._build)
        factory.noisy = False
        self._port = self._reactor.listenUNIX(self.path, factory, backlog=128, mode=0o600)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        for channel in list(self.channels):
            channel.close()
        port, self._port = self._port, None
        stopping = port.stopListening() if port is not None else None
        return stopping if stopping is not None else succeed(None)
