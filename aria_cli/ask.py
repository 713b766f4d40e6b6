"""`aria ask [IMAGES]... PROMPT`: one question, one streamed answer.

The last argument is the prompt; the ones before it (and every `-i/--image`) are pictures: paths,
http(s) URLs, or `-` for image bytes on standard input. Text piped on standard input (when no
picture comes from there) goes before the prompt, so `cat notes.md | aria ask "summarise"` works.
Pictures are read and checked before the model loads, so a bad path fails in a moment.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from PIL import Image

from runtime.assistant import Conversation
from runtime.errors import InputError, UsageError
from runtime.image_sources import STDIN_NAME, load_image

from . import console
from .assistant_loader import generation_options, open_assistant
from .options import RunOptions, with_options
from .render import answer_output, collect_reply, counted, reply_json, stats_rows, stream_reply
from .settings import utf8_text

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".avif")
_EXAMPLE = 'e.g. aria ask photo.jpg "what is in this picture?"'


@dataclass(frozen=True)
class Question:
    prompt: str
    sources: tuple[str, ...]  # where each picture comes from, in the order shown to the model


def parse_question(args: list[str], image_flags: list[str], piped_text: str | None) -> Question:
    """Split the arguments into pictures and the prompt, and put piped text before the prompt."""
    *positional_images, prompt = args if args else [None]
    sources = (*positional_images, *image_flags)
    if sum(1 for s in sources if s == STDIN_NAME) > 1:
        raise UsageError("standard input can carry only one image; pass the others as files or URLs")
    if prompt is not None and not piped_text and _names_an_image(prompt):
        raise UsageError(f"the last argument is the question, but '{prompt}' is an image; add a question after it "
                         f"({_EXAMPLE})")
    if prompt is not None:
        utf8_text(prompt, "the question")
    parts = [p for p in (piped_text, prompt) if p and p.strip()]
    if not parts:
        if prompt is not None:
            raise UsageError(f"the question is empty; {_EXAMPLE}")
        raise UsageError(f"missing PROMPT: ask a question, {_EXAMPLE}")
    return Question("\n\n".join(p.strip("\n") for p in parts), sources)


def _names_an_image(text: str) -> bool:
    if text == STDIN_NAME:
        return True
    lowered = text.lower()
    if not lowered.endswith(_IMAGE_SUFFIXES) or any(c.isspace() for c in text):
        return False
    return lowered.startswith(("http://", "https://")) or Path(text).is_file()


def read_piped_text(arguments: list[str]) -> str | None:
    """Text on standard input, when it is a pipe or a file and no argument claims it for an image."""
    if STDIN_NAME in arguments or sys.stdin is None or sys.stdin.isatty():
        return None
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(
            "standard input is not UTF-8 text; to pass an image on standard input, add `-` as an image argument"
        ) from None


@with_options(RunOptions)
def ask(
    images: Annotated[
        list[str] | None,
        typer.Argument(metavar="IMAGES", show_default=False,
                       help="Pictures to ask about: paths, http(s) URLs, or - for an image on standard input."),
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Argument(metavar="PROMPT", show_default=False,
                       help="The question (piped text on standard input is put before it)."),
    ] = None,
    image: Annotated[
        list[str] | None,
        typer.Option("-i", "--image", metavar="PATH|URL|-", show_default=False,
                     help="A picture to ask about (repeatable); shown after the positional ones."),
    ] = None,
    server: Annotated[
        str | None,
        typer.Option("--server", metavar="URL", show_default=False, rich_help_panel="Runtime",
                     help="Ask a running `aria serve` at URL (e.g. http://127.0.0.1:8000) instead of loading the "
                          "model here; ARIA_API_KEY is sent as its key."),
    ] = None,
    *,
    opts: RunOptions,
) -> None:
    """Ask one question, about zero or more pictures, and stream the answer.

    The answer goes to stdout (Markdown on a terminal, plain text in a pipe); with --json one
    object with the text, token ids, timings and memory; with -v the speed stats on stderr.
    Text piped on standard input is put before the question.
    """
    args = [*(images or []), *([prompt] if prompt is not None else [])]
    image = list(image or [])
    question = parse_question(args, image, read_piped_text(args + image))
    if STDIN_NAME in question.sources and sys.stdin is not None and sys.stdin.isatty():
        raise UsageError("`-` reads a picture from standard input, but nothing is piped in; "
                         "e.g. cat photo.jpg | aria ask - \"what is this?\"")
    if server is not None:
        ask_server(server, question, opts)
        return
    pictures = [load_image(source, offline=opts.offline) for source in question.sources]
    assistant = open_assistant(opts)
    run_question(assistant, question.prompt, pictures, question.sources, opts)


def ask_server(server: str, question: Question, opts: RunOptions) -> None:
    """The question answered by `aria serve` at `server`; Ctrl-C keeps what was written and exits 130."""
    if opts.json:
        raise UsageError("--json needs the answer's tokens and timings, which only a local model gives; with "
                         "--server, ask its API for JSON (see the README, Serve)")
    from .remote_ask import picture_url, remote_reply, request_body

    pictures = [picture_url(source, opts.offline) for source in question.sources]
    reply = remote_reply(server, request_body(opts, question.prompt, pictures))
    interrupted = stream_reply(reply, answer_output(opts.quiet))
    console.detail(f"{server}: {counted(reply.stats.prompt_tokens, 'prompt token')}, "
                   f"{counted(reply.stats.completion_tokens, 'token')} ({reply.finish_reason})")
    if interrupted:
        raise KeyboardInterrupt


def run_question(assistant, prompt: str, pictures: list[Image.Image], sources: tuple[str, ...],
                 opts: RunOptions, extra_json: dict[str, Any] | None = None) -> None:
    """Answer in the mode the flags ask for; Ctrl-C keeps what was written and exits 130.
    `extra_json`: more keys for the --json object (the demo adds its question)."""
    chat = Conversation()
    chat.set_system(opts.system)
    chat.add("user", prompt, pictures, sources)
    reply = assistant.reply(chat, generation_options(opts))
    if opts.json:
        interrupted = collect_reply(reply)
        console.emit_json({**reply_json(reply, opts.model), **(extra_json or {})})
    else:
        interrupted = stream_reply(reply, answer_output(opts.quiet))
    for name, value in stats_rows(reply, assistant.offload):
        console.detail(f"{name}: {value}")
    if interrupted:
        raise KeyboardInterrupt  # the error handler says "interrupted" and exits 130
