"""
How close the rate limiter's input-token estimate comes to real token
counts: the table under "Estimation accuracy" in docs/rate-limiting.md.

For each sample prompt (short chat, long chat, system prompt + tools,
multi-turn, code, Japanese), in each provider's own wire format, the
estimate is what the proxy computes before forwarding: the provider module's
C{inspect} (its C{prompt_chars}) and L{llmproxy.ratelimit.estimate_tokens} with the
default settings (4 characters per token).

The reference is OpenAI's C{o200k_base} encoding (the tokenizer of gpt-4o,
gpt-4.1, gpt-5 and the o-series) run by C{tiktoken}. The encoding file must
be the real one: this script refuses a file whose SHA-256 differs from the
hash tiktoken itself pins for C{o200k_base}. No network is needed, but
neither tiktoken nor the encoding ship with llmproxy:

    python -m venv /tmp/tok && /tmp/tok/bin/pip install tiktoken
    npm pack js-tiktoken            # or any copy of o200k_base.tiktoken
    tar xzf js-tiktoken-*.tgz
    PYTHONPATH=/tmp/tok/lib/python3.11/site-packages .venv/bin/python \\
        bench/estimation_accuracy.py --from-js-tiktoken package/dist/ranks/o200k_base.js

(C{--encoding PATH} takes an C{o200k_base.tiktoken} file instead.)

What is and is not measured:
  - OpenAI: the reference adds the chat framing OpenAI documents for its
    chat models (3 tokens per message, 1 per C{name}, 3 to prime the
    reply). Tool definitions are counted as their compact JSON: OpenAI
    renders them differently inside the prompt and does not document how,
    so rows with tools are approximate.
  - Anthropic and Gemini: their tokenizers are not public (both providers
    count tokens only through an API call), so their rows compare the
    estimate with the same o200k count of the same texts. That shows what
    the 4-characters rule does with the text; it is not the provider's
    count, which is typically somewhat higher for Claude.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib
import importlib.util
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import orjson
from attrs import frozen

from llmproxy.config import Estimation
from llmproxy.providers import format_for
from llmproxy.ratelimit import estimate_tokens

O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
"""The hash tiktoken pins for C{o200k_base.tiktoken} (tiktoken_ext.openai_public)."""

# --- the sample prompts (written for this table) ---------------------------

ARTICLE = """\
Lighthouses were once the most important pieces of infrastructure on any
coast. Before satellite navigation, a captain approaching land at night had
little more than a chart, a compass, a lead line for the depth, and the
lights along the shore. Each light had its own character: a pattern of
flashes and eclipses, sometimes a colour, repeated at a fixed period, so that
a navigator who counted the seconds between flashes could tell which tower
he was looking at and fix his position from it.

The early towers burned wood or coal in open braziers, and the light they
gave was weak and unsteady. Oil lamps with polished reflectors were a great
improvement, but the decisive step came in the 1820s, when the French
physicist Augustin Fresnel designed a lens built from concentric rings of
glass prisms. A Fresnel lens gathered the light of a single lamp into a
narrow, intense beam and could be made large without becoming impossibly
heavy. Rotating the lens on a bed of mercury turned the beam into the
familiar sweeping flash.

Keeping a light was hard and lonely work. Keepers trimmed wicks, polished
brass and glass, wound the clockwork that turned the lens, and recorded the
weather in a log several times a night. On rock stations far offshore, crews
rotated every few weeks and were sometimes stranded for much longer when
storms made a landing impossible. Many keepers kept gardens in boxes of soil
carried out by boat, and some raised families on the larger islands.

