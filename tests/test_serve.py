"""`aria serve` as a real process on a loopback port, talked to by the official `openai` client
and by raw HTTP.

The reference for an answer is `aria ask --json` on the same model, picture and question (itself
proven against transformers in test_cli_ask.py and test_demo_model.py): same text, same token
counts, streamed or not. Also: many concurrent streaming clients, the KV cache reused by a
continued conversation (and not by another picture behind the same tokens), a disconnect that
frees the model, malformed requests, the queue limit, API keys, and stop signals.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import threading
from pathlib import Path

import pytest
from endless_checkpoint import write_endless_checkpoint
from serve_harness import (
    Server,
    data_url,
    picture_message,
    read_events,
    server_env,
    start_server,
    streamed_text,
)
from typer.testing import CliRunner

from aria_cli.main import app
from runtime.demo_paths import DEMO_EXAMPLES_DIR

openai = pytest.importorskip("openai")  # the dev extra; CI installs it

RED = DEMO_EXAMPLES_DIR / "red-circle.png"
YELLOW = DEMO_EXAMPLES_DIR / "yellow-circle.png"
TRIANGLES = DEMO_EXAMPLES_DIR / "2-red-triangles.png"
SQUARES = DEMO_EXAMPLES_DIR / "3-yellow-squares.png"
QUESTION = "What is this?"


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve_home")


@pytest.fixture(scope="module")
def demo_server(home):
    # glibc raises its mmap threshold after the first large free and then keeps freed picture
    # buffers in the heap: a fixed threshold returns them, so the memory test measures leaks.
    env = server_env(home, MALLOC_MMAP_THRESHOLD_=str(2**20))
    server = start_server("-m", "demo", "--online", env=env)  # online: pictures by URL
    yield server
    assert server.stop(signal.SIGINT) == 0, server.log_text()
    assert server.log[-1] == "stopped" and "Traceback" not in server.log_text()


@pytest.fixture(scope="module")
def asked(home):
    """`aria ask --json -m demo PICTURE QUESTION`, once per picture."""
    cache: dict[Path, dict] = {}

    def answer(picture: Path) -> dict:
        if picture not in cache:
            run = CliRunner().invoke(app, ["ask", "--json", "-m", "demo", str(picture), QUESTION],
                                     env={k: None for k in os.environ} | server_env(home))
            assert run.exit_code == 0, run.stderr
            cache[picture] = json.loads(run.stdout)
        return cache[picture]

    return answer


def client(server: Server, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs)


def test_answers_equal_aria_ask_whole_and_streamed(demo_server, asked):
    expected = asked(RED)
    messages = [picture_message(RED, QUESTION)]
    whole = client(demo_server).chat.completions.create(model="demo", messages=messages)
    assert whole.object == "chat.completion" and whole.model == "demo"
    assert whole.choices[0].message.content == expected["text"] == "a red circle"
    assert whole.choices[0].finish_reason == expected["finish_reason"] == "stop"
    assert whole.usage.completion_tokens == expected["usage"]["completion_tokens"]
    assert whole.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(client(demo_server).chat.completions.create(model="demo", messages=messages, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected["text"]
    assert len({c.id for c in chunks}) == 1 and chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens == expected["usage"]["completion_tokens"]  # usage at the end

    # OpenAI's own form when asked: a last chunk with no choices, carrying only the usage.
    chunks = list(client(demo_server).chat.completions.create(
        model="demo", messages=messages, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-2].usage is None
    assert client(demo_server).models.list().data[0].id == "demo"


def test_another_picture_behind_the_same_tokens_is_not_answered_from_the_cache(demo_server, asked):
    # Both pictures become the same image token ids; only their pixels differ.
    for picture in (RED, YELLOW, RED):
        answer = client(demo_server).chat.completions.create(model="demo",
                                                             messages=[picture_message(picture, QUESTION)])
        assert answer.choices[0].message.content == asked(picture)["text"]
    assert asked(RED)["text"] != asked(YELLOW)["text"]


def test_a_continued_conversation_reuses_the_cache_and_answers_as_without_it(demo_server):
    ask = client(demo_server).chat.completions.create
    first = ask(model="demo", messages=[picture_message(SQUARES, QUESTION)])
    conversation = [picture_message(SQUARES, QUESTION),
                    {"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "How many squares?"}]
    follow_up = ask(model="demo", messages=conversation)
    assert follow_up.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    ask(model="demo", messages=[{"role": "user", "content": "Hello"}])  # the cache now holds another prompt
    again = ask(model="demo", messages=conversation)
    assert again.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens
    assert again.choices[0].message.content == follow_up.choices[0].message.content


def test_eight_concurrent_streaming_clients_are_all_answered_in_full_without_memory_growth(demo_server):
    # A quarter of the questions show a picture (each costs the vision tower ~0.5 s here).
    questions = [[picture_message(p, QUESTION)] for p in (RED, YELLOW)]
    questions += [[{"role": "user", "content": text}]
                  for text in ("Hello", "What is this?", "red", "How many?", "Two circles", "Shapes")]
    expected = [client(demo_server).chat.completions.create(model="demo", messages=q).choices[0].message.content
                for q in questions]

    def run_clients(requests_each: int) -> list[str]:
        problems: list[str] = []

        def one_client(n: int) -> None:
            for i in range(requests_each):
                k = (n + 3 * i) % len(questions)
                try:
                    chunks = list(client(demo_server, timeout=120).chat.completions.create(
                        model="demo", messages=questions[k], stream=True))
                    text = "".join(c.choices[0].delta.content or "" for c in chunks)
                    if text != expected[k] or chunks[-1].choices[0].finish_reason not in ("stop", "length"):
                        problems.append(f"client {n} request {i}: {text!r}, not {expected[k]!r}")
                except Exception as exc:  # noqa: BLE001 - collected, reported by the assertion
                    problems.append(f"client {n} request {i}: {exc!r}")

        threads = [threading.Thread(target=one_client, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        return problems

    assert run_clients(2) == []  # also warms every allocation a request makes
    before = demo_server.rss_bytes()
    assert run_clients(4) == []
    grown = demo_server.rss_bytes() - before
    # A picture's pixels alone are ~11 MB at the demo's crop size: the 8 picture requests that
    # each kept theirs would grow the server by ~90 MB.
    print(f"server memory grew by {grown / 2**20:.1f} MiB over 32 requests")
    assert grown < 16 * 2**20, f"the server grew by {grown / 2**20:.1f} MiB over 32 requests"


def test_pictures_by_http_url_and_inside_the_text(demo_server, asked):
    class Pictures(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(DEMO_EXAMPLES_DIR), **kwargs)

        def log_message(self, *args):
            pass

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Pictures)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{files.server_port}/{RED.name}"
        message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": QUESTION}]}
        answer = client(demo_server).chat.completions.create(model="demo", messages=[message])
        assert answer.choices[0].message.content == asked(RED)["text"]
        missing = dict(message, content=[{"type": "image_url", "image_url": {"url": url + ".missing"}}])
        status, _, body = demo_server.request("POST", "/v1/chat/completions",
                                              {"model": "demo", "messages": [missing]})
        assert status == 400 and "HTTP 404" in body["error"]["message"]
    finally:
        files.shutdown()
    # Text before the picture is placed before it: the prompt grows by exactly that text's tokens.
    plain = client(demo_server).chat.completions.create(model="demo", messages=[picture_message(RED, QUESTION)])
    inside = {"role": "user", "content": [{"type": "text", "text": "Look."},
                                          {"type": "image_url", "image_url": {"url": data_url(RED)}},
                                          {"type": "text", "text": QUESTION}]}
    placed = client(demo_server).chat.completions.create(model="demo", messages=[inside])
    assert placed.usage.prompt_tokens > plain.usage.prompt_tokens


def test_sampling_fields_seed_and_stop(demo_server):
    ask = client(demo_server).chat.completions.create
    messages = [picture_message(TRIANGLES, QUESTION)]
    sampled = [ask(model="demo", messages=messages, temperature=1.5, top_p=0.9, seed=7, max_tokens=8)
               for _ in range(2)]
    assert sampled[0].choices[0].message.content == sampled[1].choices[0].message.content
    greedy = ask(model="demo", messages=messages).choices[0].message.content
    words = greedy.split(" ")
    assert len(words) >= 2
    cut = ask(model="demo", messages=messages, stop=[" " + words[1]])
    assert cut.choices[0].message.content == words[0] and cut.choices[0].finish_reason == "stop"
    short = ask(model="demo", messages=messages, max_completion_tokens=1)
    assert short.usage.completion_tokens == 1 and short.choices[0].finish_reason == "length"


GOOD = {"model": "demo", "messages": [{"role": "user", "content": "Hello"}]}
MALFORMED = [
    # (what, body as bytes or JSON, extra headers, status, param or code the error names)
    ("not JSON", b"{model: demo", {}, 400, None),
    ("NaN is not JSON", b'{"model": "demo", "messages": [], "temperature": NaN}', {}, 400, None),
    ("not UTF-8", b'{"model": "\xff"}', {}, 400, None),
    ("an array body", [], {}, 400, None),
    ("no messages", {"model": "demo"}, {}, 400, "messages"),
    ("empty messages", {**GOOD, "messages": []}, {}, 400, "messages"),
    ("a tool message", {**GOOD, "messages": [{"role": "tool", "content": "x"}]}, {}, 400, "messages[0].role"),
    ("content a number", {**GOOD, "messages": [{"role": "user", "content": 5}]}, {}, 400, "messages[0].content"),
    ("an audio part", {**GOOD, "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, {}, 400,
     "messages[0].content[0]"),
    ("a local file", {**GOOD, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}, {}, 400,
     "messages[0].content[0].image_url.url"),
    ("a data URL that is not base64", {**GOOD, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png,abc"}}]}]}, {}, 400, "invalid_image"),
    ("a data URL of text", {**GOOD, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8gd29ybGQ="}}]}]}, {}, 400,
     "invalid_image"),
    ("an unknown model", {**GOOD, "model": "gpt-4o"}, {}, 404, "model_not_found"),
    ("max_tokens 0", {**GOOD, "max_tokens": 0}, {}, 400, "max_tokens"),
    ("temperature 3", {**GOOD, "temperature": 3}, {}, 400, "temperature"),
    ("temperature as text", {**GOOD, "temperature": "hot"}, {}, 400, "temperature"),
    ("n 2", {**GOOD, "n": 2}, {}, 400, "n"),
    ("stop a number", {**GOOD, "stop": 5}, {}, 400, "stop"),
    ("tools", {**GOOD, "tools": [{"type": "function", "function": {"name": "f"}}]}, {}, 400, "tools"),
    ("a lone surrogate", b'{"model": "demo", "messages": [{"role": "user", "content": "\\ud800"}]}', {}, 400,
     "messages[0].content"),
    ("the picture marker", {**GOOD, "messages": [{"role": "user", "content": "<|img|>"}]}, {}, 400,
     "messages[0].content"),
    ("a prompt longer than the context", {**GOOD, "messages": [{"role": "user", "content": "red " * 5000}]}, {},
     400, "context_length_exceeded"),
    ("a body over the limit", b"{}", {"Content-Length": str(10**9)}, 413, "request_too_large"),
    ("a page in a browser", GOOD, {"Origin": "http://example.com"}, 403, "origin_not_allowed"),
]


@pytest.mark.parametrize("what,body,headers,status,names", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_requests_get_their_status_and_an_openai_error_object(demo_server, what, body, headers, status,
                                                                       names):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, _, answer = demo_server.request("POST", "/v1/chat/completions", raw=raw, headers=headers)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and "\n" not in error["message"]
    assert names is None or names in (error["param"], error["code"])
    # ...and the next good request is answered.
    assert demo_server.request("POST", "/v1/chat/completions", GOOD)[0] == 200


def test_routes_methods_and_the_official_clients_errors(demo_server):
    assert demo_server.request("GET", "/v1/nothing")[0] == 404
    assert demo_server.request("GET", "/v1/chat/completions")[0] == 405
    assert demo_server.request("GET", "/v1/models/demo")[2]["id"] == "demo"
    assert demo_server.request("GET", "/v1/models/other")[0] == 404
    status, _, health = demo_server.request("GET", "/health")
    assert status == 200 and health["status"] == "ok"
    with pytest.raises(openai.NotFoundError):
        client(demo_server).chat.completions.create(model="other", messages=GOOD["messages"])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client(demo_server).chat.completions.create(model="demo", messages=GOOD["messages"], temperature=2.5)
    # A page served from this machine may use it (a local UI).
    assert demo_server.request("POST", "/v1/chat/completions", GOOD, {"Origin": "http://localhost:3000"})[0] == 200


# --- a model that talks until stopped ------------------------------------------------------------


@pytest.fixture(scope="module")
def endless(tmp_path_factory) -> Path:
    return write_endless_checkpoint(tmp_path_factory.mktemp("endless"))


LONG = {"model": None, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 900,
        "stream": True}


def open_stream(server: Server, body: dict):
    conn = server.connection()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    return conn, response


def test_a_full_queue_is_429_and_a_client_that_leaves_frees_the_model(endless, home):
    server = start_server("-m", endless, "--max-queue", "0", env=server_env(home))
    try:
        body = {**LONG, "model": str(endless)}
        conn, response = open_stream(server, body)
        first = read_events(response, limit=4)
        assert streamed_text(first)
        status, headers, error = server.request("POST", "/v1/chat/completions", {**body, "stream": False})
        assert status == 429 and int(headers["Retry-After"]) > 0 and error["error"]["code"] == "queue_full"
        conn.sock.close()  # the client goes away mid-answer
        conn.close()
        stopped = server.wait_for_log(r"(\d+) tokens, .*\(stopped: the client went away\)")
        assert int(stopped.group(1)) < body["max_tokens"]
        # The model is free again: the next request is admitted and answered in full.
        status, _, answer = server.request("POST", "/v1/chat/completions", {**body, "stream": False, "max_tokens": 5})
        assert status == 200 and answer["usage"]["completion_tokens"] == 5
        assert answer["choices"][0]["finish_reason"] == "length"
    finally:
        assert server.stop(signal.SIGINT) == 0, server.log_text()


def test_sigterm_during_a_stream_ends_it_cleanly_and_exits_143(endless, home):
    server = start_server("-m", endless, "--host", "0.0.0.0", env=server_env(home))
    assert any("warning: --host 0.0.0.0" in line and "--api-key" in line for line in server.log)
    _conn, response = open_stream(server, {**LONG, "model": str(endless)})
    first = read_events(response, limit=3)
    server.proc.send_signal(signal.SIGTERM)
    rest = read_events(response)
    assert rest[-1] == "[DONE]"
    assert rest[-2]["choices"][0]["finish_reason"] == "length"
    assert 0 < rest[-2]["usage"]["completion_tokens"] < LONG["max_tokens"]
    assert streamed_text(first + rest)
    assert server.proc.wait(60) == 143
    log = server.log_text()
    assert "terminated (SIGTERM)" in log and "Traceback" not in log


def test_an_api_key_is_required_when_set(home):
    server = start_server("-m", "demo", env=server_env(home, ARIA_API_KEY="sesame"))
    try:
        question = {"model": "demo", "messages": [picture_message(RED, QUESTION)]}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            status, _, error = server.request("POST", "/v1/chat/completions", question, headers)
            assert status == 401 and error["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(server, api_key="wrong").models.list()
        answer = client(server, api_key="sesame").chat.completions.create(**question)
        assert answer.choices[0].message.content == "a red circle"
        assert server.request("GET", "/health")[0] == 200  # health checks need no key
    finally:
        assert server.stop(signal.SIGINT) == 0


def test_a_taken_port_and_bad_flags_are_one_line_before_any_model_loads(tmp_path, monkeypatch):
    from user_env import isolate_user_env

    isolate_user_env(monkeypatch, tmp_path)
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", "-m", "demo", "--port", str(port)])
        assert result.exit_code == 1
        assert result.stderr.strip().splitlines()[-1] == (f"error: 127.0.0.1 port {port} is already in use "
                                                          "(another aria serve?); pick another --port")
    finally:
        taken.close()
    for args, line in [(["--port", "70000"], "--port must be a port number from 0 to 65535"),
                       (["--max-queue", "-1"], "--max-queue must be >= 0"),
                       (["--json"], "--json is for `aria ask`")]:
        result = CliRunner().invoke(app, ["serve", "-m", "demo", *args])
        assert result.exit_code == 2 and line in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_aria_ask_server_answers_as_a_local_ask(demo_server, asked, tmp_path, monkeypatch):
    from user_env import isolate_user_env

    isolate_user_env(monkeypatch, tmp_path)
    local = asked(RED)["text"]
    by_path = CliRunner().invoke(app, ["ask", "--server", demo_server.base_url, str(RED), QUESTION])
    assert by_path.exit_code == 0 and by_path.stdout == local + "\n"
    by_stdin = CliRunner().invoke(app, ["ask", "--server", f"127.0.0.1:{demo_server.port}", "-", QUESTION],
                                  input=RED.read_bytes())
    assert by_stdin.exit_code == 0 and by_stdin.stdout == local + "\n"
    other = CliRunner().invoke(app, ["ask", "--server", demo_server.base_url, "-m", "other", QUESTION])
    assert other.exit_code == 1 and other.stderr.strip().endswith("not 'other'")
    for args, code, line in [
        (["--server", "http://127.0.0.1:1", QUESTION], 1, "cannot reach aria serve at http://127.0.0.1:1"),
        (["--server", demo_server.base_url, "--json", QUESTION], 2, "--json needs the answer's tokens"),
        (["--server", demo_server.base_url, str(tmp_path / "none.png"), QUESTION], 1, "does not exist"),
    ]:
        result = CliRunner().invoke(app, ["ask", *args])
        assert result.exit_code == code and line in result.stderr and result.stderr.count("\n") == 1
