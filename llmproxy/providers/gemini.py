# -*- test-case-name: llmproxy.test.test_providers_gemini -*-
"""
The Gemini API wire format (C{/v1beta/models/<model>:generateContent} and
friends), plus Gemini's OpenAI-compatible C{/v1beta/openai/...}, which is
metered as OpenAI.

Usage, normalised (see L{llmproxy.usage.Usage}) from C{usageMetadata}:
input is C{promptTokenCount} (which already includes
C{cachedContentTokenCount}, the cache-read part) plus
C{toolUsePromptTokenCount} (tool results the model read, e.g. search
grounding); output is C{candidatesTokenCount + thoughtsTokenCount}, with
C{thoughtsTokenCount} as reasoning.  In a stream every chunk may carry
C{usageMetadata}, each a running total: the last one wins.

C{:streamGenerateContent} answers SSE with C{alt=sse} and otherwise one JSON
array that grows over time; both are metered as they arrive.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import orjson

from llmproxy.providers.format import ProviderFormat, RequestFacts
from llmproxy.providers.keyscan import KeyScanner
from llmproxy.providers.meters import (
    Extractor,
    JSONBodyMeter,
    Meter,
    ScanMeter,
    SSEMeter,
    Tally,
)
from llmproxy.providers.openai import (
    COMPATIBLE_ENDPOINTS,
    describe_openai,
    openai_meter_for,
    openai_prompt_chars,
)
from llmproxy.providers.prompt import text_chars
from llmproxy.providers.wire import as_count, as_int, as_str, dig, json_string, query_values
from llmproxy.sse import Event

ID_HEADERS = ("x-request-id",)
"""Gemini itself sends none; a gateway in front of it may."""

_METHODS: Mapping[str, str] = {
    "generateContent": "generateContent",
    "streamGenerateContent": "streamGenerateContent",
    "embedContent": "embedContent",
    "batchEmbedContents": "embedContent",
    "countTokens": "count_tokens",
}

# google.rpc status per HTTP status, as Google APIs answer them.
_STATUSES: Mapping[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

_MODEL_VERSION = re.compile(rb'"modelVersion"[ \t\r\n]*:[ \t\r\n]*"([^"\\]*(?:\\.[^"\\]*)*)"')
_RESPONSE_ID = re.compile(rb'"responseId"[ \t\r\n]*:[ \t\r\n]*"([^"\\]*(?:\\.[^"\\]*)*)"')
_FINISH = re.compile(rb'"finishReason"[ \t\r\n]*:[ \t\r\n]*"([^"\\]*(?:\\.[^"\\]*)*)"')


def status_name(status: int) -> str:
    """
    The C{google.rpc.Code} name for an HTTP status.
    """
    if status in _STATUSES:
        return _STATUSES[status]
    return "INTERNAL" if status >= 500 else "FAILED_PRECONDITION"


def _error_json(status: int, message: str) -> bytes:
    return orjson.dumps(
        {"error": {"code": status, "message": message, "status": status_name(status)}}
    )


def model_name(value: object) -> str | None:
    """
    C{gemini-2.5-flash} from C{gemini-2.5-flash} or C{models/gemini-2.5-flash}.
    """
    name = as_str(value)
    if name is not None and name.startswith("models/"):
        name = name[len("models/") :] or None
    return name


def apply_usage_metadata(tally: Tally, usage: object) -> None:
    """
    Apply one C{usageMetadata} object.
    """
    if not isinstance(usage, dict):
        return
    thoughts = as_int(usage.get("thoughtsTokenCount"))
    tally.set_tokens(
        input_tokens=as_int(usage.get("promptTokenCount"))
        + as_int(usage.get("toolUsePromptTokenCount")),
        output_tokens=as_int(usage.get("candidatesTokenCount")) + thoughts,
        cache_read_tokens=as_int(usage.get("cachedContentTokenCount")),
        reasoning_tokens=thoughts,
    )


class GeminiExtractor(Extractor):
    """
    Usage from C{GenerateContentResponse} objects (one, or a list of
    streamed ones), or from the keys of a body too big to parse.
    """

    keys = ("usageMetadata", "modelVersion", "responseId", "finishReason")

    def apply_json(self, tally: Tally, obj: object) -> None:
        for response in obj if isinstance(obj, list) else [obj]:
            if isinstance(response, dict):
                self.apply_response(tally, response)

    @staticmethod
    def apply_response(tally: Tally, response: dict[str, object]) -> None:
        """
        Apply one C{GenerateContentResponse}.
        """
        tally.model = model_name(response.get("modelVersion")) or tally.model
        tally.body_id = as_str(response.get("responseId")) or tally.body_id
        reason = as_str(dig(response, "candidates", 0, "finishReason"))
        tally.finish_reason = reason or tally.finish_reason
        apply_usage_metadata(tally, response.get("usageMetadata"))

    def apply_scan(self, tally: Tally, scanner: KeyScanner) -> None:
        tally.model = model_name(scanner.first.get("modelVersion")) or tally.model
        tally.body_id = as_str(scanner.first.get("responseId")) or tally.body_id
        tally.finish_reason = as_str(scanner.last.get("finishReason")) or tally.finish_reason
        apply_usage_metadata(tally, scanner.last.get("usageMetadata"))


EXTRACTOR = GeminiExtractor()


class GenerateStreamMeter(SSEMeter):
    """
    C{alt=sse} streams: every event is a C{GenerateContentResponse}.

    Chunks are searched, not parsed: model, id and finish reason by regular
    expression; of the last chunk that has C{usageMetadata}, the text from
    that key on is kept and parsed only when usage is asked for.
    """

    def __init__(self, tally: Tally) -> None:
        super().__init__(tally)
        self._last_usage: bytes | dict[str, object] | None = None
        self._parsed: tuple[object, object] | None = None

    def on_event(self, event: Event) -> bool:
        tally = self.tally
        if event.truncated:
            scanner = KeyScanner(EXTRACTOR.keys)
            scanner.feed(event.tail)
            tally.model = tally.model or model_name(scanner.first.get("modelVersion"))
            tally.body_id = tally.body_id or as_str(scanner.first.get("responseId"))
            tally.finish_reason = as_str(scanner.last.get("finishReason")) or tally.finish_reason
            usage = scanner.last.get("usageMetadata")
            if isinstance(usage, dict):
                self._last_usage = usage
            return False
        data = event.data
        if tally.model is None:
            match = _MODEL_VERSION.search(data)
            if match:
                tally.model = model_name(json_string(match.group(1)))
        if tally.body_id is None:
            match = _RESPONSE_ID.search(data)
            if match:
                tally.body_id = json_string(match.group(1))
        match = _FINISH.search(data)
        if match:
            tally.finish_reason = json_string(match.group(1)) or tally.finish_reason
        at = data.rfind(b'"usageMetadata"')
        if at >= 0:
            # Keep only the text from the key on (usage sits near a chunk's
            # end), and parse it only when usage is asked for.
            self._last_usage = data[at:]
        return False

    def snapshot(self) -> Tally:
        source = self._last_usage
        if source is None:
            return self.tally
        if self._parsed is None or self._parsed[0] is not source:
            if isinstance(source, bytes):
                scanner = KeyScanner(("usageMetadata",))
                scanner.feed(source)
                usage = scanner.last.get("usageMetadata")
            else:
                usage = source
            self._parsed = (source, usage)
        tally = self.tally.copy()
        apply_usage_metadata(tally, self._parsed[1])
        return tally


class GeminiFormat(ProviderFormat):
    """
    The Gemini API (Google AI Studio's C{generativelanguage} endpoints).
    """

    kind = "gemini"
    id_headers = ID_HEADERS
    unmetered_endpoints = frozenset({"count_tokens"})

    def describe(
        self, method: str, segments: list[str], query: bytes, body: object | None
    ) -> RequestFacts:
        if "openai" in segments:
            return describe_openai(method, segments, body)
        endpoint = "other"
        model = None
        last = segments[-1] if segments else ""
        resource, colon, action = last.rpartition(":")
        if colon:
            endpoint = _METHODS.get(action, "other")
            if segments[-2:-1] in (["models"], ["tunedModels"]):
                model = resource or None
        elif "models" in segments[-2:]:
            endpoint = "models"
            if segments[-2:-1] == ["models"]:
                model = last
        alt = query_values(query, "alt") + query_values(query, "$alt")
        streaming = endpoint == "streamGenerateContent" or "sse" in alt
        limit = None
        if isinstance(body, dict):
            limit = as_count(dig(body, "generationConfig", "maxOutputTokens"))
            if limit is None:
                limit = as_count(dig(body, "generation_config", "max_output_tokens"))
        return RequestFacts(
            method=method,
            endpoint=endpoint,
            model=model,
            streaming=streaming,
            max_output_tokens=limit,
        )

    def prompt_chars(self, facts: RequestFacts, body: object | None) -> int | None:
        if facts.endpoint in COMPATIBLE_ENDPOINTS:
            return openai_prompt_chars(body)
        if not isinstance(body, dict):
            return None if body is None else 0
        texts = [
            body.get(key)
            for key in (
                "contents",
                "systemInstruction",
                "system_instruction",
                "content",
                "requests",
            )
        ]
        return text_chars(texts) + text_chars([body.get("tools")], count_keys=True)

    def meter_for(self, facts: RequestFacts, tally: Tally, sse: bool, strip: bool) -> Meter:
        if facts.endpoint in COMPATIBLE_ENDPOINTS:
            return openai_meter_for(facts, tally, sse, strip)
        if sse:
            return GenerateStreamMeter(tally)
        if facts.endpoint == "streamGenerateContent":
            return ScanMeter(tally, EXTRACTOR)
        return JSONBodyMeter(tally, EXTRACTOR)

    def error_body(self, status: int, message: str) -> bytes:
        return _error_json(status, message)

    def sse_error_event(self, status: int, message: str) -> bytes:
        """
        A C{data:} line holding the error body, and no C{event:} line: the
        google-genai SDK raises its C{ClientError} / C{ServerError} for a
        chunk that is C{{"error": ...}}, but fails on an C{event:} line with
        a JSON decoding error instead.
        """
        return b"data: " + _error_json(status, message) + b"\n\n"
