# -*- test-case-name: llmproxy.test.test_fake_upstream_bedrock -*-
"""
Vertex AI's Claude routes (C{.../publishers/anthropic/models/<model>:rawPredict}
and C{:streamRawPredict}: Anthropic's Messages with the model in the path and
C{anthropic_version} in the body), and the OAuth token endpoint that
google-auth refreshes Application Default Credentials against, so a test can
point a credentials file's C{token_uri} at the fake.

Vertex's Gemini routes are the Gemini API's (the fake routes on the end of
the path): nothing here.
"""

from __future__ import annotations

from attrs import evolve

from llmproxy.testing.fake_upstream import anthropic
from llmproxy.testing.fake_upstream.call import Call, Reply
from llmproxy.testing.fake_upstream.dialects import GEMINI, GOOGLE_OAUTH

TOKEN_PREFIX = "ya29.fake-token-"
"""Access tokens the token endpoint issues start with this."""


def claude(call: Call) -> Reply:
    """
    C{POST .../publishers/anthropic/models/<model>:rawPredict} (or
    C{streamRawPredict}): the Anthropic answer for the path's model.
    """
    body = call.body
    if not isinstance(body.get("anthropic_version"), str):
        # Vertex takes the API version in the body (vertex-2023-10-16 or later).
        return GEMINI.error(call, 400, "anthropic_version: Field required")
    if "model" in body:
        return GEMINI.error(call, 400, "model: Extra inputs are not permitted")
    return anthropic.messages(evolve(call, body={**body, "model": call.params["model"]}))


def token(call: Call) -> Reply:
    """
    C{POST .../token}: a fresh access token, whatever the grant.
    """
    return GOOGLE_OAUTH.json(
        call,
        {
            "access_token": TOKEN_PREFIX + f"{call.serial:04d}",
            "expires_in": 3599,
            "token_type": "Bearer",
            "scope": "https://www.googleapis.com/auth/cloud-platform",
        },
    )
