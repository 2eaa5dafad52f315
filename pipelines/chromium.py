"""Headless Chromium (the Debian package, ``apt-get install -y chromium``) driven over the DevTools protocol on a
pipe: no debugging port is opened, and nothing but the pages asked for is fetched.

A page is waited for until it shows what the caller expects, with a deadline, rather than for a fixed
``--virtual-time-budget``: an app that polls its server keeps its virtual time from ever running out.
"""

from __future__ import annotations

import base64
import json
import os
import select
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
WINDOW = (1600, 1000)
# Without the background-networking flags Chromium calls home, which a closed network refuses.
FLAGS = (
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",  # the pages are on 127.0.0.1
    "--disable-dev-shm-usage",  # containers' /dev/shm is small
    "--hide-scrollbars",
    f"--window-size={WINDOW[0]},{WINDOW[1]}",
)
COMMAND_TIMEOUT_S = 60


class BrowserError(RuntimeError):
    pass


class Browser:
    """One Chromium process with a fresh profile. It reads commands on its fd 3 and writes replies and events on its
    fd 4, each a JSON message ended by a NUL byte; a page's commands carry the session of its tab."""

    def __init__(self, profile: Path, chromium: Path = CHROMIUM):
        if not chromium.is_file():
            raise FileNotFoundError(f"{chromium} not found: install Chromium (apt-get install -y chromium)")
        to_browser, self._commands = os.pipe()
        self._replies, from_browser = os.pipe()
        flags = [*FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe"]
        if os.geteuid() == 0:
            flags.append("--no-sandbox")  # Chromium refuses to run its sandbox as root
        self.log = profile.with_suffix(".log")
        log = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        devnull = os.open(os.devnull, os.O_RDONLY)
        actions = [(os.POSIX_SPAWN_DUP2, fd, target) for fd, target in ((devnull, 0), (log, 1), (log, 2))]
        actions += [(os.POSIX_SPAWN_DUP2, to_browser, 3), (os.POSIX_SPAWN_DUP2, from_browser, 4)]
        argv = [str(chromium), *flags, "about:blank"]
        self.pid = os.posix_spawn(str(chromium), argv, os.environ, file_actions=actions, setsid=True)
        for fd in (to_browser, from_browser, log, devnull):
            os.close(fd)
        self._buffer, self._id = b"", 0

    def send(self, method: str, session: str | None = None, timeout: float = COMMAND_TIMEOUT_S, **params) -> dict:
        """One command, to the tab of ``session`` or else the browser; its result."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params} | ({"sessionId": session} if session else {})
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:  # events and late replies in between are of no use here
            reply = self._next(deadline, method)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise BrowserError(f"Chromium refused {method}: {reply['error'].get('message')}")
                return reply["result"]

    def _next(self, deadline: float, method: str) -> dict:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._replies], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(self._replies, 1 << 20) if ready else b""
            if not chunk:
                why = "exited" if ready else "timed out"
                raise BrowserError(
                    f"Chromium {why} on {method}; its log:\n{self.log.read_text(errors='replace')[-2000:]}"
                )
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, url: str) -> str:
        """A new tab of the window's size, loading ``url``; its session."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        size = {"width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1, "mobile": False}
        self.send("Emulation.setDeviceMetricsOverride", session, **size)
        self.send("Page.navigate", session, url=url)
        return session

    def evaluate(self, session: str, expression: str):
        """The value of a JavaScript expression in the tab (JSON-like values only)."""
        return self.send("Runtime.evaluate", session, expression=expression, returnByValue=True)["result"].get("value")

    def text(self, session: str) -> str:
        return self.evaluate(session, "document.body ? document.body.innerText : ''") or ""

    def wait_until(self, session: str, problems: Callable[[], list[str]], timeout: float) -> None:
        """Until ``problems()`` (what the tab does not show yet) is empty; past ``timeout`` seconds, raises with the
        last problems and the tab's text."""
        deadline = time.monotonic() + timeout
        while found := problems():
            if time.monotonic() > deadline:
                raise BrowserError(f"{'; '.join(found)}. The page shows:\n{self.text(session)[:2000]}")
            time.sleep(0.5)

    def screenshot(self, session: str, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", session, format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (BrowserError, OSError):
            pass
        for _ in range(50):
            if os.waitpid(self.pid, os.WNOHANG)[0]:
                break
            time.sleep(0.2)
        else:  # its own session: the renderers go with it
            os.killpg(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self._commands)
        os.close(self._replies)


@contextmanager
def browser(scratch: Path, chromium: Path = CHROMIUM) -> Iterator[Browser]:
    """A Chromium whose profile lives in ``scratch``, closed afterwards."""
    chrome = Browser(scratch / "chromium-profile", chromium)
    try:
        yield chrome
    finally:
        chrome.close()
