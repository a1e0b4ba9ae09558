"""
The official clients of the cloud providers, built the way their users
build them but pointed at a base URL of the test's choosing (the fake
upstream directly, or the proxy in front of it): C{openai.AzureOpenAI},
boto3's C{bedrock-runtime}, C{anthropic.AnthropicVertex} and google-genai
in Vertex mode.  Shared by C{tests.compat.test_cloud_fake_vs_sdks} and
C{tests.compat.test_cloud_through_proxy}.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anthropic
import boto3
import google.oauth2.credentials
import openai
import urllib3
from botocore.config import Config as BotoConfig
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google import genai
from google.genai import types as genai_types
from twisted.internet.ssl import KeyPair

from llmproxy.testing.fake_upstream.sigv4 import TEST_ACCESS_KEY, TEST_SECRET_KEY

# The tests' TLS certificates are self-signed and not verified, on purpose.
warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)

SDK_TIMEOUT = 20.0
AZURE_API_VERSION = "2024-10-21"
REGION = "us-east-1"
VERTEX_PROJECT = "fake-project"
VERTEX_REGION = "us-east5"
BEDROCK_MODEL = "us.anthropic.claude-sonnet-4-20250514-v1:0"
BEDROCK_API_KEY = "ABSKZmFrZS1iZWRyb2NrLWFwaS1rZXk="


def azure(base_url: str, api_key: str = "azure-key") -> openai.AzureOpenAI:
    """
    The Azure client for an endpoint at C{base_url} (the SDK adds
    C{/openai/deployments/<deployment>/...}).
    """
    return openai.AzureOpenAI(
        api_key=api_key,
        api_version=AZURE_API_VERSION,
        azure_endpoint=base_url,
        max_retries=0,
        timeout=SDK_TIMEOUT,
    )


def bedrock(
    endpoint_url: str,
    access_key: str = TEST_ACCESS_KEY,
    secret_key: str = TEST_SECRET_KEY,
) -> Any:
    """
    boto3's C{bedrock-runtime} client, signing with SigV4 (with the fake's
    test credential unless told otherwise), no retries; an C{https} endpoint
    is not verified (the tests' certificates are self-signed).
    """
    return boto3.client(
        "bedrock-runtime",
        region_name=REGION,
        endpoint_url=endpoint_url,
        verify=False,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=BotoConfig(
            retries={"max_attempts": 1, "mode": "standard"},
            connect_timeout=SDK_TIMEOUT,
            read_timeout=SDK_TIMEOUT,
        ),
    )


def self_signed_pem() -> bytes:
    """
    A fresh private key and self-signed certificate for 127.0.0.1, as PEM:
    boto3 sends a Bedrock API key only over TLS.
    """
    key = KeyPair.generate(size=2048)
    certificate = key.selfSignedCert(serialNumber=1, commonName="127.0.0.1")
    pem: bytes = certificate.dumpPEM()
    return pem


def tls_description(directory: str) -> str:
    """
    A Twisted endpoint description listening with TLS on a free loopback
    port, its certificate written under C{directory}.
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "server.pem")
    with open(path, "wb") as stream:
        stream.write(self_signed_pem())
    escaped = path.replace(":", "\\:")
    return f"ssl:0:interface=127.0.0.1:privateKey={escaped}:certKey={escaped}"


def service_account(token_uri: str) -> dict[str, str]:
    """
    A Google service account key file's contents, with a fresh key, whose
    tokens come from C{token_uri} (the fake's token endpoint): what
    C{GOOGLE_APPLICATION_CREDENTIALS} names for Application Default
    Credentials.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return {
        "type": "service_account",
        "project_id": VERTEX_PROJECT,
        "private_key_id": "fake-key-id",
        "private_key": pem.decode("ascii"),
        "client_email": f"llmproxy@{VERTEX_PROJECT}.iam.gserviceaccount.com",
        "client_id": "1234567890",
        "token_uri": token_uri,
    }


def add_headers(client: Any, headers: dict[str, str]) -> None:
    """
    Send C{headers} with every request of a boto3 client (the fake's
    C{x-fake-*} knobs), added before the request is signed.
    """

    def add(request: Any, **ignored: Any) -> None:
        for name, value in headers.items():
            request.headers[name] = value

    client.meta.events.register_first("before-sign.bedrock-runtime.*", add)


@contextmanager
def bedrock_api_key(key: str = BEDROCK_API_KEY) -> Iterator[None]:
    """
    Make boto3 send a Bedrock API key (C{Authorization: Bearer}) instead of
    signing, as C{AWS_BEARER_TOKEN_BEDROCK} does for a user.
    """
    previous = os.environ.get("AWS_BEARER_TOKEN_BEDROCK")
    os.environ["AWS_BEARER_TOKEN_BEDROCK"] = key
    try:
        yield
    finally:
        if previous is None:
            del os.environ["AWS_BEARER_TOKEN_BEDROCK"]
        else:
            os.environ["AWS_BEARER_TOKEN_BEDROCK"] = previous


def anthropic_vertex(base_url: str, token: str = "vertex-oauth-token") -> anthropic.AnthropicVertex:
    """
    C{AnthropicVertex} with a fixed OAuth token; C{base_url} ends before
    C{/projects/...} (the SDK's default is C{https://<region>-aiplatform.googleapis.com/v1}).
    """
    return anthropic.AnthropicVertex(
        region=VERTEX_REGION,
        project_id=VERTEX_PROJECT,
        access_token=token,
        base_url=base_url,
        max_retries=0,
        timeout=SDK_TIMEOUT,
    )


def genai_vertex(base_url: str, token: str = "vertex-oauth-token") -> genai.Client:
    """
    google-genai in Vertex mode with a fixed OAuth token, its base URL at
    C{base_url}.
    """
    credentials = google.oauth2.credentials.Credentials(token=token)
    return genai.Client(
        vertexai=True,
        project=VERTEX_PROJECT,
        location="us-central1",
        credentials=credentials,
        http_options=genai_types.HttpOptions(
            base_url=base_url, api_version="v1", timeout=int(SDK_TIMEOUT * 1000)
        ),
    )


CONVERSE_MESSAGES: Any = [{"role": "user", "content": [{"text": "hi"}]}]
ANTHROPIC_BODY: dict[str, Any] = {
    "anthropic_version": "bedrock-2023-05-31",
    "max_tokens": 100,
    "messages": [{"role": "user", "content": "hi"}],
}
