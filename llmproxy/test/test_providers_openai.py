"""
Tests for L{llmproxy.providers.openai}.
"""

from __future__ import annotations

import orjson
from attrs import evolve
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.providers import Meter, RequestFacts
from llmproxy.providers.openai import OpenAIFormat
from llmproxy.usage import Usage

# ---------------------------------------------------------------------------
# Golden payloads.  Shaped after the OpenAI API reference (platform.openai.com
# /docs/api-reference: Chat Completions object and chunk object, Completions,
# Responses object and its streaming events, Embeddings), API as of 2025
# (gpt-4o / gpt-4.1 / o-series era: prompt_tokens_details, reasoning_tokens,
# obfuscation field on stream chunks, sequence_number on Responses events).
# Token counts are made up but consistent.

CHAT_JSON = b"""{
  "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
  "object": "chat.completion",
  "created": 1741570283,
  "model": "gpt-4o-2024-08-06",
  "choices": [
    {
      "index": 0,
      "message": {
        "role": "assistant",
        "content": "The image shows a wooden boardwalk extending through a lush green marshland.",
        "refusal": null,
        "annotations": []
      },
      "logprobs": null,
      "finish_reason": "stop"
    }
  ],
  "usage": {
    "prompt_tokens": 1117,
    "completion_tokens": 46,
    "total_tokens": 1163,
    "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
    "completion_tokens_details": {
      "reasoning_tokens": 0,
      "audio_tokens": 0,
      "accepted_prediction_tokens": 0,
      "rejected_prediction_tokens": 0
    }
  },
  "service_tier": "default",
  "system_fingerprint": "fp_fc9f1d7035"
}"""

CHAT_REASONING_JSON = b"""{
  "id": "chatcmpl-AyPNinnUqUDYo9SAdA52NobMflmj2",
  "object": "chat.completion",
  "created": 1738960610,
  "model": "o3-mini-2025-01-31",
  "choices": [
    {
      "index": 0,
      "message": {"role": "assistant", "content": "42", "refusal": null, "annotations": []},
      "finish_reason": "length"
    }
  ],
  "usage": {
    "prompt_tokens": 19,
    "completion_tokens": 2000,
    "total_tokens": 2019,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {
      "reasoning_tokens": 1984,
      "audio_tokens": 0,
      "accepted_prediction_tokens": 0,
      "rejected_prediction_tokens": 0
    }
  },
  "service_tier": "default",
  "system_fingerprint": "fp_ef58bd3122"
}"""

_HEAD = (
    b'{"id":"chatcmpl-BkTCpN7bJgk5QJjt6Rb2E6h2TFSE1","object":"chat.completion.chunk",'
    b'"created":1750347931,"model":"gpt-4o-mini-2024-07-18","service_tier":"default",'
    b'"system_fingerprint":"fp_34a54ae93c",'
)
CHAT_CHUNKS = [
    _HEAD + b'"choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},'
    b'"logprobs":null,"finish_reason":null}],"usage":null,"obfuscation":"mB4q"}',
    _HEAD + b'"choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,'
    b'"finish_reason":null}],"usage":null,"obfuscation":"x1"}',
    _HEAD + b'"choices":[{"index":0,"delta":{"content":" there!"},"logprobs":null,'
    b'"finish_reason":null}],"usage":null,"obfuscation":"Zk"}',
    _HEAD + b'"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],'
    b'"usage":null,"obfuscation":"9f"}',
]
CHAT_USAGE_CHUNK = (
    _HEAD + b'"choices":[],"usage":{"prompt_tokens":1056,"completion_tokens":3,"total_tokens":1059,'
    b'"prompt_tokens_details":{"cached_tokens":1024,"audio_tokens":0},'
    b'"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,'
    b'"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"obfuscation":"q"}'
)
CHAT_USAGE = Usage(
    model="gpt-4o-mini-2024-07-18",
    input_tokens=1056,
    output_tokens=3,
    cache_read_tokens=1024,
    finish_reason="stop",
    upstream_request_id="req_7e3f",
    reported=True,
)


def sse(*datas: bytes, ending: bytes = b"\n") -> bytes:
    return b"".join(b"data: " + data + ending + ending for data in datas)


CHAT_STREAM = sse(*CHAT_CHUNKS, CHAT_USAGE_CHUNK, b"[DONE]")
CHAT_STREAM_STRIPPED = sse(*CHAT_CHUNKS, b"[DONE]")

