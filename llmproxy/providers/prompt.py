# -*- test-case-name: llmproxy.test.test_providers_wire -*-
"""
Counting the prompt text in a request body, for token estimation: every
string a tokenizer would read, not the binary payloads and structural
fields around it, with bounded work for any body.
"""

from __future__ import annotations

from collections.abc import Iterable

PROMPT_WALK_BUDGET = 200_000
"""Most JSON nodes L{text_chars} visits for one request."""

_SKIP_KEYS = frozenset(
    {
        # Binary or opaque payloads, which are not prompt text (or not text
        # the tokenizer counts by characters).
        "data",
        "image_url",
        "input_audio",
        "file_data",
        "file_id",
        "file_url",
        "b64_json",
        "inlineData",
        "inline_data",
        "fileData",
        "url",
        "image",
        "audio",
        "signature",
        "thoughtSignature",
        "thought_signature",
        "encrypted_content",
        # Structure, not text.
        "type",
        "role",
        "mimeType",
        "mime_type",
        "media_type",
        "cache_control",
        "id",
        "tool_use_id",
        "tool_call_id",
        "call_id",
        "model",
    }
)


def text_chars(roots: Iterable[object], *, count_keys: bool = False) -> int:
    """
    Characters of text in some JSON values: every string except binary
    payloads (base64 fields, C{data:} URLs) and structural fields.

    @param count_keys: also count object keys (for tool schemas, whose
        property names the model reads).
    @return: the count; at most L{PROMPT_WALK_BUDGET} nodes are visited, so
        a pathological body costs bounded work (and is under-counted).
    """
    total = 0
    stack = list(roots)
    steps = 0
    while stack and steps < PROMPT_WALK_BUDGET:
        node = stack.pop()
        steps += 1
        if isinstance(node, str):
            if not node.startswith("data:"):
                total += len(node)
        elif isinstance(node, dict):
            for key, value in node.items():
                if key in _SKIP_KEYS:
                    continue
                if count_keys:
                    total += len(key)
                stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)
    return total
