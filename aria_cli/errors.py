"""Failures -> one line on stderr and an exit code, for every command in one place.

Exit codes: 0 success, 1 error, 2 usage error (bad flag, bad value, bad command), 130 interrupted
(Ctrl-C), 143 and 129 terminated (SIGTERM, SIGHUP: see main.py).
Expected failures (the runtime.errors.AriaError family, click's usage errors) print one line
"error: ..."; the traceback is shown only with --debug. Anything else is a bug: it still prints
one line (with a pointer to --debug) rather than a wall of traceback.

The handling lives in the click group that Typer builds for the app (`AriaGroup`), so it covers
option parsing, settings resolution and the command body alike, both for the `aria` console
script and for Typer's CliRunner in tests.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

import typer
from typer.core import TyperCommand, TyperGroup

from runtime.errors import AriaError

from . import console

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class Terminated(BaseException):
    """A stop signal arrived. Raised in the main thread, it unwinds the command the way Ctrl-C does,
    so every `finally` and `except BaseException` clean-up runs (quantize deletes its partial
    directory, chat saves its history). Not a KeyboardInterrupt: in chat that only stops an answer
    or discards a line, and these signals mean "stop the program"."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

# Whether the running command has --debug. One process runs one command; AriaGroup resets it
# when a command line starts being parsed (tests run many in one process).
_debug = {"on": False}


# What stops a command from outside: Ctrl-C, or a stop signal (see main.py).
STOPPED = (KeyboardInterrupt, Terminated)


def mark_debug(debug: bool) -> None:
    """Tell the error handler whether this command runs with --debug."""
    _debug["on"] = debug


# Typer vendors its own copy of click (typer._click), so click's exception classes are matched
# by shape, not imported: a click exception has format_message() and exit_code; a usage error
# also carries the context of the command it is about.
def _is_click_exception(exc: BaseException) -> bool:
    return hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int)


def _passes_through(exc: BaseException) -> bool:
    # --help and explicit exits are not failures; a bare `aria` shows its help.
    return isinstance(exc, (typer.Exit, SystemExit)) or type(exc).__name__ == "NoArgsIsHelpError"


def report(exc: BaseException, *, debug: bool = False, command_path: str = "aria") -> int:
    """Print what went wrong (one line, plus a traceback with --debug) and return the exit code."""
    if isinstance(exc, KeyboardInterrupt) or (
        isinstance(exc, typer.Abort) and isinstance(exc.__context__, KeyboardInterrupt)
    ):
        console.err.print("interrupted", markup=False)
        return EXIT_INTERRUPTED
    if isinstance(exc, typer.Abort):  # e.g. end of input at a confirmation prompt
        console.error("aborted")
        return EXIT_ERROR
    if isinstance(exc, OSError) and exc.errno == errno.EPIPE:
        return EXIT_ERROR  # stdout closed by the reader (`aria ... | head`): nothing to say
    if isinstance(exc, OSError) and exc.errno == errno.EBADF and console.stdout_is_closed():
        exc = console.output_error(exc)  # e.g. --help, printed by click, with stdout closed
    if isinstance(exc, AriaError):
        console.error(str(exc))
        code = exc.exit_code
    elif _is_click_exception(exc):
        message = exc.format_message()  # type: ignore[attr-defined]
        if exc.exit_code == EXIT_USAGE:  # type: ignore[attr-defined]
            ctx = getattr(exc, "ctx", None)
            message += f" (see '{ctx.command_path if ctx is not None else command_path} --help')"
        console.error(message)
        return exc.exit_code  # type: ignore[attr-defined]
    else:
        console.error(
            f"unexpected {type(exc).__name__}: {exc} (this is a bug in aria; rerun with --debug for the traceback)"
        )
        code = EXIT_ERROR
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    return code


def _guarded(ctx: Any, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except (Exception, KeyboardInterrupt) as exc:
        if _passes_through(exc):
            raise
        code = report(exc, debug=_debug["on"], command_path=ctx.command_path)
        raise typer.Exit(code) from None


class AriaCommand(TyperCommand):
    """Typer's command whose --help, when stdout is full or closed, is one line like any other
    output (the group handles its errors; the group's own help is guarded in its parse_args)."""

    def format_help(self, ctx: Any, formatter: Any) -> Any:
        with console.writing_stdout():
            return super().format_help(ctx, formatter)


class AriaGroup(TyperGroup):
    """Typer's group with aria's error policy around parsing and invocation."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        mark_debug(False)

        def parse() -> list[str]:
            # What the group itself writes while parsing (--help, --show-completion) goes to stdout.
            with console.writing_stdout():
                return super(AriaGroup, self).parse_args(ctx, args)

        return _guarded(ctx, parse)

    def invoke(self, ctx: Any) -> Any:
        return _guarded(ctx, lambda: super(AriaGroup, self).invoke(ctx))


class AriaTyper(typer.Typer):
    """The app object behind the `aria` script and `python -m aria_cli` (tests use CliRunner instead).

    After Ctrl-C, Python would wait for worker threads to finish before exiting (thread pools are
    joined at exit even when their threads are daemons): for a download, until every file in
    flight is complete, which can be minutes. When other threads are still running, exit at once.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        console.guard_closed_stdout()
        try:
            return super().__call__(*args, **kwargs)
        except SystemExit as exit_:
            if exit_.code == EXIT_INTERRUPTED:
                exit_at_once(EXIT_INTERRUPTED)
            raise


def exit_at_once(code: int) -> NoReturn:
    """Exit with `code` after a stop (Ctrl-C, SIGTERM) without waiting for worker threads still
    running (a download's pool), which Python would join first even when they are daemons."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):  # the reader or (after SIGHUP) the terminal may be gone
            stream.flush()
    if any(t.is_alive() for t in threading.enumerate() if t is not threading.main_thread()):
        os._exit(code)
    sys.exit(code)
