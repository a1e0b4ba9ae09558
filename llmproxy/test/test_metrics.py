# trial's assertion methods and twisted.web's test helpers are unannotated.
# mypy: disallow-untyped-calls=False
"""
Tests for L{llmproxy.metrics}.
"""

from __future__ import annotations

import os
import subprocess
import sys

from prometheus_client import REGISTRY
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.error import UnsupportedMethod
from twisted.web.test.requesthelper import DummyRequest

import llmproxy
from llmproxy.metrics import OTHER_MODEL, Metrics, metrics_resource
from llmproxy.pricing import UNPRICED, Cost
from llmproxy.usage import Usage

DOCUMENTED_SERIES = {
    "llmproxy_requests",
    "llmproxy_request_duration_seconds",
    "llmproxy_time_to_first_byte_seconds",
    "llmproxy_tokens",
    "llmproxy_key_tokens",
    "llmproxy_cost_usd",
    "llmproxy_unpriced_requests",
    "llmproxy_rate_limited",
    "llmproxy_active_streams",
    "llmproxy_upstream_errors",
    "llmproxy_cost_records_dropped",
    "llmproxy_unmetered_responses",
    "llmproxy_ratelimit_backend_errors",
}
"""
The series docs/operations.md lists, by family name as the parser reports
them (counters without C{_total}).
"""

USAGE = Usage(
    model="gpt-4o",
    input_tokens=100,
    output_tokens=50,
    cache_read_tokens=30,
    cache_write_tokens=10,
    reasoning_tokens=20,
    reported=True,
)
COST = Cost(input_cost=0.25, output_cost=0.5, total_cost=0.75, matched_model="gpt-4o")