COMPLETION_JSON = b"""{
  "id": "cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7",
  "object": "text_completion",
  "created": 1589478378,
  "model": "gpt-3.5-turbo-instruct",
  "system_fingerprint": "fp_44709d6fcb",
  "choices": [
    {"text": "\\n\\nThis is indeed a test", "index": 0, "logprobs": null, "finish_reason": "length"}
  ],
  "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
}"""

COMPLETION_STREAM = sse(
    b'{"id":"cmpl-8mZ","object":"text_completion","created":1706790000,"choices":[{"text":"This",'
    b'"index":0,"logprobs":null,"finish_reason":null}],"model":"gpt-3.5-turbo-instruct",'
    b'"system_fingerprint":null,"usage":null}',
    b'{"id":"cmpl-8mZ","object":"text_completion","created":1706790000,"choices":[{"text":" is",'
    b'"index":0,"logprobs":null,"finish_reason":"length"}],"model":"gpt-3.5-turbo-instruct",'
    b'"system_fingerprint":null,"usage":null}',
    b'{"id":"cmpl-8mZ","object":"text_completion","created":1706790000,"choices":[],'
    b'"model":"gpt-3.5-turbo-instruct","system_fingerprint":null,'
    b'"usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}}',
    b"[DONE]",
)

RESPONSE_JSON = b"""{
  "id": "resp_67ccd3a9da748190baa7f1570fe91ac604becb25c45c1d41",
  "object": "response",
  "created_at": 1741476777,
  "status": "completed",
  "background": false,
  "error": null,
  "incomplete_details": null,
  "instructions": null,
  "max_output_tokens": null,
  "model": "o4-mini-2025-04-16",
  "output": [
    {"id": "rs_6876cf02e0bc8192b74af0fb64b715ff06fa2fcced15a5ac", "type": "reasoning",
     "summary": []},
    {
      "id": "msg_67ccd3acc8d48190a77525dc6de64b4104becb25c45c1d41",
      "type": "message",
      "status": "completed",
      "role": "assistant",
      "content": [{"type": "output_text", "text": "Under the violet sky...", "annotations": []}]
    }
  ],
  "parallel_tool_calls": true,
  "previous_response_id": null,
  "reasoning": {"effort": "medium", "summary": null},
  "store": true,
  "temperature": 1.0,
  "text": {"format": {"type": "text"}},
  "tool_choice": "auto",
  "tools": [],
  "top_p": 1.0,
  "truncation": "disabled",
  "usage": {
    "input_tokens": 1328,
    "input_tokens_details": {"cached_tokens": 1152},
    "output_tokens": 532,
    "output_tokens_details": {"reasoning_tokens": 448},
    "total_tokens": 1860
  },
  "user": null,
  "metadata": {}
}"""

_RESPONSE_OBJECT = (
    b'{"id":"resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654","object":"response",'
    b'"created_at":1741290958,"status":"%s","error":null,"incomplete_details":%s,'
    b'"instructions":"You are a helpful assistant.","max_output_tokens":64,'
    b'"model":"gpt-4.1-2025-04-14","output":%s,"parallel_tool_calls":true,'
    b'"previous_response_id":null,"reasoning":{"effort":null,"summary":null},"store":true,'
    b'"temperature":1.0,"text":{"format":{"type":"text"}},"tool_choice":"auto","tools":[],'
    b'"top_p":1.0,"truncation":"disabled","usage":%s,"user":null,"metadata":{}}'
)
_MESSAGE_ITEM = (
    b'[{"id":"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654","type":"message",'
    b'"status":"%s","role":"assistant","content":[{"type":"output_text",'
    b'"text":"Hi there! How can I assist you today?","annotations":[]}]}]'
)
_RESPONSE_USAGE = (
    b'{"input_tokens":37,"input_tokens_details":{"cached_tokens":0},"output_tokens":11,'
    b'"output_tokens_details":{"reasoning_tokens":0},"total_tokens":48}'
)


