# -*- test-case-name: llmproxy.test.test_budgets_alerts -*-
"""
Budget alerts: a warning log line, and a JSON POST to
C{auth.alerts.webhook_url}, when spend crosses a fraction of a budget.

Which crossings are alerts is the spend store's business (each fraction of
a budget once per period, across every instance sharing a store); this
module tells the world. Delivery never blocks a request: the POST goes out
on the reactor after the request that crossed the fraction is accounted,
and a failure (connection error, timeout, 408, 429, 5xx) is retried with
backoff up to L{MAX_ATTEMPTS} times. Other answers (a 4xx) are final.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson
from attrs import asdict, field, frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="llmproxy.budgets")

MAX_ATTEMPTS = 6
"""POSTs per alert at most: one, then retries after 1, 2, 4, 8 and 16 s."""

BACKOFF_SECONDS = 1.0
"""The wait before the first retry; each later wait doubles."""

TIMEOUT_SECONDS = 10.0
"""How long one POST may take before it counts as failed."""

Post = Callable[[str, bytes], Deferred[int]]
"""POSTs JSON bytes to a URL; fires with the response status."""


@frozen
class Alert:
    """
    One crossing, as the webhook receives it (every field but C{scope}).

    @ivar key_id: the proxy key whose budget it is, or for a user's budget
        L{None}.
    @ivar user: the user whose budget it is, or the key's request user.
    @ivar period: C{day} or C{month}.
    @ivar fraction: the fraction of the budget crossed (C{1.0} also when a
        request was refused for lack of budget).
    @ivar scope: C{key:<id>} or C{user:<user>}, for the log line.
    """

    key_id: str | None
    user: str | None
    period: str
    spent_usd: float
    limit_usd: float
    fraction: float
    scope: str = field(default="")

    def payload(self) -> bytes:
        data = asdict(self)
        del data["scope"]
        return orjson.dumps(data)


def retryable(status: int) -> bool:
    return status in (408, 425, 429) or status >= 500


class AlertSender(Service):
    """
    Logs alerts and delivers them to the webhook.

    A service: stopping it cancels the retries still waiting (each lost
    alert is logged); the log line of every alert has been written by then.
    """

    def __init__(self, clock: IReactorTime, post: Post | None) -> None:
        """
        @param post: how to POST to the webhook; L{None} logs only.
        """
        self._clock = clock
        self._post = post
        self._timers: set[IDelayedCall] = set()
        self._sending: set[Deferred[int]] = set()
        self._stopped = False

    def alert(self, alert: Alert, webhook_url: str | None) -> None:
        """
        Log C{alert} and, with a C{webhook_url}, start delivering it.
        """
        log.warn(
            "budget alert: {scope} reached {percent:g}% of its {period} budget"
            " ({spent_usd:.6f} of {limit_usd:.6f} USD)",
            scope=alert.scope,
            percent=round(alert.fraction * 100, 2),
            period=alert.period,
            spent_usd=alert.spent_usd,
            limit_usd=alert.limit_usd,
            key_id=alert.key_id,
            user=alert.user,
            fraction=alert.fraction,
        )
        if webhook_url and self._post is not None:
            self._attempt(webhook_url, alert, 1)

    def _attempt(self, url: str, alert: Alert, attempt: int) -> None:
        assert self._post is not None
        try:
            sending = self._post(url, alert.payload())
        except Exception:
            log.failure("budget alert webhook POST could not start")
            return
        self._sending.add(sending)

        def answered(status: int) -> None:
            self._sending.discard(sending)
            if 200 <= status < 300:
                return
            if retryable(status):
                self._again(url, alert, attempt, f"status {status}")
            else:
                log.error(
                    "budget alert webhook answered {status}; alert for {scope} not delivered",
                    status=status,
                    scope=alert.scope,
                )

        def failed(failure: Failure) -> None:
            self._sending.discard(sending)
            if not self._stopped:
                self._again(url, alert, attempt, failure.getErrorMessage() or repr(failure.value))

        sending.addCallbacks(answered, failed).addErrback(
            lambda failure: log.failure("budget alert delivery", failure)
        )

    def _again(self, url: str, alert: Alert, attempt: int, why: str) -> None:
        if attempt >= MAX_ATTEMPTS:
            log.error(
                "budget alert webhook failed {attempts} times ({why}); alert for {scope} dropped",
                attempts=attempt,
                why=why,
                scope=alert.scope,
            )
            return
        delay = BACKOFF_SECONDS * 2 ** (attempt - 1)
        log.warn(
            "budget alert webhook failed ({why}); retrying in {delay:g}s",
            why=why,
            delay=delay,
        )

        def retry() -> None:
            self._timers.discard(timer)
            self._attempt(url, alert, attempt + 1)

        timer = self._clock.callLater(delay, retry)
        self._timers.add(timer)

    def stopService(self) -> None:
        super().stopService()
        self._stopped = True
        waiting = [timer for timer in self._timers if timer.active()]
        for timer in waiting:
            timer.cancel()
        self._timers.clear()
        for sending in list(self._sending):
            sending.cancel()
        if waiting:
            log.warn(
                "{count} budget alerts were waiting to be retried at shutdown", count=len(waiting)
            )
