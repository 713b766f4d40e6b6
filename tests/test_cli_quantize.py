"""`aria quantize`: the output loads with `aria ask --model DIR` (same tokens as the in-process
quantized model), --force, where the output goes, the per-family bytes report (checked against
the tensors in the files), progress on stderr only, one-line errors."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import SafetensorError, safe_open
from typer.testing import CliRunner
from user_env import isolate_user_env

import runtime.convert
import runtime.safetensors_io
from aria_cli.main import app
from runtime.assistant import Assistant, Conversation, GenerationOptions
from runtime.tiny_checkpoint import tiny_config, write_tiny_checkpoint

# Widths every scheme accepts (int4 needs in_features divisible by its group of 128).
CONFIG = tiny_config(hidden_size=128, moe_intermediate_size=128)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("src") / "tiny", seed=3, config=CONFIG)


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch):
    isolate_user_env(monkeypatch, tmp_path)
    return tmp_path


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def tensor_bytes(folder: Path, pick) -> int:
    """Bytes of the tensors whose names `pick` accepts, read from the safetensors files themselves."""
    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if pick(name):
                    t = f.get_tensor(name)
                    total += t.numel() * t.element_size()
    return total


def is_routed_expert(name: str) -> bool:
    return ".mlp.experts." in name


def test_quantized_output_loads_with_ask_and_answers_like_the_in_process_model(source, tmp_path):
    out = tmp_path / "q8"
    result = run("quantize", source, "-o", out, "--scheme", "int8", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["output"] == str(out) and report["scheme"] == "int8"
    assert json.loads((out / "config.json").read_text())["quantization"]["scheme"] == "int8"
    assert (out / "tokenizer.model").read_bytes() == (source / "tokenizer.model").read_bytes()

    ask = run("ask", "-m", out, "Describe a cat.", "-n", 10, "--json")
    assert ask.exit_code == 0, ask.stderr
    chat = Conversation()
    chat.add("user", "Describe a cat.")
    expected = Assistant.open(source, quant="int8").reply(chat, GenerationOptions(max_tokens=10))
    expected.read()
    assert len(expected.tokens) >= 5
    assert json.loads(ask.stdout)["tokens"] == expected.tokens


def test_quant_lm_head_flag_quantizes_it_in_the_file_and_while_loading(source, tmp_path):
    out = tmp_path / "q8-head"
    result = run("quantize", source, "-o", out, "--scheme", "int8", "--quant-lm-head", "--json")
    assert result.exit_code == 0, result.stderr
    families = {row["family"]: row["status"] for row in json.loads(result.stdout)["families"]}
    assert families["lm_head"] == "quantized" and families["embeddings"] == "kept"

    stored = run("ask", "-m", out, "Describe a cat.", "-n", 10, "--json")
    on_the_fly = run("ask", "-m", source, "--quant", "int8", "--quant-lm-head", "Describe a cat.", "-n", 10, "--json")
    assert stored.exit_code == 0 and on_the_fly.exit_code == 0, stored.stderr + on_the_fly.stderr
    chat = Conversation()
    chat.add("user", "Describe a cat.")
    expected = Assistant.open(source, quant="int8", quant_lm_head=True).reply(chat, GenerationOptions(max_tokens=10))
    expected.read()
    assert json.loads(stored.stdout)["tokens"] == json.loads(on_the_fly.stdout)["tokens"] == expected.tokens

    kept = tmp_path / "q8"
    assert run("quantize", source, "-o", kept, "--scheme", "int8").exit_code == 0
    refused = run("ask", "-m", kept, "--quant-lm-head", "Describe a cat.")
    assert refused.exit_code == 2 and refused.stdout == ""
    assert refused.stderr.startswith("error: this model was quantized with its lm_head kept; drop --quant-lm-head")
    assert len(refused.stderr.splitlines()) == 1


def test_report_rows_match_the_bytes_in_the_files(source, tmp_path):
    out = tmp_path / "q4"
    report = json.loads(run("quantize", source, "-o", out, "--scheme", "int4", "--json").stdout)
    families = {row["family"]: row for row in report["families"]}
    experts = families["routed experts"]
    assert experts["status"] == "quantized"
    assert experts["bytes_before"] == tensor_bytes(source, is_routed_expert)
    assert experts["bytes_after"] == tensor_bytes(out, is_routed_expert)
    assert experts["bytes_after"] < experts["bytes_before"] / 3  # 4 bits plus scales, from 32-bit floats
    assert families["vision tower"]["status"] == "kept"
    # The hub layout's zero vision post_layernorm is never used (ARIA_SPEC §3.3): not a model weight.
    weights = lambda n: "post_layernorm" not in n
    assert report["bytes_before"] == tensor_bytes(source, weights)
    assert report["bytes_after"] == tensor_bytes(out, weights)

    table = run("quantize", source, "-o", tmp_path / "q4-table", "--scheme", "int4")
    lines = [line.split("\t") for line in table.stdout.splitlines()]
    assert lines[0] == ["FAMILY", "BEFORE", "AFTER", "STATUS"]
    assert [(r[0], r[3]) for r in lines[1:-1]] == [(f["family"], f["status"]) for f in report["families"]]
    assert lines[-1][0] == "total" and lines[-1][3].endswith("x smaller")
    assert "MB/s" in table.stderr and str(tmp_path / "q4-table") in table.stderr


def test_output_has_the_permissions_of_a_plain_directory_and_files(source, tmp_path):
    # The reference: what mkdir() and open() give under this process's umask. (safetensors and
    # tempfile.mkdtemp would otherwise leave the model readable by its owner only.)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "file").write_text("x")
    dir_mode, file_mode = ((tmp_path / p).stat().st_mode & 0o777 for p in ("plain", "plain/file"))
    out = tmp_path / "q"
    assert run("quantize", source, "-o", out, "--scheme", "int8").exit_code == 0
    assert out.stat().st_mode & 0o777 == dir_mode
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == dict.fromkeys(
        (p.name for p in out.iterdir()), file_mode)
    assert any(p.suffix == ".safetensors" for p in out.iterdir())


def test_existing_output_needs_force(source, tmp_path):
    out = tmp_path / "q"
    assert run("quantize", source, "-o", out, "--scheme", "int8").exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = run("quantize", source, "-o", out, "--scheme", "int4")
    assert again.exit_code == 2 and again.stdout == ""
    assert again.stderr == f"error: {out} already exists; choose another -o or pass --force to replace it\n"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    forced = run("quantize", source, "-o", out, "--scheme", "int4", "--force")
    assert forced.exit_code == 0, forced.stderr
    assert json.loads((out / "config.json").read_text())["quantization"]["scheme"] == "int4"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".q.")]  # no temporary left behind


def test_bare_name_and_default_go_to_the_models_folder_and_work_as_model_names(source, env):
    models = env / "data" / "aria" / "models"
    named = run("quantize", source, "-o", "my-int8", "--scheme", "int8", "-q")
    assert named.exit_code == 0 and named.stderr == ""
    assert (models / "my-int8" / "config.json").is_file()
    default = run("quantize", source, "--scheme", "int8", "-q")
    assert default.exit_code == 0
    assert (models / "tiny-int8" / "config.json").is_file()
    listed = run("models", "--json")
    assert {"my-int8", "tiny-int8"} <= {m["name"] for m in json.loads(listed.stdout)["models"]}
    asked = run("ask", "-m", "my-int8", "hello", "-n", 3, "--json")
    assert asked.exit_code == 0 and len(json.loads(asked.stdout)["tokens"]) >= 1


@pytest.mark.parametrize(
    ("args", "code", "line"),
    [
        (["--scheme", "int3"], 2, "error: --scheme must be one of int4, int8, nf4 (got int3)"),
        (["-o", ""], 2, "error: -o must name a directory; e.g. -o ./aria-int4"),
    ],
)
def test_bad_flags_are_one_line_usage_errors(source, args, code, line):
    result = run("quantize", source, *args)
    assert (result.exit_code, result.stdout, result.stderr) == (code, "", line + "\n")


def test_unknown_source_offline_and_unsupported_shape(tmp_path):
    missing = run("quantize", "some-org/some-model", "--offline", "-o", tmp_path / "x")
    assert missing.exit_code == 1 and missing.stdout == ""
    assert missing.stderr == ("error: model some-org/some-model is not downloaded; run `aria download "
                              "some-org/some-model` (or drop --offline)\n")
    narrow = write_tiny_checkpoint(tmp_path / "narrow", seed=1)  # 64 wide: int4 groups of 128 do not fit
    result = run("quantize", narrow, "-o", tmp_path / "n4", "--scheme", "int4")
    assert result.exit_code == 2 and result.stdout == "" and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: language_model.") and "choose another --scheme" in result.stderr
    assert not (tmp_path / "n4").exists()


def test_progress_bar_is_drawn_on_stderr_only(source, tmp_path):
    """A real process with stderr on a terminal and stdout in a pipe: the bar goes to the terminal."""
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "120"}
    proc = subprocess.Popen([sys.executable, "-m", "aria_cli", "quantize", str(source), "-o", str(tmp_path / "p"),
                             "--scheme", "int8"], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=slave)
    os.close(slave)
    terminal = b""
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # the process closed the terminal
            break
        if not data:
            break
        terminal += data
    stdout = proc.stdout.read()
    assert proc.wait(timeout=60) == 0
    os.close(master)
    assert re.search(rb"quantizing.*\d+/\d+ tensors", terminal)  # the bar, with its tensor count
    assert b"\x1b[?25l" in terminal  # Rich's live display hides the cursor while it draws
    assert stdout.startswith(b"FAMILY\tBEFORE\tAFTER\tSTATUS\n") and b"\x1b[" not in stdout


# --- where the output may go: refused before any work, one line, nothing touched ------------


@pytest.fixture
def work(tmp_path):
    """An empty folder of its own (the user's config and data directories live in tmp_path)."""
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


def entries(folder: Path) -> dict[str, bytes | None]:
    """Everything under `folder` (hidden files too): file contents, None for a directory."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in folder.rglob("*")}


def test_force_replaces_only_a_directory_that_holds_a_model_or_nothing(source, work):
    (work / "afile").write_text("hi")
    (work / "photos").mkdir()
    (work / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 a cat")
    before = entries(work)
    not_a_directory = "exists and is not a directory; choose another -o (--force only replaces a directory)"
    not_a_model = "exists and is not an Aria model directory; choose another -o (--force only replaces a model directory)"
    for name, line in [("afile", not_a_directory), ("photos", not_a_model)]:
        for force in ([], ["--force"]):
            result = run("quantize", source, "-o", work / name, "--scheme", "int8", *force)
            assert (result.exit_code, result.stdout) == (2, ""), result.stderr
            assert result.stderr == f"error: {work / name} {line}\n"
    assert entries(work) == before  # no .afile.old-N, no partial directory
    (work / "empty").mkdir()
    assert run("quantize", source, "-o", work / "empty", "--scheme", "int8", "--force").exit_code == 0
    assert (work / "empty" / "config.json").is_file()


def test_output_that_cannot_be_replaced_is_refused_before_any_work(source, work, monkeypatch):
    model = work / "model"
    assert run("quantize", source, "-o", model, "--scheme", "int8").exit_code == 0
    (model / "tiny").mkdir()  # a source inside the output: replacing the output would delete it
    for f in source.iterdir():
        (model / "tiny" / f.name).write_bytes(f.read_bytes())
    before = entries(work)

    inside = run("quantize", model / "tiny", "-o", model, "--scheme", "int4", "--force")
    assert (inside.exit_code, inside.stderr) == (
        2, "error: the output directory must differ from the source and not contain it; choose another -o\n")

    monkeypatch.chdir(model)
    here = run("quantize", source, "-o", ".", "--scheme", "int4", "--force")
    assert (here.exit_code, here.stderr) == (
        2, f"error: {model} is the current directory or contains it and cannot be replaced; choose another -o\n")
    monkeypatch.chdir(work)

    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == model or real_ismount(p))
    mounted = run("quantize", source, "-o", model, "--scheme", "int4", "--force")
    assert mounted.exit_code == 2 and mounted.stderr == (
        f"error: {model} is a mount point and cannot be replaced; choose a new directory inside it (e.g. -o {model}/NAME)\n")
    assert entries(work) == before


def test_unwritable_output_locations_are_one_line_errors(source, work, monkeypatch):
    (work / "afile").write_text("hi")
    (work / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != work / "ro" and real_access(p, mode, **kw))
    real_statvfs = os.statvfs

    def statvfs(path):  # `ro` as on a file system mounted read-only
        if Path(path) != work / "ro":
            return real_statvfs(path)
        return type("StatVFS", (), {"f_flag": os.ST_RDONLY})()

    monkeypatch.setattr(os, "statvfs", statvfs)
    before = entries(work)
    for out, line in [
        (work / "afile" / "sub", f"{work / 'afile'} is not a directory"),
        (work / "ro" / "q", f"{work / 'ro'} is on a read-only file system"),
        (work / "ro" / "new" / "q", f"{work / 'ro'} is on a read-only file system"),
    ]:
        result = run("quantize", source, "-o", out, "--scheme", "int8")
        assert (result.exit_code, result.stdout) == (1, "")
        assert result.stderr == f"error: cannot write {out}: {line}; choose another -o\n"
    # A bare name goes to the models folder under XDG_DATA_HOME, here a file.
    monkeypatch.setenv("XDG_DATA_HOME", str(work / "afile"))
    bare = run("quantize", source, "-o", "mine", "--scheme", "int8")
    assert bare.exit_code == 1 and bare.stderr == (
        f"error: cannot write {work / 'afile/aria/models/mine'}: {work / 'afile'} is not a directory; choose another -o\n")
    assert entries(work) == before


@pytest.mark.parametrize(("failure", "reason"), [
    # What safetensors' (Rust) writer raises when the disk fills up during a shard.
    ("safetensors", "no space left on device; free some space or choose another -o"),
    # The file system went read-only after the checks (e.g. remounted after an I/O error).
    ("mkdtemp", "read-only file system; choose another -o"),
])
def test_failures_while_writing_are_one_line_errors_and_leave_nothing(source, work, monkeypatch, failure, reason):
    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    if failure == "safetensors":
        monkeypatch.setattr(runtime.safetensors_io, "save_file", full_disk)
    else:
        monkeypatch.setattr(runtime.convert.tempfile, "mkdtemp", read_only)
    out = work / "q"
    result = run("quantize", source, "-o", out, "--scheme", "int8")
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr.splitlines()[-1] == f"error: cannot write {out}: {reason}"
    assert list(work.iterdir()) == []


def test_a_source_file_that_cannot_be_read_is_named_not_the_output(source, work, monkeypatch):
    def unreadable(src, dst, *args, **kwargs):  # root reads any file: the refusal is simulated
        raise PermissionError(13, "Permission denied", str(src))

    monkeypatch.setattr(runtime.convert.shutil, "copy2", unreadable)
    result = run("quantize", source, "-o", work / "q", "--scheme", "int8")
    assert (result.exit_code, result.stdout) == (1, "")
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"error: cannot read {Path(source).resolve()}/") and last.endswith(
        ": permission denied; check the source model's files"), last
    assert list(work.iterdir()) == []


def test_free_space_message_states_the_whole_requirement(source, work, monkeypatch):
    # More than the model itself needs, less than the model plus the headroom kept free.
    monkeypatch.setattr(runtime.convert.shutil, "disk_usage", lambda p: type("Usage", (), {"free": 50_000_000})())
    result = run("quantize", source, "-o", work / "q", "--scheme", "int8")
    assert (result.exit_code, result.stdout) == (1, "")
    assert re.fullmatch(
        rf"error: {re.escape(str(work))} has 50\.0 MB free but the int8 model needs \d+\.\d MB plus 0\.3 GB "
        r"of headroom; free some space or choose another -o\n", result.stderr)
    assert not (work / "q").exists()


# --- stopped by a signal: the partial directory goes, the exit code says which signal ----------

# The real CLI in a real process, its writer stalled after a few tensors so that the signal
# lands while the temporary directory is half written.
STALLED_QUANTIZE = """
import sys, time
import runtime.convert

real = runtime.convert.write_checkpoint

def stalled_writer(folder, tensors, *args, **kwargs):
    def stalled():
        for i, item in enumerate(tensors):
            yield item
            if i == 3:
                print("stalled", file=sys.stderr, flush=True)
                time.sleep(60)
    return real(folder, stalled(), *args, **kwargs)

runtime.convert.write_checkpoint = stalled_writer
from aria_cli.main import app
app(prog_name="aria")
"""


@pytest.mark.parametrize(("signum", "code", "last_line"), [
    (signal.SIGTERM, 143, "terminated (SIGTERM)"),  # timeout, docker stop, systemd
    (signal.SIGHUP, 129, "terminated (SIGHUP)"),  # the terminal was closed
    (signal.SIGINT, 130, "interrupted"),  # Ctrl-C
])
def test_signal_during_quantize_removes_the_partial_directory(source, work, signum, code, last_line):
    out = work / "q"
    proc = subprocess.Popen([sys.executable, "-c", STALLED_QUANTIZE, "quantize", str(source), "-o", str(out),
                             "--scheme", "int8"], env=dict(os.environ), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while (line := proc.stderr.readline()) and line != "stalled\n":
        pass
    assert [p.name for p in work.glob(".q.partial-*")], "the writer should be half way"
    proc.send_signal(signum)
    out_text, err = proc.communicate(timeout=30)
    assert proc.returncode == code
    assert err.splitlines()[-1] == last_line and "Traceback" not in err and out_text == ""
    assert not out.exists() and not list(work.glob(".q.*"))
