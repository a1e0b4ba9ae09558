"""
Tests for the fake upstream's cloud dialects: Bedrock
(L{llmproxy.testing.fake_upstream.bedrock}, its SigV4 check
L{llmproxy.testing.fake_upstream.sigv4}) and Vertex AI
(L{llmproxy.testing.fake_upstream.vertex}), through the pure router.
"""

from __future__ import annotations

import orjson
from botocore.credentials import ReadOnlyCredentials
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from llmproxy.cloudauth import sign_sigv4
from llmproxy.eventstream import EventStreamDecoder
from llmproxy.testing.fake_upstream.records import ReceivedRequest
from llmproxy.testing.fake_upstream.routes import answer
from llmproxy.testing.fake_upstream.sigv4 import TEST_ACCESS_KEY, TEST_SECRET_KEY

HOST = b"127.0.0.1:8080"
CONVERSE = b"/model/us.anthropic.claude-sonnet-4-20250514-v1%3A0/converse-stream"
BODY = orjson.dumps({"messages": [{"role": "user", "content": [{"text": "hi"}]}]})


def request(
    path: bytes, body: bytes, headers: list[tuple[bytes, bytes]], query: bytes = b""
) -> ReceivedRequest:
    uri = path + (b"?" + query if query else b"")
    return ReceivedRequest(b"POST", uri, path, query, [(b"Host", HOST), *headers], body)


def signed(path: bytes, body: bytes, secret: str = TEST_SECRET_KEY) -> list[tuple[bytes, bytes]]:
    """
    The headers the proxy's signer sends for a request to the fake.
    """
    credentials = ReadOnlyCredentials(TEST_ACCESS_KEY, secret, None)
    headers = Headers({b"content-type": [b"application/json"], b"authorization": [b"Bearer x"]})
    out = sign_sigv4(
        credentials, "us-east-1", "bedrock", b"POST", b"http://" + HOST + path, headers, body
    )
    return [(name, value) for name, values in out.getAllRawHeaders() for value in values]


class BedrockTests(SynchronousTestCase):
    def test_converse_stream_frames(self) -> None:
        headers = [*signed(CONVERSE, BODY), (b"x-fake-cached-tokens", b"4")]
        _knobs, reply = answer(request(CONVERSE, BODY, headers), {}, True, 1, 0)
        self.assertEqual(reply.status, 200)
        decoder = EventStreamDecoder()
        frames = [frame for chunk in reply.chunks for frame in decoder.feed(chunk)]
        names = [frame.event_type for frame in frames]
        self.assertEqual(names[0], "messageStart")
        self.assertEqual(names[-3:], ["contentBlockStop", "messageStop", "metadata"])
        usage = orjson.loads(frames[-1].payload or b"")["usage"]
        self.assertEqual(usage["cacheReadInputTokens"], 4)
        self.assertEqual(usage["totalTokens"], usage["inputTokens"] + usage["outputTokens"] + 4)
        assert reply.error_event is not None
        [error] = EventStreamDecoder().feed(reply.error_event)
        self.assertEqual(error.message_type, "exception")

    def test_signature_covers_body_and_headers(self) -> None:
        """
        What the proxy's signer signs, the fake accepts; a changed body, a
        changed signed header, another secret or a missing date are refused.
        """
        headers = signed(CONVERSE, BODY)
        self.assertEqual(answer(request(CONVERSE, BODY, headers), {}, True, 1, 0)[1].status, 200)
        self.assertNotIn(b"Bearer x", [value for _, value in headers])
        cases = [
            (request(CONVERSE, BODY + b" ", headers), "InvalidSignatureException"),
            (
                request(
                    CONVERSE,
                    BODY,
                    [(n, b"text/plain" if n.lower() == b"content-type" else v) for n, v in headers],
                ),
                "InvalidSignatureException",
            ),
            (request(CONVERSE, BODY, signed(CONVERSE, BODY, "x")), "InvalidSignatureException"),
            (
                request(CONVERSE, BODY, [h for h in headers if h[0].lower() != b"x-amz-date"]),
                "IncompleteSignatureException",
            ),
        ]
        for received, code in cases:
            reply = answer(received, {}, True, 1, 0)[1]
            self.assertIn(
                (
                    b"x-amzn-ErrorType",
                    code.encode() + b":http://internal.amazon.com/coral/com.amazon.bedrock/",
                ),
                reply.headers,
            )
            self.assertIn(reply.status, (400, 403))

    def test_unsigned(self) -> None:
        reply = answer(request(CONVERSE, BODY, []), {}, True, 1, 0)[1]
        self.assertEqual(reply.status, 403)
        self.assertEqual(
            orjson.loads(b"".join(reply.chunks)), {"message": "Missing Authentication Token"}
        )


class VertexTests(SynchronousTestCase):
    def test_token_endpoint(self) -> None:
        form = b"grant_type=refresh_token&refresh_token=r&client_id=c&client_secret=s"
        headers = [(b"content-type", b"application/x-www-form-urlencoded")]
        reply = answer(request(b"/oauth2/token", form, headers), {}, True, 7, 0)[1]
        token = orjson.loads(b"".join(reply.chunks))
        self.assertEqual(token["access_token"], "ya29.fake-token-0007")
        self.assertEqual(token["expires_in"], 3599)

    def test_claude(self) -> None:
        path = b"/v1/projects/p/locations/l/publishers/anthropic/models/claude-x@2025:rawPredict"
        body = orjson.dumps(
            {
                "anthropic_version": "vertex-2023-10-16",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "hi"}],
            }
        )
        reply = answer(request(path, body, [(b"authorization", b"Bearer t")]), {}, True, 1, 0)[1]
        self.assertEqual(orjson.loads(b"".join(reply.chunks))["model"], "claude-x@2025")
        bad = orjson.dumps({"model": "m", "max_tokens": 5, "messages": []})
        reply = answer(request(path, bad, [(b"authorization", b"Bearer t")]), {}, True, 1, 0)[1]
        self.assertEqual(reply.status, 400)
        self.assertEqual(
            orjson.loads(b"".join(reply.chunks))["error"]["status"], "INVALID_ARGUMENT"
        )
