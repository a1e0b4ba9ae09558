"""
Tests for L{llmproxy.senturl}: treq sends the URL the proxy built, byte for
byte, without encoding it again.
"""

from __future__ import annotations

from typing import Any

from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IAgent
from zope.interface import implementer

from llmproxy import senturl
from llmproxy.senturl import SentURL, for_treq


@implementer(IAgent)
class RecordingAgent:
    """Remembers the URI it is asked for; never answers."""

    def __init__(self) -> None:
        self.uris: list[bytes] = []

    def request(
        self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None
    ) -> Deferred[Any]:
        self.uris.append(uri)
        return Deferred()


class ForTreqTests(SynchronousTestCase):
    def sent(self, url: bytes) -> bytes:
        agent = RecordingAgent()
        HTTPClient(agent).request("POST", for_treq(url), unbuffered=True, allow_redirects=False)
        [uri] = agent.uris
        return uri

    def test_sent_as_built(self) -> None:
        """
        Percent-encoded paths and queries, C{:} and C{@} in segments, a
        port: all reach the agent exactly as given.
        """
        for url in (
            b"http://127.0.0.1:8080/v1/chat/completions",
            b"https://api.example.com/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse&key=k",
            b"http://h/openai/deployments/a%2Fb/chat?api-version=2024-10-21&x=%E2%82%AC",
            b"http://h/v1/files/file-abc/content?q=a+b&empty=&flag",
        ):
            self.assertIsInstance(for_treq(url), SentURL)
            self.assertEqual(self.sent(url), url)

    def test_fields_are_the_texts(self) -> None:
        """
        Whatever else reads the URL sees the same parts treq's own parse
        would give.
        """
        url = for_treq(b"https://api.example.com:8443/v1/x?a=1")
        assert isinstance(url, SentURL)
        self.assertEqual((url.scheme, url.host, url.port), ("https", "api.example.com", 8443))
        self.assertEqual(url.path, ("v1", "x"))
        self.assertEqual(url.query, (("a", "1"),))

    def test_other_bytes_left_to_treq(self) -> None:
        """
        A URL with a character a URI does not allow (a space, a quote, a
        brace, a control character, a byte above ASCII) is not short-cut:
        treq encodes it as it always did.
        """
        for url in (
            b"http://h/a b",
            b'http://h/a"b',
            b"http://h/x?b=<>|{}",
            b"http://h/a\x01",
            b"http://h/caf\xc3\xa9",
        ):
            self.assertIs(for_treq(url), url)
        self.assertEqual(self.sent(b"http://h/a b"), b"http://h/a%20b")
        self.assertEqual(self.sent(b'http://h/a"b'), b"http://h/a%22b")

    def test_parsed_once_and_bounded(self) -> None:
        """
        A URL sent again is the URL parsed the first time; one with a
        credential in its query is parsed each time and never kept; the
        store holds at most L{senturl.KEPT} URLs.
        """
        url = b"http://127.0.0.1:8080/v1/chat/completions"
        self.assertIs(for_treq(url), for_treq(url))
        keyed = b"https://h/v1beta/models/m:generateContent?key=secret"
        self.assertIsNot(for_treq(keyed), for_treq(keyed))
        self.assertNotIn(keyed, senturl._kept)
        for n in range(senturl.KEPT * 2):
            for_treq(b"http://h/v1/files/%d" % n)
            self.assertLessEqual(len(senturl._kept), senturl.KEPT)
        self.assertEqual(self.sent(b"http://h/v1/files/7"), b"http://h/v1/files/7")
