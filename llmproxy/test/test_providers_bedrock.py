"""
Tests for L{llmproxy.providers.bedrock}.
"""

from __future__ import annotations

import base64
import random
from typing import Any

import orjson
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.eventstream import EventStreamDecoder, event_frame
from llmproxy.providers import Meter, RequestFacts
from llmproxy.providers.bedrock import BedrockFormat, EventStreamMeter, model_id
from llmproxy.usage import Usage

EVENT_STREAM = b"application/vnd.amazon.eventstream"
MODEL = "us.anthropic.claude-sonnet-4-20250514-v1:0"

# Golden payloads shaped after the Bedrock Runtime API reference (Converse,
# ConverseStream, InvokeModel, InvokeModelWithResponseStream, 2025): the
# random "p" padding field Bedrock adds to stream events included.  Token
# counts are made up but consistent.
CONVERSE_JSON = orjson.dumps(
    {
        "output": {"message": {"role": "assistant", "content": [{"text": "Hello there."}]}},
        "stopReason": "end_turn",
        "usage": {
            "inputTokens": 12,
            "outputTokens": 40,
            "totalTokens": 1852,
            "cacheReadInputTokens": 1500,
            "cacheWriteInputTokens": 300,
        },
        "metrics": {"latencyMs": 812},
    }
)
CONVERSE_USAGE = Usage(
    model=MODEL,
    input_tokens=12 + 1500 + 300,
    output_tokens=40,
    cache_read_tokens=1500,
    cache_write_tokens=300,
    finish_reason="end_turn",
    upstream_request_id="6c8d1c1e-0b7e-4f4e-9d1f-0a4c8a2b7e11",
    reported=True,
)
HEADERS = {"x-amzn-requestid": "6c8d1c1e-0b7e-4f4e-9d1f-0a4c8a2b7e11"}


def converse_stream() -> bytes:
    return b"".join(
        [
            event_frame("messageStart", b'{"p":"abcdefgh","role":"assistant"}'),
            event_frame("contentBlockDelta", b'{"contentBlockIndex":0,"delta":{"text":"Hi"}}'),
            event_frame("contentBlockStop", b'{"contentBlockIndex":0,"p":"abc"}'),
            event_frame("messageStop", b'{"p":"abcdefghijkl","stopReason":"max_tokens"}'),
            event_frame(
                "metadata",
                b'{"metrics":{"latencyMs":411},"p":"ab","usage":{"inputTokens":25,'
                b'"outputTokens":7,"totalTokens":32}}',
            ),
        ]
    )


def chunk(event: dict[str, Any]) -> bytes:
    encoded = base64.b64encode(orjson.dumps(event))
    return event_frame("chunk", b'{"bytes":"' + encoded + b'","p":"abcd"}')


def invoke_anthropic_stream() -> bytes:
    return b"".join(
        [
            chunk(
                {
                    "type": "message_start",
                    "message": {
                        "id": "msg_bdrk_01",
                        "type": "message",
                        "role": "assistant",
                        "model": "claude-sonnet-4-20250514",
                        "content": [],
                        "usage": {
                            "input_tokens": 20,
                            "cache_read_input_tokens": 100,
                            "cache_creation_input_tokens": 0,
                            "output_tokens": 1,
                        },
                    },
                }
            ),
            chunk({"type": "content_block_start", "index": 0, "content_block": {"type": "text"}}),
            chunk(
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": "Hi"},
                }
            ),
            chunk({"type": "content_block_stop", "index": 0}),
            chunk(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn"},
                    "usage": {"output_tokens": 9},
                }
            ),
            chunk(
                {
                    "type": "message_stop",
                    "amazon-bedrock-invocationMetrics": {
                        "inputTokenCount": 20,
                        "outputTokenCount": 9,
                        "invocationLatency": 500,
                        "firstByteLatency": 300,
                    },
                }
            ),
        ]
    )


