# -*- test-case-name: llmproxy.test.test_providers_bedrock -*-
"""
Amazon Bedrock Runtime (C{kind: bedrock}): C{/model/<modelId>/converse},
C{converse-stream}, C{invoke} and C{invoke-with-response-stream}.

The model is the path's C{modelId}, percent-decoded: a model id
(C{anthropic.claude-sonnet-4-20250514-v1:0}), an inference profile
(C{us.anthropic...}), or an ARN; the ARN of a foundation model or of a
system inference profile is read as the id it ends in, any other ARN
(provisioned throughput, application profiles) stays whole.

Usage, normalised (see L{llmproxy.usage.Usage}):
  - Converse: C{usage.inputTokens} counts only uncached prompt tokens, so
    input is C{inputTokens + cacheReadInputTokens + cacheWriteInputTokens};
    output is C{outputTokens}.  ConverseStream reports the same object in
    its C{metadata} event.
  - InvokeModel: the body is the model's own; an Anthropic Messages body is
    metered as Anthropic, any other from the
    C{X-Amzn-Bedrock-Input-Token-Count} / C{-Output-Token-Count} (and cache)
    headers.  InvokeModelWithResponseStream: each C{chunk} event carries one
    of the model's own stream events, base64 in C{bytes}; Anthropic's are
    metered as Anthropic, and the last chunk's
    C{amazon-bedrock-invocationMetrics} serve any other model.

Streams are binary event streams (L{llmproxy.eventstream}), decoded as they
pass with bounded memory; every byte reaches the client unchanged.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
from collections.abc import Mapping

import orjson
from attrs import evolve
from twisted.logger import Logger

from llmproxy.eventstream import (
    EventStreamDecoder,
    EventStreamError,
    Frame,
    exception_frame,
)
from llmproxy.providers.anthropic import AnthropicExtractor, MessageUsage
from llmproxy.providers.format import ProviderFormat, RequestFacts, StreamError
from llmproxy.providers.keyscan import KeyScanner
from llmproxy.providers.meters import Extractor, JSONBodyMeter, Meter, Tally
from llmproxy.providers.prompt import text_chars
from llmproxy.providers.wire import as_int, as_str, dig, loads
from llmproxy.usage import Usage

log = Logger(namespace="llmproxy.providers.bedrock")

EVENT_STREAM = b"application/vnd.amazon.eventstream"

ID_HEADERS = ("x-amzn-requestid",)

_ENDPOINTS: Mapping[str, str] = {
    "converse": "converse",
    "converse-stream": "converse_stream",
    "invoke": "invoke",
    "invoke-with-response-stream": "invoke_stream",
    "count-tokens": "count_tokens",
}
STREAM_ENDPOINTS = frozenset({"converse_stream", "invoke_stream"})

_ARN_IDS = re.compile(
    r"^arn:aws[a-z-]*:bedrock:[^:]*:[^:]*:(?:foundation-model|inference-profile)/"
)

# Error code per status, as Bedrock names them in x-amzn-ErrorType.
_ERRORS: Mapping[int, str] = {
    400: "ValidationException",
    401: "UnrecognizedClientException",
    402: "AccessDeniedException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    408: "ModelTimeoutException",
    413: "ValidationException",
    424: "ModelErrorException",
    429: "ThrottlingException",
    500: "InternalServerException",
    502: "InternalServerException",
    503: "ServiceUnavailableException",
    504: "ModelTimeoutException",
}

_HEADER_TOKENS = (
    "x-amzn-bedrock-input-token-count",
    "x-amzn-bedrock-output-token-count",
    "x-amzn-bedrock-cache-read-input-token-count",
    "x-amzn-bedrock-cache-write-input-token-count",
)

_DELTA_PREFIX = base64.b64encode(b'{"type":"content_block_delta"')[:36]
"""
How a chunk holding an Anthropic content delta starts, base64-encoded:
such chunks (most of a stream) are recognised without decoding them.
"""


def error_code(status: int) -> str:
    """
    The Bedrock error code for an HTTP status.
    """
    if status in _ERRORS:
        return _ERRORS[status]
    return "InternalServerException" if status >= 500 else "ValidationException"


def model_id(raw: str) -> str:
    """
    The model a path's C{modelId} names (see the module docstring).
    """
    if _ARN_IDS.match(raw):
        return raw.split("/", 1)[1] or raw
    return raw


def set_bedrock_tokens(tally: Tally, uncached: int, output: int, read: int, write: int) -> None:
    """
    Bedrock's counts, normalised: its input count leaves out the cached
    tokens, which are parts of the normalised input.
    """
    tally.set_tokens(
        input_tokens=uncached + read + write,
        output_tokens=output,
        cache_read_tokens=read,
        cache_write_tokens=write,
    )


def apply_converse_usage(tally: Tally, usage: object) -> None:
    """
    Apply a Converse C{usage} object (C{TokenUsage}).
    """
    if isinstance(usage, dict):
        set_bedrock_tokens(
            tally,
            as_int(usage.get("inputTokens")),
            as_int(usage.get("outputTokens")),
            as_int(usage.get("cacheReadInputTokens")),
            as_int(usage.get("cacheWriteInputTokens")),
        )


def apply_invocation_metrics(tally: Tally, metrics: object) -> None:
    """
    Apply Bedrock's C{amazon-bedrock-invocationMetrics} (any model's
    stream), counted like Converse usage.
    """
    if isinstance(metrics, dict):
        set_bedrock_tokens(
            tally,
            as_int(metrics.get("inputTokenCount")),
            as_int(metrics.get("outputTokenCount")),
            as_int(metrics.get("cacheReadInputTokenCount")),
            as_int(metrics.get("cacheWriteInputTokenCount")),
        )


class ConverseExtractor(Extractor):
    """
    Usage and stop reason from a Converse response.
    """

    keys = ("usage", "stopReason")

    def apply_json(self, tally: Tally, obj: object) -> None:
        if not isinstance(obj, dict):
            return
        tally.finish_reason = as_str(obj.get("stopReason")) or tally.finish_reason
        apply_converse_usage(tally, obj.get("usage"))

    def apply_scan(self, tally: Tally, scanner: KeyScanner) -> None:
        tally.finish_reason = as_str(scanner.last.get("stopReason")) or tally.finish_reason
        apply_converse_usage(tally, scanner.last.get("usage"))


class InvokeExtractor(Extractor):
    """
    Usage from an InvokeModel body when it is an Anthropic message; other
    models' bodies leave the header counts in place.  The model stays the
    path's: it is what Bedrock bills, and the body names Anthropic's own.
    """

    keys = ("model", "id", "usage", "stop_reason")
    _anthropic = AnthropicExtractor()

    def apply_json(self, tally: Tally, obj: object) -> None:
        if isinstance(obj, dict) and obj.get("type") == "message":
            model = tally.model
            self._anthropic.apply_json(tally, obj)
            tally.model = model

    def apply_scan(self, tally: Tally, scanner: KeyScanner) -> None:
        if isinstance(scanner.last.get("usage"), dict):
            model = tally.model
            self._anthropic.apply_scan(tally, scanner)
            tally.model = model


def header_tokens(tally: Tally, headers: Mapping[str, str]) -> None:
    """
    Token counts from InvokeModel's C{X-Amzn-Bedrock-*-Token-Count}
    headers, when it sent them.
    """
    if _HEADER_TOKENS[0] in headers or _HEADER_TOKENS[1] in headers:
        uncached, output, read, write = (_number(headers.get(name)) for name in _HEADER_TOKENS)
        set_bedrock_tokens(tally, uncached, output, read, write)


def _number(text: str | None) -> int:
    return int(text) if text is not None and text.strip().isdigit() else 0


class EventStreamMeter(Meter):
    """
    Meters a binary event stream as it passes: every byte goes to the
    client unchanged, each frame is decoded once (L{EventStreamDecoder},
    bounded memory) and handed to L{on_frame}.

    A malformed stream stops the metering (logged once, no traceback); the
    bytes still pass, and the client's SDK reports the damage itself.
    """

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self._decoder = EventStreamDecoder()

    def on_frame(self, frame: Frame) -> None:
        """
        Read one frame (a subclass knows which matter).
        """

    def snapshot(self) -> Tally:
        return self.tally

    def feed(self, data: bytes) -> bytes:
        try:
            frames = self._decoder.feed(data)
        except EventStreamError as error:
            log.warn("Bedrock event stream not metered further: {error}", error=str(error))
            return data
        for frame in frames:
            if frame.payload is not None:
                self.on_frame(frame)
        return data

    def finish(self) -> bytes:
        # Cut short: the relay reports that; usage so far still counts.
        with contextlib.suppress(EventStreamError):
            self._decoder.finish()
        return b""

    def usage(self) -> Usage:
        return self.snapshot().usage()

    def error_frame(self, status: int, message: str) -> bytes | None:
        """
        An exception frame the client's SDK raises, when the stream stands
        between two frames; L{None} inside one (the connection is cut).
        """
        if not self._decoder.at_boundary:
            return None
        return exception_frame(
            "modelStreamErrorException",
            orjson.dumps({"message": message, "originalStatusCode": status}),
        )


class ConverseStreamMeter(EventStreamMeter):
    """
    ConverseStream: the C{metadata} event holds the usage, C{messageStop}
    the stop reason.
    """

    def on_frame(self, frame: Frame) -> None:
        name = frame.event_type
        if name == "metadata":
            apply_converse_usage(self.tally, dig(loads(frame.payload or b""), "usage"))
        elif name == "messageStop":
            reason = as_str(dig(loads(frame.payload or b""), "stopReason"))
            self.tally.finish_reason = reason or self.tally.finish_reason


class InvokeStreamMeter(EventStreamMeter):
    """
    InvokeModelWithResponseStream: C{chunk} events, each one of the model's
    own stream events in base64.  Content deltas are recognised by their
    encoded prefix and not decoded; the rest are decoded and read as
    Anthropic events, or for Bedrock's C{invocationMetrics}.
    """

    def __init__(self, tally: Tally) -> None:
        super().__init__(tally)
        self._anthropic = MessageUsage()
        self._metrics: object = None

    def on_frame(self, frame: Frame) -> None:
        if frame.event_type != "chunk" or frame.payload is None:
            return
        encoded = _chunk_bytes(frame.payload)
        if encoded is None or encoded.startswith(_DELTA_PREFIX):
            return
        try:
            event = loads(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            return
        if not isinstance(event, dict):
            return
        kind = event.get("type")
        tally = self.tally
        if kind == "message_start" and isinstance(event.get("message"), dict):
            message = event["message"]
            model = tally.model
            AnthropicExtractor.apply_message(tally, message)
            tally.model = model
            self._anthropic.update(message.get("usage"))
        elif kind == "message_delta":
            reason = as_str(dig(event, "delta", "stop_reason"))
            tally.finish_reason = reason or tally.finish_reason
            self._anthropic.update(event.get("usage"))
        else:
            reason = as_str(event.get("stop_reason")) or as_str(event.get("completionReason"))
            tally.finish_reason = reason or tally.finish_reason
        metrics = event.get("amazon-bedrock-invocationMetrics")
        if metrics is not None:
            self._metrics = metrics

    def snapshot(self) -> Tally:
        tally = self.tally.copy()
        if self._anthropic.fields:
            self._anthropic.apply(tally)
        else:
            apply_invocation_metrics(tally, self._metrics)
        return tally


_BYTES_KEY = re.compile(rb'"bytes"[ \t\r\n]*:[ \t\r\n]*"([A-Za-z0-9+/=]*)"')


def _chunk_bytes(payload: bytes) -> bytes | None:
    """
    The base64 text of a chunk event's C{bytes} member.
    """
    match = _BYTES_KEY.search(payload)
    return match.group(1) if match else None


class BedrockFormat(ProviderFormat):
    """
    The Amazon Bedrock Runtime API.
    """

    kind = "bedrock"
    id_headers = ID_HEADERS
    unmetered_endpoints = frozenset({"count_tokens"})

    def describe(
        self, method: str, segments: list[str], query: bytes, body: object | None
    ) -> RequestFacts:
        endpoint = "other"
        model = None
        if len(segments) >= 3 and segments[0] == "model":
            # An ARN's "/" was percent-encoded: decoded, it splits the id.
            model = model_id("/".join(segments[1:-1]))
            if method == "POST":
                endpoint = _ENDPOINTS.get(segments[-1], "other")
        return RequestFacts(
            method=method,
            endpoint=endpoint,
            model=model,
            streaming=endpoint in STREAM_ENDPOINTS,
        )

    def prompt_chars(self, facts: RequestFacts, body: object | None) -> int | None:
        if not isinstance(body, dict):
            return None if body is None else 0
        if facts.endpoint.startswith("converse"):
            texts = [body.get("messages"), body.get("system")]
            return text_chars(texts) + text_chars([body.get("toolConfig")], count_keys=True)
        # InvokeModel bodies are each model's own: count every string.
        return text_chars([body])

    def new_meter(
        self,
        facts: RequestFacts,
        content_type: bytes | None,
        headers: Mapping[str, str],
        strip_usage_chunk: bool = False,
    ) -> Meter:
        meter = super().new_meter(facts, content_type, headers, strip_usage_chunk)
        if facts.endpoint == "invoke" and isinstance(meter, JSONBodyMeter):
            return HeaderCountedMeter(meter, headers)
        return meter

    def meter_for(self, facts: RequestFacts, tally: Tally, sse: bool, strip: bool) -> Meter:
        if facts.endpoint == "invoke":
            return JSONBodyMeter(tally, InvokeExtractor())
        return JSONBodyMeter(tally, ConverseExtractor())

    def meter_for_media(self, facts: RequestFacts, tally: Tally, media: bytes | None) -> Meter:
        if media == EVENT_STREAM:
            if facts.endpoint == "converse_stream":
                return ConverseStreamMeter(tally)
            return InvokeStreamMeter(tally)
        return super().meter_for_media(facts, tally, media)

    def stream_error(
        self, facts: RequestFacts, content_type: bytes | None, meter: Meter | None
    ) -> StreamError | None:
        """
        For a binary event stream, an exception frame while the stream
        stands between frames; the connection is cut otherwise.
        """
        if isinstance(meter, EventStreamMeter):
            return meter.error_frame
        return super().stream_error(facts, content_type, meter)

    def error_body(self, status: int, message: str) -> bytes:
        return orjson.dumps({"message": message})

    def error_headers(self, status: int) -> tuple[tuple[bytes, bytes], ...]:
        """
        C{x-amzn-ErrorType}, where the AWS SDKs read the error's code.
        """
        return ((b"x-amzn-ErrorType", error_code(status).encode("ascii")),)

    def sse_error_event(self, status: int, message: str) -> bytes:
        """
        Bedrock never streams SSE; an SSE body from behind it gets the
        generic event a client can at least read.
        """
        return b"event: error\ndata: " + self.error_body(status, message) + b"\n\n"


class HeaderCountedMeter(Meter):
    """
    InvokeModel: the body's own usage when it has one (Anthropic), else the
    counts Bedrock put in the response headers.
    """

    def __init__(self, meter: Meter, headers: Mapping[str, str]) -> None:
        self._meter = meter
        self._headers = headers

    def feed(self, data: bytes) -> bytes:
        return self._meter.feed(data)

    def finish(self) -> bytes:
        return self._meter.finish()

    def usage(self) -> Usage:
        usage = self._meter.usage()
        if usage.reported:
            return usage
        tally = Tally()
        header_tokens(tally, self._headers)
        if tally.tokens is None:
            return usage
        return evolve(
            tally.tokens,
            model=usage.model,
            finish_reason=usage.finish_reason,
            upstream_request_id=usage.upstream_request_id,
        )
