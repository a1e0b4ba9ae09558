# -*- test-case-name: llmproxy.test.test_call -*-
"""
One proxied request, through its four phases:

  1. L{inspect<llmproxy.inspection.inspect>}: what the request is, and who
     sends it;
  2. L{admit<llmproxy.admission.Admission>}: whether the limits let it
     through (one reservation per client request);
  3. L{attempt<llmproxy.attempt.Attempt>}: one try at the upstream, which
     relays the answer;
  4. L{account<llmproxy.accounting.account>}: price, record, metrics,
     limits, access line, once.

The L{Call} holds only the state machine between them: which phase is
running, whether the client has left, and the answers the proxy makes
itself when a phase refuses or fails.
"""

from __future__ import annotations

import itertools
import math
import secrets

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from llmproxy.accesslog import AccessLine
from llmproxy.accounting import CallSummary, account
from llmproxy.admission import Admission, Admitted, Refused
from llmproxy.attempt import ATTEMPTS_HEADER, UPSTREAM_HEADER, Attempt, AttemptResult
from llmproxy.choice import AttemptPlan, Choice, Exhausted
from llmproxy.httperrors import send_error
from llmproxy.inspection import BadRequest, CallFacts, inspect
from llmproxy.outcomes import CLIENT_GONE, Verdict
from llmproxy.routes import Target
from llmproxy.runtime import ProxyState, Runtime
from llmproxy.tracing import NO_TRACE
from llmproxy.usage import Usage

log = Logger(namespace="llmproxy.call")

REQUEST_ID_HEADER = b"X-LLM-Proxy-Request-ID"

_PROCESS_ID = secrets.token_hex(8)
_SERIAL = itertools.count()


def next_request_id() -> str:
    """
    A request id: 32 hex digits, unique in this process by a counter and
    across processes by a random half drawn once at start (a random id per
    request cost a system call each).
    """
    return f"{_PROCESS_ID}{next(_SERIAL) & 0xFFFFFFFFFFFFFFFF:016x}"