def scrape(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """
    Parse the exposition as Prometheus would: sample name and labels ->
    value.
    """
    text = metrics.render().decode("utf-8")
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return scrape(metrics).get((name, tuple(sorted(labels.items()))))


def sample(text: str, name: str, **labels: str) -> float:
    """
    The sum of the samples called C{name} whose labels include C{labels}.
    """
    return sum(
        found.value
        for family in text_string_to_metric_families(text)
        for found in family.samples
        if found.name == name and all(found.labels.get(k) == v for k, v in labels.items())
    )


class MetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.metrics = Metrics()

    def test_exposition(self) -> None:
        """
        The text output parses and has every documented family, with the right
        types, plus process metrics.
        """
        m = self.metrics
        m.request_finished("openai", "gpt-4o", 200, 1.5, 0.2, USAGE, COST)
        m.stream_opened("openai")
        m.upstream_error("openai", "connect")
        m.rate_limited("global", "requests", "minute")
        m.unmetered("openai", "content-encoding")
        m.cost_record_dropped()
        m.ratelimit_backend_error("redis")
        m.request_finished("openai", "x", 200, 1.0, None, USAGE, UNPRICED)
        families = {
            f.name: f.type for f in text_string_to_metric_families(m.render().decode("utf-8"))
        }
        self.assertEqual(DOCUMENTED_SERIES - set(families), set())
        self.assertEqual(families["llmproxy_request_duration_seconds"], "histogram")
        self.assertEqual(families["llmproxy_time_to_first_byte_seconds"], "histogram")
        self.assertEqual(families["llmproxy_active_streams"], "gauge")
        self.assertEqual(families["llmproxy_requests"], "counter")
        self.assertIn("process_cpu_seconds", families)

    def test_requestFinished(self) -> None:
        """
        One finished request moves the request, duration, TTFB, token and
        cost series.
        """
        m = self.metrics
        m.request_finished("openai", "gpt-4o", 200, 1.5, 0.2, USAGE, COST)
        m.request_finished("openai", "gpt-4o", 200, 700.0, None, USAGE, COST)
        got = scrape(m)
        key = (("model", "gpt-4o"), ("provider", "openai"))
        self.assertEqual(got[("llmproxy_requests_total", (*key, ("status", "200")))], 2.0)
        self.assertEqual(
            got[("llmproxy_request_duration_seconds_count", (("provider", "openai"),))], 2.0
        )
        self.assertEqual(
            got[
                (
                    "llmproxy_request_duration_seconds_bucket",
                    (("le", "2.5"), ("provider", "openai")),
                )
            ],
            1.0,
        )
        self.assertEqual(
            got[
                (
                    "llmproxy_request_duration_seconds_bucket",
                    (("le", "600.0"), ("provider", "openai")),
                )
            ],
            1.0,
        )
        self.assertEqual(
            got[("llmproxy_time_to_first_byte_seconds_count", (("provider", "openai"),))], 1.0
        )
        self.assertEqual(
            got[("llmproxy_time_to_first_byte_seconds_sum", (("provider", "openai"),))], 0.2
        )
        tokens = {
            kind: got[("llmproxy_tokens_total", (key[0], key[1], ("type", kind)))]
            for kind in ("input", "output", "cache_read", "cache_write", "reasoning")
        }
        self.assertEqual(
            tokens,
            {
                "input": 200.0,
                "output": 100.0,
                "cache_read": 60.0,
                "cache_write": 20.0,
                "reasoning": 40.0,
            },
        )
        self.assertEqual(got[("llmproxy_cost_usd_total", key)], 1.5)
        self.assertNotIn(("llmproxy_unpriced_requests_total", key), got)

    def test_unpriced(self) -> None:
        """
        Usage for an unpriced model counts in the unpriced series, not as $0.
        """
        m = self.metrics
        m.request_finished("openai", "mystery", 200, 1.0, 0.1, USAGE, UNPRICED)
        key = (("model", "mystery"), ("provider", "openai"))
        got = scrape(m)
        self.assertEqual(got[("llmproxy_unpriced_requests_total", key)], 1.0)
        self.assertNotIn(("llmproxy_cost_usd_total", key), got)

    def test_noUsageNoTokensNoUnpriced(self) -> None:
        """
        A request that never reported usage (an unreachable upstream) counts
        as a request but adds no tokens and is not called unpriced.
        """
        m = self.metrics
        m.request_finished("openai", None, 502, 0.01, None, Usage(), UNPRICED)
        got = scrape(m)
        self.assertEqual(
            got[
                (
                    "llmproxy_requests_total",
                    (("model", "unknown"), ("provider", "openai"), ("status", "502")),
                )
            ],
            1.0,
        )
        names = {name for name, _ in got}
        self.assertNotIn("llmproxy_tokens_total", names)
        self.assertNotIn("llmproxy_unpriced_requests_total", names)

    def test_activeStreams(self) -> None:
        m = self.metrics
        m.stream_opened("anthropic")
        m.stream_opened("anthropic")
        m.stream_closed("anthropic")
        self.assertEqual(value(m, "llmproxy_active_streams", provider="anthropic"), 1.0)
        m.stream_closed("anthropic")
        self.assertEqual(value(m, "llmproxy_active_streams", provider="anthropic"), 0.0)

    def test_events(self) -> None:
        m = self.metrics
        m.upstream_error("gemini", "idle_timeout")
        m.upstream_error("gemini", "idle_timeout")
        m.unmetered("openai", "content-encoding")
        m.cost_record_dropped()
        m.cost_record_dropped(4)
        m.ratelimit_backend_error("redis")
        self.assertEqual(
            value(m, "llmproxy_upstream_errors_total", provider="gemini", kind="idle_timeout"), 2.0
        )
        self.assertEqual(
            value(
                m,
                "llmproxy_unmetered_responses_total",
                provider="openai",
                reason="content-encoding",
            ),
            1.0,
        )
        self.assertEqual(value(m, "llmproxy_cost_records_dropped_total"), 5.0)
        self.assertEqual(value(m, "llmproxy_ratelimit_backend_errors_total", backend="redis"), 1.0)

    def test_rateLimitedScopeKindOnly(self) -> None:
        """
        The scope label is the kind; an id passed by mistake is cut off, and
        an unknown kind becomes C{other}.
        """
        m = self.metrics
        m.rate_limited("key", "tokens", "minute")
        m.rate_limited("key:3f2a9c", "tokens", "minute")
        m.rate_limited("user:alice", "requests", "day")
        m.rate_limited("sk-secret", "requests", "day")
        got = scrape(m)
        series = {
            labels: v for (name, labels), v in got.items() if name == "llmproxy_rate_limited_total"
        }
        self.assertEqual(
            series,
            {
                (("metric", "tokens"), ("scope", "key"), ("window", "minute")): 2.0,
                (("metric", "requests"), ("scope", "user"), ("window", "day")): 1.0,
                (("metric", "requests"), ("scope", "other"), ("window", "day")): 1.0,
            },
        )

    def test_modelLabelCap(self) -> None:
        """
        Past the cap, new model names of a provider fold into C{other}; names
        already seen keep their label; other providers have their own cap.
        """
        m = Metrics(max_models_per_provider=2)
        labels = [
            m.model_label("openai", "a"),
            m.model_label("openai", "b"),
            m.model_label("openai", "c"),
            m.model_label("openai", "a"),
            m.model_label("gemini", "c"),
            m.model_label("openai", None),
            m.model_label("openai", ""),
        ]
        self.assertEqual(labels, ["a", "b", OTHER_MODEL, "a", "c", "unknown", "unknown"])
        for model in ("a", "b", "c", "d", "e"):
            m.request_finished("openai", model, 200, 1.0, None, USAGE, COST)
        series = {
            dict(labels)["model"]: v
            for (name, labels), v in scrape(m).items()
            if name == "llmproxy_requests_total"
        }
        self.assertEqual(series, {"a": 1.0, "b": 1.0, OTHER_MODEL: 3.0})

    def test_keyTokens(self) -> None:
        """
        Tokens by key id, for the prompt-cache hit ratio per key: input and
        its cache parts, and output; past the cap new ids fold into
        C{other}, and requests without a credential count as C{none}.
        """
        m = Metrics(max_keys=2)
        for key in ("k1", "k1", "k2", "k3", "k4", None):
            m.request_finished("openai", "gpt-4o", 200, 1.0, None, USAGE, COST, key)
        tokens = {
            (dict(labels)["key"], dict(labels)["type"]): v
            for (name, labels), v in scrape(m).items()
            if name == "llmproxy_key_tokens_total"
        }
        self.assertEqual(tokens[("k1", "input")], 200.0)
        self.assertEqual(tokens[("k1", "cache_read")], 60.0)
        self.assertEqual(tokens[("k1", "cache_write")], 20.0)
        self.assertEqual(tokens[("k1", "output")], 100.0)
        self.assertEqual(tokens[(OTHER_MODEL, "input")], 200.0)
        self.assertEqual(tokens[("none", "input")], 100.0)
        self.assertEqual({key for key, _ in tokens}, {"k1", "k2", OTHER_MODEL, "none"})
        m.request_finished("openai", "gpt-4o", 502, 1.0, None, Usage(), UNPRICED, "k9")
        keys = {
            dict(labels)["key"]
            for (name, labels) in scrape(m)
            if name == "llmproxy_key_tokens_total"
        }
        self.assertNotIn("k9", keys)

    def test_longModelNameCut(self) -> None:
        self.assertEqual(len(self.metrics.model_label("openai", "m" * 1000)), 128)

    def test_ownRegistry(self) -> None:
        """
        Each L{Metrics} has its own registry, never the global one, so two
        can coexist (tests, reloads) and nothing leaks into C{REGISTRY}.
        """
        other = Metrics()
        self.assertIsNot(self.metrics.registry, REGISTRY)
        self.assertIsNot(self.metrics.registry, other.registry)
        self.metrics.upstream_error("openai", "tls")
        self.assertIsNone(
            value(other, "llmproxy_upstream_errors_total", provider="openai", kind="tls")
        )
        self.assertIsNone(REGISTRY.get_sample_value("llmproxy_upstream_errors_total"))


class MetricsResourceTests(SynchronousTestCase):
    def test_get(self) -> None:
        metrics = Metrics()
        metrics.upstream_error("openai", "connect")
        request = DummyRequest([b""])
        body = metrics_resource(metrics).render(request)
        self.assertEqual(
            request.responseHeaders.getRawHeaders(b"content-type"),
            [CONTENT_TYPE_LATEST.encode("ascii")],
        )
        self.assertIn(b'llmproxy_upstream_errors_total{kind="connect",provider="openai"} 1.0', body)

    def test_postNotAllowed(self) -> None:
        request = DummyRequest([b""])
        request.method = b"POST"
        self.assertRaises(UnsupportedMethod, metrics_resource(Metrics()).render, request)


class NoReactorImportTests(SynchronousTestCase):
    def test_modulesDoNotImportReactor(self) -> None:
        """
        Importing metrics, metering and sinks installs no reactor (the
        composition root chooses it, and C{prometheus_client.twisted} would
        have imported the global one).
        """
        code = (
            "import sys, llmproxy.metrics, llmproxy.pricing, llmproxy.records, llmproxy.sinks;"
            "sys.exit('twisted.internet.reactor' in sys.modules)"
        )
        root = os.path.dirname(os.path.dirname(os.path.abspath(llmproxy.__file__)))
        env = {**os.environ, "PYTHONPATH": root}
        done = subprocess.run([sys.executable, "-c", code], check=False, env=env, cwd=root)
        self.assertEqual(done.returncode, 0)


_WORKER_SCRIPT = """
import os, sys
from llmproxy.metrics import Metrics
from llmproxy.pricing import UNPRICED
from llmproxy.usage import Usage
metrics = Metrics.for_group(os.environ["PROMETHEUS_MULTIPROC_DIR"])
for _ in range(int(sys.argv[1])):
    metrics.request_finished("openai", "m", 200, 0.1, 0.05, Usage(), UNPRICED)
metrics.stream_opened("openai")
metrics.circuit_state("openai", "up", "", int(sys.argv[2]))
if sys.argv[3] == "render":
    sys.stdout.write(metrics.render().decode())
print(os.getpid(), file=sys.stderr)
"""


class GroupMetricsTests(SynchronousTestCase):
    """
    L{Metrics.for_group}: every worker of a group counts in files of one
    directory, and any of them renders the sum.
    """

    def run_worker(
        self, directory: str, requests: int, circuit: int, render: bool
    ) -> tuple[str, int]:
        root = os.path.dirname(os.path.dirname(os.path.abspath(llmproxy.__file__)))
        env = {**os.environ, "PYTHONPATH": root, "PROMETHEUS_MULTIPROC_DIR": directory}
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                _WORKER_SCRIPT,
                str(requests),
                str(circuit),
                "render" if render else "-",
            ],
            check=True,
            env=env,
            cwd=root,
            capture_output=True,
            text=True,
        )
        return done.stdout, int(done.stderr.split()[-1])

    def test_sums_over_workers(self) -> None:
        """
        Counters and histograms add up over workers, the dead ones
        included (a counter never goes back when a worker is replaced);
        live gauges count only live workers once the master has let a dead
        one go (C{mark_process_dead}): streams are summed, a circuit is the
        highest state.
        """
        from prometheus_client.multiprocess import mark_process_dead

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        _, first = self.run_worker(directory, 3, 1, render=False)
        text, second = self.run_worker(directory, 4, 0, render=True)
        self.assertEqual(sample(text, "llmproxy_requests_total", status="200"), 7)
        self.assertEqual(sample(text, "llmproxy_request_duration_seconds_count"), 7)
        self.assertEqual(sample(text, "llmproxy_active_streams", provider="openai"), 2)
        self.assertEqual(sample(text, "llmproxy_circuit_state", upstream="up"), 1)
        self.assertNotIn("process_cpu_seconds_total", text)
        mark_process_dead(first, directory)
        mark_process_dead(second, directory)
        text, _ = self.run_worker(directory, 0, 0, render=True)
        self.assertEqual(sample(text, "llmproxy_requests_total", status="200"), 7)
        self.assertEqual(sample(text, "llmproxy_active_streams", provider="openai"), 1)
        self.assertEqual(sample(text, "llmproxy_circuit_state", upstream="up"), 0)

    def test_needs_the_variable_first(self) -> None:
        """
        prometheus_client decides how to store values when it is imported:
        without C{PROMETHEUS_MULTIPROC_DIR} at that time, a worker's metrics
        would count only itself, so L{Metrics.for_group} refuses.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.assertRaises(RuntimeError, Metrics.for_group, directory)