def responses_stream(final: bytes, status: bytes, details: bytes) -> bytes:
    """
    A Responses API stream ending in the event C{final}.
    """
    item = b'"item_id":"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654","output_index":0'
    events = [
        (
            b"response.created",
            b'{"type":"response.created","sequence_number":0,"response":'
            + _RESPONSE_OBJECT % (b"in_progress", b"null", b"[]", b"null")
            + b"}",
        ),
        (
            b"response.in_progress",
            b'{"type":"response.in_progress","sequence_number":1,"response":'
            + _RESPONSE_OBJECT % (b"in_progress", b"null", b"[]", b"null")
            + b"}",
        ),
        (
            b"response.output_item.added",
            b'{"type":"response.output_item.added","sequence_number":2,"output_index":0,'
            b'"item":{"id":"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654",'
            b'"type":"message","status":"in_progress","role":"assistant","content":[]}}',
        ),
        (
            b"response.content_part.added",
            b'{"type":"response.content_part.added","sequence_number":3,'
            + item
            + b',"content_index":0,"part":{"type":"output_text","text":"","annotations":[]}}',
        ),
        (
            b"response.output_text.delta",
            b'{"type":"response.output_text.delta","sequence_number":4,'
            + item
            + b',"content_index":0,"delta":"Hi there! How can I assist you today?",'
            b'"logprobs":[]}',
        ),
        (
            b"response.output_text.done",
            b'{"type":"response.output_text.done","sequence_number":5,'
            + item
            + b',"content_index":0,"text":"Hi there! How can I assist you today?",'
            b'"logprobs":[]}',
        ),
        (
            final,
            b'{"type":"'
            + final
            + b'","sequence_number":6,"response":'
            + _RESPONSE_OBJECT % (status, details, _MESSAGE_ITEM % status, _RESPONSE_USAGE)
            + b"}",
        ),
    ]
    return b"".join(b"event: " + name + b"\ndata: " + data + b"\n\n" for name, data in events)


RESPONSES_STREAM = responses_stream(b"response.completed", b"completed", b"null")
RESPONSES_INCOMPLETE_STREAM = responses_stream(
    b"response.incomplete", b"incomplete", b'{"reason":"max_output_tokens"}'
)

EMBEDDINGS_JSON = b"""{
  "object": "list",
  "data": [
    {"object": "embedding", "index": 0, "embedding": [0.0023064255, -0.009327292, -0.0028842222]}
  ],
  "model": "text-embedding-3-small",
  "usage": {"prompt_tokens": 8, "total_tokens": 8}
}"""

ERROR_JSON = b"""{
  "error": {
    "message": "Incorrect API key provided: sk-abc. You can find your API key at https://platform.openai.com/account/api-keys.",
    "type": "invalid_request_error",
    "param": null,
    "code": "invalid_api_key"
  }
}"""

# ---------------------------------------------------------------------------

FORMAT = OpenAIFormat()
HEADERS = {"x-request-id": "req_7e3f", "content-type": "application/json"}


def request(path: bytes, body: object, method: bytes = b"POST") -> RequestFacts:
    return FORMAT.inspect(method, path, b"", orjson.dumps(body)).facts


def meter_for(info: RequestFacts, content_type: bytes | None, strip: bool = False) -> Meter:
    return FORMAT.new_meter(info, content_type, HEADERS, strip)


def run(meter: Meter, body: bytes, size: int) -> bytes:
    """
    Feed C{body} in pieces of C{size} bytes, then finish; the bytes the
    client got.
    """
    out = b"".join(meter.feed(body[i : i + size]) for i in range(0, len(body), size))
    return out + meter.finish()


CHAT = request(b"/v1/chat/completions", {"model": "gpt-4o", "messages": [], "stream": True})
PLAIN_CHAT = request(b"/v1/chat/completions", {"model": "gpt-4o", "messages": []})


