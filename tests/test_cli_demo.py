"""`aria demo`: the bundled model answers a question about the bundled picture, offline, on the CPU.

A tiny random checkpoint with an example picture stands in for the bundled demo directory
(`aria_cli.models.DEMO_MODEL_DIR`), so these tests check the command itself: the answer equals
the transformers reference's greedy answer to the demo question about that picture, the user's
own settings do not leak in, and it runs with HF_HUB_OFFLINE=1 in a real process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from PIL import Image
from typer.testing import CliRunner
from user_env import isolate_user_env

from aria_cli import models
from aria_cli.demo_command import DEMO_MAX_TOKENS, DEMO_QUESTION
from aria_cli.main import app
from runtime.assistant import Conversation
from runtime.tiny_checkpoint import write_tiny_checkpoint
from tests.test_assistant import reference_tokens


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("demo") / "demo_model", seed=8)
    picture = Image.new("RGB", (320, 240), "white")
    picture.paste(Image.new("RGB", (120, 80), "red"), (100, 80))
    (path / "examples").mkdir()
    picture.save(path / "examples" / "shapes.png")
    return path


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch, demo_dir):
    isolate_user_env(monkeypatch, tmp_path)
    monkeypatch.setattr(models, "DEMO_MODEL_DIR", demo_dir)


def test_demo_answers_like_the_reference_and_ignores_user_settings(demo_dir, monkeypatch):
    monkeypatch.setenv("ARIA_MAX_TOKENS", "1")  # the user's defaults are for their own questions
    monkeypatch.setenv("ARIA_TEMPERATURE", "1.5")
    result = CliRunner().invoke(app, ["demo", "--json"])
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["question"] == DEMO_QUESTION and out["image"] == str(demo_dir / "examples" / "shapes.png")
    chat = Conversation()
    chat.add("user", DEMO_QUESTION, [Image.open(demo_dir / "examples" / "shapes.png")])
    expected = reference_tokens(demo_dir, chat, DEMO_MAX_TOKENS)
    assert len(out["tokens"]) >= 4
    assert out["tokens"] == expected[: len(out["tokens"])]


def test_demo_prints_the_picture_question_and_answer(demo_dir):
    text = json.loads(CliRunner().invoke(app, ["demo", "--json"]).stdout)["text"]
    result = CliRunner().invoke(app, ["demo"])
    assert result.exit_code == 0 and result.stderr == ""
    assert result.stdout == f"picture: shapes.png\nquestion: {DEMO_QUESTION}\nanswer:\n{text.rstrip(chr(10))}\n"
    quiet = CliRunner().invoke(app, ["demo", "-q"])
    assert quiet.stdout == text.rstrip("\n") + "\n"


def test_demo_question_can_ship_beside_the_picture(demo_dir):
    (demo_dir / "examples" / "shapes.txt").write_text("What shape is this?\n")
    try:
        out = json.loads(CliRunner().invoke(app, ["demo", "--json"]).stdout)
    finally:
        (demo_dir / "examples" / "shapes.txt").unlink()
    assert out["question"] == "What shape is this?"


def test_demo_runs_offline_in_a_real_process(demo_dir, tmp_path):
    script = textwrap.dedent(f"""
        from pathlib import Path
        from aria_cli import models
        from aria_cli.main import app
        models.DEMO_MODEL_DIR = Path({str(demo_dir)!r})
        app(["demo"], prog_name="aria")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "XDG_CONFIG_HOME": str(tmp_path / "cfg"), "XDG_DATA_HOME": str(tmp_path / "data")}
    result = subprocess.run([sys.executable, "-c", script], env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[:3] == ["picture: shapes.png", f"question: {DEMO_QUESTION}", "answer:"]
    assert "".join(lines[3:]).strip()


def test_missing_demo_model_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "DEMO_MODEL_DIR", tmp_path / "not-installed")
    result = CliRunner().invoke(app, ["demo"])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == (f"error: the demo model is not installed with this copy of aria "
                             f"(expected {tmp_path / 'not-installed'})\n")
