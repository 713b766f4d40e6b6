"""Model management commands: `aria download`, `aria models`, `aria rm`.

Each prints its result on stdout (a path, a table, or one JSON object with --json) and
everything meant for people (progress, confirmations, "done") on stderr.
"""

from __future__ import annotations

from typing import Annotated

import typer

from runtime.errors import AriaError

from . import console
from .download import download_model
from .models import installed_models, plan_removal, remove
from .options import HubOptions, OutputOptions, with_options
from .settings import format_size

_MODEL_ARG = typer.Argument(
    metavar="MODEL", show_default=False,
    help="Hub repo id (org/name) or an alias: aria (= rhymes-ai/Aria), aria-int4, aria-int8, demo.",
)


@with_options(HubOptions)
def download(
    model: Annotated[str, _MODEL_ARG],
    revision: Annotated[str, typer.Option("--revision", help="Branch, tag or commit to download.")] = "main",
    *,
    opts: HubOptions,
) -> None:
    """Download a model from the Hugging Face Hub into the HF cache (only the files aria needs).

    Completed files are kept, so running it again resumes an interrupted download. It prints the
    snapshot path on stdout once every file is verified complete. With --offline it only checks
    that the model is already complete, without any network call.
    """
    result = download_model(model, revision=revision, offline=opts.offline)
    verb = "is complete (checked offline)" if opts.offline else "downloaded and verified"
    console.info(f"{result.repo_id} {verb}: {len(result.files)} files, {format_size(result.size_bytes)}")
    if opts.json:
        console.emit_json(result.to_json())
    else:
        console.emit_text(str(result.path))


@with_options(OutputOptions)
def models(*, opts: OutputOptions) -> None:
    """List the Aria models on this machine: name, variant, size, status and path."""
    found = installed_models()
    if opts.json:
        console.emit_json({"models": [m.to_json() for m in found]})
        return
    if not found:
        console.info("no models yet; get one with `aria download aria`")
        return
    rows = [
        [m.name, m.variant, format_size(m.size_bytes), "ok" if m.complete else f"incomplete: {m.problem}", str(m.path)]
        for m in found
    ]
    console.emit_table(["NAME", "VARIANT", "SIZE", "STATUS", "PATH"], rows)


def _confirmed(question: str) -> bool:
    try:
        return typer.confirm(question, default=False, err=True)
    except typer.Abort as abort:
        if isinstance(abort.__context__, KeyboardInterrupt):
            raise
        # Standard input ended before an answer (a script, `</dev/null`): say how to skip the question.
        console.err.print()  # end the question's line
        raise AriaError("no answer on standard input; pass --yes to remove without asking") from None


@with_options(OutputOptions)
def rm(
    model: Annotated[str, _MODEL_ARG],
    yes: Annotated[bool, typer.Option("-y", "--yes", help="Remove without asking.")] = False,
    *,
    opts: OutputOptions,
) -> None:
    """Remove a downloaded (or locally quantized) model and free its disk space."""
    removal = plan_removal(model)
    size = format_size(removal.size_bytes)
    if not yes and not _confirmed(f"remove {model} ({size}) at {removal.paths[0]}?"):
        console.info(f"kept {model}")
        raise typer.Exit(1)
    remove(removal)
    console.info(f"removed {model} ({size} freed)")
    if opts.json:
        console.emit_json({"removed": model, "path": str(removal.paths[0]), "size_bytes": removal.size_bytes})
