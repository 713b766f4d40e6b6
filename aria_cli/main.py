"""The `aria` command: the Typer app and the list of its commands.

Every command is registered here. Errors and exit codes are handled for all of them by
AriaGroup (errors.py); shared flags come from options.py (`@with_options(...)`).

A new command (ask, chat, quantize, plan) lives in its own module: it takes its shared flags with
`@with_options(RunOptions)` (or HubOptions / OutputOptions), gets its checkpoint directory from
`models.resolve_model_dir(opts.model, offline=opts.offline)`, writes its result with
`console.emit_text` / `console.emit_json` and everything else with `console.info` / `warn` /
`detail`, raises runtime.errors for expected failures, and is registered below with app.command().
"""

from __future__ import annotations

from . import console
from .ask import ask
from .chat import chat
from .demo_command import demo
from .errors import AriaGroup, AriaTyper
from .model_commands import download, models, rm
from .plan_command import plan
from .quantize_command import quantize

app = AriaTyper(
    cls=AriaGroup,
    name="aria",
    help="Ask the Aria multimodal model about your images, on one GPU or on the CPU.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion
    rich_markup_mode="markdown",  # docstring paragraphs reflow to the terminal width
    pretty_exceptions_enable=False,  # AriaGroup prints errors; no Rich traceback walls
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.command()
def version() -> None:
    """Print the version."""
    from importlib.metadata import version as _v

    console.emit_text(_v("aria-cli"))


app.command()(ask)
app.command()(chat)
app.command(rich_help_panel="Models")(download)
app.command(rich_help_panel="Models")(models)
app.command(rich_help_panel="Models")(rm)
app.command(rich_help_panel="Models")(quantize)
app.command()(demo)
app.command()(plan)
