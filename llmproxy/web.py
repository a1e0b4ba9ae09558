# -*- test-case-name: llmproxy.test.test_call -*-
"""
The HTTP front: the Klein app that answers C{/health}, C{/metrics},
C{/status} and C{/status.json} and hands every other path to the
provider it names (through the runtime's L{llmproxy.routes.RouteTable}),
with CORS on every answer and an access line per request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_to_bytes

import orjson
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from werkzeug.exceptions import MethodNotAllowed, NotFound

from llmproxy.cors import preflight_headers
from llmproxy.group.health import group_health
from llmproxy.healthreport import health_report
from llmproxy.httperrors import ERROR_SOURCE_HEADER, error_body
from llmproxy.metrics import metrics_resource
from llmproxy.provider_resource import ProviderResource
from llmproxy.runtime import ProxyState
from llmproxy.site import ProxyRequest, ProxySite, make_site
from llmproxy.status.page import render_data, render_page


class Gateway:
    """
    The routes. Provider paths return a L{ProviderResource} for the
    request; everything the proxy answers itself is here.
    """

    app = Klein()

    def __init__(self, state: ProxyState) -> None:
        self._state = state

    @app.route("/health", strict_slashes=False)
    def health(self, request: IRequest) -> bytes | Deferred[bytes]:
        if request.method not in (b"GET", b"HEAD"):
            return self._not_allowed(request)
        state = self._state
        if state.group is not None:
            return group_health(state.group, state).addCallback(_health_answer, request)
        return _health_answer(health_report(state), request)

    @app.route("/metrics", strict_slashes=False)
    def metrics(self, request: IRequest) -> IResource | bytes:
        if not self._state.runtime.config.features.metrics.enabled:
            return self._not_found(request)
        if request.method not in (b"GET", b"HEAD"):
            return self._not_allowed(request)
        return metrics_resource(self._state.metrics)

    @app.route("/status", strict_slashes=False)
    def status_page(self, request: IRequest) -> bytes | Deferred[bytes]:
        return self._status(request, render_page)

    @app.route("/status.json")
    def status_data(self, request: IRequest) -> bytes | Deferred[bytes]:
        return self._status(request, render_data)

    def _status(
        self,
        request: IRequest,
        render: Callable[[IRequest, ProxyState], bytes | Deferred[bytes]],
    ) -> bytes | Deferred[bytes]:
        if not self._state.runtime.config.server.status.enabled:
            return self._not_found(request)
        if request.method not in (b"GET", b"HEAD"):
            return self._not_allowed(request)
        return render(request, self._state)

    # strict_slashes/merge_slashes off: werkzeug would otherwise answer 308
    # redirects (/openai -> /openai/, //x -> /x) instead of routing or 404.
    @app.route("/", branch=True, strict_slashes=False, merge_slashes=False)
    def provider(self, request: IRequest) -> IResource | bytes:
        """
        Every other path: the provider it names (C{/<provider>/...} or
        C{/meta/<user>/<provider>/...}), else 404.
        """
        runtime = self._state.runtime
        target = runtime.routes.match(request.uri)
        if target is None:
            return self._not_found(request)
        return ProviderResource(target, runtime, self._state)

    @app.handle_errors(NotFound)
    def not_found(self, request: IRequest, failure: Failure) -> bytes:
        return self._not_found(request)

    @app.handle_errors(MethodNotAllowed)
    def not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        return self._not_allowed(request)

    def _not_allowed(self, request: IRequest) -> bytes:
        request.setResponseCode(405)
        request.setHeader(b"allow", b"GET, HEAD")
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(ERROR_SOURCE_HEADER, b"proxy")
        return error_body(None, 405, "Method not allowed.")

    def _not_found(self, request: IRequest) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(ERROR_SOURCE_HEADER, b"proxy")
        path = (request.path or b"").decode("latin-1")
        return error_body(None, 404, f"No route for {path}.")


def _health_answer(body: dict[str, Any], request: IRequest) -> bytes:
    request.setResponseCode(503 if body["status"] == "draining" else 200)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return orjson.dumps(body)


class GatewayRoot(Resource):
    """
    The root resource: counts requests in flight, answers CORS preflights,
    puts CORS headers on every answer, finishes each request's access line,
    and hands everything else to the Klein app.
    """

    isLeaf = True

    def __init__(self, state: ProxyState) -> None:
        super().__init__()
        self._state = state
        self._app = Gateway(state).app.resource()

    def render(self, request: ProxyRequest) -> Any:
        state = self._state
        state.request_started()
        access = request.access
        access.method = request.method.decode("latin-1")
        access.endpoint = (request.path or b"").decode("latin-1")
        request.notifyFinish().addBoth(self._finished, request, state.clock.seconds())
        origin = request.getHeader(b"origin")
        for name, value in request.channel.site.cors_headers(origin):
            request.setHeader(name, value)
        if request.method == b"OPTIONS":
            request.setResponseCode(204)
            for name, value in preflight_headers(
                request.getHeader(b"access-control-request-headers")
            ):
                request.setHeader(name, value)
            return b""
        if not _decodable(request.path or b""):
            # The router needs text; a provider path is forwarded raw anyway.
            runtime = state.runtime
            target = runtime.routes.match(request.uri)
            if target is not None:
                return ProviderResource(target, runtime, state).render(request)
            request.setResponseCode(400)
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(ERROR_SOURCE_HEADER, b"proxy")
            return error_body(None, 400, "The path is not UTF-8 once percent-decoded.")
        return self._app.render(request)

    def _finished(self, result: object, request: ProxyRequest, started: float) -> None:
        state = self._state
        state.request_finished()
        request.access.finished(
            status=request.code,
            duration_ms=(state.clock.seconds() - started) * 1000.0,
            complete=not isinstance(result, Failure),
            sent=request.sentLength,
        )


def _decodable(path: bytes) -> bool:
    """
    Whether C{path}, percent-decoded, is UTF-8 (what the router reads).
    """
    try:
        unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def gateway_site(state: ProxyState, request_timeout: float = 60.0) -> ProxySite:
    """
    The proxy's Site: the gateway's resources behind L{ProxySite}.
    """
    return make_site(state, GatewayRoot(state), request_timeout)
