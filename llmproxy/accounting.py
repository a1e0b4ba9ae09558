# -*- test-case-name: llmproxy.test.test_call -*-
"""
Phase four of a proxied request: account.

However a forwarded request ended (complete, upstream failure, timeout,
client gone), the call hands one frozen L{CallSummary} to L{account},
exactly once. Accounting prices it, warns once about an unpriced model,
counts the request's metrics, writes its cost record, settles its
admission (the rate-limit reservation becomes the real usage, the budget
reservation the real cost) and fills in its access line.
"""

from __future__ import annotations

from attrs import frozen

from llmproxy.accesslog import AccessLine
from llmproxy.admission import Admission
from llmproxy.inspection import CallFacts
from llmproxy.pricing import Cost
from llmproxy.records import make_record
from llmproxy.runtime import ProxyState, Runtime
from llmproxy.usage import Usage

CLIENT_CLOSED = 499
"""The status recorded when the client left before any response (nginx's)."""


@frozen
class CallSummary:
    """
    Everything known about a forwarded request once it is over.

    @ivar status: the status sent to the client; L{None} when the client
        left before any was sent.
    @ivar complete: the whole response reached the client.
    @ivar unsent: the upstream never received the request.
    @ivar started: clock time the request arrived.
    @ivar ended: clock time it was over.
    @ivar first_byte: clock time of the upstream's first body byte.
    @ivar streaming: the request or its response streamed.
    @ivar unmetered: why the response was not metered, if it was not.
    @ivar upstream: C{<mount>/<upstream>} of the last attempt, if any.
    @ivar attempts: upstream tries made.
    @ivar failure: why the upstream gave no response to relay, if so
        (C{connect}, C{first_byte_timeout}, ...).
    """

    facts: CallFacts
    status: int | None
    complete: bool
    usage: Usage
    unsent: bool
    started: float
    ended: float
    first_byte: float | None
    streaming: bool
    unmetered: str | None = None
    upstream: str | None = None
    attempts: int = 0
    failure: str | None = None


def account(
    summary: CallSummary,
    runtime: Runtime,
    state: ProxyState,
    admission: Admission,
    access: AccessLine,
) -> Cost:
    """
    Account for one forwarded request: price, metrics, status page,
    record, limits, access line.

    @return: what the request cost.
    """
    facts, usage = summary.facts, summary.usage
    model = usage.model or facts.request.model
    status = summary.status if summary.status is not None else CLIENT_CLOSED
    cost = runtime.prices.cost(facts.provider, model, usage)
    if usage.reported and not cost.priced:
        state.unpriced.warn_once(facts.provider, model)
    if summary.unmetered is not None:
        state.metrics.unmetered(facts.provider, summary.unmetered)
    duration = summary.ended - summary.started
    ttfb = None if summary.first_byte is None else summary.first_byte - summary.started
    state.metrics.request_finished(
        facts.provider, model, status, duration, ttfb, usage, cost, facts.key_id
    )
    state.status.observe(summary, cost)
    if state.sink.wants_records:
        state.sink.write(
            make_record(
                now=summary.ended,
                request_id=facts.request_id,
                provider=facts.provider,
                model=model,
                endpoint=facts.endpoint,
                user_id=facts.user,
                key_id=facts.key_id,
                is_streaming=summary.streaming,
                status=status,
                complete=summary.complete,
                usage=usage,
                cost=cost,
                duration_ms=duration * 1000.0,
                ttfb_ms=None if ttfb is None else ttfb * 1000.0,
                upstream=summary.upstream,
                attempts=summary.attempts,
            )
        )
    admission.settle(usage, summary.status, summary.unsent, cost.total_cost)
    access.settled(
        model=model,
        streaming=summary.streaming,
        ttfb_ms=None if ttfb is None else round(ttfb * 1000.0, 3),
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        total_cost=cost.total_cost,
    )
    return cost
