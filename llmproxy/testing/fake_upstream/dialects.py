# -*- test-case-name: llmproxy.test.test_fake_upstream_dialects -*-
"""
The provider dialects: the response headers of OpenAI, Anthropic and
Gemini, the shape of their errors (as a response and inside a stream) and
how each checks credentials.

Every reply is built through one of these, so an error (a real one or one
injected with C{x-fake-status}) looks like the provider's own.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from llmproxy.testing.fake_upstream.call import Call, Reply, dumps, sse_data, sse_event
from llmproxy.testing.fake_upstream.records import ReceivedRequest

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
    Headers and error shapes of one provider.
    """

    json_type = b"application/json"
    sse_type = b"text/event-stream; charset=utf-8"

    def headers(self, call: Call, content_type: bytes) -> list[tuple[bytes, bytes]]:
        raise NotImplementedError()

    def error_body(self, call: Call, status: int, message: str, code: str | None) -> Any:
        raise NotImplementedError()

    def stream_error(self, call: Call) -> bytes:
        raise NotImplementedError()

    def check_auth(self, call: Call) -> Reply | None:
        raise NotImplementedError()

    def error(
        self, call: Call, status: int, message: str | None = None, code: str | None = None
    ) -> Reply:
        text = message if message is not None else status_message(status)
        return Reply(
            status=status,
            headers=self.headers(call, self.json_type),
            chunks=[dumps(self.error_body(call, status, text, code))],
        )

    def json(self, call: Call, value: Any) -> Reply:
        return Reply(status=200, headers=self.headers(call, self.json_type), chunks=[dumps(value)])

    def stream(
        self, call: Call, chunks: Iterable[bytes], content_type: bytes | None = None
    ) -> Reply:
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


class _OpenAI(Dialect):
    _types = {
        400: "invalid_request_error",
        401: "invalid_request_error",
        403: "permission_error",
        404: "invalid_request_error",
        409: "invalid_request_error",
        413: "invalid_request_error",
        422: "invalid_request_error",
        429: "requests",
    }
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
        kind = self._types.get(status, "server_error" if status >= 500 else "invalid_request_error")
        return {
            "error": {
                "message": message,
                "type": kind,
                "param": None,
                "code": code if code is not None else self._codes.get(status),
            }
        }

    def stream_error(self, call: Call) -> bytes:
        return sse_data(self.error_body(call, 500, status_message(500), None))

    def check_auth(self, call: Call) -> Reply | None:
        if not call.require_auth:
            return None
        key = _bearer(call.request)
        if key is None:
            azure = call.request.header(b"api-key")
            key = azure.decode("latin-1").strip() if azure else None
        if not key:
            return self.error(
                call,
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                None,
            )
        if key.startswith("invalid"):
            return self.error(call, 401, f"Incorrect API key provided: {key[:4]}****.")
        return None


class _Anthropic(Dialect):
    _types = {
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
        kind = code or self._types.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        return {
            "type": "error",
            "error": {"type": kind, "message": message},
            "request_id": call.ident("req_"),
        }

    def stream_error(self, call: Call) -> bytes:
        return sse_event(
            "error",
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        )

    def check_auth(self, call: Call) -> Reply | None:
        if call.require_auth:
            header = call.request.header(b"x-api-key")
            key = header.decode("latin-1").strip() if header else _bearer(call.request)
            if not key:
                return self.error(call, 401, "x-api-key header is required")
            if key.startswith("invalid"):
                return self.error(call, 401, "invalid x-api-key")
        if call.request.header(b"anthropic-version") is None:
            return self.error(call, 400, "anthropic-version: header is required")
        return None


class _Gemini(Dialect):
    json_type = b"application/json; charset=UTF-8"
    sse_type = b"text/event-stream"
    _statuses = {
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
            "status": self._statuses.get(
                status, "INTERNAL" if status >= 500 else "FAILED_PRECONDITION"
            ),
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

    def check_auth(self, call: Call) -> Reply | None:
        if not call.require_auth:
            return None
        header = call.request.header(b"x-goog-api-key")
        key = call.query.get("key") or (header.decode("latin-1").strip() if header else None)
        if not key:
            key = _bearer(call.request)
        if not key:
            return self.error(
                call,
                403,
                "Method doesn't allow unregistered callers (callers without established "
                "identity). Please use API Key or other form of API consumer identity to "
                "call this API.",
            )
        if key.startswith("invalid"):
            return self.error(
                call, 400, "API key not valid. Please pass a valid API key.", "API_KEY_INVALID"
            )
        return None


OPENAI = _OpenAI()
ANTHROPIC = _Anthropic()
GEMINI = _Gemini()
