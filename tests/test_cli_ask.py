"""`aria ask`: pictures by path, by stdin and several; piped text; --json, --quiet, -v; Ctrl-C;
every expected error as one line with its exit code.

The reference for the answer is transformers' AriaProcessor + AriaForConditionalGeneration on the
same checkpoint directory (tests/test_assistant.py's `reference_tokens`): `--json`'s `tokens` must
be its greedy tokens. Runs both in-process (Typer's CliRunner) and as real processes, where stdout
and stderr are real pipes (or a pseudo-terminal).
"""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys

import pytest
import torch
from endless_checkpoint import write_endless_checkpoint
from PIL import Image
from typer.testing import CliRunner
from user_env import isolate_user_env

from aria_cli.main import app
from runtime.assistant import Conversation
from runtime.tiny_checkpoint import tiny_config, write_tiny_checkpoint
from tests.test_assistant import reference_tokens

N = 12
JSON_KEYS = {"text", "tokens", "finish_reason", "model", "usage", "timings", "memory", "experts"}
NESTED_KEYS = {
    "usage": {"prompt_tokens", "completion_tokens"},
    "timings": {"load_s", "ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s"},
    "memory": {"peak_device_bytes", "peak_host_bytes"},
    "experts": {"hit_rate", "fetched", "cpu_computed"},
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ask"), seed=21)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    paths = {}
    for name, colour, size in [("red", "red", (640, 400)), ("blue", "blue", (300, 500)), ("green", "green", (256, 256))]:
        image = Image.new("RGB", size, "white")
        image.paste(Image.new("RGB", (size[0] // 2, size[1] // 3), colour), (size[0] // 4, size[1] // 3))
        paths[name] = folder / f"{name}.png"
        image.save(paths[name])
    paths["text"] = folder / "notes.png"
    paths["text"].write_text("this is not a picture\n")
    paths["truncated"] = folder / "cut.png"
    paths["truncated"].write_bytes(paths["red"].read_bytes()[:200])
    return paths


@pytest.fixture(scope="module")
def reference(checkpoint):
    """Greedy tokens of the transformers reference for (prompt, picture paths), computed once each."""
    cache: dict = {}

    def tokens(prompt: str, paths=(), n: int = N) -> list[int]:
        key = (prompt, tuple(paths), n)
        if key not in cache:
            chat = Conversation()
            chat.add("user", prompt, [Image.open(p) for p in paths])
            cache[key] = reference_tokens(checkpoint, chat, n)
        return cache[key]

    return tokens


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch):
    isolate_user_env(monkeypatch, tmp_path)


def ask(*args: str, input: bytes | str | None = None):
    return CliRunner().invoke(app, ["ask", *map(str, args)], input=input)


def ask_process(*args: str, stdin=subprocess.DEVNULL, input: bytes | None = None, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "aria_cli", "ask", *map(str, args)], env=env, stdin=stdin,
                          input=input, capture_output=True, timeout=120, check=False, **kwargs)


def answer(result) -> dict:
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count("\n") == 1, "--json prints exactly one line"
    return json.loads(result.stdout)


def check_tokens(out: dict, expected: list[int]) -> None:
    # Our stop ids (im_end, eos) may end the answer early; the reference always runs N tokens.
    assert len(out["tokens"]) >= 6, "the comparison needs a real stretch of generated tokens"
    assert out["tokens"] == expected[: len(out["tokens"])]
    if out["finish_reason"] == "length":
        assert len(out["tokens"]) == N


def test_json_schema_and_tokens_equal_the_reference_for_a_picture_by_path(checkpoint, pictures, reference):
    out = answer(ask("-m", checkpoint, pictures["red"], "What is in the image?", "-n", N, "--json"))
    assert set(out) == JSON_KEYS
    for key, names in NESTED_KEYS.items():
        assert set(out[key]) == names
    assert out["model"] == str(checkpoint)
    assert out["finish_reason"] in ("stop", "length")
    check_tokens(out, reference("What is in the image?", [pictures["red"]]))
    assert out["usage"]["completion_tokens"] == len(out["tokens"])
    # 16 image tokens per 980 crop in the tiny model, plus the template and the question.
    assert out["usage"]["prompt_tokens"] > 16
    assert out["experts"] == {"hit_rate": 0.0, "fetched": 0, "cpu_computed": 0}  # nothing offloaded on CPU
    assert out["timings"]["ttft_s"] > 0 and out["memory"]["peak_host_bytes"] > 0


def test_several_pictures_keep_their_order_positional_then_flags(checkpoint, pictures, reference):
    out = answer(ask("-m", checkpoint, pictures["blue"], pictures["red"], "Compare them.", "-i", pictures["green"],
                     "-n", N, "--json"))
    check_tokens(out, reference("Compare them.", [pictures["blue"], pictures["red"], pictures["green"]]))
    swapped = answer(ask("-m", checkpoint, pictures["red"], pictures["blue"], "Compare them.", "-i",
                         pictures["green"], "-n", N, "--json"))
    check_tokens(swapped, reference("Compare them.", [pictures["red"], pictures["blue"], pictures["green"]]))


def test_picture_on_stdin_in_a_real_process_with_stats_on_stderr(checkpoint, pictures, reference):
    result = ask_process("-m", checkpoint, "-", "What is in the image?", "-n", N, "--json", "-v", stdin=None,
                         input=pictures["red"].read_bytes())
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(b"\n") == 1  # one JSON object, nothing else
    check_tokens(json.loads(result.stdout), reference("What is in the image?", [pictures["red"]]))
    assert b"time to first token" in result.stderr and b"\x1b[" not in result.stderr


def test_piped_text_goes_before_the_prompt(checkpoint, reference):
    out = answer(ask("-m", checkpoint, "Summarise the notes.", "-n", N, "--json",
                     input="Notes: the sky is blue.\n"))
    check_tokens(out, reference("Notes: the sky is blue.\n\nSummarise the notes."))
    alone = answer(ask("-m", checkpoint, "-n", N, "--json", input="What is the sky?\n"))
    check_tokens(alone, reference("What is the sky?"))


def test_plain_quiet_and_verbose_outputs(checkpoint, pictures):
    args = ("-m", checkpoint, pictures["red"], "What is in the image?", "-n", N)
    text = answer(ask(*args, "--json"))["text"]
    expected = text if text.endswith("\n") else text + "\n"
    plain = ask(*args)
    assert (plain.exit_code, plain.stdout, plain.stderr) == (0, expected, "")
    quiet = ask(*args, "-q")
    assert (quiet.exit_code, quiet.stdout, quiet.stderr) == (0, expected, "")
    verbose = ask(*args, "-v")
    assert verbose.exit_code == 0 and verbose.stdout == expected
    for name in ("load:", "time to first token:", "prompt:", "answer:", "peak memory:", "experts:", "device: cpu"):
        assert name in verbose.stderr
    one_token = ask("-m", checkpoint, "hi", "-n", "1", "-v")
    assert one_token.exit_code == 0 and re.search(r"^answer: 1 token, .* \(length\)$", one_token.stderr, re.MULTILINE)


def one_line_error(result, code: int, line: str) -> None:
    assert result.exit_code == code, result.stderr
    assert result.stdout == ""
    assert result.stderr == line + "\n"


@pytest.mark.parametrize(
    ("args", "code", "line"),
    [
        (["{missing}", "hi"], 1, "error: image {missing} does not exist; check the path"),
        (["{text}", "hi"], 1, "error: {text} is a text file, not an image; give a JPEG, PNG, WebP, GIF or TIFF picture"),
        (["-m", "{red}", "hi"], 1, ("error: {red} is a file, not a model directory; give the directory that holds "
                                    "the model's config.json and weights")),
        # A question with bytes that are not UTF-8, as Python decodes argv (surrogateescape).
        (["What \udcff\udcfe is this?"], 2, ("error: the question is not UTF-8 text (byte 0xff); write it in UTF-8 "
                                             "(check the encoding of your terminal or file)")),
        (["-t", "inf", "hi"], 2, "error: --temperature must be a finite number (got inf)"),
        (["-t", "1", "--seed", "999999999999999999999999", "hi"], 2,
         "error: --seed must be at most 18446744073709551615 (got 999999999999999999999999)"),
        (["-m", "some-org/some-model", "--offline", "hi"], 1,
         ("error: model some-org/some-model is not downloaded; run `aria download some-org/some-model` "
          "(or drop --offline)")),
        (["-t", "-1", "hi"], 2, "error: --temperature must be >= 0 (got -1)"),
        (["--image-size", "300", "hi"], 2, "error: --image-size must be one of 490, 980 (got 300)"),
        (["--max-context", "0", "hi"], 2, "error: --max-context must be >= 1 (got 0)"),
        (["--n-cpu-moe", "3", "hi"], 2, "error: --n-cpu-moe must be 0 to 2 (the model's layers), got 3"),
        (["--expert-slots", "9", "hi"], 2, "error: --expert-slots must be 0 to 8 (experts per layer), got 9"),
        (["--cpu-moe", "--expert-slots", "2", "hi"], 2,
         "error: --cpu-moe computes every expert on the CPU, so there are no GPU slots; drop --expert-slots"),
        ([], 2, 'error: missing PROMPT: ask a question, e.g. aria ask photo.jpg "what is in this picture?"'),
        (["  "], 2, 'error: the question is empty; e.g. aria ask photo.jpg "what is in this picture?"'),
        (["{red}"], 2, ("error: the last argument is the question, but '{red}' is an image; add a question "
                        'after it (e.g. aria ask photo.jpg "what is in this picture?")')),
        (["-", "-", "hi"], 2, "error: standard input can carry only one image; pass the others as files or URLs"),
    ],
)
def test_errors_are_one_line_with_their_exit_code(checkpoint, pictures, args, code, line):
    names = {"missing": pictures["red"].with_name("nope.png"), **pictures}
    args = [a.format(**names) for a in args]
    if "-m" not in args:
        args = ["-m", str(checkpoint), *args]
    one_line_error(ask(*args), code, line.format(**names))


def test_damaged_picture_and_binary_stdin_are_errors(checkpoint, pictures):
    result = ask("-m", checkpoint, pictures["truncated"], "hi")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith(f"error: image {pictures['truncated']} is") and result.stderr.count("\n") == 1
    one_line_error(ask("-m", checkpoint, "hi", input=pictures["red"].read_bytes()), 1,
                   "error: standard input is not UTF-8 text; to pass an image on standard input, "
                   "add `-` as an image argument")


def test_real_process_error_is_one_line_without_traceback(checkpoint, pictures):
    missing = pictures["red"].with_name("nope.png")
    result = ask_process("-m", checkpoint, missing, "hi")
    assert result.returncode == 1 and result.stdout == b""
    assert result.stderr.decode() == f"error: image {missing} does not exist; check the path\n"


def test_non_utf8_bytes_in_real_arguments_are_one_line_usage_errors(checkpoint):
    hint = "write it in UTF-8 (check the encoding of your terminal or file)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for args, line in [([b"What \xff\xfe is this?"], f"error: the question is not UTF-8 text (byte 0xff); {hint}"),
                       ([b"-s", b"\xe9t\xe9", b"hi"], f"error: --system is not UTF-8 text (byte 0xe9); {hint}")]:
        result = subprocess.run([sys.executable, "-m", "aria_cli", "ask", "-m", str(checkpoint), *args], env=env,
                                stdin=subprocess.DEVNULL, capture_output=True, timeout=120, check=False)
        assert (result.returncode, result.stdout, result.stderr.decode()) == (2, b"", line + "\n")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_stdout_closed_or_full_is_one_line(checkpoint):
    """`aria ask ... >&-` and `> /dev/full`: one line saying the answer could not be written."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "aria_cli", "ask", "-m", str(checkpoint), "hello", "-n", "4"]
    closed = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", *command], env=env, stdin=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, timeout=120, check=False)
    assert (closed.returncode, closed.stderr.decode()) == (
        1, "error: cannot write the output: standard output is closed; redirect it to a file or /dev/null\n")
    helped = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, "-m", "aria_cli", "--help"],
                            env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60, check=False)
    assert (helped.returncode, helped.stderr) == (closed.returncode, closed.stderr)  # printed by click, same line
    help_commands = ([sys.executable, "-m", "aria_cli", "--help"], [sys.executable, "-m", "aria_cli", "ask", "-h"],
                     [sys.executable, "-m", "aria_cli", "--show-completion", "bash"])
    for run in [command, command + ["--json"], *help_commands]:
        with open("/dev/full", "w") as full:
            result = subprocess.run(run, env=env, stdin=subprocess.DEVNULL, stdout=full,
                                    stderr=subprocess.PIPE, timeout=120, check=False)
        assert (result.returncode, result.stderr.decode()) == (
            1, "error: cannot write the output: no space left on device; free some space or write it elsewhere\n")


def test_a_kv_cache_too_large_to_allocate_is_one_line(tmp_path):
    # 10**15 positions need petabytes: more than any machine's address space, so allocation fails everywhere.
    folder = write_tiny_checkpoint(tmp_path / "long", seed=21, config=tiny_config(max_position_embeddings=10**16))
    result = ask("-m", folder, "hi", "--max-context", str(10**15))
    assert result.exit_code == 1 and result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert re.fullmatch(r"error: the KV cache for 1000000000000000 tokens of context needs [\d.]+ GB, more than the "
                        r"CPU can allocate; lower --max-context\n", result.stderr), result.stderr


def test_full_context_at_the_models_maximum_does_not_suggest_raising_it(checkpoint):
    from runtime.config import load_config

    limit = load_config(checkpoint).text.max_position_embeddings
    result = ask("-m", checkpoint, "sea " * limit, "--max-context", str(limit))
    assert result.exit_code == 1 and result.stdout == "" and result.stderr.count("\n") == 1
    assert f"but the context holds {limit} (the most this model takes); shorten the prompt, or (in a chat) /clear" \
        in result.stderr


def test_ctrl_c_in_json_mode_reports_interrupted_with_the_tokens_so_far(checkpoint, pictures, reference,
                                                                        monkeypatch):
    from runtime.generate import Session

    step = Session._step
    calls = {"n": 0}

    def interrupted_step(self, token):  # Ctrl-C arrives while the 4th decode step runs
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return step(self, token)

    monkeypatch.setattr(Session, "_step", interrupted_step)
    result = ask("-m", checkpoint, pictures["red"], "What is in the image?", "-n", N, "--json")
    assert result.exit_code == 130
    assert result.stderr == "interrupted\n"
    out = json.loads(result.stdout)
    assert out["finish_reason"] == "interrupted"
    assert 1 <= len(out["tokens"]) < N
    assert out["tokens"] == reference("What is in the image?", [pictures["red"]])[: len(out["tokens"])]


@pytest.fixture(scope="module")
def endless_checkpoint(tmp_path_factory):
    return write_endless_checkpoint(tmp_path_factory.mktemp("endless"))


def test_ctrl_c_in_a_real_process_keeps_the_printed_answer_and_exits_130(endless_checkpoint):
    args = ["-m", endless_checkpoint, "Tell me a long story.", "-n", 300]
    full = answer(ask(*args, "--json"))
    assert full["finish_reason"] == "length", "the model must talk long enough to be interrupted"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "aria_cli", "ask", *map(str, args)], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = os.read(proc.stdout.fileno(), 1)  # the answer has started streaming
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    printed = (first + rest).decode("utf-8", errors="replace")
    assert proc.returncode == 130
    assert err.decode().endswith("interrupted\n") and "Traceback" not in err.decode()
    assert printed.endswith("\n")  # the cut answer is ended cleanly
    printed = printed[:-1]
    assert printed and len(printed) < len(full["text"])
    assert full["text"].startswith(printed)


def test_on_a_terminal_the_answer_is_drawn_by_rich(checkpoint):
    master, slave = pty.openpty()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TERM": "xterm", "COLUMNS": "80"}
    proc = subprocess.Popen([sys.executable, "-m", "aria_cli", "ask", "-m", str(checkpoint), "hello", "-n", "8"],
                            env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)
    output = b""
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        output += data
    assert proc.wait(timeout=60) == 0
    os.close(master)
    assert b"\x1b[?25l" in output  # Rich's live display hides the cursor while it redraws
    assert proc.stderr.read() == b""


def test_asking_for_a_missing_gpu_is_a_clear_error(checkpoint, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    one_line_error(ask("-m", checkpoint, "hi", "--device", "cuda"), 1,
                   "error: --device cuda: no CUDA GPU is available to this torch build; use --device cpu")


def test_help_shows_images_then_prompt():
    result = CliRunner().invoke(app, ["ask", "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0
    assert "aria ask [OPTIONS] [IMAGES]... [PROMPT]" in result.stdout


def test_offloaded_experts_give_the_same_tokens_and_report_their_counters(checkpoint, pictures, reference,
                                                                          monkeypatch):
    """The GPU path, with "device" = CPU: a plan that keeps layer 0's experts on the host and 2 of 8
    experts of layer 1 in slots is followed (Assistant.open -> apply_offload) and its counters reach
    --json and -v. Only the GPU-only choice of plan is replaced; loading and offloading are real."""
    from aria_cli import assistant_loader
    from runtime.config import load_config
    from runtime.placement import plan_placement

    plan = plan_placement(load_config(checkpoint), 2**30, context=1024, dtype=torch.float32, n_cpu_moe=1,
                          expert_slots=2)
    assert plan.offloaded
    monkeypatch.setattr(assistant_loader, "plan_for", lambda *args: plan)
    out = answer(ask("-m", checkpoint, pictures["red"], "What is in the image?", "-n", N, "--json"))
    check_tokens(out, reference("What is in the image?", [pictures["red"]]))
    experts = out["experts"]
    assert 0.0 <= experts["hit_rate"] <= 1.0
    assert experts["cpu_computed"] > 0  # layer 0 computes every routed expert on the host
    verbose = ask("-m", checkpoint, "hello", "-n", 4, "-v")
    assert verbose.exit_code == 0 and "decode expert hit rate" in verbose.stderr


def test_picture_by_url_and_a_system_prompt(checkpoint, pictures, reference):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    body = pictures["blue"].read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/blue.png"
        out = answer(ask("-m", checkpoint, url, "What is in the image?", "-n", N, "--json"))
        offline = ask("-m", checkpoint, url, "What is in the image?", "--offline")
    finally:
        server.shutdown()
        server.server_close()
    check_tokens(out, reference("What is in the image?", [pictures["blue"]]))
    one_line_error(offline, 1, f"error: cannot fetch {url}: offline mode allows no downloads; "
                               "save the image and pass its path")

    system = answer(ask("-m", checkpoint, "Hello!", "-s", "Answer in French.", "-n", N, "--json"))
    chat = Conversation()
    chat.set_system("Answer in French.")
    chat.add("user", "Hello!")
    check_tokens(system, reference_tokens(checkpoint, chat, N))


def test_max_context_reaches_the_kv_cache(checkpoint):
    result = ask("-m", checkpoint, "Tell me about the sea and the sky.", "--max-context", "8")
    assert result.exit_code == 1 and result.stdout == "" and result.stderr.count("\n") == 1
    assert "but the context holds 8" in result.stderr


def test_dash_with_nothing_piped_in_does_not_wait_for_the_keyboard(checkpoint):
    master, slave = pty.openpty()
    try:
        result = ask_process("-m", checkpoint, "-", "What is this?", stdin=slave)
    finally:
        os.close(slave)
        os.close(master)
    assert result.returncode == 2 and result.stdout == b""
    assert result.stderr.decode() == ('error: `-` reads a picture from standard input, but nothing is piped in; '
                                      'e.g. cat photo.jpg | aria ask - "what is this?"\n')
