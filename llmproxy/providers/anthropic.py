# -*- test-case-name: llmproxy.test.test_providers_anthropic -*-
"""
The Anthropic Messages wire format (C{/v1/messages}), plus Anthropic's
OpenAI-compatible C{/v1/chat/completions}, which is metered as OpenAI.

Usage, normalised (see L{llmproxy.usage.Usage}): Anthropic's
C{input_tokens} counts only uncached prompt tokens, so the normalised input
is C{input_tokens + cache_read_input_tokens + cache_creation_input_tokens};
the cache fields are its read and write parts.  C{output_tokens} includes
extended thinking, which Anthropic does not report separately, so
reasoning stays 0.

Streams: C{message_start} carries the input usage; each C{message_delta}
carries cumulative usage, so a later value replaces an earlier one, field by
field, whichever fields it has.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import orjson

from llmproxy.providers.format import ProviderFormat, RequestFacts
from llmproxy.providers.keyscan import KeyScanner
from llmproxy.providers.meters import Extractor, JSONBodyMeter, Meter, SSEMeter, Tally
from llmproxy.providers.openai import (
    COMPATIBLE_ENDPOINTS,
    describe_openai,
    openai_meter_for,
    openai_prompt_chars,
)
from llmproxy.providers.prompt import text_chars
from llmproxy.providers.wire import as_count, as_int, as_str, dig, loads
from llmproxy.sse import Event

ID_HEADERS = ("request-id",)

_USAGE_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
)

# Error type per status, as the Anthropic API answers them.
_ERRORS: Mapping[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}

_TYPE = re.compile(rb'"type"[ \t\r\n]*:[ \t\r\n]*"([^"\\]*)"')


def error_type(status: int) -> str:
    """
    The Anthropic error C{type} for an HTTP status.
    """
    if status in _ERRORS:
        return _ERRORS[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def _error_json(status: int, message: str) -> bytes:
    return orjson.dumps(
        {"type": "error", "error": {"type": error_type(status), "message": message}}
    )


class MessageUsage:
    """
    Anthropic's raw usage fields, replaced one by one as reports arrive,
    summed into the normalised form on demand.
    """

    def __init__(self) -> None:
        self.fields: dict[str, int] = {}

    def update(self, usage: object) -> None:
        """
        Take every known field present in a C{usage} object.
        """
        if not isinstance(usage, dict):
            return
        for name in _USAGE_FIELDS:
            value = usage.get(name)
            if value is not None:
                self.fields[name] = as_int(value)

    def apply(self, tally: Tally) -> None:
        if not self.fields:
            return
        read = self.fields.get("cache_read_input_tokens", 0)
        write = self.fields.get("cache_creation_input_tokens", 0)
        tally.set_tokens(
            input_tokens=self.fields.get("input_tokens", 0) + read + write,
            output_tokens=self.fields.get("output_tokens", 0),
            cache_read_tokens=read,
            cache_write_tokens=write,
        )


class AnthropicExtractor(Extractor):
    """
    Usage from a Messages response object, or from the keys of a body too
    big to parse.
    """

    keys = ("model", "id", "usage", "stop_reason")

    def apply_json(self, tally: Tally, obj: object) -> None:
        if not isinstance(obj, dict):
            return
        self.apply_message(tally, obj)
        usage = MessageUsage()
        usage.update(obj.get("usage"))
        usage.apply(tally)

    @staticmethod
    def apply_message(tally: Tally, message: dict[str, object]) -> None:
        """
        Model, id and stop reason of a message object.
        """
        tally.model = as_str(message.get("model")) or tally.model
        tally.body_id = as_str(message.get("id")) or tally.body_id
        tally.finish_reason = as_str(message.get("stop_reason")) or tally.finish_reason

    def apply_scan(self, tally: Tally, scanner: KeyScanner) -> None:
        tally.model = as_str(scanner.first.get("model")) or tally.model
        tally.body_id = as_str(scanner.first.get("id")) or tally.body_id
        tally.finish_reason = as_str(scanner.last.get("stop_reason")) or tally.finish_reason
        usage = MessageUsage()
        usage.update(scanner.last.get("usage"))
        usage.apply(tally)


EXTRACTOR = AnthropicExtractor()


class MessagesStreamMeter(SSEMeter):
    """
    Messages streams: only C{message_start} and C{message_delta} events are
    parsed; content deltas, pings and errors are not even searched.
    """

    def __init__(self, tally: Tally) -> None:
        super().__init__(tally)
        self._usage = MessageUsage()

    def on_event(self, event: Event) -> bool:
        if event.truncated:
            return False
        name = event.event
        if not name:
            match = _TYPE.search(event.data, 0, 64)
            name = match.group(1) if match else b""
        if name == b"message_start":
            message = dig(loads(event.data), "message")
            if isinstance(message, dict):
                AnthropicExtractor.apply_message(self.tally, message)
                self._usage.update(message.get("usage"))
                self._usage.apply(self.tally)
        elif name == b"message_delta":
            delta = loads(event.data)
            if isinstance(delta, dict):
                reason = as_str(dig(delta, "delta", "stop_reason"))
                self.tally.finish_reason = reason or self.tally.finish_reason
                self._usage.update(delta.get("usage"))
                self._usage.apply(self.tally)
        return False


def classify(method: str, segments: list[str]) -> str:
    """
    The endpoint name for an Anthropic path.
    """
    tail = segments[-2:]
    if method == "POST":
        if tail[-1:] == ["messages"]:
            return "messages"
        if tail == ["messages", "count_tokens"]:
            return "count_tokens"
    if "models" in tail:
        return "models"
    return "other"


class AnthropicFormat(ProviderFormat):
    """
    The Anthropic API.
    """

    kind = "anthropic"
    id_headers = ID_HEADERS
    unmetered_endpoints = frozenset({"count_tokens"})

    def describe(
        self, method: str, segments: list[str], query: bytes, body: object | None
    ) -> RequestFacts:
        if segments[-2:] == ["chat", "completions"]:
            return describe_openai(method, segments, body)
        model = user = limit = None
        streaming = False
        if isinstance(body, dict):
            model = as_str(body.get("model"))
            user = as_str(dig(body, "metadata", "user_id"))
            streaming = body.get("stream") is True
            limit = as_count(body.get("max_tokens"))
        return RequestFacts(
            method=method,
            endpoint=classify(method, segments),
            model=model,
            streaming=streaming,
            user=user,
            max_output_tokens=limit,
        )

    def prompt_chars(self, facts: RequestFacts, body: object | None) -> int | None:
        if facts.endpoint in COMPATIBLE_ENDPOINTS:
            return openai_prompt_chars(body)
        if not isinstance(body, dict):
            return None if body is None else 0
        texts = [body.get("system"), body.get("messages")]
        return text_chars(texts) + text_chars([body.get("tools")], count_keys=True)

    def meter_for(self, facts: RequestFacts, tally: Tally, sse: bool, strip: bool) -> Meter:
        if facts.endpoint in COMPATIBLE_ENDPOINTS:
            return openai_meter_for(facts, tally, sse, strip)
        if sse:
            return MessagesStreamMeter(tally)
        return JSONBodyMeter(tally, EXTRACTOR)

    def error_body(self, status: int, message: str) -> bytes:
        return _error_json(status, message)

    def sse_error_event(self, status: int, message: str) -> bytes:
        """
        Anthropic's own mid-stream error event; the SDKs raise on
        C{event: error}.
        """
        return b"event: error\ndata: " + _error_json(status, message) + b"\n\n"
