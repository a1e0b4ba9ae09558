"""
Every command and SDK snippet in the README, executed against the fake
upstream through a proxy running in this process.

The README is the source: the curl commands are read from between the
C{readme-curl} markers, the SDK snippets from the C{sdk-snippets} section
(each fenced block preceded by C{<!-- snippet:NAME -->}).  Each runs as a
user would run it, in a child process: curl with C{http://localhost:9002}
replaced by the test proxy's URL and the key variables by made-up keys, the
Python snippets with this interpreter and C{LLMPROXY_URL} / C{*_API_KEY} in
a minimal environment, the Node snippet with C{node} after
C{npm install openai} into a temporary directory (skipped, saying why, when
node, npm or the registry is unavailable).  A command passes when it exits 0,
got a 200 with the fake's answer, and its request reached the fake upstream
with the user's key.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from llmproxy.testing.fake_upstream import ReceivedRequest, fake_text, text_pieces
from tests.e2e.harness import ProxyTestCase, reactor

README = Path(__file__).resolve().parents[2] / "README.md"
README_URL = "http://localhost:9002"
CURL = "/usr/bin/curl"

FAKE_KEYS = {
    "OPENAI_API_KEY": "sk-readme-openai",
    "ANTHROPIC_API_KEY": "sk-ant-readme",
    "GEMINI_API_KEY": "AIza-readme-gemini",
}
"""The made-up key each variable stands for in a test run."""

_PROVIDER_KEY = {
    "openai": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "gemini": "GEMINI_API_KEY",
}

_SNIPPET = re.compile(
    r"<!-- snippet:(?P<name>[\w-]+) -->\n```(?P<lang>\w+)\n(?P<code>.*?)\n```\n", re.S
)
_FENCE = re.compile(r"^```", re.M)
_VARIABLE = re.compile(r"\$\{?([A-Z][A-Z0-9_]*)\}?")


def between(text: str, start: str, end: str) -> str:
    """
    The text between two marker comments, which must each occur once.
    """
    if text.count(start) != 1 or text.count(end) != 1:
        raise ValueError(f"expected {start} and {end} once each in the README")
    return text.split(start, 1)[1].split(end, 1)[0]


@attrs.frozen
class Snippet:
    name: str
    language: str
    code: str


@attrs.frozen
class Expectation:
    """
    What a snippet's request looks like at the fake upstream.

    @ivar provider: its key variable is set for it and its key must arrive.
    @ivar upstream_path: the path the fake must receive.
    """

    provider: str
    upstream_path: bytes


SNIPPETS: Mapping[str, Expectation] = {
    "python-openai": Expectation("openai", b"/v1/chat/completions"),
    "python-anthropic": Expectation("anthropic", b"/v1/messages"),
    "python-google-genai": Expectation(
        "gemini", b"/v1beta/models/gemini-2.5-flash:generateContent"
    ),
    "node-openai": Expectation("openai", b"/v1/chat/completions"),
}
"""Every snippet the README must have, and where its request goes."""


def readme_snippets(text: str) -> list[Snippet]:
    """
    The marked snippets of the C{sdk-snippets} section; L{ValueError} if a
    fenced block there is not marked (it would never be run).
    """
    section = between(
        text, "<!-- section:sdk-snippets:start -->", "<!-- section:sdk-snippets:end -->"
    )
    found = [Snippet(m["name"], m["lang"], m["code"] + "\n") for m in _SNIPPET.finditer(section)]
    if len(_FENCE.findall(section)) != 2 * len(found):
        raise ValueError("a fenced block in sdk-snippets has no <!-- snippet:NAME --> marker")
    return found


def readme_curl_commands(text: str) -> list[str]:
    """
    The shell commands of the C{readme-curl} block: continuation lines
    joined, comments and blank lines dropped.
    """
    block = between(text, "<!-- readme-curl:start -->", "<!-- readme-curl:end -->")
    body = block.strip()
    if not (body.startswith("```sh\n") and body.endswith("\n```")):
        raise ValueError("readme-curl must hold exactly one ```sh block")
    joined = body[len("```sh\n") : -len("\n```")].replace("\\\n", " ")
    return [
        line.strip()
        for line in joined.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def curl_argv(command: str, proxy_url: str) -> list[str]:
    """
    One README command as curl's arguments, aimed at C{proxy_url}, with each
    key variable replaced by its made-up key.
    """

    def key(match: re.Match[str]) -> str:
        return FAKE_KEYS[match.group(1)]

    argv = shlex.split(_VARIABLE.sub(key, command.replace(README_URL, proxy_url)))
    if argv[0] != "curl":
        raise ValueError(f"not a curl command: {command}")
    return argv[1:]


def provider_of(url: str) -> tuple[str, str] | None:
    """
    The provider a proxy URL addresses and the path the upstream gets
    (C{/meta/<user>/} removed), or C{None} for the proxy's own routes.
    """
    path = "/" + url.split("://", 1)[1].split("/", 1)[1].split("?", 1)[0]
    segments = path.split("/")
    if segments[1] == "meta":
        segments = ["", *segments[3:]]
    if segments[1] in _PROVIDER_KEY:
        return segments[1], "/" + "/".join(segments[2:])
    return None


def has_key(received: ReceivedRequest, key: str) -> bool:
    """
    Whether C{key} arrived in any header (SDKs differ in which one).
    """
    return any(key.encode() in value for _, value in received.headers)


def process_env(proxy_url: str, **extra: str) -> dict[str, str]:
    """
    A minimal environment: no inherited keys or base URLs can leak in.
    """
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LLMPROXY_URL": proxy_url}
    env["HOME"] = os.environ.get("HOME", "/tmp")
    env.update(FAKE_KEYS)
    env.update(extra)
    return env


class ParsingTests(SynchronousTestCase):
    """
    The README has what the runners below expect.
    """

    def test_snippets_marked_and_known(self) -> None:
        snippets = readme_snippets(README.read_text())
        self.assertEqual(sorted(s.name for s in snippets), sorted(SNIPPETS))
        languages = {s.name: s.language for s in snippets}
        self.assertEqual(languages["node-openai"], "js")
        for name in SNIPPETS:
            if name.startswith("python-"):
                self.assertEqual(languages[name], "python")

    def test_unmarked_block_refused(self) -> None:
        text = (
            "<!-- section:sdk-snippets:start -->\n<!-- snippet:a -->\n```python\nx\n```\n"
            "```python\ny\n```\n<!-- section:sdk-snippets:end -->"
        )
        self.assertRaises(ValueError, readme_snippets, text)

    def test_curl_commands(self) -> None:
        commands = readme_curl_commands(README.read_text())
        self.assertGreaterEqual(len(commands), 6)
        for command in commands:
            self.assertTrue(command.startswith("curl "), command)
            self.assertIn(README_URL, command)
        argv = curl_argv(
            'curl -s http://localhost:9002/x -H "Authorization: Bearer $OPENAI_API_KEY"',
            "http://127.0.0.1:1",
        )
        self.assertEqual(
            argv, ["-s", "http://127.0.0.1:1/x", "-H", "Authorization: Bearer sk-readme-openai"]
        )

    def test_provider_of(self) -> None:
        self.assertEqual(
            provider_of("http://h:1/meta/alice/openai/v1/chat?x=1"), ("openai", "/v1/chat")
        )
        self.assertEqual(
            provider_of("http://h:1/gemini/v1beta/m:g?alt=sse"), ("gemini", "/v1beta/m:g")
        )
        self.assertIsNone(provider_of("http://h:1/health"))


class ReadmeTests(ProxyTestCase):
    timeout = 120

    def setUp(self) -> Any:
        self.readme = README.read_text()
        self.snippets = {s.name: s for s in readme_snippets(self.readme)}
        return super().setUp()

    def workdir(self) -> Path:
        path = Path(self.mktemp()).resolve()
        path.mkdir(parents=True)
        return path

    @inlineCallbacks
    def run_process(
        self, executable: str, args: Sequence[str], env: Mapping[str, str], path: Path
    ) -> Any:
        """
        Run a child process; returns C{(stdout, stderr, exit code)}.
        """
        result = yield getProcessOutputAndValue(
            executable, list(args), env=dict(env), path=str(path), reactor=reactor
        )
        out, err, code = result
        return out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), code

    def check_request(self, name: str, before: int) -> None:
        """
        The snippet's one request reached the fake upstream at the right
        path with the snippet user's key.
        """
        expected = SNIPPETS[name]
        self.assertEqual(len(self.fake.received), before + 1, name)
        received = self.fake.received[-1]
        self.assertEqual(received.path, expected.upstream_path, name)
        key = FAKE_KEYS[_PROVIDER_KEY[expected.provider]]
        self.assertTrue(has_key(received, key), f"{name}: the key did not reach the upstream")

    @inlineCallbacks
    def run_python_snippet(self, name: str) -> Any:
        snippet = self.snippets[name]
        directory = self.workdir()
        script = directory / "snippet.py"
        script.write_text(snippet.code)
        before = len(self.fake.received)
        out, err, code = yield self.run_process(
            sys.executable, [str(script)], process_env(self.proxy_url), directory
        )
        self.assertEqual(code, 0, f"{name} failed:\n{out}\n{err}")
        self.assertIn(fake_text(), out, err)
        self.check_request(name, before)
        return out

    def test_python_openai(self) -> Deferred[Any]:
        return self.run_python_snippet("python-openai")

    @inlineCallbacks
    def test_python_anthropic(self) -> Any:
        out = yield self.run_python_snippet("python-anthropic")
        self.assertIn("output_tokens=3", out)

    def test_python_google_genai(self) -> Deferred[Any]:
        return self.run_python_snippet("python-google-genai")

    @inlineCallbacks
    def test_node_openai(self) -> Any:
        node, npm = shutil.which("node"), shutil.which("npm")
        if node is None or npm is None:
            raise SkipTest("node or npm not installed: README Node snippet not run")
        directory = self.workdir()
        env = process_env(self.proxy_url, npm_config_update_notifier="false")
        out, err, code = yield self.run_process(
            npm,
            ["install", "--no-audit", "--no-fund", "--prefer-offline", "openai"],
            env,
            directory,
        )
        if code != 0:
            tail = (err or out).strip().splitlines()[-3:]
            raise SkipTest(f"npm install openai failed (registry unavailable?): {tail}")
        script = directory / "snippet.mjs"
        script.write_text(self.snippets["node-openai"].code)
        before = len(self.fake.received)
        out, err, code = yield self.run_process(node, [str(script)], env, directory)
        self.assertEqual(code, 0, f"node-openai failed:\n{out}\n{err}")
        self.assertEqual(out.strip(), fake_text())
        self.check_request("node-openai", before)

    @inlineCallbacks
    def test_curl_commands(self) -> Any:
        if not os.access(CURL, os.X_OK):
            raise SkipTest(f"{CURL} not installed: README curl commands not run")
        directory = self.workdir()
        for command in readme_curl_commands(self.readme):
            argv = curl_argv(command, self.proxy_url)
            [url] = [arg for arg in argv if arg.startswith(self.proxy_url)]
            before = len(self.fake.received)
            out, err, code = yield self.run_process(
                CURL, [*argv, "-w", "\n%{http_code}"], process_env(self.proxy_url), directory
            )
            self.assertEqual(code, 0, f"{command}\n{err}")
            body, _, status = out.rpartition("\n")
            self.assertEqual(status, "200", f"{command}\n{body}")
            target = provider_of(url)
            if target is None:
                self.assertEqual(len(self.fake.received), before, command)
                continue
            provider, upstream_path = target
            self.assertEqual(len(self.fake.received), before + 1, command)
            received = self.fake.received[-1]
            self.assertEqual(received.path, upstream_path.encode(), command)
            self.assertTrue(has_key(received, FAKE_KEYS[_PROVIDER_KEY[provider]]), command)
            self.assertIn(text_pieces(3)[1], body, command)
