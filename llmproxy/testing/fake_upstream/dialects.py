# -*- test-case-name: llmproxy.test.test_fake_upstream_dialects -*-
"""
The provider dialects: the response headers of OpenAI, Anthropic and
Gemini, the shape of their errors (as a response and inside a stream) and
how each checks credentials.

Every reply is built through one of these, so an error (a real one or one
injected with C{x-fake-status}) looks like the provider's own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from llmproxy.eventstream import exception_frame
from llmproxy.testing.fake_upstream.call import Call, Reply, sse_data, sse_event
from llmproxy.testing.fake_upstream.records import ReceivedRequest
from llmproxy.testing.fake_upstream.sigv4 import is_sigv4, sigv4_problem

_STATUS_MESSAGES = {
    400: "Invalid request.",
    401: "Invalid authentication credentials.",
    402: "Payment required.",
    403: "Permission denied.",
    404: "Not found.",
    408: "Request timed out.",
    409: "Conflict.",
    413: "Request too large.",
    422: "Unprocessable request.",
    429: "Rate limit reached, please slow down.",
    500: "The server had an error while processing your request.",
    502: "Bad gateway.",
    503: "The service is temporarily overloaded.",
    504: "The request timed out.",
    529: "Overloaded.",
}


def status_message(status: int) -> str:
    """
    The default error message for C{status}.
    """
    return _STATUS_MESSAGES.get(status, f"Error {status}.")


class Dialect:
    """
    Headers, error shapes and credential checks of one provider.

    A provider sets the class attributes and writes the methods that raise
    L{NotImplementedError} here.

    @cvar json_type: the C{Content-Type} of a JSON answer.
    @cvar sse_type: the C{Content-Type} of an event stream.
    @cvar json_requests: a C{POST} body must be a JSON object (else 400).
    @cvar error_kinds: the provider's name for an error status (its error
        C{type}, or Gemini's C{status}).
    @cvar client_error_kind: the name for a 4xx status not in C{error_kinds}.
    @cvar server_error_kind: the name for a 5xx status not in C{error_kinds}.
    """

    json_type = b"application/json"
    sse_type = b"text/event-stream; charset=utf-8"
    json_requests = True
    error_kinds: Mapping[int, str] = {}
    client_error_kind = ""
    server_error_kind = ""

    def headers(self, call: Call, content_type: bytes) -> list[tuple[bytes, bytes]]:
        """
        The response headers of every reply, in the provider's order.
        """
        raise NotImplementedError()

    def error_body(self, call: Call, status: int, message: str, code: str | None) -> Any:
        """
        The JSON body of an error response.
        """
        raise NotImplementedError()

    def stream_error(self, call: Call) -> bytes:
        """
        The event the provider sends when a stream fails midway.
        """
        raise NotImplementedError()

    def api_key(self, call: Call) -> str | None:
        """
        The key the request authenticates with, wherever the provider
        takes it from.
        """
        raise NotImplementedError()

    def no_key(self, call: Call) -> Reply:
        """
        The provider's answer to a request without a key.
        """
        raise NotImplementedError()

    def wrong_key(self, call: Call, key: str) -> Reply:
        """
        The provider's answer to a key it does not know.
        """
        raise NotImplementedError()

    def not_found(self, call: Call) -> Reply:
        """
        The provider's 404 for a path (or method) the fake does not serve.
        """
        raise NotImplementedError()

    def error_kind(self, status: int) -> str:
        """
        The provider's name for an error status.
        """
        fallback = self.server_error_kind if status >= 500 else self.client_error_kind
        return self.error_kinds.get(status, fallback)

    def check_auth(self, call: Call) -> Reply | None:
        """
        The provider's refusal of the request's credentials, or C{None} to
        go on: no key, or one starting with C{invalid} (the fake's wrong
        key).  Nothing is refused when the fake does not require auth.
        """
        if not call.require_auth:
            return None
        key = self.api_key(call)
        if not key:
            return self.no_key(call)
        if key.startswith("invalid"):
            return self.wrong_key(call, key)
        return None

    def error(
        self, call: Call, status: int, message: str | None = None, code: str | None = None
    ) -> Reply:
        """
        An error reply in the provider's shape (C{message} defaults to one
        for the status).
        """
        text = message if message is not None else status_message(status)
        return Reply(
            status=status,
            headers=self.headers(call, self.json_type),
            chunks=[orjson.dumps(self.error_body(call, status, text, code))],
        )

    def json(self, call: Call, value: Any) -> Reply:
        """
        A 200 with C{value} as its JSON body.
        """
        return Reply(
            status=200, headers=self.headers(call, self.json_type), chunks=[orjson.dumps(value)]
        )

    def stream(
        self, call: Call, chunks: Iterable[bytes], content_type: bytes | None = None
    ) -> Reply:
        """
        A 200 streaming C{chunks}, one write each (an event stream unless
        C{content_type} says otherwise).
        """
        return Reply(
            status=200,
            headers=self.headers(call, content_type or self.sse_type),
            chunks=chunks,
            streaming=True,
            error_event=self.stream_error(call),
        )


def _bearer(request: ReceivedRequest) -> str | None:
    value = request.header(b"authorization")
    if value is None:
        return None
    scheme, _, token = value.decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _header_text(request: ReceivedRequest, name: bytes) -> str | None:
    value = request.header(name)
    return value.decode("latin-1").strip() if value else None


class _OpenAI(Dialect):
    error_kinds = {
        400: "invalid_request_error",
        401: "invalid_request_error",
        403: "permission_error",
        404: "invalid_request_error",
        409: "invalid_request_error",
        413: "invalid_request_error",
        422: "invalid_request_error",
        429: "requests",
    }
    client_error_kind = "invalid_request_error"
    server_error_kind = "server_error"
    _codes = {401: "invalid_api_key", 429: "rate_limit_exceeded"}

    def headers(self, call: Call, content_type: bytes) -> list[tuple[bytes, bytes]]:
        return [
            (b"Content-Type", content_type),
            (b"Server", b"cloudflare"),
            (b"x-request-id", call.ident("req_").encode()),
            (b"openai-organization", b"fake-org"),
            (b"openai-processing-ms", b"1"),
            (b"openai-version", b"2020-10-01"),
            (b"x-ratelimit-limit-requests", b"10000"),
            (b"x-ratelimit-remaining-requests", b"9999"),
            (b"x-ratelimit-reset-requests", b"6ms"),
            (b"x-ratelimit-limit-tokens", b"30000000"),
            (b"x-ratelimit-remaining-tokens", b"29999990"),
            (b"x-ratelimit-reset-tokens", b"0s"),
        ]

    def error_body(self, call: Call, status: int, message: str, code: str | None) -> Any:
        return {
            "error": {
                "message": message,
                "type": self.error_kind(status),
                "param": None,
                "code": code if code is not None else self._codes.get(status),
            }
        }

    def stream_error(self, call: Call) -> bytes:
        return sse_data(self.error_body(call, 500, status_message(500), None))

    def api_key(self, call: Call) -> str | None:
        key = _bearer(call.request)
        return key if key is not None else _header_text(call.request, b"api-key")

    def no_key(self, call: Call) -> Reply:
        return self.error(
            call,
            401,
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        )

    def wrong_key(self, call: Call, key: str) -> Reply:
        return self.error(call, 401, f"Incorrect API key provided: {key[:4]}****.")

    def not_found(self, call: Call) -> Reply:
        request = call.request
        method = request.method.decode()
        return self.error(call, 404, f"Invalid URL ({method} {request.path.decode('latin-1')})")


class _Anthropic(Dialect):
    error_kinds = {
        400: "invalid_request_error",
        401: "authentication_error",
        402: "billing_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        500: "api_error",
        504: "timeout_error",
        529: "overloaded_error",
    }
    client_error_kind = "invalid_request_error"
    server_error_kind = "api_error"

    def headers(self, call: Call, content_type: bytes) -> list[tuple[bytes, bytes]]:
        return [
            (b"Content-Type", content_type),
            (b"Server", b"cloudflare"),
            (b"request-id", call.ident("req_").encode()),
            (b"anthropic-organization-id", b"00000000-0000-4000-8000-00000000fa4e"),
            (b"anthropic-ratelimit-requests-limit", b"4000"),
            (b"anthropic-ratelimit-requests-remaining", b"3999"),
            (b"anthropic-ratelimit-requests-reset", b"1970-01-01T00:00:00Z"),
        ]

    def error_body(self, call: Call, status: int, message: str, code: str | None) -> Any:
        return {
            "type": "error",
            "error": {"type": code or self.error_kind(status), "message": message},
            "request_id": call.ident("req_"),
        }

    def stream_error(self, call: Call) -> bytes:
        return sse_event(
            "error",
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        )

    def api_key(self, call: Call) -> str | None:
        key = _header_text(call.request, b"x-api-key")
        return key if key is not None else _bearer(call.request)

    def no_key(self, call: Call) -> Reply:
        return self.error(call, 401, "x-api-key header is required")

    def wrong_key(self, call: Call, key: str) -> Reply:
        return self.error(call, 401, "invalid x-api-key")

    def not_found(self, call: Call) -> Reply:
        return self.error(call, 404, "Not Found")

    def check_auth(self, call: Call) -> Reply | None:
        """
        Credentials as for any provider, then the C{anthropic-version}
        header, which the API requires even where it takes no key.
        """
        refused = super().check_auth(call)
        if refused is None and call.request.header(b"anthropic-version") is None:
            return self.error(call, 400, "anthropic-version: header is required")
        return refused


class _Gemini(Dialect):
    json_type = b"application/json; charset=UTF-8"
    sse_type = b"text/event-stream"
    error_kinds = {
        400: "INVALID_ARGUMENT",
        401: "UNAUTHENTICATED",
        403: "PERMISSION_DENIED",
        404: "NOT_FOUND",
        409: "ABORTED",
        429: "RESOURCE_EXHAUSTED",
        499: "CANCELLED",
        500: "INTERNAL",
        501: "NOT_IMPLEMENTED",
        503: "UNAVAILABLE",
        504: "DEADLINE_EXCEEDED",
    }
    client_error_kind = "FAILED_PRECONDITION"
    server_error_kind = "INTERNAL"

    def headers(self, call: Call, content_type: bytes) -> list[tuple[bytes, bytes]]:
        return [
            (b"Content-Type", content_type),
            (b"Vary", b"Origin, X-Origin, Referer"),
            (b"X-Content-Type-Options", b"nosniff"),
            (b"Server", b"scaffolding on HTTPServer2"),
        ]

    def error_body(self, call: Call, status: int, message: str, code: str | None) -> Any:
        error: dict[str, Any] = {
            "code": status,
            "message": message,
            "status": self.error_kind(status),
        }
        if code is not None:
            error["details"] = [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": code,
                    "domain": "googleapis.com",
                }
            ]
        return {"error": error}

    def stream_error(self, call: Call) -> bytes:
        return sse_data(
            self.error_body(call, 500, "An internal error has occurred.", None), b"\r\n\r\n"
        )

    def api_key(self, call: Call) -> str | None:
        key = call.query.get("key") or _header_text(call.request, b"x-goog-api-key")
        return key or _bearer(call.request)

    def no_key(self, call: Call) -> Reply:
        return self.error(
            call,
            403,
            "Method doesn't allow unregistered callers (callers without established "
            "identity). Please use API Key or other form of API consumer identity to "
            "call this API.",
        )

    def wrong_key(self, call: Call, key: str) -> Reply:
        return self.error(
            call, 400, "API key not valid. Please pass a valid API key.", "API_KEY_INVALID"
        )

    def not_found(self, call: Call) -> Reply:
        return self.error(call, 404, "The requested URL was not found on this server.")


class _Bedrock(Dialect):
    """
    Amazon Bedrock Runtime: errors are C{{"message"}} with the error's name
    in C{x-amzn-ErrorType}; a stream's error is an exception frame.  Auth is
    a SigV4 signature by the fake's test credential (checked against what
    arrived, see L{sigv4_problem}) or a Bedrock API key
    (C{Authorization: Bearer}).
    """

    sse_type = b"application/vnd.amazon.eventstream"
    error_kinds = {
        400: "ValidationException",
        403: "AccessDeniedException",
        404: "ResourceNotFoundException",
        408: "ModelTimeoutException",
        424: "ModelErrorException",
        429: "ThrottlingException",
        500: "InternalServerException",
        503: "ServiceUnavailableException",
    }
    client_error_kind = "ValidationException"
    server_error_kind = "InternalServerException"

    def headers(self, call: Call, content_type: bytes) -> list[tuple[bytes, bytes]]:
        return [
            (b"Content-Type", content_type),
            (b"x-amzn-RequestId", call.ident("00000000-").encode()),
        ]

    def error(
        self, call: Call, status: int, message: str | None = None, code: str | None = None
    ) -> Reply:
        reply = super().error(call, status, message, code)
        kind = code or self.error_kind(status)
        error_type = kind.encode() + b":http://internal.amazon.com/coral/com.amazon.bedrock/"
        return Reply(
            status=reply.status,
            headers=[*reply.headers, (b"x-amzn-ErrorType", error_type)],
            chunks=reply.chunks,
        )

    def error_body(self, call: Call, status: int, message: str, code: str | None) -> Any:
        return {"message": message}

    def stream_error(self, call: Call) -> bytes:
        return exception_frame(
            "modelStreamErrorException",
            orjson.dumps({"message": "The model stream failed.", "originalStatusCode": 500}),
        )

    def api_key(self, call: Call) -> str | None:
        return _bearer(call.request)

    def no_key(self, call: Call) -> Reply:
        return self.error(call, 403, "Missing Authentication Token", "AccessDeniedException")

    def wrong_key(self, call: Call, key: str) -> Reply:
        return self.error(
            call,
            403,
            "The security token included in the request is invalid.",
            "UnrecognizedClientException",
        )

    def not_found(self, call: Call) -> Reply:
        return self.error(call, 404, "The requested operation is not recognized.")

    def check_auth(self, call: Call) -> Reply | None:
        if call.require_auth and is_sigv4(call.request):
            problem = sigv4_problem(call.request)
            if problem is None:
                return None
            code, message = problem
            status = 400 if code == "IncompleteSignatureException" else 403
            return self.error(call, status, message, code)
        return super().check_auth(call)


class _GoogleOAuth(Dialect):
    """
    Google's OAuth token endpoint, as far as google-auth's refresh needs it:
    a form-encoded request, no credential check.
    """

    json_requests = False
    client_error_kind = "invalid_request"
    server_error_kind = "internal_failure"

    def headers(self, call: Call, content_type: bytes) -> list[tuple[bytes, bytes]]:
        return [(b"Content-Type", content_type)]

    def error_body(self, call: Call, status: int, message: str, code: str | None) -> Any:
        return {"error": code or self.error_kind(status), "error_description": message}

    def check_auth(self, call: Call) -> Reply | None:
        return None

    def not_found(self, call: Call) -> Reply:
        return self.error(call, 404, "Not found.")


OPENAI = _OpenAI()
ANTHROPIC = _Anthropic()
GEMINI = _Gemini()
BEDROCK = _Bedrock()
GOOGLE_OAUTH = _GoogleOAuth()
