"""The README's test command is exactly what CI runs, and it sits at the top with the main command."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _commands(text: str) -> list[str]:
    lines = text.splitlines()
    return [lines[i + 1] for i, line in enumerate(lines) if line.strip() == "```bash"]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    main_cmd, test_cmd = _commands(readme)[:2]
    assert test_cmd in ci, "the README's test command must be the line .ci/run executes"
    assert "pytest" in test_cmd
    assert main_cmd.startswith("pip install torch==2.13.0") and " aria " in f"{main_cmd} "
