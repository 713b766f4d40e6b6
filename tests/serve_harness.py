"""Starting a real `aria serve` process on a free loopback port, and talking to it over raw HTTP.

The server prints `aria serve: MODEL at http://127.0.0.1:PORT/v1` once it listens; `start_server`
reads that line, waits until `/health` says the model is loaded, and keeps collecting the
server's stderr (its -v log) for the tests to read.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from user_env import isolated_env

_LISTENING = re.compile(r"at http://\S+:(\d+)/v1")


def server_env(home: Path, **extra: str) -> dict[str, str]:
    """The test process's environment without the user's settings, Hub offline, one thread (the
    tests run beside the server on a small machine)."""
    return isolated_env(home, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)


@dataclass
class Server:
    proc: subprocess.Popen
    port: int = 0
    log: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def connection(self, timeout: float = 120) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                raw: bytes | None = None) -> tuple[int, dict[str, str], Any]:
        """(status, headers, parsed JSON body) of one request; `raw` is sent as the body as-is."""
        conn = self.connection()
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        payload = response.read()
        conn.close()
        return response.status, response.headers, json.loads(payload) if payload else None

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def log_text(self) -> str:
        return "\n".join(self.log)

    def wait_for_log(self, pattern: str, timeout: float = 60) -> re.Match:
        ends = time.monotonic() + timeout
        while time.monotonic() < ends:
            for line in list(self.log):
                found = re.search(pattern, line)
                if found:
                    return found
            time.sleep(0.05)
        raise AssertionError(f"no log line matches {pattern!r}:\n{self.log_text()}")

    def stop(self, signum: int = signal.SIGINT, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        return self.proc.wait(timeout)


def start_server(*args: str, env: dict[str, str], wait_ready: bool = True) -> Server:
    proc = subprocess.Popen([sys.executable, "-m", "aria_cli", "serve", "--port", "0", "-v", *map(str, args)],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    server = Server(proc)
    listening = threading.Event()

    def collect() -> None:
        for line in proc.stderr:
            server.log.append(line.rstrip("\n"))
            found = _LISTENING.search(line)
            if found and not listening.is_set():
                server.port = int(found.group(1))
                listening.set()
        listening.set()  # the process ended

    threading.Thread(target=collect, daemon=True).start()
    if not listening.wait(120) or not server.port:
        proc.kill()
        raise AssertionError(f"aria serve did not start:\n{server.log_text()}")
    if wait_ready:
        ends = time.monotonic() + 180
        while server.request("GET", "/health")[0] != 200:
            if proc.poll() is not None or time.monotonic() > ends:
                proc.kill()
                raise AssertionError(f"aria serve did not load its model:\n{server.log_text()}")
            time.sleep(0.1)
    return server


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def picture_message(path: Path, question: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(path)}},
                                        {"type": "text", "text": question}]}


def read_events(response: http.client.HTTPResponse, limit: int | None = None) -> list[Any]:
    """The server-sent events of a streamed answer, parsed ("[DONE]" as the string), up to `limit`."""
    events: list[Any] = []
    while limit is None or len(events) < limit:
        line = response.fp.readline()
        if not line:
            break
        line = line.decode().rstrip("\r\n")
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
            if data == "[DONE]":
                break
    return events


def streamed_text(events: list[Any]) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if isinstance(e, dict) and e.get("choices"))
