"""Streaming an answer: where finished Markdown blocks end, and that drawing the answer piece by
piece prints exactly what Rich prints for the whole text at once."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from rich.markdown import Markdown

from aria_cli import render
from aria_cli.render import MarkdownOutput, PlainOutput, settled_length


@pytest.mark.parametrize(
    ("text", "settled"),
    [
        ("no blank line yet\n", 0),
        ("a\n\nb", 3),  # "a\n" + the blank line
        ("a\n\nb\n\nc", 6),
        ("a\n\n\n", 4),
        ("```\nx\n\n", 0),  # a blank line inside an open code fence ends nothing
        ("para\n\n```\nx\n\ny\n```\n\nz", 20),  # 5 + 1 + 4 + 2 + 1 + 2 + 4 + 1
        ("~~~\nx\n\n~~~\n\nz", 12),  # 4 + 2 + 1 + 4 + 1
        ("a\n\n  ", 3),  # the last line is still being written
    ],
)
def test_settled_length_by_hand(text, settled):
    assert settled_length(text) == settled


MARKDOWN = (
    "# Title\n\nHello **world**, this is a paragraph.\n\n- one\n- two\n\n1. first\n\n2. second\n\n"
    "```python\nx = 1\n\ny = 2\n```\n\n> quote\n\nLast line with `code`."
)


def rich_whole(text: str) -> str:
    out = io.StringIO()
    Console(file=out, width=50, color_system=None).print(Markdown(text))
    return out.getvalue()


@pytest.mark.parametrize("step", [1, 7, len(MARKDOWN)])
def test_streamed_markdown_prints_what_rich_prints_for_the_whole_text(monkeypatch, step):
    monkeypatch.setattr(render, "_REFRESH_PER_S", 1e9)  # draw after every chunk
    out = io.StringIO()
    stream = MarkdownOutput(Console(file=out, width=50, color_system=None))
    for i in range(0, len(MARKDOWN), step):
        stream.push(MARKDOWN[i:i + step])
    stream.close()
    # Off a terminal Rich's live display leaves the last line open (on a terminal it ends it).
    assert out.getvalue() + "\n" == rich_whole(MARKDOWN)


def test_plain_output_is_the_text_with_one_final_newline():
    out = io.StringIO()
    plain = PlainOutput(out)
    for chunk in ["Hel", "lo\nwor", "ld"]:
        plain.push(chunk)
    plain.close()
    assert out.getvalue() == "Hello\nworld\n"
    out = io.StringIO()
    plain = PlainOutput(out)
    plain.push("done\n")
    plain.close()
    assert out.getvalue() == "done\n"
