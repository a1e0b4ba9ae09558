"""
Item: a finished request must be freed when it ends, not when the garbage
collector next walks the heap: its call, attempt and relay (with the
meter's buffers) form no reference cycle once it is over.

The daemon runs in this process (on loopback) so its objects can be seen.
"""

from __future__ import annotations

import gc
from typing import Any

from treq.content import content
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.web.http_headers import Headers

from llmproxy.attempt import Attempt
from llmproxy.call import Call
from llmproxy.relay import Relay
from tests.abuse.harness import CHAT, CHAT_STREAM, sleep
from tests.e2e.harness import ProxyTestCase


class CycleTests(ProxyTestCase):
    @inlineCallbacks
    def test_finished_requests_freed_by_reference_counting(self) -> Any:
        """
        With the collector off, 40 finished requests (JSON and SSE, plain and
        gzip, an upstream error, a stream cut by the upstream) leave no
        call, attempt or relay behind.
        """
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)

        @inlineCallbacks
        def one(body: bytes, extra: dict[str, str]) -> Any:
            headers = Headers(
                {"authorization": ["Bearer sk-x"], "content-type": ["application/json"]}
            )
            for name, value in extra.items():
                headers.setRawHeaders(name, [value])
            response = yield self.http.post(
                self.proxy_url + "/openai/v1/chat/completions", data=body, headers=headers
            )
            yield content(response)

        kinds: list[dict[str, str]] = [
            {},
            {"x-fake-gzip": "1"},
            {"x-fake-status": "500"},
            {"x-fake-die-after": "1"},
        ]
        yield gatherResults(
            [
                one(CHAT_STREAM if n % 2 else CHAT, kinds[n % len(kinds)]).addErrback(
                    lambda _: None
                )
                for n in range(40)
            ]
        )
        yield sleep(0.2)
        alive = [o for o in gc.get_objects() if isinstance(o, Call | Attempt | Relay)]
        self.assertEqual(alive, [])
