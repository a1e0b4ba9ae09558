# -*- test-case-name: llmproxy.test.test_config_reference -*-
"""
The configuration reference: every key, its default and its meaning.

docs/configuration.md's reference is the table L{render_reference_table}
prints (a test keeps the two equal); defaults are read from
L{llmproxy.config.model} so the table cannot drift from the code.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import NoneType, UnionType
from typing import Any, get_args, get_type_hints

import attrs

from llmproxy.config.model import Config

_P = "providers.<name>"
_M = f"{_P}.models.<model>"
_RL = "features.rate_limiting"
_CT = "features.cost_tracking"
_K = "auth.keys[]"

_REFERENCE_ROWS: tuple[tuple[str, str | None, str], ...] = (
    # (key, default or None to read it from the model, meaning)
    (
        "extends",
        "(none)",
        "Path of a file to load first, relative to this file; this file merges over it",
    ),
    (
        "server.listen",
        None,
        "Endpoint descriptions (`tcp:9002:interface=127.0.0.1`, `ssl:...`, `unix:...`, "
        "`systemd:domain=INET:index=0`); empty: `--listen`, else `tcp:$PORT`, else `tcp:9002`",
    ),
    (
        "server.workers",
        None,
        "Processes accepting on the listeners; above 1 a master supervises them "
        "(`--workers` overrides)",
    ),
    ("server.max_body_bytes", None, "Largest request body accepted; a larger one gets 413"),
    (
        "server.drain_timeout_seconds",
        None,
        "On SIGTERM, how long in-flight requests and streams may still run",
    ),
    (
        "server.shutdown_grace_seconds",
        None,
        "On SIGTERM, how long listeners stay open while `/health` answers 503",
    ),
    ("server.cors.allow_origins", None, "Origins allowed by CORS (`*` = any)"),
    (
        "server.forwarded_headers",
        None,
        "Append `X-Forwarded-For` and set `X-Forwarded-Proto` on forwarded requests",
    ),
    ("server.status.enabled", None, "Serve the live status page at `/status` (and `/status.json`)"),
    (
        "server.status.token",
        "(none)",
        "Secret (16+ characters) the page then needs, as `Authorization: Bearer` or `?token=`; "
        "without one the page answers only clients on this machine",
    ),
    (
        "server.max_connections",
        None,
        "Client connections served at once; idle keep-alive ones are closed to make room, "
        "then new ones get 503 (`/health` still answers)",
    ),
    (
        "server.header_timeout_seconds",
        None,
        "A request head must arrive within this from its first byte (from the connection's "
        "opening for its first request), else 408",
    ),
    (
        "server.body_timeout_seconds",
        None,
        "A request body may take this long, plus 1 s for each "
        "`min_body_rate_bytes_per_second` it delivered, else 408",
    ),
    (
        "server.min_body_rate_bytes_per_second",
        None,
        "The slowest average upload rate accepted after `body_timeout_seconds`",
    ),
    (
        "server.client_stall_timeout_seconds",
        None,
        "A client that reads none of a response for this long is dropped (a client fault, "
        "not an upstream one)",
    ),
    ("logging.format", None, "`text` or `json` (one JSON object per line)"),
    ("logging.level", None, "`debug`, `info`, `warn`, `error` or `critical`"),
    (f"{_P}.enabled", None, "Mount the provider at `/<name>/`; `false` answers 404 there"),
    (
        f"{_P}.kind",
        "(the name)",
        "Wire format: `openai`, `anthropic`, `gemini`, `azure_openai`, `bedrock` or `vertex`; "
        "required for a name that is not built in",
    ),
    (
        f"{_P}.base_url",
        "(public API)",
        "Upstream scheme, host, optional port and path prefix; required for a name not built in "
        "(`bedrock` and `vertex` may give `region` instead)",
    ),
    (
        f"{_P}.region",
        "(none)",
        "`bedrock`: the AWS region (`us-east-1`); `vertex`: the Google Cloud region "
        "(`us-central1`) or `global`; sets the default `base_url`",
    ),
    (
        f"{_P}.deployments",
        None,
        "`azure_openai`: deployment name to the model it runs, for prices, limits and records",
    ),
    (
        f"{_P}.aws_sigv4",
        None,
        "`bedrock`: sign every request with the proxy's own AWS credentials (SigV4), "
        "replacing the client's; needs `llmproxy[aws]`",
    ),
    (
        f"{_P}.google_adc",
        None,
        "`vertex`: authorize every request with the proxy's own Application Default "
        "Credentials, replacing the client's; needs `llmproxy[gcp]`",
    ),
    (
        f"{_P}.upstreams",
        "(one, at `base_url`)",
        "Several upstreams instead of `base_url`: a list of the keys below",
    ),
    (f"{_P}.upstreams[].name", "(the host)", "Shown in metrics, `/health`, records, headers"),
    (f"{_P}.upstreams[].base_url", "(required)", "As `base_url`, for this upstream"),
    (f"{_P}.upstreams[].weight", "1", "Share of traffic among available upstreams of a priority"),
    (
        f"{_P}.upstreams[].priority",
        "0",
        "Lower goes first; higher only while every lower one is unavailable or failed",
    ),
    (
        f"{_P}.upstreams[].headers",
        "{}",
        "Request headers set for this upstream (a credential the proxy holds)",
    ),
    (
        f"{_P}.upstreams[].models",
        "{}",
        "Requested model -> the name this upstream knows it by",
    ),
    (
        f"{_P}.fallback",
        None,
        "Other providers of the same kind, tried in order when every upstream has failed",
    ),
    (
        f"{_P}.retry.max_attempts",
        None,
        "Upstream tries per request, fallbacks included; `1` = no retry",
    ),
    (
        f"{_P}.retry.backoff_seconds",
        None,
        "First wait before retrying an upstream that failed; doubles, full jitter",
    ),
    (
        f"{_P}.retry.max_wait_seconds",
        None,
        "Longest `Retry-After` waited for; a longer one moves on or answers",
    ),
    (
        f"{_P}.stream_gate.max_bytes",
        None,
        "Stream bytes held back waiting for the first content event; `0` = no gate",
    ),
    (
        f"{_P}.stream_gate.max_seconds",
        None,
        "Longest a stream is held back for its first content event; `0` = no gate",
    ),
    (
        f"{_P}.circuit_breaker.failures",
        None,
        "Consecutive failed attempts on one upstream and model that open its circuit",
    ),
    (
        f"{_P}.circuit_breaker.cooldown_seconds",
        None,
        "How long an open circuit is skipped before one request probes it",
    ),
    (
        f"{_P}.inject_stream_usage",
        None,
        "Ask OpenAI-format streams for usage and hide the added usage chunk from the client",
    ),
    (f"{_P}.timeouts.connect_seconds", None, "Connecting to the upstream"),
    (f"{_P}.timeouts.first_byte_seconds", None, "Until the upstream's response headers (else 504)"),
    (f"{_P}.timeouts.idle_seconds", None, "Between two chunks of the response body"),
    (f"{_P}.timeouts.total_seconds", None, "Whole request; `0` = no limit"),
    (f"{_M}.aliases", "[]", "Other names of the model (dated snapshots) priced like it"),
    (
        f"{_M}.pricing",
        "(unpriced)",
        "A price mapping (keys below) or a list of tiers; USD per 1M tokens",
    ),
    (f"{_M}.pricing.input", "(required)", "Price of uncached input tokens"),
    (f"{_M}.pricing.output", "(required)", "Price of output tokens that are not reasoning"),
    (f"{_M}.pricing.cache_read", "(= input)", "Price of input tokens read from the cache"),
    (f"{_M}.pricing.cache_write", "(= input)", "Price of input tokens written to the cache"),
    (f"{_M}.pricing.reasoning", "(= output)", "Price of reasoning (thinking) output tokens"),
    (
        f"{_M}.pricing.overrides.<alias>",
        "{}",
        "Price keys (or tiers) for responses naming that alias (one of `aliases`)",
    ),
    (
        f"{_M}.pricing[].threshold",
        "(required)",
        "Tier list: a tier applies while input tokens <= threshold; `0` = catch-all; "
        "each tier also holds the price keys",
    ),
    (f"{_RL}.enabled", None, "Enforce the limits below"),
    (f"{_RL}.backend", None, "`memory` (one process) or `redis` (shared by every instance)"),
    (f"{_RL}.redis.url", None, "`redis://[:password@]host:port/db` or `rediss://...`"),
    (
        f"{_RL}.redis.timeout_ms",
        None,
        "A Redis call unanswered this long counts as a failure (its request still waits for "
        "the answer)",
    ),
    (
        f"{_RL}.redis.outage_after_failures",
        None,
        "Failures in a row that make an outage (so does losing every connection): requests "
        "are then decided without Redis, by `fail_mode`",
    ),
    (
        f"{_RL}.redis.outage_limit_fraction",
        None,
        "During an outage with `fail_mode: open`, the share of each limit this instance "
        "enforces on its own (1/N for a fleet of N)",
    ),
    (
        f"{_RL}.fail_mode",
        None,
        "During a Redis outage: `open` admits within the local share of each limit, "
        "`closed` refuses (503)",
    ),
    (f"{_RL}.sweep_interval_seconds", None, "How often the memory backend drops idle scopes"),
    (
        f"{_RL}.max_tracked_scopes",
        None,
        "Scope-windows the memory backend counts separately (about 600 bytes each); beyond, "
        "new users, keys and models share one counter per kind",
    ),
    (f"{_RL}.limits.requests_per_minute", None, "Per scope; `0` = unlimited"),
    (f"{_RL}.limits.tokens_per_minute", None, "Per scope; `0` = unlimited"),
    (f"{_RL}.limits.requests_per_day", None, "Per scope; `0` = unlimited"),
    (f"{_RL}.limits.tokens_per_day", None, "Per scope; `0` = unlimited"),
    (
        f"{_RL}.overrides.per_provider.<name>.<limit>",
        "(from limits)",
        "Any of the four limit keys for one provider; a key left out inherits `limits`",
    ),
    (
        f"{_RL}.overrides.per_model.<model>.<limit>",
        "(from limits)",
        "The same for one model",
    ),
    (
        f"{_RL}.overrides.per_key.<key_id>.<limit>",
        "(from limits)",
        "The same for one client key (its hash id)",
    ),
    (f"{_RL}.overrides.per_user.<user>.<limit>", "(from limits)", "The same for one user"),
    (f"{_RL}.estimation.chars_per_token", None, "Characters of prompt text per estimated token"),
    (
        f"{_RL}.estimation.provider_chars_per_token",
        None,
        "Provider name to characters per token, replacing `chars_per_token` for that provider",
    ),
    (f"{_RL}.estimation.bytes_per_token", None, "Body bytes per token when no text is sampled"),
    (
        f"{_RL}.estimation.max_sample_bytes",
        None,
        "Largest JSON body whose text is read for the estimate",
    ),
    (
        f"{_RL}.estimation.optimistic_first_request",
        None,
        "Admit a request whose estimate alone exceeds a token limit while its scope is unused",
    ),
    (f"{_CT}.enabled", None, "Write one cost record per forwarded request"),
    (f"{_CT}.transports[].type", "(required)", "`file` (the only type)"),
    (
        f"{_CT}.transports[].file.path",
        "(required)",
        "JSON Lines file the records are appended to (relative to the working directory)",
    ),
    (f"{_CT}.flush_interval_seconds", None, "How often buffered records are written"),
    (
        f"{_CT}.queue_size",
        None,
        "Records held while a sink fails before new ones are dropped (and counted)",
    ),
    ("features.metrics.enabled", None, "Serve Prometheus metrics at `/metrics`"),
    (
        "features.tracing.enabled",
        None,
        "OpenTelemetry spans and GenAI metrics over OTLP, set up by the `OTEL_*` variables; "
        "needs `pip install 'llmproxy[otel]'`",
    ),
    (
        "auth.mode",
        None,
        "`passthrough` forwards the client's credential; `keys` accepts only proxy keys; "
        "`mixed` swaps a proxy key and passes any other credential through",
    ),
    (f"{_K}.id", "(required)", "Names the key in limits, records, metrics and logs"),
    (
        f"{_K}.hash",
        "(required)",
        "`sha256:<hex>` of the key, as `python -m llmproxy new-key` prints it",
    ),
    (f"{_K}.user", "(none)", "The user of the key's requests when nothing else names one"),
    (f"{_K}.providers", "(all)", "Provider mounts the key may use"),
    (f"{_K}.models", "(all)", "Glob patterns (`*`, `?`, `[...]`) of the models the key may use"),
    (
        f"{_K}.limits.<limit>",
        "(from limits)",
        "Rate limits of the key's scope, enforced even while `features.rate_limiting.enabled` "
        "is `false`",
    ),
    (f"{_K}.budget.daily_usd", "(none)", "Spending cap per UTC day in USD; `0` allows no spend"),
    (f"{_K}.budget.monthly_usd", "(none)", "Spending cap per calendar month (UTC) in USD"),
    (
        f"{_K}.budget.reserve_output_tokens",
        None,
        "Output tokens reserved for a request that names no maximum of its own",
    ),
    (
        f"{_K}.budget.unpriced",
        None,
        "`deny` refuses (403) a model without a price; `allow` forwards it and counts nothing",
    ),
    (
        f"{_K}.budget.alert_at",
        None,
        "Fractions of a cap whose crossing is logged and posted to `auth.alerts.webhook_url`",
    ),
    (f"{_K}.expires_at", "(never)", "ISO 8601 time from which the key is refused (UTC by default)"),
    (
        "auth.credentials.<name>.<header>",
        "(none)",
        "A header sent to provider `<name>` in place of the client's credential when a proxy "
        "key is swapped (use `${VAR}`)",
    ),
    (
        "auth.budgets.per_user.<user>.<budget>",
        "(none)",
        "A budget for one user, with the keys of `auth.keys[].budget`",
    ),
    (
        "auth.alerts.webhook_url",
        "(none)",
        "URL that receives each budget alert as a JSON POST",
    ),
)


def _yaml_text(value: object) -> str:
    """
    A default as it would be written in YAML: C{true}, C{600}, C{["*"]}.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, tuple | list):
        return (
            "["
            + ", ".join(
                f'"{item}"' if isinstance(item, str) else _yaml_text(item) for item in value
            )
            + "]"
        )
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{key}: {_yaml_text(item)}" for key, item in value.items()) + "}"
    return str(value)


