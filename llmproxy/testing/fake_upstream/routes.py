# -*- test-case-name: llmproxy.test.test_fake_upstream_routes -*-
"""
Routing: which provider and handler answer a request, chosen from the end
of its raw path (so the fake answers the same under any prefix) and, where
providers share a path, from its headers and query; and L{answer}, which
applies the knobs, the credentials check and the handler in the order the
fake promises.

Pure functions of a recorded request: no twisted.web, no clock.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import parse_qsl, unquote

import orjson
from attrs import evolve

from llmproxy.testing.fake_upstream import anthropic, bedrock, gemini, openai, vertex
from llmproxy.testing.fake_upstream.call import Call, Handler, Reply
from llmproxy.testing.fake_upstream.dialects import (
    ANTHROPIC,
    BEDROCK,
    GEMINI,
    GOOGLE_OAUTH,
    OPENAI,
    Dialect,
)
from llmproxy.testing.fake_upstream.knobs import KnobError, Knobs, collect_knobs, parse_knobs
from llmproxy.testing.fake_upstream.records import ReceivedRequest

_GEMINI_METHOD = re.compile(r"/models/([^/:]+):([A-Za-z]+)$")
_MODEL_ID = re.compile(r"/models/([^/]+)$")
_VERTEX_CLAUDE = re.compile(r"/publishers/anthropic/models/([^/:]+):(rawPredict|streamRawPredict)$")
_GEMINI_METHODS: dict[str, Handler] = {
    "generateContent": gemini.generate_content,
    "streamGenerateContent": gemini.generate_content,
    "countTokens": gemini.count_tokens,
    "embedContent": gemini.embed,
    "batchEmbedContents": gemini.embed,
}


def route(
    request: ReceivedRequest, query: Mapping[str, str]
) -> tuple[Dialect, Handler | None, dict[str, str]]:
    """
    Pick the provider and handler for a request from the end of its path.
    """
    path = request.path.decode("latin-1")
    method = request.method
    operation = bedrock.PATH.search(path)
    if operation is not None:
        handler: Handler | None = (
            bedrock.OPERATIONS[operation.group(2)] if method == b"POST" else None
        )
        params = {"model": bedrock.model_from(operation.group(1)), "operation": operation.group(2)}
        return BEDROCK, handler, params
    if path.endswith("/token") and method == b"POST":
        return GOOGLE_OAUTH, vertex.token, {}
    claude = _VERTEX_CLAUDE.search(path)
    if claude is not None:
        handler = vertex.claude if method == b"POST" else None
        return GEMINI, handler, {"model": unquote(claude.group(1)), "method": claude.group(2)}
    gemini_method = _GEMINI_METHOD.search(path)
    if gemini_method is not None:
        model = unquote(gemini_method.group(1))
        name = gemini_method.group(2)
        handler = _GEMINI_METHODS.get(name) if method == b"POST" else None
        return GEMINI, handler, {"model": model, "method": name}
    model_id = _MODEL_ID.search(path)
    is_gemini = (
        "/v1beta/" in path + "/"
        or "/v1alpha/" in path + "/"
        or "key" in query
        or request.header(b"x-goog-api-key") is not None
    )
    is_anthropic = request.header(b"anthropic-version") is not None
    if method == b"GET" and (path.endswith("/models") or model_id is not None):
        params = {"model": unquote(model_id.group(1))} if model_id else {}
        if is_gemini:
            return GEMINI, gemini.model_get if model_id else gemini.models, params
        if is_anthropic:
            return ANTHROPIC, anthropic.model_get if model_id else anthropic.models, params
        return OPENAI, openai.model_get if model_id else openai.models, params
    if path.endswith("/messages/count_tokens"):
        return ANTHROPIC, anthropic.count_tokens if method == b"POST" else None, {}
    if path.endswith("/messages"):
        return ANTHROPIC, anthropic.messages if method == b"POST" else None, {}
    if is_gemini:
        return GEMINI, None, {}
    posts: dict[str, Handler] = {
        "/chat/completions": openai.chat_completions,
        "/completions": openai.completions,
        "/responses": openai.responses,
        "/embeddings": openai.embeddings,
    }
    for suffix, handler in posts.items():
        if path.endswith(suffix):
            return OPENAI, handler if method == b"POST" else None, {}
    return OPENAI, None, {}


def parse_query(query: bytes) -> dict[str, str]:
    """
    A raw query string as a dict (the last value of a repeated name wins).
    """
    return dict(parse_qsl(query.decode("latin-1"), keep_blank_values=True))


def answer(
    request: ReceivedRequest,
    defaults: Mapping[str, str],
    require_auth: bool,
    serial: int,
    now: int,
    failed_so_far: int = 0,
) -> tuple[Knobs, Reply]:
    """
    The fake's reply to C{request}, and the knobs that say how to write it.

    In order: a bad knob is a 400; C{x-fake-status} is that error; then the
    provider checks credentials; then the route answers (a 404 where there
    is none, a 400 for a POST body that is not a JSON object).  Errors use
    the dialect of the provider the path belongs to.

    @param defaults: knob values for headers the request does not set.
    @param require_auth: whether to check credentials.
    @param serial: this request's number, for its identifiers.
    @param now: the clock's time, in whole seconds.
    @param failed_so_far: how many earlier requests this fake failed on
        purpose for C{x-fake-fail-first}.
    """
    query = parse_query(request.query)
    dialect, handler, params = route(request, query)
    call = Call(
        knobs=Knobs(),
        request=request,
        serial=serial,
        now=now,
        query=query,
        params=params,
        require_auth=require_auth,
    )
    try:
        knobs = parse_knobs(collect_knobs(request.headers, defaults))
    except KnobError as error:
        return call.knobs, dialect.error(call, 400, str(error))
    call = evolve(call, knobs=knobs)
    if knobs.fail_first is not None:
        if failed_so_far < knobs.fail_first:
            return knobs, dialect.error(call, knobs.status or 503, knobs.error_message)
    elif knobs.status is not None:
        return knobs, dialect.error(call, knobs.status, knobs.error_message)
    refused = dialect.check_auth(call)
    if refused is not None:
        return knobs, refused
    if handler is None:
        return knobs, dialect.not_found(call)
    if request.method == b"POST" and dialect.json_requests:
        try:
            body = orjson.loads(request.body) if request.body else None
        except orjson.JSONDecodeError:
            message = "We could not parse the JSON body of your request."
            return knobs, dialect.error(call, 400, message)
        if not isinstance(body, dict):
            return knobs, dialect.error(call, 400, "The request body must be a JSON object.")
        call = evolve(call, body=body)
    return knobs, handler(call)
