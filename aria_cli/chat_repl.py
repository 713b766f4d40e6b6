"""The `aria chat` REPL: reads lines, runs /commands, asks for answers and streams them.

One Assistant and one Conversation live for the whole chat; each answer is asked for with the
whole conversation and the runtime reuses the KV cache of what it has already seen, so a
follow-up only prefills the new turn. Answers stream to stdout (Markdown drawn by Rich on a
terminal, see render.py); notices, errors and stats go to stderr. An expected failure (a bad
image, a bad /set value, an unreadable transcript) prints one line and the chat goes on.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from runtime.assistant import Assistant, Conversation, Reply
from runtime.errors import ImageError
from runtime.image_sources import load_image

from . import console
from .assistant_loader import generation_options
from .chat_commands import COMMANDS, Command, help_lines, image_paths_in, parse_command
from .chat_input import DiscardedInput, EmptyInterrupt, LineReader
from .chat_settings import changed, flag, setting_name, shown, usage_lines
from .chat_transcript import load_transcript, save_transcript
from .errors import report
from .options import RunOptions
from .render import answer_output, counted, stats_rows, stream_reply
from .settings import data_dir, utf8_text

HISTORY_FILE = "chat_history"
CUT_OFF = "[answer cut off]"


class Chat:
    """The REPL: reads lines, runs commands, asks for answers and prints them."""

    def __init__(self, assistant: Assistant, opts: RunOptions):
        self.assistant = assistant
        self.opts = opts  # the settings /set changes live here too
        self.conversation = Conversation()
        self.conversation.set_system(opts.system)
        self.pending: list[tuple[Image.Image, str]] = []  # (image, source) for the next message
        self.last: Reply | None = None

    def run(self) -> None:
        reader = LineReader(data_dir() / HISTORY_FILE, completions=[f"/{name}" for name in COMMANDS])
        console.info(f"Chatting with {self.assistant.name}. /help lists the commands; Ctrl-D or /exit leaves.")
        try:
            while True:
                try:
                    line = reader.read_message()
                except EOFError:
                    console.info("")
                    return
                except EmptyInterrupt:
                    console.info("\n(to leave, type /exit or press Ctrl-D)")
                    continue
                except DiscardedInput:
                    console.info("")
                    continue
                if not self.handle_safely(line):
                    return
        finally:
            reader.save_history()

    def handle_safely(self, line: str) -> bool:
        """Run one line; an error is one line on stderr and the chat goes on. False = leave."""
        try:
            return self.handle(line)
        except KeyboardInterrupt:  # e.g. Ctrl-C while an image downloads
            console.info("\n(stopped)")
        except Exception as exc:  # noqa: BLE001 - nothing but a failed load may end the chat
            report(exc, debug=self.opts.debug)
        return True

    def handle(self, line: str) -> bool:
        command = parse_command(line)
        if command is None:
            if line.strip():
                self.send(line)
            return True
        if command.name == "exit":
            return False
        getattr(self, f"do_{command.name}")(command)
        return True

    def _open_image(self, source: str) -> Image.Image:
        return load_image(source, offline=self.opts.offline)

    # -- a message ----------------------------------------------------------------------------

    def send(self, text: str) -> None:
        utf8_text(text, "the message")
        images = list(self.pending)
        for path in image_paths_in(text):
            try:
                image = self._open_image(str(path))
            except ImageError as exc:
                raise ImageError(f"{exc} (the message was not sent)") from None
            console.info(f"Added image {path}")
            images.append((image, str(path.resolve())))
        self.pending = []
        turn = self.conversation.add("user", text, [i for i, _ in images], [s for _, s in images])
        answered = False
        try:
            reply = self.assistant.reply(self.conversation, generation_options(self.opts))
            interrupted = stream_reply(reply, answer_output(self.opts.quiet))
            self.conversation.add("assistant", reply.text, interrupted=interrupted)
            answered = True
        finally:
            if not answered:  # the question got no answer: keep the conversation as it was
                self.conversation.turns.remove(turn)
        self.last = reply
        if interrupted:
            console.info(f"{CUT_OFF} (kept in the conversation)")
        elif reply.context_full:
            bigger = "" if self.assistant.context_at_model_max else ", or start the chat with a larger --max-context"
            console.info(f"[stopped: the context is full; /clear starts afresh{bigger}]")
        elif reply.finish_reason == "length":
            console.info(f"[stopped at {counted(self.opts.max_tokens, 'token')}; /set max-tokens N allows longer answers]")
        for name, value in stats_rows(reply, self.assistant.offload):
            console.detail(f"{name}: {value}")

    # -- commands -----------------------------------------------------------------------------

    def do_image(self, command: Command) -> None:
        source = command.argument
        image = self._open_image(source)
        is_url = source.lower().startswith(("http://", "https://"))
        self.pending.append((image, source if is_url else str(Path(source).expanduser().resolve())))
        console.info(f"Added image {source} ({image.width}x{image.height}); it goes with your next message")

    def do_system(self, command: Command) -> None:
        text = command.argument
        if not text:
            current = self.conversation.system
            console.info(f"system prompt: {current}" if current else "no system prompt (set one with /system TEXT)")
            return
        if text.lower() == "none":
            self.conversation.set_system(None)
            console.info("system prompt removed")
        else:
            self.conversation.set_system(utf8_text(text, "the system prompt"))
            console.info("system prompt set")

    def do_set(self, command: Command) -> None:
        if not command.argument:
            for name, value in shown(self.opts):
                console.info(f"  {name} = {value}")
            console.info("change one with: " + "; ".join(usage_lines()))
            return
        name, _, value = command.argument.partition(" ")
        opts = changed(self.opts, name, value)
        generation_options(opts)  # the runtime's own checks, before the next question
        self.opts = opts
        field = flag(setting_name(name))
        console.info(next(f"{n} = {v}" for n, v in shown(self.opts) if n == field))

    def do_clear(self, command: Command) -> None:
        system = self.conversation.system
        self.conversation = Conversation()
        self.conversation.set_system(system)
        self.pending = []
        self.assistant.reset()
        console.info("conversation cleared" + (" (the system prompt stays)" if system else ""))

    def do_save(self, command: Command) -> None:
        path = Path(command.argument).expanduser()
        save_transcript(path, self.conversation, self.opts, self.assistant.name)
        turns = sum(t.role != "system" for t in self.conversation.turns)
        console.info(f"saved {turns} turn(s) to {path}")

    def do_load(self, command: Command) -> None:
        path = Path(command.argument).expanduser()
        loaded = load_transcript(path, self.opts, self._open_image)
        for turn in loaded.conversation.turns:  # a JSON escape can hold a lone surrogate
            utf8_text(turn.text, f"a {turn.role} turn in {path}")
        self.conversation, self.opts, self.pending = loaded.conversation, loaded.settings, []
        turns = sum(t.role != "system" for t in self.conversation.turns)
        for problem in loaded.missing_images:
            console.warn(f"image left out, {problem}")
        missing = f"; {len(loaded.missing_images)} image(s) could not be opened" if loaded.missing_images else ""
        console.info(f"loaded {turns} turn(s) from {path}{missing}")
        if loaded.model and loaded.model != self.assistant.name:
            console.info(f"(it was saved with {loaded.model}; answers now come from {self.assistant.name})")

    def do_stats(self, command: Command) -> None:
        rows = stats_rows(self.last, self.assistant.offload) if self.last is not None else [("last answer", "none yet")]
        rows.append(("settings", ", ".join(f"{n} {v}" for n, v in shown(self.opts))))
        for name, value in rows:
            console.err.print(f"{name}: {value}", markup=False)

    def do_help(self, command: Command) -> None:
        for line in help_lines():
            console.err.print(line, markup=False)
