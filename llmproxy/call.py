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

import uuid

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from llmproxy.accesslog import AccessLine
from llmproxy.accounting import CallSummary, account
from llmproxy.admission import Admission, Admitted, Refused
from llmproxy.attempt import Attempt, AttemptResult
from llmproxy.httperrors import send_error
from llmproxy.inspection import BadRequest, CallFacts, inspect
from llmproxy.routes import Target
from llmproxy.runtime import ProxyState, Runtime

log = Logger(namespace="llmproxy.call")

REQUEST_ID_HEADER = b"X-LLM-Proxy-Request-ID"


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
        "_facts",
        "_gone",
        "_request",
        "_runtime",
        "_started",
        "_state",
        "_target",
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
        self.phase = "inspect"

    def start(self, body: bytes) -> None:
        """
        Inspect the request and ask for admission.

        @param body: the request's body, as received.
        """
        request, target = self._request, self._target
        request_id = uuid.uuid4().hex
        request.setHeader(REQUEST_ID_HEADER, request_id.encode("ascii"))
        self._access.identify(request_id, target.name)
        config = self._runtime.config
        inspected = inspect(
            request_id,
            target,
            request.method,
            request.path.decode("latin-1"),
            request.requestHeaders,
            body,
            inject_stream_usage=target.upstream.config.inject_stream_usage,
            sample_limit=config.features.rate_limiting.estimation.max_sample_bytes,
        )
        if isinstance(inspected, BadRequest):
            self._refuse(Refused(400, inspected.message))
            return
        facts = self._facts = inspected.facts
        self._body = inspected.body
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
        self._access.expect_account()
        facts = self._facts
        assert facts is not None
        if self._gone:
            self._account(self._summary(AttemptResult(client_gone=True), unsent=True))
            return
        self.phase = "attempt"
        timeouts = self._target.upstream.config.timeouts
        deadline = self._started + timeouts.total_seconds if timeouts.total_seconds > 0 else None
        body, self._body = self._body, b""
        attempt = self._attempt = Attempt(
            self._target.upstream, facts, body, self._request, self._state, deadline
        )
        attempt.run(self._runtime.config.server.forwarded_headers).addCallback(
            self._attempted
        ).addErrback(self._bug)

    def _attempted(self, result: AttemptResult) -> None:
        self._attempt = None
        failure = result.failure
        if failure is not None and not self._gone:
            self._answer(failure.status, failure.message, "upstream")
            status: int | None = failure.status
        else:
            status = result.status
        self._account(
            self._summary(
                result,
                status=status,
                unsent=failure is not None and failure.unsent,
            )
        )

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
        )

    def _account(self, summary: CallSummary) -> None:
        if self.phase == "accounted":
            return
        self.phase = "accounted"
        admission = self._admission
        assert admission is not None
        account(summary, self._runtime, self._state, admission, self._access)

    def _client_gone(self, failure: Failure) -> None:
        self._gone = True
        if self._attempt is not None:
            self._attempt.client_gone()

    # -- answers the proxy makes itself ---------------------------------------

    def _refuse(self, refusal: Refused) -> None:
        self.phase = "refused"
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
            self._account(self._summary(AttemptResult(), status=502))

    def _request_id(self) -> str | None:
        return self._facts.request_id if self._facts is not None else None
