"""What a line typed in `aria chat` means: a `/command` or a message, and which image files a
message names (those are attached to it, as ollama does with a dragged-in file)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import UsageError

# name -> (argument shown in /help, what it does). The first name of each alias group is canonical.
COMMANDS: dict[str, tuple[str, str]] = {
    "image": ("PATH|URL", "attach an image to your next message"),
    "system": ("[TEXT|none]", "set the system prompt (none removes it; no text shows it)"),
    "set": ("[NAME VALUE]", "change a setting: max-tokens, temperature, top-p, top-k, seed, stop"),
    "clear": ("", "forget the conversation (the system prompt and settings stay)"),
    "save": ("FILE", "save the conversation as JSON"),
    "load": ("FILE", "load a conversation saved with /save"),
    "stats": ("", "speed and token counts of the last answer, and the settings"),
    "help": ("", "show this help"),
    "exit": ("", "leave (also Ctrl-D)"),
}
ALIASES = {"quit": "exit", "bye": "exit", "q": "exit", "?": "help", "h": "help", "img": "image", "reset": "clear"}
# Commands whose argument is required.
_NEEDS_ARGUMENT = {"image": "/image PATH or /image URL", "save": "/save FILE", "load": "/load FILE"}
_TAKES_NO_ARGUMENT = {"clear", "stats", "help", "exit"}
_TAKES_LINES = {"system"}  # a system prompt may span lines (a \"\"\" block)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Command:
    name: str  # canonical: a key of COMMANDS
    argument: str  # the rest of the line, stripped ("" when none)


def parse_command(line: str) -> Command | None:
    """The command a line holds, or None when the line is a message.

    A line is a command when it starts with "/" and its first word is not a path: "/tmp/cat.png
    what is this?" is a message about a file. A \"\"\" block that starts with a command is that
    command: only /system takes text of several lines, the others refuse it (a path followed by
    a question would otherwise become one long path). Unknown commands raise UsageError listing
    the known ones.
    """
    text = line.strip()
    if not text.startswith("/"):
        return None
    word, rest = (text[1:].split(maxsplit=1) + ["", ""])[:2]
    if "/" in word or (word and Path(text.split()[0]).exists()):
        return None
    name = ALIASES.get(word.lower(), word.lower())
    if name not in COMMANDS:
        raise UsageError(f"unknown command /{word}; commands: {known_commands()} (a message cannot start with /)")
    if "\n" in rest and name not in _TAKES_LINES:
        raise UsageError(f"/{name} takes one line; send what follows it as a message of its own")
    argument = _unquote(rest.strip()) if name in ("image", "save", "load") else rest.strip()
    if name in _NEEDS_ARGUMENT and not argument:
        raise UsageError(f"/{name} needs an argument: {_NEEDS_ARGUMENT[name]}")
    if name in _TAKES_NO_ARGUMENT and argument:
        raise UsageError(f"/{name} takes no argument (got '{argument}')")
    return Command(name, argument)


def known_commands() -> str:
    return ", ".join("/" + name for name in COMMANDS)


def help_lines() -> list[str]:
    width = max(len(f"/{n} {a}") for n, (a, _) in COMMANDS.items())
    lines = [f"  {f'/{n} {a}'.strip():<{width}}  {what}" for n, (a, what) in COMMANDS.items()]
    return lines + [
        '  """                  start or end a message of several lines',
        "  Ctrl-C stops an answer (what was said is kept, marked as cut off); Ctrl-D leaves.",
        "  An image path typed in a message is attached to it.",
    ]


# A word of a message: a quoted string, or a run of non-space characters where "\ " (a space
# escaped by the shell or by a terminal's drag-and-drop) does not end the word.
_WORD = re.compile(r"""'([^']+)'|"([^"]+)"|((?:\\ |\S)+)""")
_TRAILING = ",;:!?)]}>"


def image_paths_in(message: str) -> list[Path]:
    """Existing image files named in a message, in order, each once."""
    found: list[Path] = []
    for match in _WORD.finditer(message):
        quoted = match.group(1) or match.group(2)
        word = quoted if quoted is not None else match.group(3).replace("\\ ", " ")
        # "what is in cat.png?" and "(see cat.png)": punctuation around the name is not part of it.
        candidates = [word] if quoted is not None else [word, word.lstrip("(<[{").rstrip(_TRAILING + ".")]
        for candidate in candidates:
            path = Path(candidate).expanduser()
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                if path not in found:
                    found.append(path)
                break
    return found


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text.replace("\\ ", " ")
