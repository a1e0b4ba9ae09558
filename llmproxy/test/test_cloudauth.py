"""
Tests for L{llmproxy.cloudauth}: the credential cache, the signing and
token agents, and SigV4 signing against AWS's published test vector.
"""

from __future__ import annotations

import datetime
from typing import Any

from botocore.credentials import ReadOnlyCredentials
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer
from zope.interface import implementer

from llmproxy import cloudauth
from llmproxy.attempt import BytesProducer
from llmproxy.cloudauth import (
    BearerTokenAgent,
    CredentialCache,
    NoCredentialsError,
    SigV4Agent,
    read_body,
    sign_sigv4,
    with_proxy_credentials,
)
from llmproxy.config import ProviderConfig

EXAMPLE = ReadOnlyCredentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", None)


class Threads:
    """
    Stands in for the thread pool: runs nothing until the test says so.
    """

    def __init__(self) -> None:
        self.pending: list[tuple[Any, Deferred[Any]]] = []

    def __call__(self, work: Any) -> Deferred[Any]:
        done: Deferred[Any] = Deferred()
        self.pending.append((work, done))
        return done

    def run(self) -> None:
        pending, self.pending = self.pending, []
        for work, done in pending:
            try:
                result = work()
            except Exception:
                done.errback(Failure())
            else:
                done.callback(result)


@implementer(IAgent)
class Recorder:
    """
    An agent that records what it was asked to send.
    """

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, bytes, Headers, bytes | None]] = []

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[Any]:
        body = None
        if bodyProducer is not None:
            body = self.successResultOf(read_body(bodyProducer))
        self.sent.append((method, uri, headers or Headers(), body))
        return succeed("response")

    def successResultOf(self, d: Deferred[bytes]) -> bytes:
        box: list[bytes] = []
        d.addCallback(box.append)
        return box[0]


class CacheTests(SynchronousTestCase):
    def test_shared_and_kept(self) -> None:
        """
        Callers waiting together share one resolution in a thread; the
        result is served from memory until it is C{max_age} old.
        """
        clock, threads, calls = Clock(), Threads(), []

        def resolve() -> str:
            calls.append(1)
            return f"token-{len(calls)}"

        cache: CredentialCache[str] = CredentialCache(resolve, clock, threads, max_age=60)
        first, second = cache.get(), cache.get()
        self.assertNoResult(first)
        threads.run()
        self.assertEqual(
            (self.successResultOf(first), self.successResultOf(second)), ("token-1", "token-1")
        )
        clock.advance(59)
        self.assertEqual(self.successResultOf(cache.get()), "token-1")
        clock.advance(2)
        later = cache.get()
        threads.run()
        self.assertEqual(self.successResultOf(later), "token-2")
        self.assertEqual(len(calls), 2)

    def test_failure_and_cancel(self) -> None:
        clock, threads = Clock(), Threads()

        def resolve() -> str:
            raise NoCredentialsError("none here")

        cache: CredentialCache[str] = CredentialCache(resolve, clock, threads)
        waiting, cancelled = cache.get(), cache.get()
        cancelled.cancel()
        self.failureResultOf(cancelled)
        threads.run()
        self.failureResultOf(waiting, NoCredentialsError)
        # The next call tries again.
        again = cache.get()
        self.assertEqual(len(threads.pending), 1)
        self.assertNoResult(again)