Automation ended the profession during the second half of the twentieth
century. Electric lamps with automatic changers, sensors that switched the
light on at dusk, and radio links that reported faults to a shore station
made resident crews unnecessary. Today most lighthouses are monitored
remotely, a few have been turned into museums or guest houses, and others
have been switched off altogether as ships rely on electronic navigation.
Yet the lights that remain are still maintained, because electronics fail
and a visible light on a dark coast is a backup that needs no power on the
ship to be understood.
"""

SYSTEM = (
    "You are a support assistant for an online bookshop. Answer in a friendly, concise way. "
    "Use the tools to look up orders and stock; never invent an order status. If a customer "
    "asks for a refund, collect the order number and the reason, then call the refund tool. "
    "Do not discuss topics unrelated to the shop."
)

TOOLS = [
    {
        "name": "get_order",
        "description": "Look up an order by its number and return its status and items.",
        "parameters": {
            "type": "object",
            "properties": {
                "order_number": {
                    "type": "string",
                    "description": "The order number, e.g. BK-10293.",
                },
                "include_items": {
                    "type": "boolean",
                    "description": "Whether to include the list of items.",
                },
            },
            "required": ["order_number"],
        },
    },
    {
        "name": "request_refund",
        "description": "Open a refund request for an order.",
        "parameters": {
            "type": "object",
            "properties": {
                "order_number": {"type": "string", "description": "The order number."},
                "reason": {
                    "type": "string",
                    "enum": ["damaged", "late", "wrong_item", "other"],
                    "description": "Why the customer wants a refund.",
                },
                "note": {"type": "string", "description": "Free text from the customer."},
            },
            "required": ["order_number", "reason"],
        },
    },
]

CODE = '''\
Can you review this function? It should merge overlapping intervals.

def merge(intervals):
    """Merge overlapping [start, end] intervals."""
    if not intervals:
        return []
    intervals = sorted(intervals, key=lambda pair: pair[0])
    merged = [list(intervals[0])]
    for start, end in intervals[1:]:
        last = merged[-1]
        if start <= last[1]:
            last[1] = max(last[1], end)
        else:
            merged.append([start, end])
    return [tuple(pair) for pair in merged]


if __name__ == "__main__":
    print(merge([(1, 3), (2, 6), (8, 10), (15, 18), (17, 20)]))
'''

JAPANESE = (
    "東京から大阪まで新幹線で行く予定です。朝の九時ごろに出発して、昼ごろに着きたいと思います。"
    "おすすめの列車と、駅の近くで食事ができる場所を教えてください。荷物が多いので、"
    "座席の予約についても知りたいです。"
)

Turn = tuple[str, str]


@frozen
class Sample:
    """
    One prompt: an optional system text, the turns (role, text), and
    whether the tool definitions come with it.
    """

    name: str
    system: str | None
    turns: tuple[Turn, ...]
    tools: bool = False


SAMPLES = (
    Sample(
        "short chat",
        None,
        (("user", "What is the capital of Australia, and why not Sydney?"),),
    ),
    Sample(
        "long chat",
        None,
        (("user", "Summarise this article in three sentences.\n\n" + ARTICLE),),
    ),
    Sample(
        "system prompt + tools",
        SYSTEM,
        (("user", "Hi, where is my order BK-10293? It was due on Monday."),),
        tools=True,
    ),
    Sample(
        "multi-turn (6 turns)",
        "You are a helpful cooking assistant.",
        (
            ("user", "I have eggs, spinach, feta and some stale bread. Ideas for lunch?"),
            (
                "assistant",
                "A spinach and feta strata would use all of it: layer the bread, spinach and "
                "feta in a dish, pour over eggs beaten with a little milk, and bake for about "
                "35 minutes.",
            ),
            ("user", "No milk. Does water work, or should I use something else?"),
            (
                "assistant",
                "Water works, though the result is less creamy. Yogurt thinned with water, or "
                "a spoon of cream cheese, would be closer to milk.",
            ),
            ("user", "Yogurt it is. What temperature, and can I prepare it tonight?"),
            (
                "assistant",
                "Bake at 180 °C. Yes: assemble it tonight, cover and refrigerate, and add "
                "ten minutes to the baking time tomorrow.",
            ),
        ),
    ),
    Sample("code review", None, (("user", CODE),)),
    Sample("Japanese", None, (("user", JAPANESE),)),
)

# --- each provider's wire format ---------------------------------------------


def openai_body(sample: Sample) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    if sample.system:
        messages.append({"role": "system", "content": sample.system})
    messages += [{"role": role, "content": text} for role, text in sample.turns]
    body: dict[str, Any] = {"model": "gpt-4o", "messages": messages}
    if sample.tools:
        body["tools"] = [{"type": "function", "function": tool} for tool in TOOLS]
    return body


def anthropic_body(sample: Sample) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "messages": [{"role": role, "content": text} for role, text in sample.turns],
    }
    if sample.system:
        body["system"] = sample.system
    if sample.tools:
        body["tools"] = [
            {
                "name": tool["name"],
                "description": tool["description"],
                "input_schema": tool["parameters"],
            }
            for tool in TOOLS
        ]
    return body


def gemini_body(sample: Sample) -> dict[str, Any]:
    roles = {"user": "user", "assistant": "model"}
    body: dict[str, Any] = {
        "contents": [
            {"role": roles[role], "parts": [{"text": text}]} for role, text in sample.turns
        ]
    }
    if sample.system:
        body["systemInstruction"] = {"parts": [{"text": sample.system}]}
    if sample.tools:
        body["tools"] = [{"functionDeclarations": TOOLS}]
    return body


PROVIDERS: tuple[tuple[str, bytes, Callable[[Sample], dict[str, Any]]], ...] = (
    ("openai", b"/v1/chat/completions", openai_body),
    ("anthropic", b"/v1/messages", anthropic_body),
    ("gemini", b"/v1beta/models/gemini-2.5-flash:generateContent", gemini_body),
)


def estimate(provider: str, path: bytes, body: bytes) -> tuple[int, int]:
    """
    The proxy's (characters counted, token estimate) for one request body.
    """
    wire = format_for(provider)
    chars = wire.inspect(b"POST", path, b"", body).facts.prompt_chars
    assert chars is not None
    tokens = estimate_tokens(
        text_chars=chars, body_bytes=len(body), provider=provider, estimation=Estimation()
    )
    return chars, tokens


# --- the reference ----------------------------------------------------------

Encode = Callable[[str], Sequence[int]]


def reference_tokens(encode: Encode, sample: Sample, framed: bool) -> int:
    """
    o200k tokens of the sample's texts (tools as compact JSON); with
    C{framed}, plus OpenAI's documented chat framing.
    """
    texts = ([sample.system] if sample.system else []) + [text for _, text in sample.turns]
    total = sum(len(encode(text)) for text in texts)
    if sample.tools:
        total += len(encode(json.dumps(TOOLS, separators=(",", ":"), ensure_ascii=False)))
    if framed:
        roles = (["system"] if sample.system else []) + [role for role, _ in sample.turns]
        total += sum(3 + len(encode(role)) for role in roles) + 3
    return total


def load_o200k(path: str) -> Encode:
    """
    A tiktoken encoder for C{o200k_base} from a local C{.tiktoken} file,
    checked against the pinned hash.
    """
    # Imported by name: tiktoken is not a dependency of llmproxy.
    tiktoken: Any = importlib.import_module("tiktoken")
    load: Any = importlib.import_module("tiktoken.load")
    public: Any = importlib.import_module("tiktoken_ext.openai_public")

    def local(blobpath: str, expected_hash: str | None = None) -> dict[bytes, int]:
        # The pinned URL is replaced by the local file; the pinned hash is not.
        ranks: dict[bytes, int] = load.load_tiktoken_bpe(path, O200K_SHA256)
        return ranks

    public.load_tiktoken_bpe = local
    encoding = tiktoken.Encoding(**public.o200k_base())
    encode: Encode = encoding.encode_ordinary
    return encode


def convert_js_tiktoken(source: str, target: str) -> None:
    """
    Rebuild C{o200k_base.tiktoken} from js-tiktoken's C{ranks/o200k_base.js}
    (the same ranks, stored as base64 tokens after their first rank), and
    check that the result is byte for byte the file tiktoken expects.
    """
    with open(source, encoding="utf-8") as f:
        text = f.read()
    data = json.loads(text[text.index("{") : text.rindex("}") + 1])
    ranks: dict[str, int] = {}
    for line in data["bpe_ranks"].split("\n"):
        if not line:
            continue
        _, offset, *tokens = line.split(" ")
        for index, token in enumerate(tokens):
            base64.b64decode(token, validate=True)
            ranks[token] = int(offset) + index
    out = "".join(f"{token} {rank}\n" for token, rank in sorted(ranks.items(), key=lambda i: i[1]))
    encoded = out.encode("ascii")
    digest = hashlib.sha256(encoded).hexdigest()
    if digest != O200K_SHA256:
        raise SystemExit(f"{source}: rebuilt file has SHA-256 {digest}, not o200k_base's")
    with open(target, "wb") as f:
        f.write(encoded)


# --- the table --------------------------------------------------------------


def rows(encode: Encode) -> Iterable[list[str]]:
    for sample in SAMPLES:
        for provider, path, make in PROVIDERS:
            chars, guess = estimate(provider, path, orjson.dumps(make(sample)))
            framed = provider == "openai"
            real = reference_tokens(encode, sample, framed)
            if provider == "openai":
                label = "OpenAI prompt tokens (o200k + chat framing)"
                if sample.tools:
                    label += ", tools approx."
            else:
                label = "o200k count of the same texts (stand-in)"
            error = (guess - real) / real * 100
            yield [
                sample.name,
                provider,
                f"{chars:,}",
                f"{guess:,}",
                f"{real:,}",
                f"{error:+.0f}%",
                label,
            ]


def table(encode: Encode) -> str:
    header = [
        "prompt",
        "provider",
        "characters counted",
        "estimate (chars / 4)",
        "reference tokens",
        "estimate error",
        "reference",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * 4 + "---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows(encode)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--encoding", help="an o200k_base.tiktoken file")
    source.add_argument("--from-js-tiktoken", help="js-tiktoken's ranks/o200k_base.js")
    parser.add_argument(
        "--save-encoding",
        default="o200k_base.tiktoken",
        help="where --from-js-tiktoken writes the rebuilt file [%(default)s]",
    )
    args = parser.parse_args(argv)
    if importlib.util.find_spec("tiktoken") is None:
        sys.stderr.write("tiktoken is not importable: see this script's docstring\n")
        return 2
    path = args.encoding
    if path is None:
        convert_js_tiktoken(args.from_js_tiktoken, args.save_encoding)
        path = args.save_encoding
    print(table(load_o200k(path)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
