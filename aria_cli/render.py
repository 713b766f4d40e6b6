"""Writing a streamed answer to stdout: rendered Markdown on a terminal, plain text in a pipe.

On a terminal the answer is Markdown drawn with Rich while it arrives. Only the block still being
written (the text after the last blank line outside a code fence) is redrawn; the lines of
finished blocks are printed once above it, so a long answer never makes the live area taller
than the screen (except one very long block, cut with an ellipsis until it is complete). In a
pipe, or with --quiet, the text is written as it comes, unchanged.

`stream_reply` and `collect_reply` turn Ctrl-C into `reply.interrupt()` and report it, so the
caller decides what an interruption means (`ask` exits 130, `chat` keeps going).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.markdown import Markdown
from rich.segment import Segment

from runtime.assistant import Reply
from runtime.offload.apply import OffloadEngine

from . import console
from .settings import format_size

# Redraws per second of the live block: enough to look smooth, few enough to cost nothing.
_REFRESH_PER_S = 15
_FENCES = ("```", "~~~")


class AnswerOutput(Protocol):
    def push(self, chunk: str) -> None: ...

    def close(self) -> None: ...


def settled_length(text: str) -> int:
    """How much of `text` is finished Markdown blocks: up to the last blank line outside a code fence."""
    settled, fenced, pos = 0, False, 0
    for line in text.splitlines(keepends=True):
        pos += len(line)
        if not line.endswith("\n"):
            break  # the line is still being written
        if line.lstrip().startswith(_FENCES):
            fenced = not fenced
        elif not fenced and not line.strip() and pos > 1:
            settled = pos
    return settled


class PlainOutput:
    """The text as it comes, flushed at once so a reader of the pipe sees it live."""

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stdout
        self.ends_with_newline = True

    def push(self, chunk: str) -> None:
        if chunk:
            # Noted before writing: a Ctrl-C between the two must still get the final newline.
            self.ends_with_newline = chunk.endswith("\n")
            self.stream.write(chunk)
            self.stream.flush()

    def close(self) -> None:
        if not self.ends_with_newline:
            self.stream.write("\n")
        self.stream.flush()


class _Lines:
    """Already rendered lines (lists of Segments), as a renderable."""

    def __init__(self, lines: list[list[Segment]]):
        self.lines = lines

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for line in self.lines:
            yield from line
            yield Segment.line()


class MarkdownOutput:
    """Rich Markdown on a terminal: the whole answer is rendered as one document (so spacing is
    Rich's own), the lines of finished blocks are printed once and only the rest is redrawn."""

    def __init__(self, console: Console | None = None):
        self.console = console if console is not None else Console(highlight=False)
        self.text = ""
        self.settled = 0  # characters of `text` that form finished blocks
        self.settled_lines = 0  # lines those blocks render to
        self.printed_lines = 0  # lines printed for good, above the live area
        self.live = Live(console=self.console, auto_refresh=False, vertical_overflow="ellipsis")
        self.last_draw = 0.0
        self.live.start()

    def _render(self, text: str) -> list[list[Segment]]:
        return self.console.render_lines(Markdown(text), pad=False) if text else []

    def _draw(self) -> None:
        settled = settled_length(self.text)
        if settled > self.settled:
            self.settled, self.settled_lines = settled, len(self._render(self.text[:settled]))
        lines = self._render(self.text)
        # Finished blocks render the same whatever follows them, so their lines are final.
        final = min(self.settled_lines, len(lines))
        self.live.update(_Lines(lines[final:]))
        if final > self.printed_lines:
            self.live.console.print(_Lines(lines[self.printed_lines:final]), end="")
            self.printed_lines = final
        self.live.refresh()
        self.last_draw = time.monotonic()

    def push(self, chunk: str) -> None:
        self.text += chunk
        if time.monotonic() - self.last_draw >= 1 / _REFRESH_PER_S:
            self._draw()

    def close(self) -> None:
        self._draw()
        self.live.stop()  # draws the open block in full


def answer_output(quiet: bool) -> AnswerOutput:
    """Rendered Markdown on a terminal; the plain text in a pipe or with --quiet."""
    return MarkdownOutput() if console.stdout_is_terminal() and not quiet else PlainOutput()


def stream_reply(reply: Reply, output: AnswerOutput) -> bool:
    """Write the reply as it is generated; True if Ctrl-C stopped it (what was written stays)."""
    interrupted = False
    try:
        for chunk in reply:
            with console.writing_stdout():  # only the writes: an OSError of generation is not about stdout
                output.push(chunk)
    except KeyboardInterrupt:
        reply.interrupt()
        interrupted = True
    finally:
        with console.writing_stdout():
            output.close()
    return interrupted


def collect_reply(reply: Reply) -> bool:
    """Generate the whole reply without writing it (for --json); True if Ctrl-C stopped it."""
    try:
        reply.read()
    except KeyboardInterrupt:
        reply.interrupt()
        return True
    return False


def reply_json(reply: Reply, model: str) -> dict[str, Any]:
    """The one `--json` object of an answer (the output contract of `aria ask`).

    `finish_reason`: "stop" (an end token or a --stop text), "length" (the token limit or a full
    context) or "interrupted" (Ctrl-C). `text` ends before a --stop text; `tokens` are the ids
    generated, the one that completed the stop text included (its other characters may belong
    to the answer)."""
    s = reply.stats
    return {
        "text": reply.text,
        "tokens": list(reply.tokens),
        "finish_reason": reply.finish_reason,
        "model": model,
        "usage": {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens},
        "timings": {
            "load_s": s.load_s, "ttft_s": s.ttft_s,
            "prefill_tokens_per_s": s.prefill_tokens_per_s, "decode_tokens_per_s": s.decode_tokens_per_s,
        },
        "memory": {"peak_device_bytes": s.peak_device_bytes, "peak_host_bytes": s.peak_host_bytes},
        "experts": {
            "hit_rate": float(s.experts.get("hit_rate", 0.0)),
            "fetched": int(s.experts.get("fetched", 0)),
            "cpu_computed": int(s.experts.get("cpu_computed", 0)),
        },
    }


def counted(n: int, noun: str) -> str:
    """"1 token", "7 tokens"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def stats_rows(reply: Reply, offload: OffloadEngine | None = None) -> list[tuple[str, str]]:
    """(name, value) pairs for --verbose and /stats: load, first token, speeds, memory, experts."""
    s = reply.stats
    prompt = f"{counted(s.prompt_tokens, 'token')} ({s.prefilled_tokens} prefilled)"
    answer = counted(s.completion_tokens, "token")
    rows = [
        ("load", f"{s.load_s:.2f} s"),
        ("time to first token", f"{s.ttft_s:.3f} s"),
        ("prompt", f"{prompt}, {s.prefill_tokens_per_s:.1f} tokens/s"),
        ("answer", f"{answer}, {s.decode_tokens_per_s:.1f} tokens/s ({reply.finish_reason})"),
        ("peak memory", f"{format_size(s.peak_host_bytes)} host"
                        + (f", {format_size(s.peak_device_bytes)} GPU" if s.peak_device_bytes else "")),
    ]
    if offload is None:
        rows.append(("experts", "all resident (nothing offloaded)"))
    else:
        e = s.experts
        counts = f"{int(e['fetched'])} fetched, {int(e['cpu_computed'])} computed on the CPU"
        rows.append(("experts", f"hit rate {100 * e['hit_rate']:.1f}%, {counts}"))
        rows.extend(offload.stats.rows())
    return rows
