"""
Tests for L{llmproxy.logs}: no credential reaches the output, whatever the route.
"""

from __future__ import annotations

import io
import select
from typing import Any

import orjson
from twisted.internet.task import Clock
from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    formatEventAsClassicLogText,
    formatTime,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ParseError, ResponseNeverReceived

from llmproxy import logs
from llmproxy.config import parse_config
from llmproxy.logs import (
    FLUSH_BYTES,
    FLUSH_SECONDS,
    JSONObserver,
    LevelHolder,
    LineBuffer,
    SecretHolder,
    TextObserver,
    WholeLines,
    configured_secrets,
    describe_failure,
    make_observer,
    redact,
)

SECRETS = [
    "sk-proj-abcdefghijklmnopqrstuvwxyz0123",
    "sk-ant-api03-SECRETSECRETSECRET",
    "AIzaSyD-secretsecretsecretsecret12",
    "plain-opaque-token-42",
]


class RedactTests(SynchronousTestCase):
    def test_bearer(self) -> None:
        text = redact("Authorization: Bearer plain-opaque-token-42")
        self.assertNotIn("plain-opaque-token-42", text)
        self.assertIn("Bearer [REDACTED]", text)

    def test_api_key_headers(self) -> None:
        for header in ("x-api-key", "X-Goog-Api-Key", "authorization"):
            text = redact(f"{header}: plain-opaque-token-42")
            self.assertNotIn("plain-opaque-token-42", text, header)

    def test_raw_header_repr(self) -> None:
        text = redact("Headers({b'x-api-key': [b'plain-opaque-token-42']})")
        self.assertNotIn("plain-opaque-token-42", text)

    def test_query_key(self) -> None:
        text = redact("/gemini/v1beta/models/m:generateContent?alt=sse&key=plain-opaque-token-42")
        self.assertNotIn("plain-opaque-token-42", text)
        self.assertIn("alt=sse", text)

    def test_bare_provider_keys(self) -> None:
        for secret in SECRETS[:3]:
            self.assertNotIn(secret, redact(f"upstream said: invalid key {secret}"))

    def test_proxy_keys(self) -> None:
        key = "llmp-q5EUzbdLBMYIKKQ9V8Wy3EN8dwPX_HgQCGEWAgLXSO8"
        self.assertNotIn(key, redact(f"refused {key} for team-a"))

    def test_configured_secrets(self) -> None:
        """
        The credentials of C{auth.credentials} are redacted in any form,
        even where no pattern would find them; a reload replaces them.
        """
        config = parse_config(
            {
                "auth": {
                    "credentials": {
                        "openai": {"Authorization": "Bearer opaque-provider-credential"},
                        "vllm-ish": {"X-Token": "0123456789abcdef"},
                    }
                },
                "providers": {"vllm-ish": {"kind": "openai", "base_url": "http://h"}},
            },
            "test",
        )
        secrets = SecretHolder(configured_secrets(config))
        text = redact("sent opaque-provider-credential and 0123456789abcdef to h", secrets)
        self.assertEqual(text, "sent [REDACTED] and [REDACTED] to h")
        secrets.set(["short", "another-secret-value"])
        self.assertEqual(redact("short 0123456789abcdef", secrets), "short 0123456789abcdef")
        self.assertEqual(redact("x another-secret-value", secrets), "x [REDACTED]")

    def test_cloud_credentials(self) -> None:
        """
        AWS signatures and session tokens, Bedrock API keys and Google OAuth
        tokens never reach a log line (an authorization header is redacted whole).
        """
        signed = (
            "authorization: AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20250101/us-east-1/"
            "bedrock/aws4_request, SignedHeaders=host, Signature=" + "ab12" * 16
        )
        self.assertNotIn("ab12ab12", redact(signed))
        secrets = (
            "ABSKQmVkcm9ja0FQSUtleS1wbGFpbi1vcGFxdWU=",
            "bedrock-api-key-YmVkcm9jay5hbWF6b25hd3MuY29tLz9BY3Rpb24",
            "ya29.a0AfH6SMBplainopaquetoken42xyz",
        )
        for secret in secrets:
            self.assertNotIn(secret, redact(f"upstream said: bad token {secret}"))
        token = redact("(b'X-Amz-Security-Token', [b'FwoGZXIvYXdzEJrplainopaque'])")
        self.assertNotIn("FwoGZXIvYXdzEJrplainopaque", token)
        self.assertIn("[REDACTED]", redact(signed))

    def test_any_characters(self) -> None:
        """
        A credential header's whole value is redacted, whatever characters
        it holds (spaces, punctuation, non-ASCII, escapes), quoted or not,
        in text or inside a JSON line, and the JSON stays valid.
        """
        secret = "ab!c d\u00e9#x\\'y"
        for text in [
            f"Authorization: Bearer {secret}",
            f"x-api-key: {secret}",
            repr({b"authorization": [f"Bearer {secret}".encode()]}),
            repr([(b"x-goog-api-key", [secret.encode()])]),
        ]:
            redacted = redact(text)
            for part in ("ab!c", "d\u00e9", "#x", "xc3"):
                self.assertNotIn(part, redacted, text)
            self.assertIn("[REDACTED]", redacted)
        line = orjson.dumps({"message": f"echo x-api-key: {secret}\nnext", "n": 1}).decode()
        decoded = orjson.loads(redact(line))
        self.assertNotIn("ab!c", decoded["message"])
        self.assertEqual(decoded["n"], 1)
        status_line = repr(b"HTTP/1.1 200 Bearer sk-\xc3\xbc!x-secret")
        self.assertNotIn("x-secret", redact(status_line))

    def test_describe_failure_hides_upstream_bytes(self) -> None:
        """
        Response parse errors are told by kind, without the upstream's bytes.
        """
        raw = b"HTTP/1.1 2OO Bearer sk-\xc3\xbc-not-a-status"
        failure = Failure(
            ResponseNeverReceived([Failure(ParseError("non-integer status code", raw))])
        )
        text = describe_failure(failure)
        self.assertNotIn("Bearer", text)
        self.assertIn("ParseError", text)
        self.assertIn("ResponseNeverReceived", text)
        self.assertEqual(describe_failure(Failure(ValueError("plain"))), "plain")

    def test_ordinary_text_untouched(self) -> None:
        text = "POST /openai/v1/chat/completions 200 12.5ms tokens=42"
        self.assertEqual(redact(text), text)


