# -*- test-case-name: llmproxy.test.test_call -*-
"""
Answers the proxy makes itself, in the provider's own error format so each
SDK raises its usual exception.
"""

from __future__ import annotations

from twisted.web.iweb import IRequest

from llmproxy.providers import ProviderFormat, format_for

ERROR_SOURCE_HEADER = b"X-LLM-Proxy-Error-Source"

_DEFAULT_FORMAT = "openai"
"""Unknown routes answer in the OpenAI shape, the one most clients parse."""


def error_body(fmt: ProviderFormat | None, status: int, message: str) -> bytes:
    return (fmt or format_for(_DEFAULT_FORMAT)).error_body(status, message)


def send_error(
    request: IRequest,
    fmt: ProviderFormat | None,
    status: int,
    message: str,
    source: str,
) -> None:
    """
    Write a complete error response and finish C{request}.

    @param source: C{"proxy"} when the proxy refused, C{"upstream"} when the
        upstream failed; sent as C{X-LLM-Proxy-Error-Source}.
    """
    body = error_body(fmt, status, message)
    request.setResponseCode(status)
    for name, value in fmt.error_headers(status) if fmt is not None else ():
        request.responseHeaders.setRawHeaders(name, [value])
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
    request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
    request.responseHeaders.setRawHeaders(ERROR_SOURCE_HEADER, [source.encode("ascii")])
    request.write(body)
    request.finish()