class InspectTests(SynchronousTestCase):
    """
    L{OpenAIFormat.inspect}.
    """

    def test_chat(self) -> None:
        body = {
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "user": "u-1",
        }
        info = request(b"/v1/chat/completions", body)
        self.assertEqual(
            info,
            RequestFacts(
                method="POST",
                endpoint="chat.completions",
                model="gpt-4o",
                streaming=True,
                user="u-1",
                prompt_chars=2,
            ),
        )

    def test_endpoints(self) -> None:
        cases = [
            (b"POST", b"/v1/chat/completions", "chat.completions"),
            (b"POST", b"/v1/chat/completions/", "chat.completions"),
            (b"POST", b"/v1/completions", "completions"),
            (b"POST", b"/v1/responses", "responses"),
            (b"POST", b"/v1/embeddings", "embeddings"),
            (b"GET", b"/v1/models", "models"),
            (b"GET", b"/v1/models/gpt-4o", "models"),
            (b"GET", b"/v1/responses/resp_1", "other"),
            (b"GET", b"/v1/chat/completions", "other"),
            (b"POST", b"/v1/responses/input_tokens", "other"),
            (b"POST", b"/v1/audio/transcriptions", "other"),
            (b"POST", b"/openai/deployments/prod/chat/completions", "chat.completions"),
            (b"post", b"/v1/chat%2Fcompletions", "chat.completions"),
            (b"POST", b"", "other"),
        ]
        for method, path, endpoint in cases:
            info = FORMAT.inspect(method, path, b"", b"").facts
            self.assertEqual(info.endpoint, endpoint, path)

    def test_userFallback(self) -> None:
        """
        C{safety_identifier} names the user when C{user} does not.
        """
        info = request(b"/v1/responses", {"model": "m", "safety_identifier": "hash-9"})
        self.assertEqual(info.user, "hash-9")

    def test_maxOutputTokens(self) -> None:
        """
        The request's own cap on output, whichever field names it (the
        newer C{max_completion_tokens} first).
        """
        for body, expected in (
            ({"max_tokens": 10}, 10),
            ({"max_completion_tokens": 20, "max_tokens": 10}, 20),
            ({"max_output_tokens": 30}, 30),
            ({"max_tokens": "many"}, None),
            ({}, None),
        ):
            facts = request(b"/v1/chat/completions", {"model": "gpt-4o", **body})
            self.assertEqual(facts.max_output_tokens, expected, body)

    def test_azureDeployment(self) -> None:
        info = request(b"/openai/deployments/gpt4o-prod/chat/completions", {"messages": []})
        self.assertEqual(info.model, "gpt4o-prod")

    def test_garbage(self) -> None:
        """
        Odd bodies and paths are not errors.
        """
        for body in (b"", b"\xff\xfe", b"[1, 2]", b'{"model": 5, "stream": "true"}', b"{"):
            info = FORMAT.inspect(b"POST", b"/v1/chat/completions", b"", body).facts
            self.assertEqual((info.model, info.streaming, info.user), (None, False, None))
        info = FORMAT.inspect(b"\xff", b"/%zz/\xff", b"\x00", b"\x00").facts
        self.assertEqual(info.endpoint, "other")


class RewriteTests(SynchronousTestCase):
    """
    L{OpenAIFormat.inspect} asks streams for usage.
    """

    def rewrite(
        self,
        body: dict[str, object],
        inject: bool = True,
        path: bytes = b"/v1/chat/completions",
    ) -> tuple[object, bool]:
        raw = orjson.dumps(body)
        inspection = FORMAT.inspect(b"POST", path, b"", raw, inject_stream_usage=inject)
        new = inspection.body
        return (orjson.loads(new) if new != raw else new), inspection.strip_usage_chunk

    def test_inject(self) -> None:
        body = {"model": "m", "messages": [], "stream": True}
        self.assertEqual(
            self.rewrite(body),
            ({**body, "stream_options": {"include_usage": True}}, True),
        )

    def test_keepOtherOptions(self) -> None:
        body = {"model": "m", "stream": True, "stream_options": {"include_obfuscation": False}}
        new, strip = self.rewrite(body)
        self.assertEqual(
            new,
            {
                "model": "m",
                "stream": True,
                "stream_options": {"include_obfuscation": False, "include_usage": True},
            },
        )
        self.assertTrue(strip)

    def test_explicitFalse(self) -> None:
        """
        A client that said C{include_usage: false} is still metered.
        """
        body = {"model": "m", "stream": True, "stream_options": {"include_usage": False}}
        self.assertEqual(self.rewrite(body)[1], True)

    def test_unchanged(self) -> None:
        """
        Requests that already ask for usage, non-streaming ones, disabled
        injection, other endpoints and odd bodies go out as they came.
        """
        asked = {"model": "m", "stream": True, "stream_options": {"include_usage": True}}
        for body in (
            asked,
            {"model": "m", "stream": False},
            {"model": "m", "stream": True, "stream_options": "yes"},
        ):
            raw = orjson.dumps(body)
            self.assertEqual(self.rewrite(body), (raw, False))
        raw = orjson.dumps({"model": "m", "stream": True})
        self.assertEqual(self.rewrite({"model": "m", "stream": True}, inject=False), (raw, False))
        self.assertEqual(
            self.rewrite({"model": "m", "stream": True}, path=b"/v1/responses"), (raw, False)
        )

    def test_completions(self) -> None:
        body = {"model": "gpt-3.5-turbo-instruct", "prompt": "x", "stream": True}
        new, strip = self.rewrite(body, path=b"/v1/completions")
        self.assertTrue(strip)
        assert isinstance(new, dict)
        self.assertEqual(new["stream_options"], {"include_usage": True})


