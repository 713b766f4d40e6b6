"""`aria quantize`: the output loads with `aria ask --model DIR` (same tokens as the in-process
quantized model), --force, where the output goes, the per-family bytes report (checked against
the tensors in the files), progress on stderr only, one-line errors."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from typer.testing import CliRunner
from user_env import isolate_user_env

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
