# -*- test-case-name: llmproxy.test.test_fake_upstream_bedrock -*-
"""
Checking an AWS Signature Version 4 the way AWS does: recompute it from
the request as it arrived (method, raw path and query, the headers the
signature names, the body) with the fake's one test credential, and compare.

The recomputation uses botocore's own canonicalisation (so it needs the
C{aws} extra, installed for development); what the fake proves is that
what arrived is exactly what was signed, not only that a signature is
present.
"""

from __future__ import annotations

import hmac
import re
from typing import Any

from llmproxy.testing.fake_upstream.records import ReceivedRequest

TEST_ACCESS_KEY = "AKIDLLMPROXYFAKE"
"""The access key id of the fake's one AWS credential."""

TEST_SECRET_KEY = "fake/secret/key/llmproxy+testing/0000000"
"""Its secret key: give both to the proxy's AWS credential chain in tests."""

_AUTHORIZATION = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/"
    r"(?P<service>[^/]+)/aws4_request, ?SignedHeaders=(?P<headers>[a-z0-9;-]+), ?"
    r"Signature=(?P<signature>[0-9a-f]{64})$"
)


def is_sigv4(request: ReceivedRequest) -> bool:
    """
    Whether the request claims a SigV4 signature.
    """
    value = request.header(b"authorization")
    return value is not None and value.startswith(b"AWS4-HMAC-SHA256 ")


def sigv4_problem(request: ReceivedRequest) -> tuple[str, str] | None:
    """
    What is wrong with the request's SigV4 signature, or L{None} when it is
    the test credential's valid signature of exactly what arrived.

    @return: C{(error code, message)} as AWS names them.
    """
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import ReadOnlyCredentials

    value = (request.header(b"authorization") or b"").decode("latin-1")
    found = _AUTHORIZATION.match(value)
    if found is None:
        return ("IncompleteSignatureException", "Authorization header is malformed.")
    if found["key"] != TEST_ACCESS_KEY:
        return (
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
        )
    stamp = (request.header(b"x-amz-date") or b"").decode("latin-1")
    if not stamp.startswith(found["date"]):
        return ("IncompleteSignatureException", "X-Amz-Date does not match the credential scope.")
    names = found["headers"].split(";")
    if "host" not in names:
        return ("IncompleteSignatureException", "The host header must be signed.")
    signed: dict[str, str] = {}
    for name in names:
        header = request.header(name.encode("latin-1"))
        if header is None:
            return ("IncompleteSignatureException", f"Signed header {name} is missing.")
        signed[name] = header.decode("latin-1")
    url = "http://" + signed["host"] + request.uri.decode("latin-1")
    rebuilt: Any = AWSRequest(method=request.method.decode(), url=url, data=request.body)
    for name, header_value in signed.items():
        rebuilt.headers[name] = header_value
    rebuilt.context["timestamp"] = stamp
    credentials = ReadOnlyCredentials(TEST_ACCESS_KEY, TEST_SECRET_KEY, None)
    signer = SigV4Auth(credentials, found["service"], found["region"])
    canonical = signer.canonical_request(rebuilt)
    expected = signer.signature(signer.string_to_sign(rebuilt, canonical), rebuilt)
    if not hmac.compare_digest(expected, found["signature"]):
        return (
            "InvalidSignatureException",
            "The request signature we calculated does not match the signature you provided.",
        )
    return None
