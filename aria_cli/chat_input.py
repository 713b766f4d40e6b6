"""Reading what the user types in `aria chat`: line editing and history (readline) on a terminal,
`\"\"\"` for a message of several lines, and what Ctrl-C and Ctrl-D mean at the prompt.

On a terminal the prompt is drawn by input() (readline needs it to redraw the line). When stdin
or stdout is not a terminal (a script feeding the chat), lines are read from stdin directly and
the prompt goes to stderr, so stdout carries nothing but answers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from . import console

PROMPT = ">>> "
CONTINUATION = "... "
FENCE = '"""'
HISTORY_LENGTH = 1000


class EmptyInterrupt(Exception):
    """Ctrl-C at an empty prompt: the user may be trying to leave."""


class DiscardedInput(Exception):
    """Ctrl-C while something was typed: the line (or the unfinished multi-line message) is dropped."""


class LineReader:
    def __init__(self, history_file: Path | None = None, completions: Iterable[str] = ()):
        # Bytes that are not UTF-8 become lone surrogates, as Python already reads them in a C or
        # UTF-8 locale (a stricter locale would raise in the middle of reading): the chat then
        # refuses that message in one line (settings.utf8_text) and goes on.
        if hasattr(sys.stdin, "reconfigure"):
            sys.stdin.reconfigure(errors="surrogateescape")
        self.interactive = sys.stdin.isatty() and sys.stdout.isatty()
        self._readline = _readline() if self.interactive else None
        self._history_file = history_file
        if self._readline is not None:
            self._start_readline(sorted(completions))

    def read_message(self) -> str:
        """The next message or command; a `\"\"\"` block is returned as one text of several lines.

        Raises EOFError (Ctrl-D / end of input), EmptyInterrupt or DiscardedInput (Ctrl-C).
        """
        line = self._read(PROMPT, empty_so_far=True)
        stripped = line.strip()
        if not stripped.startswith(FENCE):
            return line
        body = stripped[len(FENCE):]
        if body.endswith(FENCE):  # """all on one line"""
            return body[: -len(FENCE)].strip()
        lines = [body] if body else []
        while True:
            try:
                more = self._read(CONTINUATION, empty_so_far=False)
            except EOFError:
                return self._unclosed_block("\n".join(lines).strip("\n"))
            if more.rstrip().endswith(FENCE):
                lines.append(more.rstrip()[: -len(FENCE)])
                return "\n".join(lines).strip("\n")
            lines.append(more)

    @staticmethod
    def _unclosed_block(text: str) -> str:
        """The input ended inside a block. Piped input means it (the script's last message or
        command); Ctrl-D at a terminal means leave, so the block is dropped. Either way it is said.
        (Reading on after a pipe's end gives its end again.)"""
        if sys.stdin.isatty() or not text:
            console.warn(f"the unfinished {FENCE} block was not sent")
            raise EOFError
        console.warn(f"the input ended inside a {FENCE} block; taking it as it is")
        return text

    def _read(self, prompt: str, empty_so_far: bool) -> str:
        try:
            if self.interactive:
                return input(prompt)
            return self._read_plain(prompt)
        except KeyboardInterrupt:
            typed = self._readline.get_line_buffer() if self._readline is not None else ""
            if empty_so_far and not typed:
                raise EmptyInterrupt from None
            raise DiscardedInput from None

    @staticmethod
    def _read_plain(prompt: str) -> str:
        if console.stderr_is_terminal():
            console.err.print(prompt, end="", markup=False)
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n").rstrip("\r")

    def _start_readline(self, completions: list[str]) -> None:
        rl = self._readline
        if self._history_file is not None:
            rl.set_history_length(HISTORY_LENGTH)
            try:
                rl.read_history_file(str(self._history_file))
            except FileNotFoundError:
                pass
            except OSError as exc:
                console.warn(f"cannot read the chat history {self._history_file}: {exc.strerror or exc}")
        rl.set_completer(_completer(completions))
        rl.set_completer_delims(" \t\n")
        # macOS Python links libedit, which has its own syntax for the same binding.
        if "libedit" in (rl.__doc__ or ""):
            rl.parse_and_bind("bind ^I rl_complete")
        else:
            rl.parse_and_bind("tab: complete")

    def save_history(self) -> None:
        if self._readline is None or self._history_file is None:
            return
        try:
            self._history_file.parent.mkdir(parents=True, exist_ok=True)
            self._readline.write_history_file(str(self._history_file))
        except OSError as exc:
            console.warn(f"cannot save the chat history to {self._history_file}: {exc.strerror or exc}")


def _readline():
    try:
        import readline
    except ImportError:  # Windows without pyreadline: plain input() still works
        return None
    return readline


def _completer(words: list[str]) -> Callable[[str, int], str | None]:
    """Tab completes /commands at the start of a line."""

    def complete(text: str, state: int) -> str | None:
        matches = [w for w in words if w.startswith(text)] if text.startswith("/") else []
        return matches[state] if state < len(matches) else None

    return complete
