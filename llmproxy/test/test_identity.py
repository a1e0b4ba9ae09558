"""
Tests for L{llmproxy.identity}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from llmproxy.identity import credential, key_id, user_id


class CredentialTests(SynchronousTestCase):
    def test_sources_in_order(self) -> None:
        self.assertEqual(credential(Headers({b"Authorization": [b"Bearer sk-1"]}), b""), b"sk-1")
        self.assertEqual(credential(Headers({b"x-api-key": [b"ant-2"]}), b""), b"ant-2")
        self.assertEqual(credential(Headers({b"x-goog-api-key": [b"g-3"]}), b""), b"g-3")
        self.assertEqual(credential(Headers(), b"alt=sse&key=g-4"), b"g-4")
        both = Headers({b"Authorization": [b"Bearer first"], b"x-api-key": [b"second"]})
        self.assertEqual(credential(both, b"key=third"), b"first")

    def test_cloud_credentials(self) -> None:
        """
        Azure's C{api-key} header is a credential; a SigV4-signed request is
        known by its access key id, never by its signature.
        """
        self.assertEqual(credential(Headers({b"api-key": [b"az-5"]}), b""), b"az-5")
        signed = Headers(
            {
                b"Authorization": [
                    b"AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20250101/us-east-1/bedrock/"
                    b"aws4_request, SignedHeaders=host;x-amz-date, Signature=abcdef0123"
                ]
            }
        )
        self.assertEqual(credential(signed, b""), b"AKIDEXAMPLE")
        bad = Headers({b"Authorization": [b"AWS4-HMAC-SHA256 Signature=abc"]})
        self.assertIsNone(credential(bad, b""))

    def test_none(self) -> None:
        self.assertIsNone(credential(Headers({b"Authorization": [b"Basic abc"]}), b"keyx=1"))
        self.assertIsNone(credential(Headers({b"Authorization": [b"Bearer   "]}), b""))


class KeyIdTests(SynchronousTestCase):
    def test_stable_short_and_one_way(self) -> None:
        kid = key_id(b"sk-secret-value")
        self.assertEqual(kid, key_id(b"sk-secret-value"))
        self.assertEqual(len(kid or ""), 16)
        self.assertNotIn("secret", kid or "")
        self.assertNotEqual(kid, key_id(b"sk-secret-valuf"))
        self.assertIsNone(key_id(None))


class UserIdTests(SynchronousTestCase):
    def test_priority(self) -> None:
        headers = Headers({b"X-User-ID": [b"header-user"]})
        self.assertEqual(user_id("meta-user", headers, "body-user"), "meta-user")
        self.assertEqual(user_id(None, headers, "body-user"), "header-user")
        self.assertEqual(user_id(None, Headers(), "body-user"), "body-user")
        self.assertIsNone(user_id(None, Headers(), None))