class SigningTests(SynchronousTestCase):
    def test_aws_test_vector(self) -> None:
        """
        AWS's published SigV4 test vector C{get-vanilla}, exactly.
        """
        moment = datetime.datetime(2015, 8, 30, 12, 36, 0)
        self.patch(cloudauth_botocore(), "get_current_datetime", lambda: moment)
        headers = sign_sigv4(
            EXAMPLE,
            "us-east-1",
            "service",
            b"GET",
            b"http://example.amazonaws.com/",
            Headers(),
            b"",
        )
        self.assertEqual(
            headers.getRawHeaders(b"authorization"),
            [
                b"AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/"
                b"aws4_request, SignedHeaders=host;x-amz-date, Signature="
                b"5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
            ],
        )
        self.assertEqual(headers.getRawHeaders(b"x-amz-date"), [b"20150830T123600Z"])

    def test_replaces_client_authorization(self) -> None:
        incoming = Headers(
            {
                b"authorization": [b"Bearer client-key"],
                b"x-amz-security-token": [b"client-session"],
                b"x-amz-date": [b"19990101T000000Z"],
                b"content-type": [b"application/json"],
                b"x-custom": [b"kept"],
            }
        )
        session = ReadOnlyCredentials("AKIDEXAMPLE", "secret", "proxy-session")
        out = sign_sigv4(
            session, "eu-west-1", "bedrock", b"POST", b"https://h/model/m/converse", incoming, b"{}"
        )
        [authorization] = out.getRawHeaders(b"authorization") or []
        self.assertTrue(authorization.startswith(b"AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"))
        self.assertIn(b"/eu-west-1/bedrock/aws4_request", authorization)
        self.assertIn(
            b"SignedHeaders=content-type;host;x-amz-date;x-amz-security-token", authorization
        )
        self.assertEqual(out.getRawHeaders(b"x-amz-security-token"), [b"proxy-session"])
        self.assertEqual(out.getRawHeaders(b"x-custom"), [b"kept"])
        self.assertNotEqual(out.getRawHeaders(b"x-amz-date"), [b"19990101T000000Z"])
        self.assertEqual(incoming.getRawHeaders(b"authorization"), [b"Bearer client-key"])


def cloudauth_botocore() -> Any:
    import botocore.auth

    return botocore.auth


class AgentTests(SynchronousTestCase):
    def test_sigv4_agent(self) -> None:
        clock, threads, inner = Clock(), Threads(), Recorder()
        cache: CredentialCache[Any] = CredentialCache(lambda: EXAMPLE, clock, threads)
        agent = SigV4Agent(inner, cache, "us-west-2", "bedrock")
        result = agent.request(
            b"POST",
            b"https://bedrock-runtime.us-west-2.amazonaws.com/model/m/converse",
            Headers({b"authorization": [b"Bearer client"]}),
            BytesProducer(b'{"messages": []}'),
        )
        self.assertNoResult(result)
        threads.run()
        self.assertEqual(self.successResultOf(result), "response")
        [(_, _, headers, body)] = inner.sent
        self.assertEqual(body, b'{"messages": []}')
        [authorization] = headers.getRawHeaders(b"authorization") or []
        self.assertIn(b"/us-west-2/bedrock/aws4_request", authorization)

    def test_bearer_agent(self) -> None:
        clock, threads, inner = Clock(), Threads(), Recorder()
        cache: CredentialCache[str] = CredentialCache(lambda: "ya29.proxy", clock, threads)
        agent = BearerTokenAgent(inner, cache)
        incoming = Headers({b"authorization": [b"Bearer client"], b"x-goog-api-key": [b"k"]})
        result = agent.request(b"GET", b"https://v/x", incoming)
        threads.run()
        self.successResultOf(result)
        [(_, _, headers, body)] = inner.sent
        self.assertEqual(headers.getRawHeaders(b"authorization"), [b"Bearer ya29.proxy"])
        self.assertFalse(headers.hasHeader(b"x-goog-api-key"))
        self.assertIsNone(body)
        self.assertEqual(incoming.getRawHeaders(b"authorization"), [b"Bearer client"])

    def test_wrapping(self) -> None:
        inner = Recorder()
        clock, threads = Clock(), Threads()
        plain = ProviderConfig(name="b", kind="bedrock", base_url="https://x")
        self.assertIs(with_proxy_credentials(plain, inner, clock, threads), inner)
        signing = ProviderConfig(
            name="b", kind="bedrock", base_url="https://x", region="us-east-1", aws_sigv4=True
        )
        self.assertIsInstance(with_proxy_credentials(signing, inner, clock, threads), SigV4Agent)
        adc = ProviderConfig(name="v", kind="vertex", base_url="https://x", google_adc=True)
        self.assertIsInstance(with_proxy_credentials(adc, inner, clock, threads), BearerTokenAgent)

    def test_no_aws_credentials(self) -> None:
        """
        An empty AWS credential chain is a clear error, not a crash.
        """

        class Empty:
            def get_credentials(self) -> None:
                return None

        import botocore.session

        self.patch(botocore.session, "Session", Empty)
        self.assertRaises(NoCredentialsError, cloudauth.aws_credentials)
