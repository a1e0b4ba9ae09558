# -*- test-case-name: llmproxy.test.test_cloudauth -*-
"""
The proxy's own cloud credentials, for upstreams configured to use them
instead of the client's: C{providers.<name>.aws_sigv4} (Bedrock: every
request signed with AWS Signature Version 4) and
C{providers.<name>.google_adc} (Vertex AI: every request sent with an
OAuth token from Google's Application Default Credentials).

Each is an L{IAgent} wrapped around the upstream's agent (the way Twisted
composes client behaviour), so the request path does not change: the
wrapper reads the body, gets current credentials, replaces the client's
authorization and sends the request on.

Credentials come from the libraries' standard chains (botocore: the
environment, shared config and credentials files, SSO, container and
instance roles; google-auth: C{GOOGLE_APPLICATION_CREDENTIALS}, gcloud's
user credentials, the metadata server).  Resolving or refreshing them can
read files and call metadata endpoints, so it runs in a thread, never in
the reactor; the result is kept for L{CREDENTIALS_MAX_AGE} seconds, and the
libraries themselves refresh short-lived credentials well before they
expire.

L{sign_sigv4} is the signing itself, usable on its own: botocore's
C{SigV4Auth}, never a hand-written signature.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from llmproxy.config import ProviderConfig
from llmproxy.config.cloud import aws_region

T = TypeVar("T")

InThread = Callable[[Callable[[], Any]], "Deferred[Any]"]
"""Runs a blocking callable in a worker thread; fires with its result."""

CREDENTIALS_MAX_AGE = 60.0
"""Seconds a resolved credential is used before the chain is asked again."""

GOOGLE_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)

SIGNED_HEADERS = (b"content-type",)
"""
Request headers covered by the signature, besides C{host} and the
C{x-amz-*} headers botocore adds: the headers a relay between the proxy
and AWS has no reason to touch.
"""

REPLACED_HEADERS = (
    b"authorization",
    b"x-amz-date",
    b"x-amz-security-token",
    b"x-amz-content-sha256",
)
"""The client's own authorization, which the proxy's replaces."""


class NoCredentialsError(Exception):
    """
    The credential chain found nothing to sign or authorize with.
    """


class CredentialCache(Generic[T]):
    """
    A credential resolved in a worker thread and kept for a while; callers
    that ask while it is being resolved share the one resolution.
    """

    def __init__(
        self,
        resolve: Callable[[], T],
        clock: IReactorTime,
        in_thread: InThread,
        max_age: float = CREDENTIALS_MAX_AGE,
    ) -> None:
        """
        @param resolve: blocking; returns the credential or raises.
        """
        self._resolve = resolve
        self._clock = clock
        self._in_thread = in_thread
        self._max_age = max_age
        self._value: T | None = None
        self._fresh_until = 0.0
        self._waiters: list[Deferred[T]] | None = None

    def get(self) -> Deferred[T]:
        """
        The current credential (at once while it is fresh).
        """
        if self._value is not None and self._clock.seconds() < self._fresh_until:
            return succeed(self._value)
        waiter: Deferred[T] = Deferred()
        if self._waiters is None:
            self._waiters = [waiter]
            self._in_thread(self._resolve).addBoth(self._resolved)
        else:
            self._waiters.append(waiter)
        return waiter

    def _resolved(self, result: T | Failure) -> None:
        waiters, self._waiters = self._waiters or [], None
        if not isinstance(result, Failure):
            self._value = result
            self._fresh_until = self._clock.seconds() + self._max_age
        for waiter in waiters:
            if waiter.called:  # cancelled by its caller meanwhile
                continue
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)


def aws_credentials() -> Any:
    """
    Resolve the proxy's AWS credentials (blocking): botocore's standard
    chain, frozen (C{access_key}, C{secret_key}, C{token}).

    @raise NoCredentialsError: the chain found none.
    """
    from botocore.session import Session

    found = Session().get_credentials()
    if found is None:
        raise NoCredentialsError(
            "no AWS credentials found (environment, shared config files, SSO, "
            "container or instance role)"
        )
    return found.get_frozen_credentials()


def google_token_source() -> Callable[[], str]:
    """
    A blocking function that returns a current OAuth access token from the
    proxy's Application Default Credentials, refreshing it when needed.
    The credentials are found on the first call (also blocking).
    """
    state: dict[str, Any] = {}

    def token() -> str:
        import google.auth
        import google.auth.exceptions
        from google.auth.transport.requests import Request

        try:
            if "credentials" not in state:
                state["credentials"], _ = google.auth.default(scopes=list(GOOGLE_SCOPES))
            credentials = state["credentials"]
            if not credentials.valid:
                credentials.refresh(Request())
        except google.auth.exceptions.GoogleAuthError as error:
            raise NoCredentialsError(f"no Google credentials: {error}") from error
        value = credentials.token
        if not isinstance(value, str) or not value:
            raise NoCredentialsError("Google credentials gave no access token")
        return value

    return token


def sign_sigv4(
    credentials: Any,
    region: str,
    service: str,
    method: bytes,
    url: bytes,
    headers: Headers,
    body: bytes,
) -> Headers:
    """
    The request's headers, signed with SigV4 by botocore's C{SigV4Auth}.

    The client's own authorization (L{REPLACED_HEADERS}) is removed; the
    signature covers C{host}, L{SIGNED_HEADERS}, the C{x-amz-*} headers it
    adds, the method, the raw path and query, and the body.

    @param credentials: botocore credentials (C{access_key}, C{secret_key},
        C{token}).
    @return: new headers; C{headers} is not changed.
    """
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest

    signed: dict[str, str] = {}
    out = Headers()
    for name, values in headers.getAllRawHeaders():
        lower = name.lower()
        if lower in REPLACED_HEADERS:
            continue
        out.setRawHeaders(name, list(values))
        if lower in SIGNED_HEADERS and values:
            signed[lower.decode("latin-1")] = values[0].decode("latin-1")
    request = AWSRequest(
        method=method.decode("ascii"), url=url.decode("latin-1"), data=body, headers=signed
    )
    SigV4Auth(credentials, service, region).add_auth(request)
    for header in ("Authorization", "X-Amz-Date", "X-Amz-Security-Token"):
        value = request.headers.get(header)
        if value is not None:
            out.setRawHeaders(header.encode("ascii"), [value.encode("latin-1")])
    return out


@implementer(IConsumer)
class _Collect:
    """Collects what a body producer writes."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.parts.append(data)

    def registerProducer(self, producer: object, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


@implementer(IBodyProducer)
class _Body:
    """A body already read, written again in one go."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def read_body(producer: IBodyProducer | None) -> Deferred[bytes]:
    """
    Everything C{producer} writes (the proxy's bodies are in memory already).
    """
    if producer is None:
        return succeed(b"")
    collect = _Collect()
    done: Deferred[None] = producer.startProducing(collect)
    return done.addCallback(lambda ignored: b"".join(collect.parts))


@implementer(IAgent)
class SigV4Agent:
    """
    Signs every request with the proxy's AWS credentials, then sends it.
    """

    def __init__(
        self, agent: IAgent, credentials: CredentialCache[Any], region: str, service: str
    ) -> None:
        self._agent = agent
        self._credentials = credentials
        self._region = region
        self._service = service

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        def send(body: bytes) -> Deferred[IResponse]:
            def signed(credentials: Any) -> Deferred[IResponse]:
                outgoing = sign_sigv4(
                    credentials,
                    self._region,
                    self._service,
                    method,
                    uri,
                    headers or Headers(),
                    body,
                )
                result: Deferred[IResponse] = self._agent.request(
                    method, uri, outgoing, _Body(body) if bodyProducer is not None else None
                )
                return result

            return self._credentials.get().addCallback(signed)

        return read_body(bodyProducer).addCallback(send)


@implementer(IAgent)
class BearerTokenAgent:
    """
    Sends every request with C{Authorization: Bearer} and the proxy's own
    OAuth token, in place of the client's authorization.
    """

    def __init__(self, agent: IAgent, tokens: CredentialCache[str]) -> None:
        self._agent = agent
        self._tokens = tokens

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        def send(token: str) -> Deferred[IResponse]:
            outgoing = headers.copy() if headers is not None else Headers()
            outgoing.removeHeader(b"x-goog-api-key")
            outgoing.setRawHeaders(b"authorization", [b"Bearer " + token.encode("latin-1")])
            result: Deferred[IResponse] = self._agent.request(method, uri, outgoing, bodyProducer)
            return result

        return self._tokens.get().addCallback(send)


def with_proxy_credentials(
    provider: ProviderConfig, agent: IAgent, clock: IReactorTime, in_thread: InThread
) -> IAgent:
    """
    C{agent}, wrapped to use the proxy's own credentials when the provider
    asks for them (C{aws_sigv4}, C{google_adc}); C{agent} itself otherwise.
    """
    if provider.aws_sigv4:
        credentials: CredentialCache[Any] = CredentialCache(aws_credentials, clock, in_thread)
        region = aws_region(provider)
        if region is None:
            raise ValueError(f"provider {provider.name}: no AWS region to sign for")
        return SigV4Agent(agent, credentials, region, "bedrock")
    if provider.google_adc:
        tokens: CredentialCache[str] = CredentialCache(google_token_source(), clock, in_thread)
        return BearerTokenAgent(agent, tokens)
    return agent
