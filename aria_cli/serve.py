"""`aria serve`: keep one model loaded and answer OpenAI clients over HTTP.

The server listens at once and loads the model on its model thread (requests meanwhile get 503
and `/health` says "loading"); a model that fails to load ends the command with its one-line
error. SIGINT (Ctrl-C) and SIGTERM stop accepting, cut the answer being written after its current
token (the client gets its end and `finish_reason: "length"`), refuse the waiting ones (503) and
exit 0 (SIGINT) or 143 (SIGTERM; 129 for SIGHUP). The HTTP side is aria_cli/server/.
"""

from __future__ import annotations

import signal
from typing import Any

from runtime.errors import UsageError

from . import console
from .errors import EXIT_OK, Terminated, exit_at_once
from .options import ServeOptions, with_options

_GRACE_S = 30  # after a stop signal, how long answers may take to end (a long prefill cannot be cut)


@with_options(ServeOptions, hidden=("json",))  # refused below: the answers are the server's output
def serve(opts: ServeOptions) -> None:
    """Serve the model to OpenAI clients over HTTP: chat completions with pictures, streamed.

    `POST /v1/chat/completions` takes OpenAI's request (text and `image_url` parts as data: or
    http(s) URLs, `stream`, `max_tokens`, `temperature`, `top_p`, `seed`, `stop`), `GET /v1/models`
    lists the model and `GET /health` says whether it is loaded. The sampling flags are the
    defaults for requests that do not set them. One answer is written at a time; --max-queue more
    may wait, and past that clients get 429. Ctrl-C or SIGTERM stop the server.
    """
    if opts.json:
        raise UsageError("--json is for `aria ask`; aria serve answers in JSON over HTTP")
    import uvicorn

    from .assistant_loader import open_assistant
    from .server.app import ServerState, build_app, is_loopback
    from .server.http_server import StoppableServer, listen, url_of
    from .server.model_worker import ModelWorker

    listener = listen(opts.host, opts.port)
    worker = ModelWorker(opts.max_queue)
    config = uvicorn.Config(build_app(ServerState(opts, worker)), log_config=None, log_level="warning",
                            access_log=False, lifespan="off", timeout_graceful_shutdown=_GRACE_S)
    server = StoppableServer(config, on_stop=worker.stop)
    url = url_of(listener)
    console.info(f"aria serve: {opts.model} at {url}/v1 (OpenAI API); Ctrl-C stops")
    if opts.api_key is None and not is_loopback(opts.host):
        console.warn(f"--host {opts.host} accepts requests from other machines and no --api-key is set: anyone "
                     "who reaches this port can use the model")
    loading = worker.load(lambda: open_assistant(opts))
    loading.add_done_callback(lambda done: _loaded(done, server, opts.model))
    try:
        server.run(sockets=[listener])
    finally:
        listener.close()
        idle = worker.close(timeout=5)
    failure = loading.exception() if loading.done() and not loading.cancelled() else None
    if failure is not None:
        raise failure
    if server.stop_signal not in (None, signal.SIGINT):
        raise Terminated(server.stop_signal)
    console.info("stopped")
    if not idle:  # still loading or in a prefill: Python would wait for that thread at exit
        exit_at_once(EXIT_OK)


def _loaded(done, server: Any, name: str) -> None:
    if done.cancelled():
        return
    if done.exception() is not None:  # reported by the command once the server has stopped
        server.should_exit = True
        return
    console.info(f"ready: {name} is loaded")
