"""`aria demo`: one question about a bundled example picture, answered by the bundled demo model.

Nothing is downloaded and no GPU is used: the demo model (a tiny Aria that ships inside the
package) answers on the CPU in seconds. The settings are fixed (greedy, CPU, no user config), so
the demo shows the same answer everywhere.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from runtime.errors import ModelNotFoundError
from runtime.image_sources import load_image

from . import console
from .ask import run_question
from .assistant_loader import open_assistant
from .models import DEMO_ALIAS, resolve_model_dir
from .options import OutputOptions, RunOptions, with_options
from .settings import SETTINGS

DEMO_QUESTION = "What is this?"  # the demo model answers e.g. "a red circle" (runtime/shapes_task.py)
DEMO_MAX_TOKENS = 64
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def demo_run_options(out: OutputOptions) -> RunOptions:
    """Built-in defaults (never the user's config file or ARIA_* variables), on the CPU, offline."""
    values = {f.name: SETTINGS[f.name].default for f in dataclasses.fields(RunOptions)}
    values.update(dataclasses.asdict(out))
    values.update(model=DEMO_ALIAS, offline=True, device="cpu", max_tokens=DEMO_MAX_TOKENS, temperature=0.0)
    return RunOptions(**values)


def demo_example(model_dir: Path) -> tuple[Path, str]:
    """The example picture shipped with the demo model, and the question asked about it."""
    pictures = sorted(p for p in model_dir.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not pictures:
        raise ModelNotFoundError(f"the demo model at {model_dir} has no example picture; reinstall aria")
    question = pictures[0].with_suffix(".txt")
    return pictures[0], question.read_text(encoding="utf-8").strip() if question.is_file() else DEMO_QUESTION


@with_options(OutputOptions)
def demo(*, opts: OutputOptions) -> None:
    """Ask the bundled demo model about a bundled example picture (offline, CPU, a few seconds).

    Shows what `aria ask` does without downloading anything; the real model is
    `aria ask -m aria PICTURE QUESTION`.
    """
    run = demo_run_options(opts)
    picture, question = demo_example(resolve_model_dir(DEMO_ALIAS, offline=True))
    image = load_image(picture, offline=True)
    assistant = open_assistant(run)
    if not (opts.json or opts.quiet):
        console.emit_text(f"picture: {picture.name}\nquestion: {question}\nanswer:")
    run_question(assistant, question, [image], (str(picture),), run,
                 extra_json={"question": question, "image": str(picture)})
