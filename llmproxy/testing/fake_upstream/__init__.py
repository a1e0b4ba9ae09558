# -*- test-case-name: llmproxy.test.test_fake_upstream -*-
"""
A fake LLM upstream: the OpenAI, Anthropic, Gemini, Azure OpenAI, Bedrock
and Vertex AI HTTP APIs as their SDKs see them, with knobs for the failures a proxy has to survive.

Every end-to-end test, the SDK compatibility suite and the benchmarks talk
to this instead of the real providers.  Its wire formats (status codes,
headers, JSON shapes, SSE framing, usage fields, error bodies) are proved
against the official SDKs by C{tests.compat.test_fake_vs_sdks}: a shape an
SDK cannot parse is a bug here.

Use
===

In a test over loopback TCP::

    fake = FakeUpstream(clock)
    port = yield listen(fake, reactor)          # an IListeningPort
    self.addCleanup(port.stopListening)         # also drops open connections
    ...
    received = yield fake.wait_for_request()

In memory, with no socket and nothing on the global reactor, as the code
under test's L{IAgent <twisted.web.iweb.IAgent>}::

    clock = Clock()
    fake = FakeUpstream(clock)
    agent = RequestTraversalAgent(fake.resource())   # from treq.testing
    d = agent.request(b"POST", b"http://fake/v1/chat/completions", headers, body)
    clock.advance(0.1)                               # fire the fake's timers
    agent.flush()                                    # deliver what they wrote

Every delay and stream timer is set on C{clock}, so streams, hangs and
stalls move only when the test advances it, and a client that gives up
(C{transport.stopProducing()} on the response's protocol, then C{flush()})
shows in C{connection_lost_events}.  The request body needs a producer that
writes at once, like the proxy's own L{llmproxy.attempt.BytesProducer}:
treq's default one runs on the global reactor's cooperator.
C{StubTreq(fake.resource())} wraps the same agent with such a producer.

C{fake.site()} is a L{Site} that also records raw header order and tracks
connections, for mounting on any transport (its own timers also use
C{clock}).

What a test can observe: C{fake.received} (every L{ReceivedRequest}: raw
URI, raw header lines, body), C{wait_for_request()} (each request handed to
exactly one waiter, in order, even if it arrived first),
C{connection_lost_events} / C{wait_for_disconnect()} (clients that left
mid-response, with the clock time), C{paused_count} / C{resumed_count}
(flow control), C{bytes_sent}, C{last_body_sent}, C{active_responses}.

Standalone, for process-level tests and benchmarks::

    python -m llmproxy.testing.fake_upstream --port 0 [--interface 127.0.0.1]
        [--default x-fake-delay-ms=20 ...] [--no-auth]

prints the bound port number on a line of its own once it is listening.

Routes
======

Routes match on the B{end} of the raw request path, so the fake answers the
same under any prefix (a proxy C{base_url} of C{http://fake/some/prefix}
works) and records exactly what arrived (L{ReceivedRequest.uri}).

  - OpenAI: C{POST .../chat/completions}, C{.../completions},
    C{.../responses}, C{.../embeddings}; C{GET .../models},
    C{GET .../models/{id}}.  Auth: C{Authorization: Bearer <key>} (or
    Azure's C{api-key}); errors C{{"error": {"message", "type", "param",
    "code"}}}; request id in C{x-request-id}.
  - Anthropic: C{POST .../messages}, C{POST .../messages/count_tokens};
    C{GET .../models[/{id}]} when the request carries
    C{anthropic-version}.  Auth: C{x-api-key} or C{Authorization: Bearer}
    (else 401 C{authentication_error}); C{anthropic-version} is required
    (else 400).  Errors C{{"type": "error", "error": {"type", "message"},
    "request_id"}}; request id in C{request-id}.
  - Gemini: C{POST .../models/{model}:generateContent},
    C{:streamGenerateContent} (C{?alt=sse} gives SSE framed with
    C{\\r\\n\\r\\n}; without it a JSON array streamed element by element),
    C{:countTokens}, C{:embedContent}, C{:batchEmbedContents};
    C{GET .../v1beta/models[/{id}]} (any C{/v1beta/}, C{/v1alpha/} path, or
    one carrying a Gemini key).  Auth: C{?key=}, C{x-goog-api-key} or
    C{Authorization: Bearer} (none: 403 C{PERMISSION_DENIED}).  Errors
    C{{"error": {"code", "message", "status"}}}.

  - Azure OpenAI: the OpenAI routes under C{/openai/deployments/<d>/...}
    (they match on the path's end), with C{api-key} auth.
  - Amazon Bedrock Runtime: C{POST .../model/<modelId>/converse},
    C{converse-stream}, C{invoke}, C{invoke-with-response-stream} (streams
    as binary event streams, one frame per chunk written; L{bedrock}).
    Auth: a SigV4 signature by the test credential
    (L{sigv4.TEST_ACCESS_KEY}, checked against what arrived) or a Bedrock
    API key (C{Authorization: Bearer}).  Errors C{{"message"}} with
    C{x-amzn-ErrorType}; a stream's error is an exception frame.
  - Vertex AI: Gemini's routes serve C{.../publishers/google/models/...};
    C{POST .../publishers/anthropic/models/<m>:rawPredict} and
    C{:streamRawPredict} answer as Anthropic (model from the path,
    C{anthropic_version} in the body); auth as Gemini (a Bearer token).
    C{POST .../token} issues OAuth access tokens (C{ya29.fake-token-...})
    to google-auth's refresh, for Application Default Credentials.

An API key starting with C{invalid} is rejected the way each provider
rejects a wrong key (OpenAI and Anthropic 401, Gemini 400
C{API_KEY_INVALID}).  C{fake.require_auth = False} turns every credential
check off.  Anything else is a 404 in the OpenAI shape.

Generated content is deterministic: text is L{text_pieces} (one piece per
stream chunk, one token per piece); when the request offers tools (OpenAI
C{tools}, Anthropic C{tools} with an C{input_schema}, Gemini
C{functionDeclarations}) and the tool choice does not forbid it, the answer
is one call to the first (or the forced) tool, with arguments made up from
its JSON schema and streamed in C{x-fake-chunks} pieces.  A request's
C{max_tokens} / C{max_completion_tokens} / C{max_output_tokens} /
C{generationConfig.maxOutputTokens} below the piece count truncates the
text and reports the provider's "length" finish reason.

Knobs
=====

Set per request as headers (so a test sets them on its client request and
the proxy passes them through), or per instance in C{fake.defaults} (keys
are the header names below, lower case; a request header wins).  An
unknown C{x-fake-*} header, or a bad value, is a 400 naming it: typos fail
loudly.  Durations are in milliseconds on the injected clock.

  - C{x-fake-status: N}: answer status N with the provider's own error body
    (checked before auth).  C{x-fake-error-message: text} sets its message,
    C{x-fake-retry-after: S} adds C{retry-after: S}.
  - C{x-fake-chunks: N} [3]: number of text pieces (stream content events).
  - C{x-fake-bytes: N}: instead, enough 8 KiB filler pieces that the
    content is at least N bytes (the body is slightly larger: framing).
    Pieces are generated lazily, so 50 MiB streams cost no memory.
  - C{x-fake-delay-ms: N} [0]: delay between two stream chunks (the first
    chunk goes with the headers; the last is followed by the end at once).
  - C{x-fake-headers-delay-ms: N} [0]: delay before the status line.
  - C{x-fake-hang: headers}: never answer.  C{x-fake-hang: body}: send the
    headers (with C{Content-Length} for JSON), then nothing.
  - C{x-fake-stall-after: N}: send N chunks, then nothing (connection open).
  - C{x-fake-die-after: N}: send N chunks, then close the connection without
    the rest or the chunked terminator (if N is at least the number of
    chunks, everything is sent and the terminator still withheld).  A JSON
    (non-stream) body is one chunk, so C{0} means headers then close.
  - C{x-fake-error-after: N}: after N stream chunks, send the provider's
    in-stream error event (OpenAI C{data: {"error": ...}}, Anthropic
    C{event: error}, Gemini C{data: {"error": ...}}) and end the response.
  - C{x-fake-gzip: 1}: C{Content-Encoding: gzip} (JSON and streams, each
    chunk flushed) when the request's C{Accept-Encoding} allows gzip.
  - C{x-fake-usage: 0}: omit usage everywhere (OpenAI C{usage}, the
    include_usage chunk, Anthropic C{usage}, Gemini C{usageMetadata}).
    For proxy tests: the Anthropic SDK needs usage in streams.
  - C{x-fake-model: name}: the model reported back [the request's model].
  - C{x-fake-input-tokens: N} [10], C{x-fake-output-tokens: N} [pieces],
    C{x-fake-reasoning-tokens: N} [0], C{x-fake-cached-tokens: N} [0],
    C{x-fake-cache-write-tokens: N} [0]: usage, each placed verbatim in the
    provider's own field; see L{FakeUpstream} for the exact mapping.
  - C{x-fake-finish-reason: value}: the finish/stop reason verbatim.
  - C{x-fake-set-cookie: value} (repeatable): a C{Set-Cookie} per value.
  - C{x-fake-fail-first: N}: the first N requests carrying it (counted
    per fake) get the error of C{x-fake-status} (503 when not set); later
    ones are answered normally.  For retries and circuit breakers.
  - C{x-fake-reset: 1}: drop the connection without any response.
  - C{x-fake-header: Name: value} (repeatable): an extra response header
    per value (duplicates and hop-by-hop names allowed: they are the point);
    it replaces a header of that name the fake would send itself (its
    rate-limit headers, say).
Layout
======

One module per idea; this package re-exports the public names.

  - L{knobs}: the C{x-fake-*} knobs, parsed strictly.
  - L{records}: L{ReceivedRequest} and L{ClientDisconnect}, what a test reads.
  - L{text}: the deterministic fake model (text, tool calls, embeddings).
  - L{call}: what a route handler takes and returns, and the JSON/SSE encoders.
  - L{dialects}: each provider's headers, error shapes and credential checks.
  - L{openai}, L{anthropic}, L{gemini}, L{bedrock}, L{vertex}: each
    provider's routes; L{sigv4}: checking an AWS signature.
  - L{routes}: which provider and handler answer a request.
  - L{responder}: writing a reply on the injected clock, with flow control.
  - L{server}: L{FakeUpstream}, its site and channel, and L{listen}.
  - C{__main__}: the standalone command line.
"""

from llmproxy.testing.fake_upstream.anthropic import ANTHROPIC_MODELS
from llmproxy.testing.fake_upstream.gemini import GEMINI_MODELS
from llmproxy.testing.fake_upstream.knobs import DEFAULT_CHUNKS, DEFAULT_INPUT_TOKENS, KNOBS
from llmproxy.testing.fake_upstream.openai import OPENAI_MODELS
from llmproxy.testing.fake_upstream.records import ClientDisconnect, ReceivedRequest
from llmproxy.testing.fake_upstream.server import FakeUpstream, listen
from llmproxy.testing.fake_upstream.text import fake_text, text_pieces

__all__ = [
    "ANTHROPIC_MODELS",
    "DEFAULT_CHUNKS",
    "DEFAULT_INPUT_TOKENS",
    "GEMINI_MODELS",
    "KNOBS",
    "OPENAI_MODELS",
    "ClientDisconnect",
    "FakeUpstream",
    "ReceivedRequest",
    "fake_text",
    "listen",
    "text_pieces",
]
