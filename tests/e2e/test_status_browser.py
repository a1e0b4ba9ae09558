"""
The status page in a real browser: Debian's headless chromium, driven
over the Chrome DevTools protocol, against the real daemon with the demo's
traffic from the fake upstream (L{llmproxy.testing.demo}).

The DevTools client is the blocking one of C{websockets}; every exchange
with the browser runs in a worker thread so the reactor keeps serving the
fake upstream and sending traffic meanwhile. The screenshot is saved as
C{_trial_temp/status-page.png}.
"""

from __future__ import annotations

import base64
import itertools
import os
import re
import shutil
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from websockets.sync.client import ClientConnection, connect

from llmproxy.testing.demo import BUDGET_KEY_ID, Demo, DemoRequest
from tests.e2e.harness import reactor

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
    "--window-size=1400,2200",
)

SCREENSHOT = "status-page.png"
"""Where the screenshot goes, relative to trial's working directory (_trial_temp)."""

_DEVTOOLS_LINE = re.compile(rb"DevTools listening on (ws://\S+)")


class DevTools:
    """
    A blocking DevTools session with one page: commands and their answers,
    and every event seen meanwhile. Used from worker threads only.
    """

    def __init__(self, url: str) -> None:
        self._socket: ClientConnection = connect(url, proxy=None, max_size=None, open_timeout=10)
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, timeout: float = 10.0, **params: Any) -> Any:
        ident = next(self._ids)
        self._socket.send(orjson.dumps({"id": ident, "method": method, "params": params}).decode())
        deadline = time.monotonic() + timeout
        while True:
            message = orjson.loads(
                self._socket.recv(timeout=max(0.01, deadline - time.monotonic()))
            )
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def evaluate(self, expression: str) -> Any:
        answer = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in answer:
            raise RuntimeError(f"{expression}: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def wait_for(self, expression: str, timeout: float) -> float:
        """
        Evaluate C{expression} every 50 ms until it is true; the seconds it
        took. L{AssertionError} after C{timeout}. (While the page is still
        loading, an expression may throw: that counts as false.)
        """
        started = time.monotonic()
        problem: Exception | None = None
        while True:
            try:
                if self.evaluate(expression):
                    return time.monotonic() - started
            except RuntimeError as error:
                problem = error
            if time.monotonic() - started > timeout:
                raise AssertionError(f"not true after {timeout}s: {expression} ({problem})")
            time.sleep(0.05)

    def errors(self) -> list[dict[str, Any]]:
        """
        Console errors, uncaught exceptions and failed loads seen so far.
        """
        found = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if (
                method == "Runtime.exceptionThrown"
                or (
                    method == "Runtime.consoleAPICalled"
                    and params.get("type") in ("error", "assert")
                )
                or (method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error")
            ):
                found.append(event)
        return found

    def close(self) -> None:
        self._socket.close()


class _Browser(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.listening: Deferred[str] = Deferred()
        self.ended: Deferred[None] = Deferred()

    def errReceived(self, data: bytes) -> None:
        self.output += data
        match = _DEVTOOLS_LINE.search(self.output)
        if match is not None and not self.listening.called:
            self.listening.callback(match.group(1).decode())

    outReceived = errReceived

    def processEnded(self, reason: Failure) -> None:
        if not self.listening.called:
            self.listening.errback(RuntimeError(self.output.decode("utf-8", "replace")))
        self.ended.callback(None)


class StatusPageBrowserTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        if CHROMIUM is None:
            raise SkipTest(
                "chromium is not installed (.ci/run installs it): the status page was not "
                "tested in a browser"
            )
        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir(parents=True)
        self.demo = yield Demo.start(reactor, workdir, rate=6)
        self.addCleanup(self.demo.stop)
        self.browser = _Browser()
        process = reactor.spawnProcess(
            self.browser,
            CHROMIUM,
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={workdir / 'chromium'}", "about:blank"],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir)},
        )

        def stop_browser() -> Deferred[None]:
            if not self.browser.ended.called:
                process.signalProcess(signal.SIGKILL)
            return self.browser.ended

        self.addCleanup(stop_browser)
        browser_url = yield self.browser.listening
        port = browser_url.split("//", 1)[1].split("/", 1)[0]
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        response = yield HTTPClient(Agent(reactor, pool=pool)).get(f"http://{port}/json/list")
        targets = orjson.loads((yield response.content()))
        [page] = [target for target in targets if target["type"] == "page"]
        self.devtools: DevTools = yield deferToThread(DevTools, page["webSocketDebuggerUrl"])
        self.addCleanup(deferToThread, self.devtools.close)

    @inlineCallbacks
    def test_live_page(self) -> Any:
        """
        The page renders with no console error, lists the providers, its
        charts move as requests flow, the Budgets section shows the demo's
        budgeted key once it has had traffic, and a forced upstream failure
        shows among the errors within 3 s; the screenshot is kept.
        """
        devtools = self.devtools

        def load() -> tuple[list[str], str, str]:
            for domain in ("Runtime", "Log", "Page"):
                devtools.call(f"{domain}.enable")
            devtools.call("Page.navigate", url=self.demo.status_url)
            devtools.wait_for("Number(document.body.dataset.updates || 0) >= 1", 15)
            providers = devtools.evaluate(
                "[...document.querySelectorAll('#providers tr td:first-child')]"
                ".map(td => td.textContent)"
            )
            points = devtools.evaluate(
                "document.querySelector('#chart-rps polyline').getAttribute('points')"
            )
            updates = devtools.evaluate("document.body.dataset.updates")
            return providers, points, updates

        providers, points, updates = yield deferToThread(load)
        self.assertEqual(sorted(providers), ["anthropic", "gemini", "openai"])

        def moved() -> tuple[str, str]:
            devtools.wait_for(f"Number(document.body.dataset.updates) >= {int(updates) + 2}", 6)
            return (
                devtools.evaluate(
                    "document.querySelector('#chart-rps polyline').getAttribute('points')"
                ),
                devtools.evaluate("document.getElementById('t-rps').textContent"),
            )

        later, rate = yield deferToThread(moved)
        self.assertNotEqual(later, points, "the requests/s chart did not move")
        self.assertGreater(float(rate), 0)

        yield deferToThread(
            devtools.wait_for,
            "!document.getElementById('budgets-section').hidden && "
            "[...document.querySelectorAll('#budgets tr')]"
            f".some(tr => tr.textContent.includes('key:{BUDGET_KEY_ID}'))",
            10.0,
        )
        budgets = yield deferToThread(
            devtools.evaluate,
            "[...document.querySelectorAll('#budgets tr')].slice(1)"
            ".map(tr => [...tr.querySelectorAll('td')].map(td => td.textContent))",
        )
        periods = sorted(row[1] for row in budgets if row[0] == f"key:{BUDGET_KEY_ID}")
        self.assertEqual(periods, ["day", "month"], budgets)

        model = "forced-failure-" + uuid.uuid4().hex[:8]
        failing = DemoRequest(
            b"/openai/v1/chat/completions",
            {
                b"authorization": [b"Bearer sk-demo-forced"],
                b"content-type": [b"application/json"],
                b"x-fake-status": [b"502"],
            },
            orjson.dumps({"model": model, "messages": [{"role": "user", "content": "x"}]}),
        )
        status = yield self.demo.traffic.send(failing)
        self.assertEqual(status, 502)
        shown_after = yield deferToThread(
            devtools.wait_for,
            "[...document.querySelectorAll('#errors tr')]"
            f".some(tr => tr.textContent.includes('{model}') && tr.dataset.kind === 'status_502')",
            3.0,
        )
        self.assertLessEqual(shown_after, 3.0)

        def screenshot() -> bytes:
            shot = devtools.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            return base64.b64decode(shot["data"])

        png = yield deferToThread(screenshot)
        self.assertTrue(png.startswith(b"\x89PNG"))
        Path(SCREENSHOT).resolve().write_bytes(png)
        self.assertEqual(devtools.errors(), [])
