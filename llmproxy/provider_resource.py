# -*- test-case-name: llmproxy.test.test_call -*-
"""
The provider Resource: where a proxied request leaves the routing and
becomes a L{Call}.
"""

from __future__ import annotations

from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from llmproxy.call import Call
from llmproxy.routes import Target
from llmproxy.runtime import ProxyState, Runtime
from llmproxy.site import ProxyRequest


class ProviderResource(Resource):
    """
    Forwards one request to the provider its target names. Built per
    request by the gateway, which has already matched the target.
    """

    isLeaf = True

    def __init__(self, target: Target, runtime: Runtime, state: ProxyState) -> None:
        super().__init__()
        self._target = target
        self._runtime = runtime
        self._state = state

    def render(self, request: ProxyRequest) -> Any:
        call = Call(self._target, self._runtime, self._state, request, request.access)
        call.start(request.take_body())
        return NOT_DONE_YET