class JSONMeterTests(SynchronousTestCase):
    """
    Non-streaming bodies, every endpoint.
    """

    def check(self, info: RequestFacts, body: bytes, expected: Usage) -> None:
        for size in (1, 7, len(body)):
            meter = meter_for(info, b"application/json")
            self.assertEqual(run(meter, body, size), body)
            self.assertEqual(meter.usage(), expected)

    def test_chat(self) -> None:
        self.check(
            PLAIN_CHAT,
            CHAT_JSON,
            Usage(
                model="gpt-4o-2024-08-06",
                input_tokens=1117,
                output_tokens=46,
                cache_read_tokens=1024,
                finish_reason="stop",
                upstream_request_id="req_7e3f",
                reported=True,
            ),
        )

    def test_chatReasoning(self) -> None:
        self.check(
            PLAIN_CHAT,
            CHAT_REASONING_JSON,
            Usage(
                model="o3-mini-2025-01-31",
                input_tokens=19,
                output_tokens=2000,
                reasoning_tokens=1984,
                finish_reason="length",
                upstream_request_id="req_7e3f",
                reported=True,
            ),
        )

    def test_completion(self) -> None:
        info = request(b"/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "x"})
        self.check(
            info,
            COMPLETION_JSON,
            Usage(
                model="gpt-3.5-turbo-instruct",
                input_tokens=5,
                output_tokens=7,
                finish_reason="length",
                upstream_request_id="req_7e3f",
                reported=True,
            ),
        )

    def test_response(self) -> None:
        info = request(b"/v1/responses", {"model": "o4-mini", "input": "x"})
        self.check(
            info,
            RESPONSE_JSON,
            Usage(
                model="o4-mini-2025-04-16",
                input_tokens=1328,
                output_tokens=532,
                cache_read_tokens=1152,
                reasoning_tokens=448,
                finish_reason="completed",
                upstream_request_id="req_7e3f",
                reported=True,
            ),
        )

    def test_embeddings(self) -> None:
        info = request(b"/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"})
        self.check(
            info,
            EMBEDDINGS_JSON,
            Usage(
                model="text-embedding-3-small",
                input_tokens=8,
                upstream_request_id="req_7e3f",
                reported=True,
            ),
        )

    def test_hugeEmbeddings(self) -> None:
        """
        A 3 MB embeddings body is metered from its tail.
        """
        body = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": [-0.0123456789] * 1536}
                    for i in range(128)
                ],
                "model": "text-embedding-3-large",
                "usage": {"prompt_tokens": 4096, "total_tokens": 4096},
            }
        )
        self.assertGreater(len(body), 2 << 20)
        info = request(b"/v1/embeddings", {"model": "text-embedding-3-large", "input": ["x"]})
        meter = meter_for(info, b"application/json")
        run(meter, body, 16384)
        self.assertEqual(
            meter.usage(),
            Usage(
                model="text-embedding-3-large",
                input_tokens=4096,
                upstream_request_id="req_7e3f",
                reported=True,
            ),
        )

    def test_error(self) -> None:
        """
        An error body reports nothing but the request's model.
        """
        self.check(
            PLAIN_CHAT,
            ERROR_JSON,
            Usage(model="gpt-4o", upstream_request_id="req_7e3f"),
        )

    def test_get(self) -> None:
        """
        Re-reading a stored response is not usage.
        """
        info = FORMAT.inspect(b"GET", b"/v1/responses/resp_1", b"", b"").facts
        meter = meter_for(info, b"application/json")
        run(meter, RESPONSE_JSON, 100)
        self.assertFalse(meter.usage().reported)

    def test_otherMedia(self) -> None:
        """
        Audio and other media pass through unread.
        """
        info = request(b"/v1/audio/speech", {"model": "tts-1", "input": "hi"})
        meter = meter_for(info, b"audio/mpeg")
        data = b"\xff\xfb\x90\x00" * 100
        self.assertIs(meter.feed(data), data)
        self.assertEqual(meter.usage(), Usage(model="tts-1", upstream_request_id="req_7e3f"))

    def test_bodyIdFallback(self) -> None:
        """
        Without an C{x-request-id} header, the body's id stands in.
        """
        meter = FORMAT.new_meter(PLAIN_CHAT, b"application/json", {}, False)
        run(meter, CHAT_JSON, 100)
        self.assertEqual(
            meter.usage().upstream_request_id, "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG"
        )