def _model_default(key: str) -> str:
    """
    The default of a dotted key, read from the attrs model: C{<...>}
    segments step into a mapping's value type, other segments name fields.
    """
    cls: Any = Config
    parts = key.split(".")
    for index, part in enumerate(parts):
        if part.startswith("<"):
            cls = get_args(cls)[1]
            continue
        listed = part.endswith("[]")
        part = part.removesuffix("[]")
        field = attrs.fields_dict(cls)[part]
        if index == len(parts) - 1:
            default: object = field.default
            factory = getattr(default, "factory", None)  # an attrs Factory
            if callable(factory):
                default = factory()
            return _yaml_text(default)
        cls = get_type_hints(cls)[part]
        if listed:
            cls = get_args(cls)[0]  # tuple[Item, ...]
        elif isinstance(cls, UnionType):
            cls = next(arg for arg in get_args(cls) if arg is not NoneType)  # Item | None
    raise KeyError(key)


def reference_keys() -> list[tuple[str, str, str]]:
    """
    Every configuration key: C{(dotted key, default, meaning)}.

    Keys use C{<name>}-style placeholders for names the operator chooses and
    C{[]} for list items.  Defaults come from the attrs model where it holds
    them; a default in parentheses is prose (C{(required)}, C{(= input)}).
    """
    return [
        (key, _model_default(key) if default is None else default, meaning)
        for key, default, meaning in _REFERENCE_ROWS
    ]


def render_reference_table() -> str:
    """
    The Markdown table of L{reference_keys} that docs/configuration.md
    holds verbatim (a test keeps the two equal).
    """
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, meaning in reference_keys():
        shown = default[1:-1] if default.startswith("(") else f"`{default}`"
        lines.append(f"| `{key}` | {shown} | {meaning} |")
    return "\n".join(lines) + "\n"