def feed_split(meter: Meter, data: bytes, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    out = bytearray()
    at = 0
    while at < len(data):
        size = rng.randint(1, 90)
        out += meter.feed(data[at : at + size])
        at += size
    out += meter.finish()
    return bytes(out)


class DescribeTests(SynchronousTestCase):
    fmt = BedrockFormat()

    def facts(self, method: bytes, path: bytes, body: bytes = b"{}") -> RequestFacts:
        return self.fmt.inspect(method, path, b"", body).facts

    def test_paths(self) -> None:
        cases = {
            b"/model/amazon.nova-pro-v1%3A0/converse": ("converse", False),
            b"/model/" + MODEL.encode() + b"/converse-stream": ("converse_stream", True),
            b"/model/anthropic.claude-3-haiku-20240307-v1%3A0/invoke": ("invoke", False),
            b"/model/x/invoke-with-response-stream": ("invoke_stream", True),
            b"/model/x/count-tokens": ("count_tokens", False),
            b"/guardrail/g1/version/1/apply": ("other", False),
        }
        for path, (endpoint, streaming) in cases.items():
            facts = self.facts(b"POST", path)
            self.assertEqual((facts.endpoint, facts.streaming), (endpoint, streaming), path)
        self.assertEqual(
            self.facts(b"POST", b"/model/amazon.nova-pro-v1%3A0/converse").model,
            "amazon.nova-pro-v1:0",
        )

    def test_arn(self) -> None:
        """
        A percent-encoded ARN names its model whole; foundation models and
        system inference profiles are read as the id they end in.
        """
        profile = b"arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2F"
        facts = self.facts(b"POST", b"/model/" + profile + MODEL.encode() + b"/converse")
        self.assertEqual(facts.model, MODEL)
        own = "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/a1b2c3"
        self.assertEqual(model_id(own), own)
        self.assertEqual(
            model_id("arn:aws:bedrock:us-east-1::foundation-model/amazon.titan-text-lite-v1"),
            "amazon.titan-text-lite-v1",
        )

    def test_get(self) -> None:
        facts = self.facts(b"GET", b"/model/x/converse", b"")
        self.assertEqual(facts.endpoint, "other")

    def test_prompt_chars(self) -> None:
        converse = orjson.dumps(
            {
                "messages": [{"role": "user", "content": [{"text": "12345"}]}],
                "system": [{"text": "abc"}],
                "inferenceConfig": {"maxTokens": 10, "stopSequences": ["zzzzzzzz"]},
                "toolConfig": {"tools": [{"toolSpec": {"name": "ab"}}]},
            }
        )
        facts = self.facts(b"POST", b"/model/m/converse", converse)
        # text 5 + system 3; toolConfig keys (tools, toolSpec, name) and "ab".
        self.assertEqual(facts.prompt_chars, 5 + 3 + 5 + 8 + 4 + 2)
        invoke = orjson.dumps({"prompt": "hello", "max_gen_len": 5})
        self.assertEqual(self.facts(b"POST", b"/model/m/invoke", invoke).prompt_chars, 5)

    def test_errors(self) -> None:
        self.assertEqual(orjson.loads(self.fmt.error_body(429, "slow")), {"message": "slow"})
        self.assertEqual(
            self.fmt.error_headers(429), ((b"x-amzn-ErrorType", b"ThrottlingException"),)
        )
        self.assertEqual(
            self.fmt.error_headers(418), ((b"x-amzn-ErrorType", b"ValidationException"),)
        )
        self.assertEqual(
            self.fmt.error_headers(599), ((b"x-amzn-ErrorType", b"InternalServerException"),)
        )


class MeterTests(SynchronousTestCase):
    fmt = BedrockFormat()

    def meter(self, path: bytes, content_type: bytes, headers: dict[str, str] = HEADERS) -> Meter:
        facts = self.fmt.inspect(b"POST", path, b"", b"{}").facts
        return self.fmt.new_meter(facts, content_type, headers)

    def test_converse(self) -> None:
        meter = self.meter(b"/model/" + MODEL.encode() + b"/converse", b"application/json")
        self.assertEqual(feed_split(meter, CONVERSE_JSON), CONVERSE_JSON)
        self.assertEqual(meter.usage(), CONVERSE_USAGE)

    def test_converse_stream(self) -> None:
        data = converse_stream()
        meter = self.meter(b"/model/m/converse-stream", EVENT_STREAM)
        self.assertEqual(feed_split(meter, data), data)
        self.assertEqual(
            meter.usage(),
            Usage(
                model="m",
                input_tokens=25,
                output_tokens=7,
                finish_reason="max_tokens",
                upstream_request_id=HEADERS["x-amzn-requestid"],
                reported=True,
            ),
        )

    def test_invoke_anthropic(self) -> None:
        """
        An Anthropic body is metered as Anthropic (its uncached input plus
        cache reads), and the model stays the path's: Bedrock's id.
        """
        body = orjson.dumps(
            {
                "id": "msg_bdrk_1",
                "type": "message",
                "role": "assistant",
                "model": "claude-3-haiku-20240307",
                "content": [{"type": "text", "text": "Hi"}],
                "stop_reason": "end_turn",
                "usage": {"input_tokens": 11, "cache_read_input_tokens": 4, "output_tokens": 3},
            }
        )
        headers = {**HEADERS, "x-amzn-bedrock-input-token-count": "999"}
        meter = self.meter(
            b"/model/anthropic.claude-3-haiku-20240307-v1%3A0/invoke", b"application/json", headers
        )
        meter.feed(body)
        usage = meter.usage()
        self.assertEqual(usage.model, "anthropic.claude-3-haiku-20240307-v1:0")
        self.assertEqual((usage.input_tokens, usage.cache_read_tokens), (15, 4))
        self.assertEqual((usage.output_tokens, usage.finish_reason), (3, "end_turn"))

    def test_invoke_other_model(self) -> None:
        """
        Another model's body: the counts from Bedrock's headers.
        """
        headers = {
            **HEADERS,
            "x-amzn-bedrock-input-token-count": "17",
            "x-amzn-bedrock-output-token-count": "5",
            "x-amzn-bedrock-cache-read-input-token-count": "3",
        }
        meter = self.meter(
            b"/model/meta.llama3-8b-instruct-v1%3A0/invoke", b"application/json", headers
        )
        meter.feed(b'{"generation": "Hi", "prompt_token_count": 17, "stop_reason": "stop"}')
        usage = meter.usage()
        self.assertEqual(
            (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens), (20, 5, 3)
        )
        self.assertTrue(usage.reported)
        none = self.meter(b"/model/m/invoke", b"application/json")
        none.feed(b'{"generation": "Hi"}')
        self.assertFalse(none.usage().reported)

    def test_invoke_stream_anthropic(self) -> None:
        data = invoke_anthropic_stream()
        meter = self.meter(
            b"/model/" + MODEL.encode() + b"/invoke-with-response-stream", EVENT_STREAM
        )
        self.assertEqual(feed_split(meter, data, seed=5), data)
        usage = meter.usage()
        self.assertEqual(usage.model, MODEL)
        self.assertEqual((usage.input_tokens, usage.cache_read_tokens), (120, 100))
        self.assertEqual((usage.output_tokens, usage.finish_reason), (9, "end_turn"))

    def test_invoke_stream_other_model(self) -> None:
        """
        A model whose own events carry no Anthropic usage: Bedrock's
        invocation metrics in the last chunk.
        """
        data = chunk({"generation": "Hi", "stop_reason": None}) + chunk(
            {
                "generation": "",
                "stop_reason": "stop",
                "amazon-bedrock-invocationMetrics": {"inputTokenCount": 8, "outputTokenCount": 2},
            }
        )
        meter = self.meter(
            b"/model/meta.llama3-8b-instruct-v1%3A0/invoke-with-response-stream", EVENT_STREAM
        )
        feed_split(meter, data)
        usage = meter.usage()
        self.assertEqual((usage.input_tokens, usage.output_tokens), (8, 2))
        self.assertEqual(usage.finish_reason, "stop")

    def test_cut_short(self) -> None:
        """
        A stream cut inside a frame: the usage of the frames before counts,
        and no error frame can follow (the connection is cut instead).
        """
        data = converse_stream()
        meter = self.meter(b"/model/m/converse-stream", EVENT_STREAM)
        assert isinstance(meter, EventStreamMeter)
        facts = self.fmt.inspect(b"POST", b"/model/m/converse-stream", b"", b"{}").facts
        ending = self.fmt.stream_error(facts, EVENT_STREAM, meter)
        assert ending is not None
        meter.feed(data[:-10])
        self.assertIsNone(ending(502, "broken"))
        meter.finish()
        self.assertEqual(meter.usage().finish_reason, "max_tokens")
        self.assertFalse(meter.usage().reported)

    def test_error_frame(self) -> None:
        """
        Between frames, a failed stream ends with an exception frame the
        AWS SDKs raise as C{modelStreamErrorException}.
        """
        meter = self.meter(b"/model/m/converse-stream", EVENT_STREAM)
        facts = self.fmt.inspect(b"POST", b"/model/m/converse-stream", b"", b"{}").facts
        ending = self.fmt.stream_error(facts, EVENT_STREAM, meter)
        assert ending is not None
        meter.feed(event_frame("messageStart", b'{"role":"assistant"}'))
        frame_bytes = ending(504, "Upstream stream was silent for too long.")
        assert frame_bytes is not None
        [frame] = EventStreamDecoder().feed(frame_bytes)
        self.assertEqual(frame.message_type, "exception")
        self.assertEqual(frame.event_type, "modelStreamErrorException")
        self.assertEqual(
            orjson.loads(frame.payload or b""),
            {"message": "Upstream stream was silent for too long.", "originalStatusCode": 504},
        )

    def test_malformed(self) -> None:
        """
        Garbage from the upstream: bytes still pass unchanged, metering
        stops with one warning and no traceback, nothing more is buffered.
        """
        good = converse_stream()
        data = good[:120] + b"\x00\x00\x00\x10garbage-garbage-garbage" + good * 20
        meter = self.meter(b"/model/m/converse-stream", EVENT_STREAM)
        self.assertEqual(feed_split(meter, data), data)
        self.assertFalse(meter.usage().reported)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_non_stream_media(self) -> None:
        meter = self.meter(b"/model/m/converse-stream", b"application/octet-stream")
        self.assertEqual(meter.feed(b"x"), b"x")
        self.assertFalse(meter.usage().reported)
