"""The `aria` command: the Typer app and the list of its commands.

Every command is registered here. Errors and exit codes are handled for all of them by
AriaGroup (errors.py); shared flags come from options.py (`@with_options(...)`).

A new command (ask, chat, quantize, plan, serve) lives in its own module: it takes its shared flags with
`@with_options(RunOptions)` (or HubOptions / OutputOptions), gets its checkpoint directory from
`models.resolve_model_dir(opts.model, offline=opts.offline)`, writes its result with
`console.emit_text` / `console.emit_json` and everything else with `console.info` / `warn` /
`detail`, raises runtime.errors for expected failures, and is registered below with app.command().
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any, NoReturn

from . import console
from .ask import ask
from .chat import chat
from .demo_command import demo
from .errors import AriaCommand, AriaGroup, AriaTyper, Terminated, exit_at_once
from .model_commands import download, models, rm
from .plan_command import plan
from .quantize_command import quantize
from .serve import serve

# `timeout`, `docker stop` and systemd send SIGTERM; closing the terminal sends SIGHUP.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def _raise_terminated(signum: int, frame: Any) -> None:
    for other in STOP_SIGNALS:  # a second signal must not cut the clean-up short (SIGKILL still works)
        signal.signal(other, signal.SIG_IGN)
    raise Terminated(signum)


@contextlib.contextmanager
def _stop_signals_unwind() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {}
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:  # e.g. under nohup, SIGHUP stays ignored
            previous[signum] = signal.signal(signum, _raise_terminated)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _exit_terminated(stop: Terminated) -> NoReturn:
    with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
        # Not through Rich: a signal that lands inside a Rich print leaves that line in its buffer,
        # and the next print through it would write the line again.
        sys.stderr.write(f"terminated ({stop})\n")
    # 128 + the signal number (143 for SIGTERM, 129 for SIGHUP): what a shell reports for a
    # process the signal ended, as 130 is for Ctrl-C (errors.py).
    exit_at_once(128 + stop.signum)


class _StoppableTyper(AriaTyper):
    """AriaTyper that also turns SIGTERM and SIGHUP into an orderly stop (Terminated)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            with _stop_signals_unwind():
                return super().__call__(*args, **kwargs)
        except Terminated as stop:
            _exit_terminated(stop)


app = _StoppableTyper(
    cls=AriaGroup,
    name="aria",
    help="Ask the Aria multimodal model about your images, on one GPU or on the CPU.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion
    rich_markup_mode="markdown",  # docstring paragraphs reflow to the terminal width
    pretty_exceptions_enable=False,  # AriaGroup prints errors; no Rich traceback walls
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.command(cls=AriaCommand)
def version() -> None:
    """Print the version."""
    from importlib.metadata import version as _v

    console.emit_text(_v("aria-cli"))


for command, panel in [(ask, None), (chat, None), (download, "Models"), (models, "Models"), (rm, "Models"),
                       (quantize, "Models"), (demo, None), (plan, None), (serve, None)]:
    app.command(cls=AriaCommand, rich_help_panel=panel)(command)
