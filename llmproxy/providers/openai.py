# -*- test-case-name: llmproxy.test.test_providers_openai -*-
"""
The OpenAI wire format: Chat Completions, Completions, Responses,
Embeddings and the rest of C{/v1}, as spoken by OpenAI itself and by the
servers that copy it (Azure OpenAI, vLLM, Ollama, Groq, OpenRouter...).

Usage, normalised (see L{llmproxy.usage.Usage}):
  - Chat Completions, Completions, Embeddings: C{usage.prompt_tokens}
    (cached ones included: C{prompt_tokens_details.cached_tokens} is a part),
    C{usage.completion_tokens} (reasoning included:
    C{completion_tokens_details.reasoning_tokens} is a part).
  - Responses (and audio, images): C{usage.input_tokens} with
    C{input_tokens_details.cached_tokens}, C{usage.output_tokens} with
    C{output_tokens_details.reasoning_tokens}.
  - Streams: Chat Completions and Completions report usage in one last chunk
    with empty C{choices}, only when the request set
    C{stream_options.include_usage}; L{OpenAIFormat.ask_stream_usage} sets it
    and the meter then removes that chunk again.  Responses streams carry it
    in C{response.completed} (or C{.incomplete} / C{.failed}).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import orjson

from llmproxy.providers.format import ProviderFormat, RequestFacts, StreamEvent
from llmproxy.providers.keyscan import KeyScanner, TopLevel
from llmproxy.providers.meters import Extractor, JSONBodyMeter, Meter, SSEMeter, Tally
from llmproxy.providers.prompt import text_chars
from llmproxy.providers.wire import as_int, as_str, dig, first_limit, json_string, loads
from llmproxy.sse import Event

ID_HEADERS: tuple[str, ...] = ("x-request-id",)

STREAM_USAGE_ENDPOINTS = frozenset({"chat.completions", "completions"})
"""Endpoints whose streams report usage only when asked to."""

COMPATIBLE_ENDPOINTS = frozenset({"chat.completions", "completions", "embeddings"})
"""
Endpoints other providers also serve in the OpenAI format (Anthropic's and
Gemini's OpenAI-compatible paths), read and metered with this module.
"""

RESPONSES_FINAL_EVENTS = frozenset(
    {b"response.completed", b"response.incomplete", b"response.failed"}
)
RESPONSES_START_EVENTS = frozenset({b"response.created", b"response.in_progress"})
RESPONSES_PRELUDE_EVENTS = RESPONSES_START_EVENTS | frozenset(
    {b"response.output_item.added", b"response.content_part.added"}
)
"""Responses events that come before any content."""
RESPONSES_ERROR_EVENTS = frozenset({b"error", b"response.failed"})

_DELTA_CONTENT = ("content", "tool_calls", "function_call", "refusal", "reasoning_content")

# (type, code) per status, as the OpenAI API answers them.
_ERRORS: Mapping[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    402: ("insufficient_quota", "budget_exceeded"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "not_found"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    422: ("invalid_request_error", None),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", None),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "timeout"),
}

_MODEL = re.compile(rb'"model"[ \t\r\n]*:[ \t\r\n]*"([^"\\]*(?:\\.[^"\\]*)*)"')
_ID = re.compile(rb'"id"[ \t\r\n]*:[ \t\r\n]*"([^"\\]*(?:\\.[^"\\]*)*)"')
_FINISH = re.compile(rb'"finish_reason"[ \t\r\n]*:[ \t\r\n]*"([^"\\]*(?:\\.[^"\\]*)*)"')
_USAGE_OBJECT = re.compile(rb'"usage"[ \t\r\n]*:[ \t\r\n]*\{')
_TYPE = re.compile(rb'"type"[ \t\r\n]*:[ \t\r\n]*"([^"\\]*)"')


def error_fields(status: int) -> tuple[str, str | None]:
    """
    The OpenAI error C{type} and C{code} for an HTTP status.
    """
    if status in _ERRORS:
        return _ERRORS[status]
    return ("server_error", None) if status >= 500 else ("invalid_request_error", None)


def openai_error_body(status: int, message: str) -> bytes:
    """
    C{{"error": {"message", "type", "param", "code"}}}, the shape every
    OpenAI SDK reads.
    """
    error_type, code = error_fields(status)
    return orjson.dumps(
        {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    )


def classify(method: str, segments: list[str]) -> str:
    """
    The endpoint name for an OpenAI-style path (any prefix before C{/v1}).
    """
    last = segments[-1] if segments else ""
    if method == "POST":
        if last == "completions":
            return "chat.completions" if segments[-2:-1] == ["chat"] else "completions"
        if last == "responses":
            return "responses"
        if last == "embeddings":
            return "embeddings"
    if "models" in segments[-2:]:
        return "models"
    return "other"


def describe_openai(method: str, segments: list[str], body: object | None) -> RequestFacts:
    """
    The facts of an OpenAI-style request, shared with the OpenAI-compatible
    endpoints of other providers.
    """
    model = user = limit = None
    streaming = False
    if isinstance(body, dict):
        model = as_str(body.get("model"))
        user = as_str(body.get("user")) or as_str(body.get("safety_identifier"))
        streaming = body.get("stream") is True
    limit = first_limit(body, ("max_completion_tokens",), ("max_tokens",), ("max_output_tokens",))
    if model is None and "deployments" in segments[:-1]:
        # Azure OpenAI names the deployment in the path instead.
        model = segments[segments.index("deployments") + 1]
    return RequestFacts(
        method=method,
        endpoint=classify(method, segments),
        model=model,
        streaming=streaming,
        user=user,
        max_output_tokens=limit,
    )


def openai_prompt_chars(body: object | None) -> int | None:
    """
    Prompt text in an OpenAI-style body: messages, prompt, input,
    instructions, and the tool definitions.
    """
    if not isinstance(body, dict):
        return None if body is None else 0
    texts = [body.get(key) for key in ("messages", "prompt", "input", "instructions", "system")]
    tools = [body.get(key) for key in ("tools", "functions")]
    return text_chars(texts) + text_chars(tools, count_keys=True)


def apply_openai_usage(tally: Tally, usage: object) -> None:
    """
    Apply an OpenAI C{usage} object of either family.
    """
    if not isinstance(usage, dict):
        return
    if "input_tokens" in usage or "output_tokens" in usage:
        tally.set_tokens(
            input_tokens=as_int(usage.get("input_tokens")),
            output_tokens=as_int(usage.get("output_tokens")),
            cache_read_tokens=as_int(dig(usage, "input_tokens_details", "cached_tokens")),
            reasoning_tokens=as_int(dig(usage, "output_tokens_details", "reasoning_tokens")),
        )
    else:
        tally.set_tokens(
            input_tokens=as_int(usage.get("prompt_tokens")),
            output_tokens=as_int(usage.get("completion_tokens")),
            cache_read_tokens=as_int(dig(usage, "prompt_tokens_details", "cached_tokens")),
            reasoning_tokens=as_int(dig(usage, "completion_tokens_details", "reasoning_tokens")),
        )


def first_finish_reason(choices: object) -> str | None:
    """
    C{finish_reason} of the choice with index 0 (else the first choice).
    """
    if not isinstance(choices, list) or not choices:
        return None
    for choice in choices:
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            return as_str(choice.get("finish_reason"))
    return as_str(dig(choices, 0, "finish_reason"))


class OpenAIExtractor(Extractor):
    """
    Usage from an OpenAI response object (any endpoint), or from the keys of
    a body too big to parse.
    """

    keys = ("model", "id", "usage", "finish_reason", "status")

    def apply_json(self, tally: Tally, obj: object) -> None:
        if not isinstance(obj, dict):
            return
        if obj.get("object") in ("response", "realtime.response") or "output" in obj:
            self.apply_response(tally, obj)
            return
        tally.model = as_str(obj.get("model")) or tally.model
        tally.body_id = as_str(obj.get("id")) or tally.body_id
        tally.finish_reason = first_finish_reason(obj.get("choices")) or tally.finish_reason
        apply_openai_usage(tally, obj.get("usage"))

    def apply_response(self, tally: Tally, response: dict[str, object]) -> None:
        """
        Apply a Responses API C{response} object.
        """
        tally.model = as_str(response.get("model")) or tally.model
        tally.body_id = as_str(response.get("id")) or tally.body_id
        tally.finish_reason = as_str(response.get("status")) or tally.finish_reason
        apply_openai_usage(tally, response.get("usage"))

    def apply_scan(self, tally: Tally, scanner: KeyScanner) -> None:
        tally.model = as_str(scanner.first.get("model")) or tally.model
        tally.body_id = as_str(scanner.first.get("id")) or tally.body_id
        tally.finish_reason = (
            as_str(scanner.last.get("finish_reason"))
            or as_str(scanner.first.get("status"))
            or tally.finish_reason
        )
        apply_openai_usage(tally, scanner.last.get("usage"))


EXTRACTOR = OpenAIExtractor()


class ChatStreamMeter(SSEMeter):
    """
    Chat Completions / Completions streams: one chunk per event, C{data:
    [DONE]} at the end, usage in a last chunk whose C{choices} is empty.

    Each chunk is only searched (model and id until found, C{finish_reason},
    a C{usage} object); just the chunk with a C{usage} object is parsed.
    """

    def __init__(self, tally: Tally, strip: bool) -> None:
        super().__init__(tally, strip)
        self._stripped = False

    def on_event(self, event: Event) -> bool:
        tally = self.tally
        if event.truncated:
            EXTRACTOR.scan(tally, event.tail)
            return False
        data = event.data
        if tally.model is None:
            match = _MODEL.search(data)
            if match:
                tally.model = json_string(match.group(1))
        if tally.body_id is None:
            match = _ID.search(data)
            if match:
                tally.body_id = json_string(match.group(1))
        match = _FINISH.search(data)
        if match:
            tally.finish_reason = json_string(match.group(1)) or tally.finish_reason
        if _USAGE_OBJECT.search(data) is None:
            return False
        chunk = loads(data)
        if not isinstance(chunk, dict):
            return False
        usage = chunk.get("usage")
        if not isinstance(usage, dict):
            # Groq's own streams report it under x_groq.
            usage = dig(chunk, "x_groq", "usage")
        apply_openai_usage(tally, usage)
        if self._stripped or chunk.get("choices") != []:
            return False
        self._stripped = True
        return True


class ResponsesStreamMeter(SSEMeter):
    """
    Responses API streams: typed events; the final one
    (C{response.completed}, C{.incomplete} or C{.failed}) holds the whole
    response with its usage, and only it (and the small C{response.created})
    is parsed.
    """

    def on_event(self, event: Event) -> bool:
        name = event.event
        if event.truncated:
            if not name or name in RESPONSES_FINAL_EVENTS:
                EXTRACTOR.scan(self.tally, event.tail)
            return False
        if not name:
            match = _TYPE.search(event.data, 0, 256)
            name = match.group(1) if match else b""
        if name in RESPONSES_FINAL_EVENTS:
            response = dig(loads(event.data), "response")
            if isinstance(response, dict):
                EXTRACTOR.apply_response(self.tally, response)
        elif name in RESPONSES_START_EVENTS and self.tally.model is None:
            # Only who answers: its status, "in_progress", is no finish reason.
            response = dig(loads(event.data), "response")
            if isinstance(response, dict):
                self.tally.model = as_str(response.get("model"))
                self.tally.body_id = as_str(response.get("id"))
        return False


def openai_stream_event(facts: RequestFacts, event: Event) -> StreamEvent:
    """
    What an event of an OpenAI-style stream is: Chat Completions and
    Completions chunks are content once a choice carries text, a tool call
    or a finish reason; Responses events once past the opening ones.
    """
    if event.event == b"error" or event.data[:16].lstrip().startswith(b'{"error"'):
        return StreamEvent.ERROR
    if facts.endpoint == "responses":
        name = event.event
        if not name:
            match = _TYPE.search(event.data, 0, 256)
            name = match.group(1) if match else b""
        if name in RESPONSES_ERROR_EVENTS:
            return StreamEvent.ERROR
        return StreamEvent.PRELUDE if name in RESPONSES_PRELUDE_EVENTS else StreamEvent.CONTENT
    if event.data.strip() == b"[DONE]":
        return StreamEvent.CONTENT
    chunk = loads(event.data)
    if not isinstance(chunk, dict):
        return StreamEvent.CONTENT
    if "error" in chunk:
        return StreamEvent.ERROR
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return StreamEvent.CONTENT
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if choice.get("text") or choice.get("finish_reason"):
            return StreamEvent.CONTENT
        if isinstance(delta, dict) and any(delta.get(key) for key in _DELTA_CONTENT):
            return StreamEvent.CONTENT
    return StreamEvent.PRELUDE


def _usage_options(options: object) -> dict[str, object] | None:
    """
    The client's C{stream_options} with C{include_usage} set, or L{None}
    when it is already set (or the options are not an object).
    """
    if options is None:
        options = {}
    if not isinstance(options, dict) or options.get("include_usage") is True:
        return None
    return {**options, "include_usage": True}


def openai_meter_for(facts: RequestFacts, tally: Tally, sse: bool, strip: bool) -> Meter:
    """
    The meter for an OpenAI-style response, shared with the
    OpenAI-compatible endpoints of other providers.
    """
    if not sse:
        return JSONBodyMeter(tally, EXTRACTOR)
    if facts.endpoint == "responses":
        return ResponsesStreamMeter(tally)
    return ChatStreamMeter(tally, strip)


class OpenAIFormat(ProviderFormat):
    """
    The OpenAI API and its compatible servers.
    """

    kind = "openai"
    id_headers = ID_HEADERS

    def describe(
        self, method: str, segments: list[str], query: bytes, body: object | None
    ) -> RequestFacts:
        return describe_openai(method, segments, body)

    def prompt_chars(self, facts: RequestFacts, body: object | None) -> int | None:
        return openai_prompt_chars(body)

    def ask_stream_usage(self, facts: RequestFacts, body: object | None) -> bytes | None:
        """
        Ask a streaming Chat Completions / Completions request for usage.

        The client's other C{stream_options} stay; a C{stream_options} that
        is not an object is left for the upstream to reject.
        """
        if facts.endpoint not in STREAM_USAGE_ENDPOINTS or not isinstance(body, dict):
            return None
        options = _usage_options(body.get("stream_options"))
        if options is None:
            return None
        rewritten = dict(body)
        rewritten["stream_options"] = options
        try:
            return orjson.dumps(rewritten)
        except (TypeError, ValueError):
            return None

    def ask_stream_usage_unparsed(
        self, facts: RequestFacts, body: bytes, top: TopLevel
    ) -> bytes | None:
        """
        L{ask_stream_usage} for a body too large to parse: the new
        C{stream_options} is written over the old one's bytes, or inserted
        as the object's first member when there is none (the scan proved
        there is none at the top level).
        """
        if facts.endpoint not in STREAM_USAGE_ENDPOINTS:
            return None
        span = top.spans.get("stream_options")
        if span is None:
            member = b'"stream_options":{"include_usage":true},'
            return body[: top.inside] + member + body[top.inside :]
        options = _usage_options(top.values.get("stream_options"))
        if options is None or span[1] <= span[0]:
            return None
        return body[: span[0]] + orjson.dumps(options) + body[span[1] :]

    def meter_for(self, facts: RequestFacts, tally: Tally, sse: bool, strip: bool) -> Meter:
        return openai_meter_for(facts, tally, sse, strip)

    def stream_event(self, facts: RequestFacts, event: Event) -> StreamEvent:
        return openai_stream_event(facts, event)

    def error_body(self, status: int, message: str) -> bytes:
        return openai_error_body(status, message)

    def sse_error_event(self, status: int, message: str) -> bytes:
        """
        C{event: error} with the error body as data: the OpenAI SDKs raise
        C{APIError} on any stream event whose data has an C{error} key.
        """
        return b"event: error\ndata: " + openai_error_body(status, message) + b"\n\n"
