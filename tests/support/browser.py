"""Drive a real headless Chromium through chromedriver's W3C WebDriver HTTP API (stdlib only).

    with chromium_session(tmp_path) as b:
        b.get(Path("report.html").resolve().as_uri())
        n = b.execute("return document.querySelectorAll('.item:not([hidden])').length")
        b.click(b.find("button.filter[data-status='ok']"))
        b.screenshot("test-artifacts/report.png")

No selenium: WebDriver is JSON over HTTP (https://www.w3.org/TR/webdriver2/), a few calls are
all the tests need. Everything stays on 127.0.0.1; Chromium runs with networking features off.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ELEMENT_KEY = "element-6066-11e4-a52e-4f735466cecf"  # the W3C web element identifier
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # small /dev/shm in containers
    "--window-size=1400,1000",
]


def missing_browser() -> str | None:
    """Why the browser tests cannot run here, or None when chromium and chromedriver exist."""
    missing = [n for n in ("chromium", "chromedriver") if not find_binary(n)]
    if missing:
        return f"{' and '.join(missing)} not installed (Debian: apt-get install chromium chromium-driver)"
    return None


def find_binary(name: str) -> str | None:
    return shutil.which(name) or (
        f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None
    )


class Browser:
    """One WebDriver session: a handful of W3C endpoints wrapped as methods."""

    def __init__(self, base: str, session: str):
        self.base, self.session = base, session

    def _call(self, method: str, path: str, body: dict | None = None, timeout: float = 60) -> Any:
        data = json.dumps(body if body is not None else {}).encode() if method == "POST" else None
        req = urllib.request.Request(
            f"{self.base}/session/{self.session}{path}", data, method=method
        )
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read())["value"]
        except urllib.error.HTTPError as e:  # WebDriver errors carry a JSON body saying why
            raise RuntimeError(f"{method} {path}: {e.code} {e.read()[:500]!r}") from None

    def get(self, url: str) -> None:
        self._call("POST", "/url", {"url": url})

    def execute(self, script: str, *args: Any) -> Any:
        return self._call("POST", "/execute/sync", {"script": script, "args": list(args)})

    def find(self, css: str) -> dict:
        return self._call("POST", "/element", {"using": "css selector", "value": css})

    def find_all(self, css: str) -> list[dict]:
        return self._call("POST", "/elements", {"using": "css selector", "value": css})

    def click(self, element: dict) -> None:
        self._call("POST", f"/element/{element[ELEMENT_KEY]}/click")

    def type(self, element: dict, text: str) -> None:
        self._call("POST", f"/element/{element[ELEMENT_KEY]}/value", {"text": text})

    def clear(self, element: dict) -> None:
        self._call("POST", f"/element/{element[ELEMENT_KEY]}/clear")

    def text(self, element: dict) -> str:
        """The rendered text (innerText), as a person reads it."""
        return self._call("GET", f"/element/{element[ELEMENT_KEY]}/text")

    def displayed(self, element: dict) -> bool:
        return self._call("GET", f"/element/{element[ELEMENT_KEY]}/displayed")

    def set_window(self, width: int, height: int) -> None:
        self._call("POST", "/window/rect", {"width": width, "height": height})

    def screenshot(self, path: str | Path) -> Path:
        """Save a PNG of the viewport (grow the window first for a whole-page picture)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self._call("GET", "/screenshot")))
        return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 60) -> Any:
    req = urllib.request.Request(url, json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())["value"]


@contextlib.contextmanager
def chromium_session(tmp_dir: Path) -> Iterator[Browser]:
    """Start chromedriver on a free loopback port and one headless Chromium session; end both."""
    port = _free_port()
    profile = tmp_dir / "chromium-profile"
    log = open(tmp_dir / "chromedriver.log", "wb")  # noqa: SIM115 - closed in finally
    driver = subprocess.Popen(
        [
            find_binary("chromedriver") or "chromedriver",
            f"--port={port}",
            "--allowed-ips=127.0.0.1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    browser_pid = None
    session = None
    try:
        deadline = time.monotonic() + 20
        while True:  # chromedriver answers /status once it listens
            try:
                with urllib.request.urlopen(f"{base}/status", timeout=2) as resp:
                    if json.loads(resp.read())["value"]["ready"]:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or driver.poll() is not None:
                raise RuntimeError(
                    f"chromedriver did not start; see {tmp_dir / 'chromedriver.log'}"
                )
            time.sleep(0.1)
        options = {
            "binary": find_binary("chromium"),
            "args": [*CHROMIUM_ARGS, f"--user-data-dir={profile}"],
        }
        caps = {"capabilities": {"alwaysMatch": {"goog:chromeOptions": options}}}
        created = _post(f"{base}/session", caps)
        session = created["sessionId"]
        browser_pid = created["capabilities"].get("goog:processID")
        yield Browser(base, session)
    finally:
        if session is not None:
            with contextlib.suppress(OSError):  # closes the browser
                urllib.request.urlopen(
                    urllib.request.Request(f"{base}/session/{session}", method="DELETE"), timeout=30
                ).read()
        driver.terminate()
        try:
            driver.wait(10)
        except subprocess.TimeoutExpired:
            driver.kill()
            driver.wait()
        log.close()
        # Chromium outlives a killed chromedriver; end the one this session started, by its
        # id, and only if that id still belongs to it (its profile directory is ours).
        if browser_pid and _is_ours(browser_pid, profile):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(browser_pid, signal.SIGKILL)


def _is_ours(pid: int, profile: Path) -> bool:
    try:
        return str(profile).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
