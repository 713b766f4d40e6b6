"""Settings: flag > ARIA_* environment > config file > default, one parser and one-line errors for all.

Checked through a real Typer command built with the shared option declarations
(`@with_options(RunOptions)`, what `ask` and `chat` use), and through resolve_setting directly.
Expected values are written by hand from the flag/env/file given, never computed by aria.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner
from user_env import isolate_user_env

from aria_cli import console
from aria_cli.errors import AriaGroup
from aria_cli.options import RunOptions, with_options
from aria_cli.settings import (
    config_file,
    data_dir,
    format_size,
    load_settings_file,
    parse_size,
    resolve_setting,
)
from runtime.errors import UsageError

probe = typer.Typer(cls=AriaGroup)


@probe.command()
@with_options(RunOptions)
def show(prompt: Annotated[str, typer.Argument()] = "hi", *, opts: RunOptions) -> None:
    """Print the resolved options as JSON (a stand-in for ask/chat)."""
    console.emit_json({"prompt": prompt, **dataclasses.asdict(opts)})


@probe.command()
def other() -> None:
    """A second command, so that `show` is a subcommand as in the real app."""


@pytest.fixture
def env(tmp_path, monkeypatch):
    isolate_user_env(monkeypatch, tmp_path)
    return monkeypatch


def write_config(text: str) -> None:
    path = config_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def show_opts(*args: str) -> dict:
    result = CliRunner().invoke(probe, ["show", *args])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def show_error(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(probe, ["show", *args])
    assert result.stdout == ""
    return result.exit_code, result.stderr


def test_defaults(env):
    opts = show_opts()
    assert opts["model"] == "aria" and opts["temperature"] == 0.0 and opts["max_tokens"] == 1024
    assert opts["stop"] == [] and opts["seed"] is None and opts["gpu_memory"] is None
    assert opts["device"] == "auto" and opts["dtype"] == "auto" and opts["quant"] == "none"
    assert opts["offline"] is False and opts["json"] is False


def test_flag_beats_env_beats_file(env):
    write_config('temperature = 0.3\nmax_tokens = 77\nmodel = "aria-int4"\nstop = ["</s>", "END"]\ncpu_moe = true\n')
    env.setenv("ARIA_TEMPERATURE", "0.5")
    env.setenv("ARIA_STOP", '["###"]')
    opts = show_opts()
    assert opts["temperature"] == 0.5  # env over file
    assert opts["max_tokens"] == 77 and opts["model"] == "aria-int4"  # file over default
    assert opts["stop"] == ["###"] and opts["cpu_moe"] is True
    opts = show_opts("-t", "0.9", "--stop", "a", "--stop", "b", "--no-cpu-moe", "-n", "5", "-m", "rhymes-ai/Aria")
    assert opts["temperature"] == 0.9 and opts["stop"] == ["a", "b"] and opts["cpu_moe"] is False
    assert opts["max_tokens"] == 5 and opts["model"] == "rhymes-ai/Aria"


def test_all_run_flags_parse(env):
    opts = show_opts(
        "question", "--top-p", "0.8", "--top-k", "40", "--seed", "7", "-s", "be brief", "--device", "cuda:1",
        "--dtype", "float16", "--quant", "nf4", "--gpu-memory", "20GB", "--n-cpu-moe", "3", "--split-image",
        "--offline", "-v", "--json",
    )
    expected = {
        "prompt": "question", "top_p": 0.8, "top_k": 40, "seed": 7, "system": "be brief", "device": "cuda:1",
        "dtype": "float16", "quant": "nf4", "gpu_memory": 20 * 10**9, "n_cpu_moe": 3, "split_image": True,
        "offline": True, "verbose": True, "json": True,
    }
    assert {key: opts[key] for key in expected} == expected


def test_hf_hub_offline_counts_as_offline_and_aria_offline_wins(env):
    env.setenv("HF_HUB_OFFLINE", "1")
    assert show_opts()["offline"] is True
    env.setenv("ARIA_OFFLINE", "0")
    assert show_opts()["offline"] is False
    assert show_opts("--offline")["offline"] is True
    env.setenv("ARIA_OFFLINE", "1")
    assert show_opts("--online")["offline"] is False


@pytest.mark.parametrize(("hf_hub_offline", "transformers_offline", "offline"), [
    ("1", None, True), ("yes", None, True), ("On", None, True), ("0", None, False), ("2", None, False),
    ("", "1", True), (None, "TRUE", True), ("0", "1", False), (None, "no", False), (None, None, False),
])
def test_the_hubs_offline_variables_read_as_huggingface_hub_reads_them(env, hf_hub_offline, transformers_offline,
                                                                       offline):
    """Offline exactly when huggingface_hub itself is (constants.HF_HUB_OFFLINE), never an error."""
    import subprocess
    import sys

    for var, value in (("HF_HUB_OFFLINE", hf_hub_offline), ("TRANSFORMERS_OFFLINE", transformers_offline)):
        if value is None:
            env.delenv(var, raising=False)
        else:
            env.setenv(var, value)
    library = subprocess.run([sys.executable, "-c", "import huggingface_hub.constants as c; print(c.HF_HUB_OFFLINE)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert library == str(offline)
    assert show_opts()["offline"] is offline


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-t", "-1"], "error: --temperature must be >= 0 (got -1)"),
        (["-t", "warm"], "error: --temperature must be a number (got warm)"),
        (["-n", "0"], "error: --max-tokens must be >= 1 (got 0)"),
        (["--top-p", "1.5"], "error: --top-p must be in (0, 1] (got 1.5)"),
        (["--top-k", "x"], "error: --top-k must be an integer (got x)"),
        (["--device", "gpu"], "error: --device must be auto, cpu, cuda or cuda:N (got gpu)"),
        (["--dtype", "fp8"], "error: --dtype must be one of auto, bfloat16, float16, float32 (got fp8)"),
        (["--quant", "int3"], "error: --quant must be one of none, int4, int8, nf4 (got int3)"),
        (["--gpu-memory", "24"], "error: --gpu-memory must be a size with a unit, like 24GiB, 20GB or 16000MiB (got 24)"),
        (["--gpu-memory", "0GiB"], "error: --gpu-memory must be more than 0 (got 0GiB)"),
        (["-q", "-v"], "error: --quiet and --verbose contradict each other; use one"),
        (["--cpu-moe", "--n-cpu-moe", "4"], "error: --cpu-moe already puts every layer's experts on the CPU; drop --n-cpu-moe"),
        # float() reads these; the sampler would turn them into garbage or a crash.
        (["-t", "inf"], "error: --temperature must be a finite number (got inf)"),
        (["-t", "nan"], "error: --temperature must be a finite number (got nan)"),
        (["--top-p", "-inf"], "error: --top-p must be a finite number (got -inf)"),
        # torch.Generator.manual_seed takes 0 .. 2**64 - 1.
        (["--seed", "18446744073709551616"], "error: --seed must be at most 18446744073709551615 (got 18446744073709551616)"),
        (["--seed", "-1"], "error: --seed must be >= 0 (got -1)"),
        # Python's decoding of a non-UTF-8 argument byte (surrogateescape).
        (["-s", "Be \udcff brief"], ("error: --system is not UTF-8 text (byte 0xff); write it in UTF-8 (check the "
                                     "encoding of your terminal or file)")),
        (["--stop", "###", "--stop", "\udcff"], ("error: --stop is not UTF-8 text (byte 0xff); write it in UTF-8 "
                                                "(check the encoding of your terminal or file)")),
    ],
)
def test_bad_flag_values_are_one_line_usage_errors(env, args, message):
    code, stderr = show_error(*args)
    assert code == 2
    assert stderr == message + "\n"


def test_bad_env_and_file_values_name_their_source(env):
    env.setenv("ARIA_TEMPERATURE", "-1")
    assert show_error() == (2, "error: ARIA_TEMPERATURE must be >= 0 (got -1)\n")
    env.delenv("ARIA_TEMPERATURE")
    write_config("temperature = -2\n")
    assert show_error() == (2, f"error: 'temperature' in {config_file()} must be >= 0 (got -2)\n")
    write_config('cpu_moe = "sometimes"\n')
    assert show_error() == (2, f"error: 'cpu_moe' in {config_file()} must be true or false (got sometimes)\n")


def test_largest_seed_is_accepted(env):
    assert show_opts("--seed", "18446744073709551615")["seed"] == 2**64 - 1


def test_non_finite_and_non_utf8_values_from_env_and_file(env):
    env.setenv("ARIA_SYSTEM", "caf\udce9")  # "café" in Latin-1, as Python reads it from the environment
    hint = "write it in UTF-8 (check the encoding of your terminal or file)"
    assert show_error() == (2, f"error: ARIA_SYSTEM is not UTF-8 text (byte 0xe9); {hint}\n")
    env.delenv("ARIA_SYSTEM")
    write_config("temperature = inf\n")  # TOML has inf and nan
    assert show_error() == (2, f"error: 'temperature' in {config_file()} must be a finite number (got inf)\n")


def test_config_file_that_is_not_text(env):
    config_file().parent.mkdir(parents=True)
    config_file().write_bytes(b"temperature = 0.5\n\xff\xfe\x00binary")
    message = f"error: {config_file()} is not UTF-8 text (byte 0xff at offset 18); fix or delete it\n"
    assert show_error() == (2, message)


def test_config_file_typos_and_syntax_errors(env):
    write_config("temprature = 0.5\n")
    code, stderr = show_error()
    assert code == 2 and stderr.startswith(f"error: unknown setting 'temprature' in {config_file()}; known settings: ")
    assert stderr.count("\n") == 1
    write_config("temperature = = 1\n")
    code, stderr = show_error()
    assert code == 2 and stderr.startswith(f"error: {config_file()} is not valid TOML") and stderr.count("\n") == 1


def test_config_and_data_dirs_follow_xdg(env, tmp_path):
    assert config_file() == tmp_path / "cfg" / "aria" / "config.toml"
    assert data_dir() == tmp_path / "data" / "aria"
    env.delenv("XDG_CONFIG_HOME")
    env.setenv("HOME", str(tmp_path / "home"))
    assert config_file() == tmp_path / "home" / ".config" / "aria" / "config.toml"
    assert load_settings_file() == {}  # no file is fine


def test_resolve_setting_layers_directly(tmp_path):
    path = tmp_path / "c.toml"
    file_values = {"top_k": 50, "gpu_memory": "16000MiB"}
    assert resolve_setting("top_k", None, env={}, file_values=file_values, file_path=path) == 50
    assert resolve_setting("top_k", None, env={"ARIA_TOP_K": "20"}, file_values=file_values) == 20
    assert resolve_setting("top_k", "3", env={"ARIA_TOP_K": "20"}, file_values=file_values) == 3
    assert resolve_setting("gpu_memory", None, env={}, file_values=file_values) == 16000 * 2**20
    assert resolve_setting("top_k", None, env={}, file_values={}) == 0
    with pytest.raises(UsageError, match=r"^'top_k' in .*c.toml must be >= 0 \(got -5\)$"):
        resolve_setting("top_k", None, env={}, file_values={"top_k": -5}, file_path=path)
    with pytest.raises(UsageError, match=r"must be an integer"):
        resolve_setting("top_k", None, env={}, file_values={"top_k": True}, file_path=path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("24GiB", 24 * 1024**3), ("20GB", 20 * 1000**3), ("16000MiB", 16000 * 1024**2), ("1.5gib", 1610612736),
     ("512 MB", 512 * 10**6), ("1TiB", 1024**4), ("100B", 100)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_format_size():
    assert format_size(512) == "512 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(50.6 * 10**9) == "47.1 GiB"