class ObserverTests(SynchronousTestCase):
    def _emit(self, observer: ILogObserver) -> None:
        log = Logger(namespace="test", observer=observer)
        log.info(
            "request {uri} with {headers}",
            uri="/gemini/x?key=" + SECRETS[2],
            headers={"authorization": "Bearer " + SECRETS[0], "x-api-key": SECRETS[1]},
        )
        log.failure(
            "boom", Failure(ValueError("bad x-api-key: " + SECRETS[3] + " Bearer " + SECRETS[3]))
        )

    def test_observers_redact_configured_secrets(self) -> None:
        secrets = SecretHolder(["configured-secret-1234"])
        for observer in (TextObserver, JSONObserver):
            stream = io.StringIO()
            Logger(observer=observer(stream, secrets)).info("got {v}", v="configured-secret-1234")
            self.assertNotIn("configured-secret-1234", stream.getvalue())
            self.assertIn("[REDACTED]", stream.getvalue())

    def test_preformatted_lines_as_twisted_formats_them(self) -> None:
        """
        An event whose message is already formatted (the access line) is
        written without twisted's formatter, as the very text it gives.
        """
        events: list[dict[str, Any]] = [
            {
                "log_format": "{message}",
                "message": "POST /openai/v1/chat/completions 200 1.2ms",
                "log_time": 1764921600.25,
                "log_namespace": "llmproxy.accesslog",
                "log_level": LogLevel.info,
                "status": 200,
            },
            {"log_format": "{message}", "message": "two\nlines", "log_system": "sys"},
            {"log_format": "{message}", "message": "no level", "log_time": 1.0},
        ]
        for event in events:
            line = logs._preformatted_line(event)
            self.assertIsNotNone(line)
            self.assertEqual(line, formatEventAsClassicLogText(event, formatTime=logs._line_time))
        for other in (
            {"log_format": "got {v}", "v": 1, "message": "x"},
            {"log_format": "{message}", "message": 7},
            {"log_format": "{message}", "message": ""},
            {"log_format": "{message}", "message": "x", "log_failure": Failure(ValueError())},
        ):
            self.assertIsNone(logs._preformatted_line(other))

    def test_text_observer_redacts(self) -> None:
        stream = io.StringIO()
        self._emit(TextObserver(stream))
        output = stream.getvalue()
        self.assertIn("request /gemini/x?key=[REDACTED]", output)
        for secret in SECRETS:
            self.assertNotIn(secret, output)

    def test_json_observer_redacts_and_is_ndjson(self) -> None:
        stream = io.StringIO()
        self._emit(JSONObserver(stream))
        lines = stream.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        first = orjson.loads(lines[0])
        self.assertEqual(first["level"], "info")
        self.assertEqual(first["namespace"], "test")
        self.assertIn("[REDACTED]", first["message"])
        self.assertIn("traceback", orjson.loads(lines[1]))
        for secret in SECRETS:
            self.assertNotIn(secret, stream.getvalue())

    def test_json_fields_kept(self) -> None:
        stream = io.StringIO()
        log = Logger(namespace="llmproxy.access", observer=JSONObserver(stream))
        log.info("{method} {status}", method="POST", status=200, model="gpt-4o", cost=None)
        record = orjson.loads(stream.getvalue())
        self.assertEqual(record["message"], "POST 200")
        self.assertEqual((record["status"], record["model"], record["cost"]), (200, "gpt-4o", None))

    def test_level_filter_and_change(self) -> None:
        stream = io.StringIO()
        level = LevelHolder("warn")
        log = Logger(namespace="t", observer=make_observer("text", level, stream))
        log.info("hidden")
        log.warn("shown")
        level.set("debug")
        log.debug("now shown")
        output = stream.getvalue()
        self.assertNotIn("hidden", output)
        self.assertIn("shown", output)
        self.assertIn("now shown", output)

    def test_global_publisher_untouched(self) -> None:
        """
        Building observers does not register them anywhere by itself.
        """
        before = list(globalLogPublisher._observers)
        make_observer("json", LevelHolder("info"), io.StringIO())
        self.assertEqual(before, list(globalLogPublisher._observers))
        self.assertIs(LogLevel.info, LogLevel.levelWithName("info"))


