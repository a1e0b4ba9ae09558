# -*- test-case-name: llmproxy.test.test_providers_format -*-
"""
What every provider wire format offers the request path: one call to read
a client request (L{ProviderFormat.inspect}), one to pick the meter for a
response (L{ProviderFormat.new_meter}), and the provider's own error
shapes for the answers the proxy makes itself.

A provider module subclasses L{ProviderFormat} and fills in the parts that
differ (how a path names its API and model, where prompt text lives, which
meter reads its responses); the order of the steps, the fallbacks and the
promise never to raise live here once.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Mapping

import orjson
from attrs import evolve, frozen

from llmproxy.providers.keyscan import TooComplexError, TopLevel, top_level
from llmproxy.providers.meters import Meter, NullMeter, Tally, new_tally
from llmproxy.providers.wire import decode_path, is_json_type, loads, media_type, parse_json_body
from llmproxy.sse import Event

StreamError = Callable[[int, str], bytes | None]
"""
How to tell a client's SDK that a streamed response failed midway: status
and message to the bytes that end the stream, or L{None} when no bytes can
(the connection is cut instead).
"""

GENERATION_METHODS = frozenset({"POST", "PUT", "PATCH"})
"""Methods whose responses can report usage; C{GET} only re-reads old results."""

PARSE_LIMIT = 1 << 20
"""
Request bodies up to this many bytes (1 MiB) are parsed whole; larger ones
only have their top-level keys read (L{llmproxy.providers.keyscan.top_level}),
so one request never costs more than a small multiple of its size in
memory, nor stalls the process while it is read.
"""

MAX_NAME_CHARS = 256
"""Longest model or user name taken from a body (longer ones are cut)."""

BODY_KEYS = (
    "model",
    "stream",
    "stream_options",
    "user",
    "safety_identifier",
    "metadata",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "generationConfig",
    "generation_config",
)
"""The top-level body keys any format reads (for bodies above L{PARSE_LIMIT})."""


@frozen
class RequestFacts:
    """
    What a provider format learned from a client request.

    @ivar method: the request method, upper case.  Usage is read only from
        responses to L{GENERATION_METHODS}: a C{GET} of a stored response
        would otherwise count its tokens a second time.
    @ivar endpoint: a short, bounded name for the API called (safe as a
        metric label): C{chat.completions}, C{completions}, C{responses},
        C{embeddings}, C{models}, C{messages}, C{count_tokens},
        C{generateContent}, C{streamGenerateContent}, C{embedContent}, C{other}.
    @ivar model: the requested model, when the request names one.
    @ivar streaming: the response will be streamed (SSE or a streamed array).
    @ivar user: the end user the client names in the body, if any.
    @ivar prompt_chars: characters of prompt text in the body (for token
        estimation); L{None} when the body is not JSON or was too large to
        sample.
    @ivar max_output_tokens: the most output the request allows
        (C{max_tokens}, C{max_completion_tokens}, C{max_output_tokens},
        C{generationConfig.maxOutputTokens}), if it names a limit.
    """

    method: str = "POST"
    endpoint: str = "other"
    model: str | None = None
    streaming: bool = False
    user: str | None = None
    prompt_chars: int | None = None
    max_output_tokens: int | None = None


@frozen
class Inspection:
    """
    A client request as the provider format reads it.

    @ivar facts: what the request is.
    @ivar body: the body to send upstream: the client's, unless the format
        rewrote it (OpenAI streams asked for their usage).
    @ivar strip_usage_chunk: the response carries a usage-only event the
        client did not ask for, which its meter must remove.
    @ivar refusal: why the request cannot be forwarded (a body too complex
        to inspect), or L{None}.
    """

    facts: RequestFacts
    body: bytes
    strip_usage_chunk: bool = False
    refusal: str | None = None


class StreamEvent(enum.Enum):
    """
    What one event of a streamed response is, for the stream gate.
    """

    PRELUDE = "prelude"
    """Before any content: it can still be taken back (a retry replaces it)."""
    CONTENT = "content"
    """Content (or the stream's normal end): from here on it is the client's."""
    ERROR = "error"
    """The provider's own error event."""


class ProviderFormat(abc.ABC):
    """
    One provider's wire format.

    @cvar kind: the config C{kind} this format serves.
    @cvar id_headers: response headers carrying the upstream request id, in
        order of preference.
    @cvar unmetered_endpoints: endpoints whose responses never carry usage.
    @cvar body_keys: the top-level body keys L{describe} reads: of a body
        above L{PARSE_LIMIT}, only these are read and handed to it.
    """

    kind: str
    id_headers: tuple[str, ...] = ()
    unmetered_endpoints: frozenset[str] = frozenset()
    body_keys: tuple[str, ...] = BODY_KEYS

    def inspect(
        self,
        method: bytes,
        path: bytes,
        query: bytes,
        body: bytes,
        *,
        inject_stream_usage: bool = True,
        sample_limit: int = 1 << 62,
    ) -> Inspection:
        """
        Read a client request; never raises, whatever the input.

        A body up to L{PARSE_LIMIT} bytes is parsed; a larger one only has
        the L{body_keys} of its top level read, and a larger one too
        complex even for that (see L{llmproxy.providers.keyscan.top_level})
        comes back with a L{refusal<Inspection.refusal>}.

        @param path: the raw, still percent-encoded path after the mount
            prefix, without the query (C{b"/v1/chat/completions"}).
        @param query: the raw query string without C{?}, possibly C{b""}.
        @param inject_stream_usage: ask streams that report usage only on
            request to report it (C{providers.<name>.inject_stream_usage}).
        @param sample_limit: prompt text is counted only in bodies up to
            this many bytes; larger ones are estimated from their size.
        """
        verb = method.decode("ascii", "replace").upper()
        try:
            top: TopLevel | None = None
            if len(body) <= PARSE_LIMIT:
                body_json = parse_json_body(body)
            else:
                top = top_level(body, self.body_keys)
                body_json = top.values if top is not None else None
            facts = _bounded(self.describe(verb, decode_path(path), query, body_json))
            if top is None and len(body) <= sample_limit:
                facts = evolve(facts, prompt_chars=self.prompt_chars(facts, body_json))
            rewritten = None
            if inject_stream_usage and facts.streaming:
                if top is None:
                    rewritten = self.ask_stream_usage(facts, body_json)
                else:
                    rewritten = self.ask_stream_usage_unparsed(facts, body, top)
        except TooComplexError as error:
            return Inspection(
                RequestFacts(method=verb),
                body,
                refusal=f"Request body too complex to inspect ({error} in a body over "
                f"{PARSE_LIMIT} bytes).",
            )
        except Exception:
            return Inspection(RequestFacts(method=verb), body)
        if rewritten is None:
            return Inspection(facts, body)
        return Inspection(facts, rewritten, strip_usage_chunk=True)

    def new_meter(
        self,
        facts: RequestFacts,
        content_type: bytes | None,
        headers: Mapping[str, str],
        strip_usage_chunk: bool = False,
    ) -> Meter:
        """
        The meter for the response to a request.

        @param content_type: the response C{Content-Type}, if any.
        @param headers: response headers, lower-case name to first value.
        @param strip_usage_chunk: the request's L{Inspection} said so.
        """
        tally = new_tally(facts.model, headers, self.id_headers)
        if facts.method not in GENERATION_METHODS or facts.endpoint in self.unmetered_endpoints:
            return NullMeter(tally)
        media = media_type(content_type)
        if media == b"text/event-stream" or is_json_type(media):
            return self.meter_for(facts, tally, media == b"text/event-stream", strip_usage_chunk)
        return self.meter_for_media(facts, tally, media)

    def stream_error(
        self, facts: RequestFacts, content_type: bytes | None, meter: Meter | None
    ) -> StreamError | None:
        """
        How to end a streamed response that failed midway, so the client's
        SDK raises: for an event stream, a blank line (ending any event the
        upstream left half-written) and this provider's L{sse_error_event};
        for other bodies L{None}: the connection is cut.

        @param meter: the response's meter (L{None} when it is not metered).
        """
        if media_type(content_type) != b"text/event-stream":
            return None
        event = self.sse_error_event
        return lambda status, message: b"\n\n" + event(status, message)

    def error_headers(self, status: int) -> tuple[tuple[bytes, bytes], ...]:
        """
        Headers an error answer the proxy makes carries besides its body
        (Bedrock names the error in one); none by default.
        """
        return ()

    def stream_event(self, facts: RequestFacts, event: Event) -> StreamEvent:
        """
        What an event of a streamed response to C{facts} is; only events
        before the first content event are asked about. By default every
        event is content (nothing is held back).
        """
        return StreamEvent.CONTENT

    def rename_model(
        self, facts: RequestFacts, path: bytes, body: bytes, model: str
    ) -> tuple[bytes, bytes]:
        """
        The path and body of the request, naming C{model} instead of the
        requested one (an upstream that knows the model by another name).
        By default the JSON body's C{model}.
        """
        parsed = loads(body)
        if not isinstance(parsed, dict) or "model" not in parsed:
            return path, body
        parsed["model"] = model
        try:
            return path, orjson.dumps(parsed)
        except (TypeError, ValueError):
            return path, body

    # -- the parts each provider fills in -------------------------------------

    @abc.abstractmethod
    def describe(
        self, method: str, segments: list[str], query: bytes, body: object | None
    ) -> RequestFacts:
        """
        The facts of a request, without C{prompt_chars}.

        @param segments: the non-empty, percent-decoded path segments.
        @param body: the parsed JSON body, or L{None} when it is not JSON.
        """

    @abc.abstractmethod
    def prompt_chars(self, facts: RequestFacts, body: object | None) -> int | None:
        """
        How many characters of prompt text C{body} carries, or L{None} when
        it is not JSON.
        """

    def ask_stream_usage(self, facts: RequestFacts, body: object | None) -> bytes | None:
        """
        The body rewritten to ask a streamed response for its usage, or
        L{None} when it reports usage anyway (only OpenAI's chat streams
        need asking).
        """
        return None

    def ask_stream_usage_unparsed(
        self, facts: RequestFacts, body: bytes, top: TopLevel
    ) -> bytes | None:
        """
        L{ask_stream_usage} for a body above L{PARSE_LIMIT}, rewritten in
        place (C{top} says where its top-level keys lie), or L{None}.
        """
        return None

    @abc.abstractmethod
    def meter_for(self, facts: RequestFacts, tally: Tally, sse: bool, strip: bool) -> Meter:
        """
        The meter for a response that may carry usage: an SSE stream when
        C{sse}, else JSON (or of unknown type).

        @param strip: remove the usage-only event L{ask_stream_usage} asked for.
        """

    def meter_for_media(self, facts: RequestFacts, tally: Tally, media: bytes | None) -> Meter:
        """
        The meter for a response that is neither JSON nor SSE (Bedrock's
        binary event stream); by default such a body is not metered.
        """
        return NullMeter(tally)

    @abc.abstractmethod
    def error_body(self, status: int, message: str) -> bytes:
        """
        This provider's own JSON error body for an error the proxy makes.
        """

    @abc.abstractmethod
    def sse_error_event(self, status: int, message: str) -> bytes:
        """
        Complete SSE bytes that make this provider's SDK raise mid-stream.
        """


def _bounded(facts: RequestFacts) -> RequestFacts:
    """
    Cut client-chosen names to L{MAX_NAME_CHARS}: they become metric
    labels, limiter scopes and Redis key names.
    """
    model, user = facts.model, facts.user
    if (model is None or len(model) <= MAX_NAME_CHARS) and (
        user is None or len(user) <= MAX_NAME_CHARS
    ):
        return facts
    return evolve(
        facts,
        model=model[:MAX_NAME_CHARS] if model is not None else None,
        user=user[:MAX_NAME_CHARS] if user is not None else None,
    )
