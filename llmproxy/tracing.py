# -*- test-case-name: llmproxy.test.test_tracing -*-
"""
Tracing (C{features.tracing}): what the request path tells a tracer, and
the tracer that does nothing, used whenever tracing is off.

The request path makes three calls: the call starts a request trace once
the request is inspected (L{ITracer.request}), each upstream attempt
starts a child of it (L{IRequestTrace.attempt}, which also puts the
attempt's C{traceparent} on the upstream request) and ends it with its
result, and accounting ends the request trace (L{IRequestTrace.end}), or
the proxy's own refusal does (L{IRequestTrace.refused}).

The OpenTelemetry implementation is in L{llmproxy.otel}, imported only
when tracing is on: its packages are the optional extra C{llmproxy[otel]}.
"""

from __future__ import annotations

from importlib.util import find_spec
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, succeed
from twisted.web.http_headers import Headers
from zope.interface import Interface, implementer

if TYPE_CHECKING:
    from llmproxy.accounting import CallSummary
    from llmproxy.admission import Refused
    from llmproxy.attempt import AttemptResult
    from llmproxy.config import TracingConfig
    from llmproxy.inspection import CallFacts
    from llmproxy.pricing import Cost
    from llmproxy.upstream import Upstream

OTEL_MODULES = ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http")
"""What C{llmproxy[otel]} installs and tracing needs."""


def otel_available() -> bool:
    """
    Whether the OpenTelemetry SDK and its OTLP exporter can be imported.
    """
    try:
        return all(find_spec(name) is not None for name in OTEL_MODULES)
    except ModuleNotFoundError:
        return False


class IAttemptTrace(Interface):
    """
    The trace of one upstream attempt.
    """

    def ended(result: AttemptResult) -> AttemptResult:  # noqa: N805
        """
        The attempt is over; returns C{result} unchanged (a callback on the
        attempt's result).
        """


class IRequestTrace(Interface):
    """
    The trace of one proxied request.
    """

    def attempt(upstream: Upstream, base_url: str, headers: Headers) -> IAttemptTrace:  # noqa: N805
        """
        An attempt at C{upstream} (its upstream at C{base_url}) begins;
        C{headers} (the upstream request's) get its C{traceparent}.
        """

    def end(summary: CallSummary, cost: Cost) -> None:  # noqa: N805
        """
        The request was accounted for.
        """

    def refused(refusal: Refused) -> None:  # noqa: N805
        """
        The proxy answered the request itself, with no upstream attempt.
        """


class ITracer(Interface):
    """
    Makes request traces; lives as long as the process.
    """

    def request(facts: CallFacts, upstream: Upstream, headers: Headers) -> IRequestTrace:  # noqa: N805
        """
        A request was inspected: start its trace, continuing the client's
        C{traceparent} from C{headers} if it sent one.
        """

    def shutdown() -> Deferred[None]:
        """
        Export what is left; fires when done.
        """


@implementer(IAttemptTrace)
class _NoAttemptTrace:
    def ended(self, result: AttemptResult) -> AttemptResult:
        return result


@implementer(IRequestTrace)
class _NoRequestTrace:
    def attempt(self, upstream: Upstream, base_url: str, headers: Headers) -> IAttemptTrace:
        return NO_ATTEMPT_TRACE

    def end(self, summary: CallSummary, cost: Cost) -> None:
        pass

    def refused(self, refusal: Refused) -> None:
        pass


@implementer(ITracer)
class NoTracer:
    """
    Tracing off: every call returns at once, and headers are left as the
    client sent them (a client's C{traceparent} passes through untouched).
    """

    def request(self, facts: CallFacts, upstream: Upstream, headers: Headers) -> IRequestTrace:
        return NO_TRACE

    def shutdown(self) -> Deferred[None]:
        return succeed(None)


NO_ATTEMPT_TRACE = _NoAttemptTrace()
NO_TRACE: IRequestTrace = _NoRequestTrace()
NO_TRACER: ITracer = NoTracer()


def tracer_for(config: TracingConfig, reactor: Any) -> ITracer:
    """
    The tracer C{config} asks for: L{NO_TRACER} when tracing is off, else
    an OpenTelemetry tracer exporting by OTLP as the C{OTEL_*} environment
    variables say.

    @param reactor: runs the exporter's shutdown in a thread.
    """
    if not config.enabled:
        return NO_TRACER
    from llmproxy.otel import tracer_from_environment

    return tracer_from_environment(reactor)
