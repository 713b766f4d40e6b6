"""Listening and stopping for `aria serve`: the socket (bound before the model loads, so a taken
port is one line at once) and uvicorn's Server, told which signal stopped it."""

from __future__ import annotations

import contextlib
import errno
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from runtime.errors import AriaError, UsageError

_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class StoppableServer(uvicorn.Server):
    """uvicorn's Server that calls `on_stop` as soon as a stop signal arrives (to cut the answer
    being written) and remembers the signal instead of raising it again after shutting down, as
    uvicorn's own does: the command reports how it stopped (exit 0 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, config: uvicorn.Config, on_stop: Callable[[], None]):
        super().__init__(config)
        self.on_stop = on_stop
        self.stop_signal: int | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        kept = [s for s in _SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]  # under nohup SIGHUP stays ignored
        previous = {s: signal.signal(s, self.handle_exit) for s in kept}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.stop_signal is None:
            self.stop_signal = sig
        self.on_stop()
        super().handle_exit(sig, frame)  # a second Ctrl-C skips waiting for open answers


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, or one line saying why there cannot be one (before any model loads)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError):
        raise UsageError(f"--host {host}: no such address or host name; use 127.0.0.1, 0.0.0.0 or a name of this "
                         "machine") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        where = f"{host} port {port}"
        if exc.errno == errno.EADDRINUSE:
            raise AriaError(f"{where} is already in use (another aria serve?); pick another --port") from None
        if exc.errno == errno.EACCES:
            raise AriaError(f"not allowed to listen on {where} (ports below 1024 need root); pick --port 8000 "
                            "or above") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise AriaError(f"--host {host} is not an address of this machine; use 127.0.0.1 or 0.0.0.0") from None
        raise AriaError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
