"""Exit codes and one-line errors: 0 ok, 1 error, 2 usage, 130 interrupted; traceback only with --debug.

In-process through Typer's CliRunner (a probe app whose commands fail on purpose, built with the
same AriaGroup and option declarations as the real app), and in real processes through
`python -m aria_cli` and a script, where stdout and stderr are the real file descriptors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner
from user_env import isolate_user_env

from aria_cli.errors import AriaGroup
from aria_cli.main import app
from aria_cli.options import OutputOptions, with_options
from aria_cli.settings import config_file
from runtime.errors import CheckpointError, ImageError, UsageError

probe = typer.Typer(cls=AriaGroup)


@probe.command()
@with_options(OutputOptions)
def fail(kind: str, *, opts: OutputOptions) -> None:
    """Fail in the way `kind` names."""
    if kind == "image":
        raise ImageError("cannot read photo.jpg: not an image; pass a JPEG, PNG or WebP file")
    if kind == "checkpoint":
        raise CheckpointError("model-00003-of-00012.safetensors is truncated; run `aria download aria` again")
    if kind == "usage":
        raise UsageError("--n-cpu-moe 40 is more than the 28 layers; use 0..28")
    if kind == "interrupt":
        raise KeyboardInterrupt
    if kind == "bug":
        raise ZeroDivisionError("division by zero")
    if kind == "lines":  # a server's or library's text with line breaks, or a path with one
        raise ImageError("cannot fetch http://x/loop: HTTP 302 The HTTP server returned a redirect error.\r\n"
                         "The last 30x error message was:\nFound; check the URL")
    typer.echo("fine")


@probe.command()
def other() -> None:
    """Keeps `fail` a subcommand, as in the real app."""


def invoke(*args: str, target=probe):
    return CliRunner().invoke(target, list(args))


@pytest.fixture(autouse=True)
def clean_env(tmp_path, monkeypatch):
    isolate_user_env(monkeypatch, tmp_path)


@pytest.mark.parametrize(
    ("kind", "code", "line"),
    [
        ("image", 1, "error: cannot read photo.jpg: not an image; pass a JPEG, PNG or WebP file"),
        ("checkpoint", 1, "error: model-00003-of-00012.safetensors is truncated; run `aria download aria` again"),
        ("usage", 2, "error: --n-cpu-moe 40 is more than the 28 layers; use 0..28"),
        ("interrupt", 130, "interrupted"),
        ("lines", 1, ("error: cannot fetch http://x/loop: HTTP 302 The HTTP server returned a redirect error. "
                      "The last 30x error message was: Found; check the URL")),
        ("bug", 1, ("error: unexpected ZeroDivisionError: division by zero (this is a bug in aria; "
                   "rerun with --debug for the traceback)")),
    ],
)
def test_failures_map_to_exit_codes_with_one_line(kind, code, line):
    result = invoke("fail", kind)
    assert result.exit_code == code
    assert result.stderr == line + "\n"
    assert result.stdout == ""


def test_success_is_zero():
    result = invoke("fail", "none")
    assert result.exit_code == 0 and result.stdout == "fine\n" and result.stderr == ""


@pytest.mark.parametrize("kind", ["image", "bug"])
def test_debug_adds_the_traceback(kind, monkeypatch):
    result = invoke("fail", kind, "--debug")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: ")
    assert "Traceback (most recent call last):" in result.stderr
    assert "in fail" in result.stderr  # the frame that raised
    monkeypatch.setenv("ARIA_DEBUG", "1")  # the environment turns it on too
    assert "Traceback" in invoke("fail", kind).stderr


def test_click_usage_errors_are_one_line_with_exit_2():
    for args, expected in [
        (["fail"], "error: Missing argument 'kind'. (see 'root fail --help')"),
        (["fail", "x", "--qiet"], "error: No such option: --qiet (Possible options: --quiet) (see 'root fail --help')"),
        (["nope"], "error: No such command 'nope'. (see 'root --help')"),
    ]:
        result = invoke(*args)
        assert result.exit_code == 2, args
        assert result.stderr == expected + "\n"
        assert result.stdout == ""


def test_real_app_help_and_version():
    result = invoke("--help", target=app)
    assert result.exit_code == 0
    for command in ("download", "models", "rm", "version", "--install-completion"):
        assert command in result.stdout
    result = invoke("version", target=app)
    assert result.exit_code == 0 and result.stdout.strip() == metadata.version("aria-cli")


def test_chat_help_does_not_offer_json_which_chat_refuses(monkeypatch):
    assert "--json" in invoke("ask", "--help", target=app).stdout
    assert "--json" not in invoke("chat", "--help", target=app).stdout
    refused = invoke("chat", "--json", target=app)
    assert refused.exit_code == 2 and "--json is for `aria ask`" in refused.stderr
    # Set for `aria ask` in the environment or the config file, it leaves chat alone.
    monkeypatch.setenv("ARIA_JSON", "1")
    config = config_file()
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("json = true\n")
    assert invoke("ask", "-m", "demo", "hi", "-n", "1", target=app).stdout.startswith("{")
    chatted = CliRunner().invoke(app, ["chat", "-m", "demo"], input="")
    assert chatted.exit_code == 0 and "Chatting with demo" in chatted.stderr, chatted.stderr


def test_bad_setting_in_env_is_a_usage_error_for_real_commands(monkeypatch):
    monkeypatch.setenv("ARIA_QUIET", "maybe")
    result = invoke("models", target=app)
    assert result.exit_code == 2
    assert result.stderr == "error: ARIA_QUIET must be true or false (got maybe)\n"


def test_rm_of_a_missing_model(tmp_path):
    result = invoke("rm", "tiny-org/absent", "--yes", target=app)
    assert result.exit_code == 1
    assert result.stderr == "error: model tiny-org/absent is not downloaded; nothing to remove (see `aria models`)\n"
    result = invoke("rm", str(tmp_path), "--yes", target=app)  # a user's own directory is never deleted
    assert result.exit_code == 2 and "aria rm only removes downloaded models" in result.stderr
    assert tmp_path.is_dir()


def aria_process(*args: str, env: dict[str, str] | None = None, script: Path | None = None):
    command = [sys.executable, str(script)] if script else [sys.executable, "-m", "aria_cli"]
    return subprocess.run([*command, *args], env=env or dict(os.environ), capture_output=True, text=True,
                          timeout=60, check=False)


def test_real_process_exit_codes_and_clean_stdout():
    proc = aria_process("download", "aria", "--offline")
    assert proc.returncode == 1
    assert proc.stderr == "error: model aria is not downloaded; run `aria download aria` (or drop --offline)\n"
    assert proc.stdout == ""
    proc = aria_process("download", "aria", "--offline", "--debug")
    assert proc.returncode == 1 and "Traceback (most recent call last):" in proc.stderr and proc.stdout == ""
    proc = aria_process("rm")
    assert proc.returncode == 2 and proc.stderr == "error: Missing argument 'MODEL'. (see 'aria rm --help')\n"
    proc = aria_process("models", "--json")
    # Nothing downloaded: only the demo model that ships with the package.
    assert proc.returncode == 0 and proc.stderr == ""
    assert [m["name"] for m in json.loads(proc.stdout)["models"]] == ["demo"]


def test_console_script_is_the_same_app():
    script = Path(sys.executable).parent / "aria"  # installed by `pip install -e .` next to python
    proc = subprocess.run([str(script), "download", "aria", "--offline"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 1
    assert proc.stderr == "error: model aria is not downloaded; run `aria download aria` (or drop --offline)\n"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and "download" in proc.stdout and proc.stderr == ""


def test_real_process_interrupt_is_130(tmp_path):
    # A command interrupted by Ctrl-C (KeyboardInterrupt) in a real process, through AriaGroup.
    script = tmp_path / "interrupted.py"
    script.write_text(textwrap.dedent("""
        import typer
        from aria_cli.errors import AriaGroup

        app = typer.Typer(cls=AriaGroup)

        @app.command()
        def wait() -> None:
            raise KeyboardInterrupt

        @app.command()
        def other() -> None:
            pass

        app()
    """))
    proc = aria_process("wait", script=script)
    assert proc.returncode == 130
    assert proc.stderr == "interrupted\n" and proc.stdout == ""


def test_the_stdout_guard_leaves_errors_naming_a_file_alone():
    """A failed write to stdout names no file; one that does (a shell's rc file that
    --install-completion writes) is not reported as "cannot write the output"."""
    import errno

    from aria_cli import console
    from runtime.errors import AriaError

    with pytest.raises(AriaError, match="cannot write the output: no space left on device"), console.writing_stdout():
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(PermissionError) as caught, console.writing_stdout():
        raise PermissionError(errno.EACCES, "Permission denied", "/home/me/.bashrc")
    assert caught.value.filename == "/home/me/.bashrc"