class Call:
    """
    The state machine of one proxied request.

    @ivar phase: C{inspect}, C{admit}, C{attempt}, C{accounted} or
        C{refused}.
    """

    __slots__ = (
        "_access",
        "_admission",
        "_attempt",
        "_body",
        "_choice",
        "_deadline",
        "_facts",
        "_gone",
        "_last",
        "_plan",
        "_queued",
        "_recorded",
        "_request",
        "_runtime",
        "_started",
        "_state",
        "_target",
        "_trace",
        "_waiting",
        "phase",
    )

    def __init__(
        self,
        target: Target,
        runtime: Runtime,
        state: ProxyState,
        request: Request,
        access: AccessLine,
    ) -> None:
        """
        @param runtime: the configuration's runtime as the request arrived;
            the call keeps it to the end, whatever a reload swaps in.
        @param access: the request's access line, filled in as it runs.
        """
        self._target = target
        self._runtime = runtime
        self._state = state
        self._request = request
        self._access = access
        self._started = state.clock.seconds()
        self._gone = False
        self._facts: CallFacts | None = None
        self._body = b""
        self._admission: Admission | None = None
        self._attempt: Attempt | None = None
        self._plan: AttemptPlan | None = None
        self._choice: Choice | None = None
        self._queued: Choice | Exhausted | None = None
        self._last: AttemptResult | None = None
        self._waiting: IDelayedCall | None = None
        self._deadline: float | None = None
        self._recorded = False
        self._trace = NO_TRACE
        self.phase = "inspect"

    def start(self, body: bytes) -> None:
        """
        Inspect the request and ask for admission.

        @param body: the request's body, as received.
        """
        request, target = self._request, self._target
        request_id = next_request_id()
        request.setHeader(REQUEST_ID_HEADER, request_id.encode("ascii"))
        self._access.identify(request_id, target.name)
        runtime = self._runtime
        config = runtime.config
        # Prompt text is counted only for something that estimates tokens.
        estimating = runtime.limiter is not None or runtime.budgets is not None
        inspected = inspect(
            request_id,
            target,
            request.method,
            request.path.decode("latin-1"),
            request.requestHeaders,
            body,
            inject_stream_usage=target.upstream.config.inject_stream_usage,
            sample_limit=(
                config.features.rate_limiting.estimation.max_sample_bytes if estimating else -1
            ),
        )
        if isinstance(inspected, BadRequest):
            self._refuse(Refused(400, inspected.message))
            return
        facts = self._facts = inspected.facts
        self._body = inspected.body
        self._trace = self._state.tracer.request(facts, target.upstream, request.requestHeaders)
        self._access.inspected(
            facts.request.model, facts.request.streaming, facts.user, facts.key_id
        )
        request.notifyFinish().addErrback(self._client_gone)
        self.phase = "admit"
        limits = config.features.rate_limiting
        admission = self._admission = Admission(
            self._runtime.limiter,
            limits.estimation,
            limits.backend,
            self._state.metrics,
            keyring=self._runtime.keyring,
            budgets=self._runtime.budgets,
            clock=self._state.clock,
        )
        admission.admit(facts).addCallback(self._admitted).addErrback(self._bug)

    def _admitted(self, verdict: Admitted | Refused) -> None:
        if isinstance(verdict, Refused):
            if not self._gone:
                self._refuse(verdict)
            else:
                self.phase = "refused"
            return
        for name, value in verdict.headers:
            self._request.setHeader(name, value)
        if verdict.facts is not None and verdict.facts is not self._facts:
            # A proxy key was accepted: its id and user are the request's.
            self._facts = verdict.facts
            self._access.identified(verdict.facts.user, verdict.facts.key_id)
        facts = self._facts
        assert facts is not None
        if self._gone:
            self._access.expect_account()
            self._account(self._summary(AttemptResult(CLIENT_GONE, client_gone=True), unsent=True))
            return
        self.phase = "attempt"
        target, runtime = self._target, self._runtime
        timeouts = target.upstream.config.timeouts
        self._deadline = (
            self._started + timeouts.total_seconds if timeouts.total_seconds > 0 else None
        )
        chain = [(target.name, target.upstream)] + [
            (name, runtime.upstreams[name])
            for name in target.upstream.config.fallback
            if name in runtime.upstreams
        ]
        self._plan = AttemptPlan(
            chain, facts.request.model, self._state.circuits, self._state.clock, self._deadline
        )
        self._go(self._plan.next())

    # -- attempts ---------------------------------------------------------------

    def _go(self, choice: Choice | Exhausted) -> None:
        """
        Make the next attempt (after its wait), or end with what there is.
        """
        if isinstance(choice, Exhausted):
            self._exhausted(choice)
        elif choice.wait > 0:
            self._waiting = self._state.clock.callLater(choice.wait, self._start, choice)
        else:
            self._start(choice)

    def _start(self, choice: Choice) -> None:
        self._waiting = None
        if choice.probe:
            self._probe(choice)
        else:
            self._send(choice)

    def _probe(self, choice: Choice) -> None:
        """
        The choice is a half-open circuit's probe: with circuits shared by
        a fleet, only the instance that claims it sends it.
        """
        model = self._facts.request.model if self._facts is not None else None
        circuits = self._state.circuits
        claim = circuits.claim_fleet_probe(choice.mount, choice.endpoint.name, model)
        if claim is None:
            self._send(choice)
            return

        def claimed(won: bool) -> None:
            if won:
                self._send(choice)
                return
            circuits.probe_lost(choice.mount, choice.endpoint.name, model)
            plan = self._plan
            assert plan is not None
            plan.retract(choice)
            self._go(plan.next())

        claim.addCallback(claimed).addErrback(self._bug)

    def _send(self, choice: Choice) -> None:
        self._waiting = None
        facts, plan = self._facts, self._plan
        assert facts is not None and plan is not None
        if self._gone:
            self._access.expect_account()
            self._account(self._summary(self._last or AttemptResult(CLIENT_GONE), unsent=True))
            return
        metrics = self._state.metrics
        previous = self._choice
        if previous is None:
            self._access.expect_account()
        else:
            metrics.retried(facts.provider, self._last.verdict.reason if self._last else "")
            if previous.mount != choice.mount:
                metrics.fell_back(previous.mount, choice.mount)
        self._choice = choice
        self._recorded = False
        self._state.circuits.started(choice.mount, choice.endpoint.name)
        attempt = self._attempt = Attempt(
            choice,
            facts,
            self._body,
            self._request,
            self._state,
            self._deadline,
            number=plan.attempts,
            retry_instead=self._retry_instead if plan.may_retry else None,
            trace=self._trace,
            committed=self._committed,
        )
        attempt.run(self._runtime.config.server.forwarded_headers).addCallback(
            self._attempted
        ).addErrback(self._bug)

    def _committed(self) -> None:
        """
        An attempt's answer is the client's: no attempt follows it, so the
        request body kept for one goes (a long stream would otherwise hold
        a large prompt for as long as it runs).
        """
        self._body = b""

    def _retry_instead(self, verdict: Verdict) -> bool:
        """
        Asked by an attempt before it commits to a retryable answer: whether
        another attempt can take its place (then that one is planned).
        """
        plan, choice = self._plan, self._choice
        if self._gone or plan is None or choice is None:
            return False
        self._record(choice, verdict)
        plan.failed(choice)
        following = plan.next()
        if isinstance(following, Exhausted):
            return False
        self._queued = following
        return True

    def _record(self, choice: Choice, verdict: Verdict) -> None:
        """
        Tell the circuits (once per attempt) how the attempt went.
        """
        if self._recorded:
            return
        self._recorded = True
        self._state.circuits.finished(
            choice.mount,
            choice.endpoint.name,
            self._facts.request.model if self._facts is not None else None,
            verdict.breaker,
            choice.upstream.config.circuit_breaker,
            verdict.pause_seconds,
        )

    def _attempted(self, result: AttemptResult) -> None:
        self._attempt = None
        choice, plan = self._choice, self._plan
        assert choice is not None and plan is not None
        self._record(choice, result.verdict)
        self._state.metrics.upstream_attempt(
            choice.mount, choice.endpoint.name, result.verdict.reason
        )
        self._last = result
        if result.abandoned:
            queued, self._queued = self._queued, None
            assert queued is not None
            self._go(queued)
            return
        failure = result.failure
        if failure is not None and result.verdict.retryable and not self._gone and plan.may_retry:
            plan.failed(choice)
            following = plan.next()
            if not isinstance(following, Exhausted):
                self._go(following)
                return
        self._finish(result)

    def _exhausted(self, exhausted: Exhausted) -> None:
        """
        No (further) attempt is possible: before any attempt, every upstream
        is unavailable (503, no record); after some, the last one stands.
        """
        if self._last is not None:
            self._finish(self._last)
            return
        seconds = exhausted.retry_after
        wait = b"%d" % max(1, math.ceil(seconds)) if seconds is not None else b"1"
        admission = self._admission
        assert admission is not None
        admission.settle(Usage(), 503, unsent=True)
        self._refuse(
            Refused(
                503,
                f"No upstream of {self._target.name} is available; try again shortly.",
                ((b"Retry-After", wait), (ATTEMPTS_HEADER, b"0")),
            )
        )

    def _finish(self, result: AttemptResult) -> None:
        """
        The call's last attempt is over: answer what it left unanswered,
        then account.
        """
        failure = result.failure
        status = result.status
        if failure is not None:
            status = failure.status
            if not self._gone:
                self._upstream_headers()
                self._answer(failure.status, failure.message, "upstream")
        self._account(
            self._summary(result, status=status, unsent=failure is not None and failure.unsent)
        )

    def _upstream_headers(self) -> None:
        plan, choice = self._plan, self._choice
        if plan is not None and choice is not None:
            self._request.setHeader(ATTEMPTS_HEADER, b"%d" % plan.attempts)
            self._request.setHeader(UPSTREAM_HEADER, choice.label.encode("utf-8"))

    def _summary(
        self, result: AttemptResult, status: int | None = None, unsent: bool = False
    ) -> CallSummary:
        facts = self._facts
        assert facts is not None
        return CallSummary(
            facts=facts,
            status=status,
            complete=result.complete,
            usage=result.usage,
            unsent=unsent,
            started=self._started,
            ended=self._state.clock.seconds(),
            first_byte=result.first_byte,
            streaming=facts.request.streaming or result.sse,
            unmetered=result.unmetered,
            upstream=self._choice.label if self._choice is not None else None,
            attempts=self._plan.attempts if self._plan is not None else 0,
            failure=result.failure.kind if result.failure is not None else None,
        )

    def _account(self, summary: CallSummary) -> None:
        if self.phase == "accounted":
            return
        self.phase = "accounted"
        admission = self._admission
        assert admission is not None

        def settle() -> None:
            cost = account(summary, self._runtime, self._state, admission, self._access)
            self._trace.end(summary, cost)

        self._state.account_after_io(settle)

    def _client_gone(self, failure: Failure) -> None:
        self._gone = True
        if self._attempt is not None:
            self._attempt.client_gone()
        elif self._waiting is not None and self._waiting.active():
            # Between attempts: no upstream holds the request now.
            self._waiting.cancel()
            self._waiting = None
            self._access.expect_account()
            self._account(self._summary(self._last or AttemptResult(CLIENT_GONE)))

    # -- answers the proxy makes itself ---------------------------------------

    def _refuse(self, refusal: Refused) -> None:
        self.phase = "refused"
        self._state.status.refused(self._target.name, self._facts, refusal)
        self._trace.refused(refusal)
        for name, value in refusal.headers:
            self._request.setHeader(name, value)
        self._answer(refusal.status, refusal.message, "proxy")

    def _answer(self, status: int, message: str, source: str) -> None:
        send_error(self._request, self._target.upstream.format, status, message, source)

    def _bug(self, failure: Failure) -> None:
        log.failure("bug while forwarding {request_id}", failure, request_id=self._request_id())
        if not self._gone and self.phase != "accounted":
            try:
                self._answer(502, "Proxy error.", "proxy")
            except Exception:
                # The response had begun: there is no clean answer left.
                log.failure("could not answer after a bug")
        if self._facts is not None and self._admission is not None:
            self._account(self._summary(AttemptResult(CLIENT_GONE), status=502))

    def _request_id(self) -> str | None:
        return self._facts.request_id if self._facts is not None else None