class ChatStreamTests(SynchronousTestCase):
    """
    Chat Completions and Completions streams.
    """

    def test_observe(self) -> None:
        """
        Without stripping, every chunk is returned as it came (the same
        object) and the usage chunk is read.
        """
        meter = meter_for(CHAT, b"text/event-stream; charset=utf-8")
        for i in range(0, len(CHAT_STREAM), 50):
            chunk = CHAT_STREAM[i : i + 50]
            self.assertIs(meter.feed(chunk), chunk)
        self.assertEqual(meter.finish(), b"")
        self.assertEqual(meter.usage(), CHAT_USAGE)

    def test_strip(self) -> None:
        """
        Stripping removes exactly the usage-only event, whatever the chunk
        size, and still reads it.
        """
        for size in (1, 2, 3, 50, 333, len(CHAT_STREAM)):
            meter = meter_for(CHAT, b"text/event-stream", strip=True)
            self.assertEqual(run(meter, CHAT_STREAM, size), CHAT_STREAM_STRIPPED)
            self.assertEqual(meter.usage(), CHAT_USAGE)

    def test_stripWholeEvents(self) -> None:
        """
        When upstream chunks are whole events, each chunk that is not the
        usage chunk is passed on at once, as the same object.
        """
        meter = meter_for(CHAT, b"text/event-stream", strip=True)
        for data in CHAT_CHUNKS:
            chunk = sse(data)
            self.assertIs(meter.feed(chunk), chunk)
        self.assertEqual(meter.feed(sse(CHAT_USAGE_CHUNK)), b"")
        self.assertEqual(meter.feed(sse(b"[DONE]")), sse(b"[DONE]"))

    def test_stripCRLF(self) -> None:
        """
        With CR LF or CR line endings the event's whole terminator goes too,
        even when split from it.
        """
        for ending in (b"\r\n", b"\r"):
            stream = sse(*CHAT_CHUNKS, CHAT_USAGE_CHUNK, b"[DONE]", ending=ending)
            expected = sse(*CHAT_CHUNKS, b"[DONE]", ending=ending)
            for size in (1, 2, 7, len(stream)):
                meter = meter_for(CHAT, b"text/event-stream", strip=True)
                self.assertEqual(run(meter, stream, size), expected)

    def test_stripOnlyUsageOnly(self) -> None:
        """
        A chunk with a usage object and choices is not removed, and neither
        is a second usage-only chunk.
        """
        with_choices = CHAT_USAGE_CHUNK.replace(b'"choices":[]', b'"choices":[{"index":0}]')
        stream = sse(with_choices, CHAT_USAGE_CHUNK, CHAT_USAGE_CHUNK)
        meter = meter_for(CHAT, b"text/event-stream", strip=True)
        self.assertEqual(run(meter, stream, 64), sse(with_choices, CHAT_USAGE_CHUNK))

    def test_azurePromptFilterChunk(self) -> None:
        """
        Azure's first chunk (empty choices, no usage, empty model) is kept
        and does not hide the model of later chunks.
        """
        azure = (
            b'{"choices":[],"created":0,"id":"","model":"","object":"",'
            b'"prompt_filter_results":[{"prompt_index":0,"content_filter_results":{}}]}'
        )
        stream = sse(azure, *CHAT_CHUNKS, CHAT_USAGE_CHUNK, b"[DONE]")
        meter = meter_for(CHAT, b"text/event-stream", strip=True)
        self.assertEqual(run(meter, stream, 100), sse(azure, *CHAT_CHUNKS, b"[DONE]"))
        self.assertEqual(meter.usage(), CHAT_USAGE)

    def test_noUsage(self) -> None:
        """
        A stream without usage (a server that ignores C{stream_options})
        reports the model and finish reason, unreported tokens, and loses
        no bytes.
        """
        stream = sse(*CHAT_CHUNKS, b"[DONE]")
        meter = meter_for(CHAT, b"text/event-stream", strip=True)
        self.assertEqual(run(meter, stream, 10), stream)
        self.assertEqual(
            meter.usage(),
            Usage(
                model="gpt-4o-mini-2024-07-18",
                finish_reason="stop",
                upstream_request_id="req_7e3f",
            ),
        )

    def test_partial(self) -> None:
        """
        Cut mid-stream: what was seen is known, and the held bytes come out
        at the end.
        """
        cut = len(sse(*CHAT_CHUNKS[:2])) + 20
        meter = meter_for(CHAT, b"text/event-stream", strip=True)
        out = meter.feed(CHAT_STREAM[:cut])
        self.assertEqual(out, sse(*CHAT_CHUNKS[:2]))
        self.assertEqual(
            meter.usage(),
            Usage(model="gpt-4o-mini-2024-07-18", upstream_request_id="req_7e3f"),
        )
        self.assertEqual(meter.finish(), CHAT_STREAM[len(out) : cut])

    def test_completionsStream(self) -> None:
        info = request(b"/v1/completions", {"model": "gpt-3.5-turbo-instruct", "stream": True})
        meter = meter_for(info, b"text/event-stream", strip=True)
        out = run(meter, COMPLETION_STREAM, 40)
        self.assertNotIn(b'"usage":{', out)
        self.assertEqual(
            meter.usage(),
            Usage(
                model="gpt-3.5-turbo-instruct",
                input_tokens=4,
                output_tokens=2,
                finish_reason="length",
                upstream_request_id="req_7e3f",
                reported=True,
            ),
        )

    def test_oversizedChunk(self) -> None:
        """
        A chunk over the parser's bound is passed on whole, and usage at its
        end is still read.
        """
        huge = (
            _HEAD
            + b'"choices":[{"index":0,"delta":{"content":"'
            + b"a" * (2 << 20)
            + b'"},"finish_reason":"stop"}],"usage":{"prompt_tokens":7,"completion_tokens":9}}'
        )
        stream = sse(huge, b"[DONE]")
        meter = meter_for(CHAT, b"text/event-stream", strip=True)
        self.assertEqual(run(meter, stream, 65536), stream)
        usage = meter.usage()
        self.assertEqual((usage.input_tokens, usage.output_tokens), (7, 9))


