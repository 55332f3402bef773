"""A minimal headless-Chromium driver over the DevTools protocol (for UI screenshots in tests).

Debian's `chromium` package and the `websockets` client (already a pinned dependency) are all
it needs: no Selenium or Playwright download.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

logger = logging.getLogger(__name__)

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


ARTIFACTS_ENV = "LEANREC_TEST_ARTIFACTS"  # where CI (.ci/run) collects the screenshots


def keep_as_test_artifact(shot: Path) -> Path | None:
    """A copy of `shot` in $LEANREC_TEST_ARTIFACTS (None when it is not set)."""
    if not os.environ.get(ARTIFACTS_ENV):
        return None
    target = Path(os.environ[ARTIFACTS_ENV]) / shot.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, target)
    return target


class Browser:
    """One headless Chromium process with one page; use as a context manager (the process is killed on exit)."""

    def __init__(self, binary: str, width: int = 1400, height: int = 2600, timeout: float = 60.0) -> None:
        self.profile = tempfile.mkdtemp(prefix="leanrec-chromium-")
        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--remote-debugging-address=127.0.0.1",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._stack = contextlib.ExitStack()
        try:
            port = self._devtools_port()
            page = self._page_target(port)
            self.ws = self._stack.enter_context(connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=timeout))
            self.call("Page.enable")
            self.call("Network.enable")
            self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.close()
            raise

    def _devtools_port(self) -> int:
        deadline = time.monotonic() + self.timeout
        lines = []
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                break
            lines.append(line)
            found = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if found:
                return int(found.group(1))
        raise RuntimeError("chromium did not start its DevTools endpoint:\n" + "".join(lines[-20:]))

    def _page_target(self, port: int) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=self.timeout) as response:
            targets = json.load(response)
        return next(t for t in targets if t.get("type") == "page")

    def call(self, method: str, **params: Any) -> dict:
        message_id = next(self._ids)
        self.ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        deadline = time.monotonic() + self.timeout
        while True:
            message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float | None = None, what: str = "") -> Any:
        """Poll a JavaScript expression until it is truthy; return its value."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.5)
        text = self.evaluate("document.body ? document.body.innerText.slice(0, 2000) : ''")
        raise TimeoutError(f"timed out waiting for {what or expression}; page text:\n{text}")

    def click(self, element: str) -> bool:
        """Click the element a JavaScript expression returns, as a mouse would (some UI kits ignore a scripted
        element.click()); False when the expression finds no element."""
        box = self.evaluate(f"(() => {{ const e = {element}; if (!e) return null; e.scrollIntoView({{block: 'center'}});"
                            "const b = e.getBoundingClientRect(); return [b.x + b.width / 2, b.y + b.height / 2]; })()")
        if not box:
            return False
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)
        return True

    def set_cookie(self, url: str, name: str, value: str) -> None:
        self.call("Network.setCookie", url=url, name=name, value=value, path="/")

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def screenshot(self, target: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(base64.b64decode(data))
        return target

    def close(self) -> None:
        try:
            self._stack.close()
        except Exception:  # the browser may already be gone
            logger.debug("closing the DevTools connection failed", exc_info=True)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stderr:
            self.proc.stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