class LineBufferTests(SynchronousTestCase):
    """
    Lines are written in batches on a timer, at once for warnings and
    errors, and whenever a batch grows large.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.stream = io.StringIO()
        self.lines = LineBuffer(self.stream, self.clock)
        self.log = Logger(
            namespace="llmproxy.access",
            observer=make_observer("text", LevelHolder("info"), self.lines),
        )

    def test_info_waits_for_the_timer(self) -> None:
        self.log.info("one {n}", n=1)
        self.log.info("two {n}", n=2)
        self.assertEqual(self.stream.getvalue(), "")
        self.clock.advance(FLUSH_SECONDS)
        written = self.stream.getvalue().splitlines()
        self.assertEqual(len(written), 2)
        self.assertTrue(written[0].endswith("one 1"))
        self.assertTrue(written[1].endswith("two 2"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_warning_flushes_everything_before_it(self) -> None:
        self.log.info("before")
        self.log.warn("trouble")
        written = self.stream.getvalue().splitlines()
        self.assertEqual([line.split("] ", 1)[1] for line in written], ["before", "trouble"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_other_namespaces_written_at_once(self) -> None:
        """
        Only access lines wait: "listening on" and the like are written as
        they happen.
        """
        Logger(namespace="llmproxy.service", observer=self.log.observer).info("listening")
        self.assertIn("listening", self.stream.getvalue())

    def test_large_batch_written_without_waiting(self) -> None:
        line = "x" * 1000
        for _ in range(FLUSH_BYTES // 1000 + 1):
            self.log.info(line)
        self.assertGreaterEqual(len(self.stream.getvalue()), FLUSH_BYTES)

    def test_flush_writes_the_rest(self) -> None:
        self.log.info("last words")
        self.lines.flush()
        self.assertIn("last words", self.stream.getvalue())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.lines.flush()  # nothing left: a no-op

    def test_without_clock_every_line_is_written(self) -> None:
        stream = io.StringIO()
        LineBuffer(stream).add("now\n")
        self.assertEqual(stream.getvalue(), "now\n")

    def test_timestamp_per_line(self) -> None:
        """
        The cached timestamp follows the event time across seconds.
        """
        observer = TextObserver(LineBuffer(self.stream))
        for text, when in (("a", 0.2), ("b", 0.9), ("c", 61.0)):
            observer({"log_format": text, "log_time": when, "log_level": LogLevel.info})
        stamps = [line.split(" ", 1)[0] for line in self.stream.getvalue().splitlines()]
        self.assertEqual(stamps[0], stamps[1])
        self.assertEqual(stamps[0], formatTime(0))
        self.assertEqual(stamps[2], formatTime(61))


class WholeLinesTests(SynchronousTestCase):
    """
    L{WholeLines}: what the workers of a group write to their shared stdout.
    """

    def test_writes_end_at_line_ends(self) -> None:
        """
        Each write holds whole lines and at most C{PIPE_BUF} bytes, so no
        other process's write lands inside a line; a line longer than that
        is the only thing ever split.
        """
        writes: list[bytes] = []

        def record(fd: int, data: Any) -> int:
            chunk = bytes(data)
            size = min(len(chunk), 1000)  # the pipe takes less at a time
            writes.append(chunk[:size])
            return size

        lines = [f"line {n} " + "x" * (n * 37 % 700) + "\n" for n in range(60)]
        long = "y" * (select.PIPE_BUF + 10) + "\n"
        WholeLines(1, record).write("".join(lines) + long + "end\n")
        self.assertEqual(b"".join(writes).decode(), "".join(lines) + long + "end\n")
        calls: list[bytes] = []

        def whole(fd: int, data: Any) -> int:
            calls.append(bytes(data))
            return len(data)

        WholeLines(1, whole).write("".join(lines) + long + "end\n")
        for call in calls:
            self.assertLessEqual(len(call), select.PIPE_BUF)
        split = [call for call in calls if not call.endswith(b"\n")]
        self.assertEqual(split, [b"y" * select.PIPE_BUF])
