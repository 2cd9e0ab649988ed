"""Drive the system Chromium headless over the DevTools protocol: load a page, collect errors, screenshot."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageLoad:
    """What loading one page showed."""

    errors: list[str] = field(default_factory=list)
    probe: Any = None
    screenshot: bytes = b""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=2) as response:
        return json.loads(response.read())


class _Session:
    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, params: dict | None = None, timeout: float = 30.0) -> dict:
        self.next_id += 1
        my_id = self.next_id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = json.loads(self.ws.recv())
            if message.get("id") == my_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)
        raise TimeoutError(method)

    def wait_for(self, method: str, timeout: float = 30.0) -> dict:
        for k, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events.pop(k)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = json.loads(self.ws.recv())
            if message.get("method") == method:
                return message
            self.events.append(message)
        raise TimeoutError(method)


def _errors(events: list[dict]) -> list[str]:
    out = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            out.append("exception: " + params.get("exceptionDetails", {}).get("text", ""))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            out.append(f"log: {entry.get('text')} {entry.get('url', '')}")
    return out


def load_page(url: str, probe_js: str, *, width: int = 1280, height: int = 1000, timeout: float = 45.0) -> PageLoad:
    """Open ``url`` in headless Chromium, wait for load, evaluate ``probe_js`` (JSON result), screenshot the viewport."""
    import websocket

    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("no chromium on PATH (make test-deps installs it: apt-get install chromium)")
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="hsm-chromium-") as profile:
        proc = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--remote-allow-origins=*",
             f"--remote-debugging-port={port}", f"--user-data-dir={profile}", f"--window-size={width},{height}",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + timeout
            targets = None
            while time.monotonic() < deadline:
                try:
                    targets = [t for t in _get_json(f"http://127.0.0.1:{port}/json") if t.get("type") == "page"]
                    if targets:
                        break
                except OSError:
                    pass
                time.sleep(0.2)
            if not targets:
                raise TimeoutError(f"chromium did not open its DevTools port {port} within {timeout} s")
            ws = websocket.create_connection(targets[0]["webSocketDebuggerUrl"], timeout=timeout, suppress_origin=True)
            try:
                session = _Session(ws)
                for domain in ("Runtime", "Log", "Page"):
                    session.call(f"{domain}.enable")
                session.call("Emulation.setDeviceMetricsOverride",
                             {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
                session.call("Page.navigate", {"url": url})
                session.wait_for("Page.loadEventFired", timeout=timeout)
                result = session.call("Runtime.evaluate", {"expression": probe_js, "returnByValue": True,
                                                            "awaitPromise": True})
                if "exceptionDetails" in result:
                    raise RuntimeError(f"probe failed: {result['exceptionDetails']}")
                shot = session.call("Page.captureScreenshot", {"format": "png"})
                # Late console messages: give the page a moment, then drain.
                ws.settimeout(0.5)
                try:
                    while True:
                        session.events.append(json.loads(ws.recv()))
                except websocket.WebSocketTimeoutException:
                    pass
                return PageLoad(errors=_errors(session.events), probe=result["result"].get("value"),
                                screenshot=base64.b64decode(shot["data"]))
            finally:
                ws.close()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def page_url(path: Path) -> str:
    return Path(path).resolve().as_uri()