class ResponsesStreamTests(SynchronousTestCase):
    """
    Responses API streams.
    """

    info = request(b"/v1/responses", {"model": "gpt-4.1", "input": "hi", "stream": True})

    def test_completed(self) -> None:
        for size in (1, 100, len(RESPONSES_STREAM)):
            meter = meter_for(self.info, b"text/event-stream")
            self.assertEqual(run(meter, RESPONSES_STREAM, size), RESPONSES_STREAM)
            self.assertEqual(
                meter.usage(),
                Usage(
                    model="gpt-4.1-2025-04-14",
                    input_tokens=37,
                    output_tokens=11,
                    finish_reason="completed",
                    upstream_request_id="req_7e3f",
                    reported=True,
                ),
            )

    def test_incomplete(self) -> None:
        meter = meter_for(self.info, b"text/event-stream")
        run(meter, RESPONSES_INCOMPLETE_STREAM, 1000)
        usage = meter.usage()
        self.assertEqual((usage.finish_reason, usage.output_tokens), ("incomplete", 11))

    def test_partial(self) -> None:
        """
        Cut before the final event: the model is known from
        C{response.created}, tokens are not.
        """
        meter = meter_for(self.info, b"text/event-stream")
        meter.feed(RESPONSES_STREAM[: len(RESPONSES_STREAM) // 2])
        self.assertEqual(
            meter.usage(),
            Usage(
                model="gpt-4.1-2025-04-14",
                upstream_request_id="req_7e3f",
            ),
        )

    def test_withoutEventNames(self) -> None:
        """
        A compatible server that omits C{event:} lines is read by the
        C{type} in the data.
        """
        stream = b"".join(
            line + b"\n" for line in RESPONSES_STREAM.split(b"\n") if not line.startswith(b"event:")
        )
        meter = meter_for(self.info, b"text/event-stream")
        run(meter, stream, 512)
        self.assertEqual(meter.usage().input_tokens, 37)


class ErrorShapeTests(SynchronousTestCase):
    """
    Errors the proxy makes, in OpenAI's shape.
    """

    def test_errorBody(self) -> None:
        cases = {
            400: ("invalid_request_error", None),
            404: ("invalid_request_error", "not_found"),
            413: ("invalid_request_error", "request_too_large"),
            429: ("rate_limit_error", "rate_limit_exceeded"),
            502: ("server_error", "bad_gateway"),
            503: ("server_error", "service_unavailable"),
            504: ("server_error", "timeout"),
            418: ("invalid_request_error", None),
            599: ("server_error", None),
        }
        for status, (kind, code) in cases.items():
            body = orjson.loads(FORMAT.error_body(status, "nope"))
            self.assertEqual(
                body, {"error": {"message": "nope", "type": kind, "param": None, "code": code}}
            )

    def test_sseErrorEvent(self) -> None:
        event = FORMAT.sse_error_event(504, "upstream idle")
        self.assertTrue(event.startswith(b"event: error\ndata: {"))
        self.assertTrue(event.endswith(b"}\n\n"))
        self.assertNotIn(b"[DONE]", event)
        body = orjson.loads(event[len(b"event: error\ndata: ") :])
        self.assertEqual(body["error"]["message"], "upstream idle")


class PromptTextTests(SynchronousTestCase):
    """
    L{OpenAIFormat.prompt_text_chars}.
    """

    def test_chat(self) -> None:
        info = request(
            b"/v1/chat/completions",
            {
                "model": "gpt-4o",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is this?"},
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
                        ],
                    },
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "f", "arguments": '{"a":1}'},
                            }
                        ],
                    },
                ],
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            },
        )
        self.assertEqual(info.prompt_chars, 9 + 13 + 1 + 7 + (8 + 4 + 1 + 10))

    def test_other(self) -> None:
        info = request(b"/v1/responses", {"model": "m", "input": "abc", "instructions": "de"})
        self.assertEqual(info.prompt_chars, 5)
        info = request(b"/v1/embeddings", {"model": "m", "input": ["ab", "c"]})
        self.assertEqual(info.prompt_chars, 3)
        info = request(b"/v1/completions", {"model": "m", "prompt": "abcd"})
        self.assertEqual(info.prompt_chars, 4)

    def test_notJSON(self) -> None:
        info = FORMAT.inspect(b"POST", b"/v1/audio/transcriptions", b"", b"--x\r\n").facts
        self.assertIsNone(info.prompt_chars)
        info = FORMAT.inspect(b"POST", b"/v1/chat/completions", b"", b"[1]").facts
        self.assertEqual(info.prompt_chars, 0)


