"""Headless Chromium (Debian's ``chromium`` package) driven through the DevTools protocol, for the UI tests.

:class:`Browser` starts ``chromium --headless --remote-debugging-port=0`` with a profile of its own,
connects to its page over the DevTools websocket (the ``websockets`` package, pinned in
requirements.lock), and offers what the tests need: set a cookie (Airflow's UI login is the ``_token``
cookie), open a page, evaluate JavaScript in it, wait until an expression holds, save a screenshot.
It stops the browser, and only it, on leaving the ``with`` block.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from websockets.sync.client import ClientConnection, connect

#: The binaries that may be Chromium, first found wins (Debian's package installs ``chromium``).
BINARIES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    """The path of a Chromium binary on PATH, or ``None``."""
    return next((path for name in BINARIES if (path := shutil.which(name))), None)


class BrowserError(RuntimeError):
    """Chromium did not start, a DevTools call failed, or what a test waited for did not come."""


class Browser:
    """One headless Chromium with one page (1280×1000). ``with Browser() as b: b.open(url)``."""

    def __init__(self, binary: str | None = None, width: int = 1280, height: int = 1000) -> None:
        found = binary or find_chromium()
        if found is None:
            raise BrowserError(f"no Chromium on PATH (looked for {', '.join(BINARIES)}): apt-get install chromium")
        self.binary = found
        self.size = (width, height)
        self.profile = Path(tempfile.mkdtemp(prefix="batchscore-chromium-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.ws: ClientConnection | None = None
        self._closing = contextlib.ExitStack()  # the websocket connection, a context manager
        self._ids = itertools.count(1)

    def __enter__(self) -> Browser:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> None:
        """Start Chromium and connect to its page."""
        args = [
            self.binary,
            "--headless",
            "--no-sandbox",  # the tests may run as root, where Chromium's sandbox refuses to start
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            f"--user-data-dir={self.profile}",
            f"--window-size={self.size[0]},{self.size[1]}",
            "about:blank",
        ]
        log = open(self.profile / "chromium.log", "wb")  # noqa: SIM115 (closed with the process's end)
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.profile / "chromium.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise BrowserError(f"Chromium did not start ({self.binary}): {tail}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            pages = [t for t in json.loads(resp.read()) if t.get("type") == "page"]
        if not pages:
            raise BrowserError("Chromium has no page to drive")
        self.ws = self._closing.enter_context(
            connect(pages[0]["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024, open_timeout=10)
        )
        self.call("Page.enable")
        self.call("Network.enable")
        self.call(
            "Emulation.setDeviceMetricsOverride", width=self.size[0], height=self.size[1], deviceScaleFactor=1, mobile=False
        )

    def stop(self) -> None:
        """Close the connection and end Chromium (the process this object started); remove its profile."""
        self._closing.close()
        self.ws = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
        shutil.rmtree(self.profile, ignore_errors=True)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events that arrive meanwhile are dropped)."""
        if self.ws is None:
            raise BrowserError("the browser is not started")
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == msg_id:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message.get("result", {})

    def set_cookie(self, name: str, value: str, url: str) -> None:
        """Set a cookie for ``url`` (as a server's ``Set-Cookie`` would)."""
        if not self.call("Network.setCookie", name=name, value=value, url=url, path="/").get("success", True):
            raise BrowserError(f"Chromium refused the cookie {name} for {url}")

    def open(self, url: str, timeout: float = 30) -> None:
        """Navigate to ``url`` and wait until its document has loaded."""
        result = self.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"{url}: {result['errorText']}")
        self.wait_for("document.readyState === 'complete'", timeout, what=f"{url} to load")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (a promise is awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails'].get('exception', result['exceptionDetails'])}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60, what: str | None = None) -> Any:
        """Evaluate ``expression`` until it is truthy; its value. :class:`BrowserError` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                body = self.evaluate("document.body ? document.body.innerText : ''") or ""
                raise BrowserError(f"waited {timeout:.0f}s for {what or expression}; the page shows:\n{body[:3000]}")
            time.sleep(0.25)

    def screenshot(self, path: Path) -> Path:
        """Save a PNG of the whole page to ``path``; return it."""
        height = int(self.evaluate("Math.max(document.documentElement.scrollHeight, document.body.scrollHeight)") or 0)
        clip = {"x": 0, "y": 0, "width": self.size[0], "height": max(height, self.size[1]), "scale": 1}
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path
