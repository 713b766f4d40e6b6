"""The model answers one request at a time, on one thread of its own, while the server's event
loop stays free to accept, stream and refuse.

A request is admitted (`admit`) or refused at once when the wait queue is full (HTTP 429). An
admitted request becomes a `Job`: the model thread runs it when its turn comes and posts its
events to the event loop ("start" with the Reply once the prompt is built, "chunk" per piece of
text, then "done" or "error"). Setting `job.cancel` (the client went away, or the server is
stopping) ends the answer after the current token (Assistant.reply checks it per token); a job
cancelled before its turn never runs.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from runtime.assistant import Assistant, Conversation, GenerationOptions

from .. import console
from .chat_request import RequestError


class Job:
    def __init__(self, loop: asyncio.AbstractEventLoop, conversation: Conversation, options: GenerationOptions,
                 name: str):
        self.conversation = conversation
        self.options = options
        self.name = name  # the completion id, for the log
        self.cancel = threading.Event()
        self.cancelled_because = ""
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._loop = loop

    def stop(self, because: str) -> None:
        if not self.cancel.is_set():
            self.cancelled_because = because
            self.cancel.set()

    def post(self, kind: str, value: Any = None) -> None:
        """From the model thread: hand an event to the event loop (dropped once it has closed)."""
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: the server has stopped, nobody is listening
            pass


class ModelWorker:
    def __init__(self, max_waiting: int):
        self.assistant: Assistant | None = None
        self.max_waiting = max_waiting
        self.stopping = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aria-model")
        self._admitted = 0  # running + waiting; touched on the event loop only
        self._lock = threading.Lock()  # the running job, between the model thread and stop()
        self._running: Job | None = None
        self._thread: threading.Thread | None = None  # the model thread, once it has started

    # On the event loop -----------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.assistant is not None

    @property
    def admitted(self) -> int:
        return self._admitted

    def admit(self) -> bool:
        if self._admitted > self.max_waiting:  # one answering and max_waiting waiting
            return False
        self._admitted += 1
        return True

    def release(self) -> None:
        self._admitted -= 1

    def submit(self, job: Job) -> None:
        self._executor.submit(self._answer, job)

    # Anywhere --------------------------------------------------------------------------------

    def load(self, open_model: Callable[[], Assistant]) -> Future:
        """Open the model on the model thread (the one that will run it)."""

        def run() -> None:
            self._thread = threading.current_thread()
            self.assistant = open_model()

        return self._executor.submit(run)

    def stop(self) -> None:
        """Refuse what waits and cut the running answer after its current token (signal-safe)."""
        with self._lock:
            self.stopping.set()
            if self._running is not None:
                self._running.stop("the server is stopping")

    def close(self, timeout: float) -> bool:
        """Let the model thread end; False when it is still busy after `timeout` seconds (a
        model still loading, a long prefill)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._thread is None:  # it never started
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # On the model thread ---------------------------------------------------------------------

    def _answer(self, job: Job) -> None:
        with self._lock:
            if self.stopping.is_set():
                job.post("error", RequestError("the server is stopping; retry on another server or later",
                                               status=503, kind="server_error", code="shutting_down"))
                return
            if job.cancel.is_set():  # the client left while it waited
                job.post("error", None)
                return
            self._running = job
        try:
            assert self.assistant is not None  # requests are admitted only once it is loaded
            reply = self.assistant.reply(job.conversation, job.options, cancel=job.cancel)
            job.post("start", reply)
            for chunk in reply:
                job.post("chunk", chunk)
            job.post("done", reply)
            _log_answer(job, reply)
        except Exception as exc:  # noqa: BLE001 - reported to the client; the server goes on
            job.post("error", exc)
        finally:
            with self._lock:
                self._running = None


def _log_answer(job: Job, reply) -> None:
    s = reply.stats
    ended = f"stopped: {job.cancelled_because}" if job.cancel.is_set() else reply.finish_reason
    console.detail(f"{job.name}: {s.prompt_tokens} prompt tokens ({s.prompt_tokens - s.prefilled_tokens} from the "
                   f"cache), {s.completion_tokens} tokens, {s.decode_tokens_per_s:.1f} tokens/s ({ended})")
