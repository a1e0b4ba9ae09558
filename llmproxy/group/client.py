# -*- test-case-name: llmproxy.test.test_ratelimit_remote,llmproxy.test.test_budgets_remote -*-
"""
What a worker's client of state kept in the master has in common (the rate
limiter's, L{llmproxy.ratelimit.remote}; the budgets' spend store,
L{llmproxy.budgets.remote}): its channel, its clock, the C{fail_mode} of
the configuration in force, and what happens when the master does not
answer (counted, and a warning at most every L{WARNING_INTERVAL} seconds).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmproxy.config import RateLimitConfig
from llmproxy.group.channel import Caller, describe

log = Logger(namespace="llmproxy.group")

CALL_TIMEOUT = 5.0
"""Seconds a worker waits for the master's answer before C{fail_mode} decides."""

WARNING_INTERVAL = 10.0
"""Seconds between two warnings about a master that does not answer."""


class MasterClient:
    """
    A worker's view of one kind of state the master keeps.

    @ivar failing_closed: C{fail_mode} is C{closed}: a request the master
        does not decide is refused.
    """

    def __init__(
        self,
        config: RateLimitConfig,
        master: Caller,
        clock: IReactorTime,
        on_error: Callable[[], object] | None = None,
    ) -> None:
        self._config = config
        self._master = master
        self._clock = clock
        self._on_error = on_error
        self._last_warning: float | None = None

    def reconfigure(self, config: RateLimitConfig) -> None:
        """
        Take the new C{fail_mode}; what the state means (limits, budgets)
        is decided elsewhere.
        """
        self._config = config

    @property
    def failing_closed(self) -> bool:
        return self._config.fail_mode == "closed"

    def unanswered(self, what: str, failure: Failure) -> None:
        """
        The master did not answer C{what} (C{"a rate-limit reservation"}):
        count it, and warn unless a warning was given recently.
        """
        if self._on_error is not None:
            self._on_error()
        now = self._clock.seconds()
        if self._last_warning is None or now - self._last_warning >= WARNING_INTERVAL:
            self._last_warning = now
            log.warn(
                "the master did not answer {what} ({error}); fail_mode {mode} decides",
                what=what,
                error=describe(failure),
                mode=self._config.fail_mode,
            )
