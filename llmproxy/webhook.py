# -*- test-case-name: llmproxy.test.test_budgets_alerts -*-
"""
POSTing JSON to a webhook (the budget alerts' C{auth.alerts.webhook_url})
with treq, on the reactor: nothing waits for it but the alert's own
retries.
"""

from __future__ import annotations

from typing import Any, cast

import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent

from llmproxy.attempt import BytesProducer
from llmproxy.budgets.alerts import TIMEOUT_SECONDS, Post
from llmproxy.upstream import no_cookies


def json_poster(agent: IAgent, reactor: Any, timeout: float = TIMEOUT_SECONDS) -> Post:
    """
    A L{Post} over C{agent}: the body as C{application/json}, no redirects
    followed, the answer's body read and dropped (so the connection can be
    reused), failing after C{timeout} seconds.
    """
    client = HTTPClient(agent, cookiejar=cast(Any, no_cookies()))

    def post(url: str, body: bytes) -> Deferred[int]:
        sent = client.post(
            url,
            data=BytesProducer(body),
            headers=Headers({b"content-type": [b"application/json"]}),
            allow_redirects=False,
            reactor=reactor,
            timeout=timeout,
        )

        def read(response: Any) -> Deferred[int]:
            status: int = response.code
            done: Deferred[int] = treq.content(response).addCallback(lambda _: status)
            return done

        answered: Deferred[int] = sent.addCallback(read)
        return answered

    return post
