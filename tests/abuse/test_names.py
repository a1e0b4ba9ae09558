"""
Items: names the clients choose must not grow memory without bound, and
must not change where a request goes. The path is read once, raw: routing,
forwarding, records and logs all agree on the provider and the user.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import gatherResults, inlineCallbacks

from tests.abuse.harness import CHAT, OPENAI_HEADERS, AbuseCase, read_records
from tests.e2e.harness import raw_exchange, raw_request, split_response


def metric(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return 0.0


class UserNameTests(AbuseCase):
    @inlineCallbacks
    def test_long_meta_users_cut_and_scopes_bounded(self) -> Any:
        """
        Distinct 15 KB users in C{/meta/<user>/} with a per-day limit: each
        is cut to 256 characters in the access line and the cost record, and
        the limiter never holds more than C{max_tracked_scopes} counters
        (plus the few one request adds), the newcomers beyond it sharing an
        overflow counter that is counted.
        """
        costs = os.path.join(self.directory, "costs.jsonl")
        proc = yield self.start_proxy(
            self.config(
                "features:\n"
                "  rate_limiting:\n"
                "    enabled: true\n"
                "    max_tracked_scopes: 40\n"
                "    limits: {requests_per_day: 100000}\n"
                "  cost_tracking:\n"
                "    enabled: true\n"
                "    flush_interval_seconds: 0.1\n"
                f"    transports: [{{type: file, file: {{path: {costs}}}}}]\n"
            )
        )
        users = [f"{n:04d}" + "u" * 15_000 for n in range(120)]
        for batch in range(0, len(users), 30):
            results = yield gatherResults(
                [
                    self.post(proc, f"/meta/{user}/openai/v1/chat/completions")
                    for user in users[batch : batch + 30]
                ]
            )
            self.assertEqual({status for status, _, _ in results}, {200})
        _, _, exposition = yield self.get(proc, "/metrics")
        text = exposition.decode()
        self.assertLessEqual(metric(text, "llmproxy_ratelimit_tracked_scopes"), 40 + 5)
        self.assertGreater(metric(text, "llmproxy_ratelimit_scope_overflow_total"), 60)
        yield self.wait_for(lambda: len(self.access_lines(proc)) >= 120)
        self.assertEqual(
            {len(line["user_id"]) for line in self.access_lines(proc) if line.get("provider")},
            {256},
        )
        yield self.wait_for(lambda: len(read_records(costs)) >= 120)
        records = read_records(costs)
        self.assertEqual({len(r["user_id"]) for r in records}, {256})
        self.assertEqual({r["user_id"][:4] for r in records}, {u[:4] for u in users})


# (request target, mount that must answer, user, upstream path it must reach)
ROUTES = [
    (b"/meta/x%2Fevil/openai/v1/chat/completions", "openai", "x/evil", b"/v1/chat/completions"),
    (b"/meta/x%2fevil/openai/v1/chat/completions", "openai", "x/evil", b"/v1/chat/completions"),
    (
        b"/meta/x%252Fevil/openai/v1/chat/completions",
        "openai",
        "x%2Fevil",
        b"/v1/chat/completions",
    ),
    (b"/meta/x%5Cevil/openai/v1/chat/completions", "openai", "x\\evil", b"/v1/chat/completions"),
    (b"/meta/x\\evil/openai/v1/chat/completions", "openai", "x\\evil", b"/v1/chat/completions"),
    (b"/meta/%65vil/openai/v1/chat/completions", "openai", "evil", b"/v1/chat/completions"),
    (b"/meta/x/%6Fpenai/v1/chat/completions", "openai", "x", b"/v1/chat/completions"),
    (
        b"/meta/x%2F..%2F..%2Fevil/openai/v1/chat/completions",
        "openai",
        "x/../../evil",
        b"/v1/chat/completions",
    ),
    (
        b"http://evil.example/meta/x%2Fevil/openai/v1/chat/completions",
        "openai",
        "x/evil",
        b"/v1/chat/completions",
    ),
    (b"/meta/x/evil/v1/chat/completions", "evil", "x", b"/evilprefix/v1/chat/completions"),
    # Forwarded as sent (the fake has no such route, and says so).
    (b"/openai/v1%2Fchat%2Fcompletions", "openai", None, b"/v1%2Fchat%2Fcompletions"),
]

NOT_FOUND = [
    b"/meta//openai/v1/chat/completions",
    b"/meta/x%2Fopenai/v1/chat/completions",
    b"/meta/x",
    b"/openai%2Fv1/chat/completions",
]


class EncodedPathTests(AbuseCase):
    @inlineCallbacks
    def test_one_reading_of_the_path(self) -> Any:
        """
        For each encoding trick, the mount that answers, the upstream path,
        the access line and the cost record all name the same provider and
        user; targets that name no provider are 404 and reach no upstream.
        """
        costs = os.path.join(self.directory, "costs.jsonl")
        proc = yield self.start_proxy(
            self.config(
                f"  evil: {{kind: openai, base_url: '{self.upstream}/evilprefix'}}\n"
                "features:\n"
                "  cost_tracking:\n"
                "    enabled: true\n"
                "    flush_interval_seconds: 0.1\n"
                f"    transports: [{{type: file, file: {{path: {costs}}}}}]\n"
            )
        )
        headers = [(k.encode(), v.encode()) for k, v in OPENAI_HEADERS.items()]
        for target, mount, user, upstream_path in ROUTES:
            before = len(self.fake.received)
            client = yield raw_exchange(proc.port, raw_request(b"POST", target, headers, CHAT))
            status, response_headers, body = split_response(client.received)
            self.assertEqual(status, 404 if b"%2Fchat" in target else 200, (target, body))
            self.assertEqual(len(self.fake.received), before + 1, target)
            self.assertEqual(self.fake.received[-1].path, upstream_path, target)
            request_id = response_headers[b"x-llm-proxy-request-id"][0].decode()
            line = yield self.access_line(proc, request_id)
            self.assertEqual((line["provider"], line["user_id"]), (mount, user), target)
            record = yield self.record(costs, request_id)
            self.assertEqual((record["provider"], record["user_id"]), (mount, user), target)
            self.assertEqual(record["endpoint"], line["endpoint"], target)
        for target in NOT_FOUND:
            before = len(self.fake.received)
            client = yield raw_exchange(proc.port, raw_request(b"POST", target, headers, CHAT))
            status, response_headers, body = split_response(client.received)
            self.assertEqual(status, 404, (target, body))
            self.assertEqual(response_headers[b"x-llm-proxy-error-source"], [b"proxy"])
            self.assertEqual(len(self.fake.received), before, target)

    @inlineCallbacks
    def record(self, path: str, request_id: str) -> Any:
        def find() -> list[dict[str, Any]]:
            return [r for r in read_records(path) if r["request_id"] == request_id]

        yield self.wait_for(lambda: bool(find()))
        return find()[0]
