"""Where output goes.

stdout carries only the result (an answer, a table, one JSON object) so it stays clean for pipes;
progress, stats, warnings and errors go to stderr through one Rich console. When stdout is not a
terminal, results are written as plain text: no colour, no wrapping, no spinners.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from runtime.errors import AriaError

# soft_wrap: an error must stay ONE line even on a narrow terminal or a log file (Rich would
# otherwise wrap at 80 columns when stderr is not a terminal).
err = Console(stderr=True, highlight=False, soft_wrap=True)

_mode = {"quiet": False, "verbose": False}


def configure(*, quiet: bool = False, verbose: bool = False) -> None:
    """Set once per command from its resolved options."""
    _mode["quiet"] = quiet
    _mode["verbose"] = verbose


def is_quiet() -> bool:
    return _mode["quiet"]


def is_verbose() -> bool:
    return _mode["verbose"]


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


class _ClosedStdout(io.TextIOBase):
    """sys.stdout of a process started with its stdout closed (`aria ... >&-`), where Python leaves
    None: writing fails as writing to a closed descriptor does, so it is reported like any other
    failed write (writing_stdout), and commands that write nothing there still work."""

    def write(self, text: str) -> int:
        raise OSError(errno.EBADF, "Bad file descriptor")


def guard_closed_stdout() -> None:
    if sys.stdout is None:
        sys.stdout = _ClosedStdout()


def stdout_is_closed() -> bool:
    return isinstance(sys.stdout, _ClosedStdout)


def output_error(exc: OSError) -> AriaError:
    """One line for a write to stdout that failed."""
    problem = {errno.EBADF: "standard output is closed; redirect it to a file or /dev/null",
               errno.ENOSPC: "no space left on device; free some space or write it elsewhere"}.get(
        exc.errno, f"{exc.strerror or exc}; check where standard output goes")
    return AriaError(f"cannot write the output: {problem}")


@contextlib.contextmanager
def writing_stdout() -> Iterator[None]:
    """A failed write of the result becomes one line that says so. A reader that went away (EPIPE,
    `aria ... | head`) is left to errors.report, which exits quietly as Unix tools do, and so is an
    error naming a file: a write to stdout names none (--install-completion writes a shell's rc file)."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.EPIPE or exc.filename is not None:
            raise
        raise output_error(exc) from None


def stderr_is_terminal() -> bool:
    return err.is_terminal


def info(message: str) -> None:
    """Progress and status for people, on stderr; silenced by --quiet."""
    if not _mode["quiet"]:
        err.print(message, markup=False)


def detail(message: str) -> None:
    """Extra information shown with --verbose (stats, paths, timings)."""
    if _mode["verbose"] and not _mode["quiet"]:
        err.print(message, markup=False)


def warn(message: str) -> None:
    if not _mode["quiet"]:
        err.print(f"warning: {message}", markup=False)


_LINE_BREAKS = re.compile(r"\s*[\r\n]+\s*")


def error(message: str) -> None:
    """The one line an expected failure prints; never silenced. Line breaks inside the message
    (a server's or a library's text, a path with a newline) become spaces: it stays one line."""
    err.print(f"error: {_LINE_BREAKS.sub(' ', message.strip())}", markup=False)


def emit_text(text: str, end: str = "\n") -> None:
    """Write a result to stdout as-is (no markup, no wrapping) and flush, so pipes see it at once."""
    with writing_stdout():
        sys.stdout.write(text + end)
        sys.stdout.flush()


def emit_json(obj: dict[str, Any]) -> None:
    """The whole stdout of a `--json` command: exactly one JSON object on one line."""
    if not isinstance(obj, dict):
        raise TypeError("--json output must be one JSON object")
    emit_text(json.dumps(obj, ensure_ascii=False, default=str))


def emit_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A table on stdout: Rich on a terminal, tab-separated plain lines otherwise (for cut/awk)."""
    if stdout_is_terminal():
        table = Table(box=None, pad_edge=False, header_style="bold")
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*row)
        with writing_stdout():
            Console(highlight=False).print(table)
        return
    for row in (columns, *rows):
        emit_text("\t".join(row))


def byte_progress(label: str, *extra_columns: Any):
    """A started Rich bar on stderr (label, bar, bytes, extras, speed, ETA) or None when quiet or
    stderr is not a terminal. The caller adds its task and stops the bar."""
    if is_quiet() or not stderr_is_terminal():
        return None
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(
        TextColumn(label), BarColumn(), DownloadColumn(binary_units=True), *extra_columns,
        TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=True,
    )
    bar.start()
    return bar