# The stripping property: any stream of chat chunks with one usage-only
# chunk somewhere, any line ending, any split.
_chunks = st.lists(st.sampled_from(CHAT_CHUNKS), max_size=6)


@st.composite
def stripping_cases(draw: st.DrawFn) -> tuple[bytes, bytes, list[int]]:
    before = draw(_chunks)
    after = draw(_chunks)
    ending = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    comment = draw(st.sampled_from([b"", b": keep-alive" + ending + ending]))
    stream = (
        sse(*before, ending=ending)
        + comment
        + sse(CHAT_USAGE_CHUNK, ending=ending)
        + sse(*after, b"[DONE]", ending=ending)
    )
    expected = sse(*before, ending=ending) + comment + sse(*after, b"[DONE]", ending=ending)
    cuts = draw(st.lists(st.integers(0, len(stream)), max_size=10))
    return stream, expected, sorted(cuts)


class StrippingPropertyTests(SynchronousTestCase):
    """
    Whatever the chunking, the client gets the upstream bytes less exactly
    the usage-only event.
    """

    @settings(max_examples=300, deadline=None)
    @given(stripping_cases())
    def test_anySplit(self, case: tuple[bytes, bytes, list[int]]) -> None:
        stream, expected, cuts = case
        meter = meter_for(CHAT, b"text/event-stream", strip=True)
        out = b""
        last = 0
        for cut in [*cuts, len(stream)]:
            out += meter.feed(stream[last:cut])
            last = cut
        out += meter.finish()
        self.assertEqual(out, expected)
        finish = "stop" if CHAT_CHUNKS[3] in stream else None
        self.assertEqual(meter.usage(), evolve(CHAT_USAGE, finish_reason=finish))


class CompatibleServerTests(SynchronousTestCase):
    """
    OpenAI-compatible servers' own ways of reporting usage.
    """

    def test_groq(self) -> None:
        """
        Groq's final chunk carries usage under C{x_groq}.
        """
        final = (
            b'{"id":"chatcmpl-0b1d","object":"chat.completion.chunk","created":1736000000,'
            b'"model":"llama-3.1-8b-instant","system_fingerprint":"fp_9cb648b966",'
            b'"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],'
            b'"x_groq":{"id":"req_01jh","usage":{"queue_time":0.017,"prompt_tokens":40,'
            b'"prompt_time":0.002,"completion_tokens":10,"completion_time":0.013,'
            b'"total_tokens":50,"total_time":0.015}}}'
        )
        stream = sse(final, b"[DONE]")
        meter = FORMAT.new_meter(CHAT, b"text/event-stream", {}, True)
        self.assertEqual(run(meter, stream, 100), stream)
        self.assertEqual(
            meter.usage(),
            Usage(
                model="llama-3.1-8b-instant",
                input_tokens=40,
                output_tokens=10,
                finish_reason="stop",
                upstream_request_id="chatcmpl-0b1d",
                reported=True,
            ),
        )
