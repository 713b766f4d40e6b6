"""Shell completion: the script installs for bash and completes commands and flags (real processes)."""

import os
import subprocess
import sys

ARIA = [sys.executable, "-m", "aria_cli"]


def run(*args, **env):
    return subprocess.run([*ARIA, *args], check=False, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env}, stdin=subprocess.DEVNULL)


def test_bash_completion_script_and_completions():
    script = run("--show-completion", "bash", SHELL="/bin/bash")
    assert script.returncode == 0 and "complete " in script.stdout and "_ARIA_COMPLETE" in script.stdout
    # What the installed script asks the program for when the user presses Tab.
    commands = run(_ARIA_COMPLETE="complete_bash", COMP_WORDS="aria as", COMP_CWORD="1")
    assert commands.stdout.split() == ["ask"]
    flags = run(_ARIA_COMPLETE="complete_bash", COMP_WORDS="aria ask --tem", COMP_CWORD="2")
    assert flags.stdout.split() == ["--temperature"]
