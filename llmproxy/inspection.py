# -*- test-case-name: llmproxy.test.test_call,llmproxy.test.test_routes -*-
"""
Phase one of a proxied request: inspect.

From the request as received (target, method, headers, body) to the facts
every later phase works from: which provider and API, which model, whether
it streams, who is calling (key id and user), how much prompt text it
carries, and the body to send. Nothing here does I/O or keeps state: the
provider's wire format is asked once, the identity rules once.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from attrs import frozen
from twisted.web.http_headers import Headers

from llmproxy import identity
from llmproxy.credentials import CredentialSwap
from llmproxy.providers import RequestFacts
from llmproxy.routes import Target


@frozen
class CallFacts:
    """
    What the proxy knows about one request before it is admitted.

    @ivar request_id: the id of its response header, cost record and
        access line.
    @ivar provider: the provider's mount name.
    @ivar endpoint: the client-facing path without the query
        (C{/openai/v1/chat/completions}), for records and logs.
    @ivar path: the raw path to append to the upstream's base URL.
    @ivar query: the raw query string to send, possibly C{b""}.
    @ivar request: what the provider's wire format read from it.
    @ivar key_id: the short hash of the client's credential, if it sent one.
    @ivar user: the user the request is attributed to, if any.
    @ivar body_bytes: the size of the client's body.
    @ivar strip_usage_chunk: the body sent upstream asks for a usage-only
        event the client did not ask for; the meter removes it.
    @ivar presented: the client's credential, as key recognition needs it.
    @ivar credential_swap: set once admission accepted a proxy key: the
        client's credential is replaced by the provider's on the way out.
    """

    request_id: str
    provider: str
    endpoint: str
    path: bytes
    query: bytes
    request: RequestFacts
    key_id: str | None
    user: str | None
    body_bytes: int
    strip_usage_chunk: bool = False
    presented: identity.Presented | None = None
    credential_swap: CredentialSwap | None = None


@frozen
class Inspected:
    """
    The facts, and the body to send upstream (kept apart: the facts live as
    long as the call, the body only until it is sent).
    """

    facts: CallFacts
    body: bytes


@frozen
class BadRequest:
    """
    A request the proxy refuses to forward, and why.
    """

    message: str


def inspect(
    request_id: str,
    target: Target,
    method: bytes,
    endpoint: str,
    headers: Headers,
    body: bytes,
    *,
    inject_stream_usage: bool,
    sample_limit: int,
) -> Inspected | BadRequest:
    """
    Read one request addressed to C{target}.

    @param endpoint: the client-facing path without the query.
    @param inject_stream_usage: see L{llmproxy.providers.ProviderFormat.inspect}.
    @param sample_limit: bodies up to this size have their prompt text
        counted for token estimation.
    """
    if has_dot_segment(target.path):
        return BadRequest("Path contains a dot-segment.")
    inspection = target.upstream.format.inspect(
        method,
        target.path,
        target.query,
        body,
        inject_stream_usage=inject_stream_usage,
        sample_limit=sample_limit,
    )
    if inspection.refusal is not None:
        return BadRequest(inspection.refusal)
    secret = identity.credential(headers, target.query)
    facts = CallFacts(
        request_id=request_id,
        provider=target.name,
        endpoint=endpoint,
        path=target.path,
        query=target.query,
        request=inspection.facts,
        key_id=identity.key_id(secret),
        presented=identity.presented(secret),
        user=identity.user_id(target.user, headers, inspection.facts.user),
        body_bytes=len(body),
        strip_usage_chunk=inspection.strip_usage_chunk,
    )
    return Inspected(facts, inspection.body)


def has_dot_segment(path: bytes) -> bool:
    """
    Whether C{path} has a C{.} or C{..} segment once percent-decoded, with
    C{/}, C{%2F} and backslashes all counted as separators (some servers
    treat each as one).
    """
    decoded = unquote_to_bytes(path).replace(b"\\", b"/")
    return any(segment in (b".", b"..") for segment in decoded.split(b"/"))
