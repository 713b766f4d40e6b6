"""The server's app before its model has loaded, and a body that outgrows the limit as it arrives.

Runs the real app (aria_cli.server.app) on uvicorn in a thread of this process, on a loopback
port, so the test decides when the model finishes loading: until then every completion is a 503
with Retry-After and /health says "loading"; afterwards the same server answers.
"""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest
import uvicorn
from serve_harness import picture_message
from user_env import isolate_user_env

from aria_cli.assistant_loader import open_assistant
from aria_cli.options import ServeOptions, resolve_options
from aria_cli.server.app import ServerState, build_app
from aria_cli.server.http_server import StoppableServer, listen
from aria_cli.server.model_worker import ModelWorker
from runtime.demo_paths import DEMO_EXAMPLES_DIR


@pytest.fixture
def unloaded(tmp_path, monkeypatch):
    """(port, worker, options) of a running server whose model has not been loaded."""
    isolate_user_env(monkeypatch, tmp_path)
    opts = resolve_options(ServeOptions, {"model": "demo", "device": "cpu"})
    worker = ModelWorker(max_waiting=2)
    sock = listen("127.0.0.1", 0)
    server = StoppableServer(uvicorn.Config(build_app(ServerState(opts, worker, max_body=4096)), log_config=None,
                                            access_log=False, lifespan="off"), on_stop=worker.stop)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield sock.getsockname()[1], worker, opts
    server.should_exit = True
    thread.join(30)
    worker.close(timeout=30)


def call(port: int, method: str, path: str, body=None, chunked: bool = False):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    if chunked:
        conn.request(method, path, body=iter(body), headers={"Content-Type": "application/json"}, encode_chunked=True)
    else:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = json.loads(response.read())
    conn.close()
    return response.status, response.headers, payload


def test_while_loading_requests_get_503_and_the_same_server_answers_once_loaded(unloaded):
    port, worker, opts = unloaded
    question = {"model": "demo", "messages": [picture_message(DEMO_EXAMPLES_DIR / "5-red-diamonds.png", "What?")]}
    status, _, health = call(port, "GET", "/health")
    assert status == 503 and health["status"] == "loading"
    status, headers, error = call(port, "POST", "/v1/chat/completions", {"model": "demo", "messages": []})
    assert status == 503 and error["error"]["code"] == "model_loading" and int(headers["Retry-After"]) > 0
    assert call(port, "GET", "/v1/models")[2]["data"][0]["id"] == "demo"  # the name is known before loading

    worker.load(lambda: open_assistant(opts)).result(timeout=120)
    assert call(port, "GET", "/health")[0] == 200
    status, _, error = call(port, "POST", "/v1/chat/completions", question)
    # This server was built with a 4 KiB body limit, below this picture: refused by its length...
    assert status == 413 and error["error"]["code"] == "request_too_large"
    # ...and, sent in chunks with no length given, once it has read past the limit.
    pieces = [b'{"model": "demo", "messages": [{"role": "user", "content": "'] + [b"x" * 1024] * 8 + [b'"}]}']
    status, _, error = call(port, "POST", "/v1/chat/completions", pieces, chunked=True)
    assert status == 413 and error["error"]["code"] == "request_too_large"
    text_question = {"model": "demo", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}
    status, _, answer = call(port, "POST", "/v1/chat/completions", text_question)
    assert status == 200 and answer["usage"]["completion_tokens"] <= 3


def test_the_servers_system_prompt_is_the_default_for_requests_without_one(tmp_path, monkeypatch):
    from aria_cli.server.app import _conversation
    from aria_cli.server.chat_request import parse_chat_request

    isolate_user_env(monkeypatch, tmp_path)
    opts = resolve_options(ServeOptions, {"model": "demo", "system": "Answer in one word."})
    plain = parse_chat_request({"messages": [{"role": "user", "content": "Hi"}]})
    assert _conversation(plain, opts).messages() == [
        {"role": "system", "content": [{"type": "text", "text": "Answer in one word."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    ]
    own = parse_chat_request({"messages": [{"role": "developer", "content": "Be kind."},
                                           {"role": "user", "content": "Hi"}]})
    assert [(m["role"], m["content"][0]["text"]) for m in _conversation(own, opts).messages()] == [
        ("system", "Be kind."), ("user", "Hi")]
