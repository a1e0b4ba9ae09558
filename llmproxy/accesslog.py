# -*- test-case-name: llmproxy.test.test_call -*-
"""
The access log: one line per request, whatever answered it.

The web layer starts an L{AccessLine} for every request and finishes it
when the response is over; a proxied request also fills it in, in its
inspection and accounting phases. The line is written when both have
happened, so it carries the tokens and cost even when the response ended
before the accounting did (a client that left, a stream that ended first).
"""

from __future__ import annotations

from attrs import define
from twisted.logger import Logger

log = Logger(namespace="llmproxy.access")


@define
class AccessLine:
    """
    What the access line of one request says, filled in as it runs.
    """

    method: str = ""
    endpoint: str = ""
    request_id: str | None = None
    provider: str | None = None
    model: str | None = None
    streaming: bool = False
    ttfb_ms: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_cost: float | None = None
    user_id: str | None = None
    key_id: str | None = None
    status: int | None = None
    duration_ms: float = 0.0
    complete: bool = False
    bytes: int = 0
    _awaiting_account: bool = False
    _finished: bool = False

    def identify(self, request_id: str, provider: str) -> None:
        """
        A proxied request: its id, and the provider it addresses.
        """
        self.request_id = request_id
        self.provider = provider

    def inspected(
        self, model: str | None, streaming: bool, user_id: str | None, key_id: str | None
    ) -> None:
        """
        What inspection learned about a proxied request.
        """
        self.model = model
        self.streaming = streaming
        self.user_id = user_id
        self.key_id = key_id

    def identified(self, user_id: str | None, key_id: str | None) -> None:
        """
        Admission accepted a proxy key: the request's user and key id.
        """
        self.user_id = user_id
        self.key_id = key_id

    def expect_account(self) -> None:
        """
        The request was admitted: hold the line until it is accounted for.
        """
        self._awaiting_account = True

    def settled(
        self,
        model: str | None,
        streaming: bool,
        ttfb_ms: float | None,
        input_tokens: int,
        output_tokens: int,
        total_cost: float | None,
    ) -> None:
        """
        What accounting knows once a forwarded request is over.
        """
        self.model = model
        self.streaming = streaming
        self.ttfb_ms = ttfb_ms
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.total_cost = total_cost
        self._awaiting_account = False
        if self._finished:
            self._write()

    def finished(self, status: int, duration_ms: float, complete: bool, sent: int) -> None:
        """
        The response is over (sent, or cut by the client leaving).
        """
        self.status = status
        self.duration_ms = duration_ms
        self.complete = complete
        self.bytes = sent
        self._finished = True
        if not self._awaiting_account:
            self._write()

    def _write(self) -> None:
        # The message is formatted here: one field for twisted.logger's
        # string.Formatter instead of four took the access line from about
        # 23 to 13 us. The fields are all still in the event (and the JSON).
        log.info(
            "{message}",
            message=f"{self.method} {self.endpoint} {self.status} {self.duration_ms:.1f}ms",
            method=self.method,
            endpoint=self.endpoint,
            status=self.status,
            duration_ms=self.duration_ms,
            complete=self.complete,
            bytes=self.bytes,
            request_id=self.request_id,
            provider=self.provider,
            model=self.model,
            streaming=self.streaming,
            ttfb_ms=self.ttfb_ms,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cost=self.total_cost,
            user_id=self.user_id,
            key_id=self.key_id,
        )
