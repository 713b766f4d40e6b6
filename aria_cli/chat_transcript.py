"""A chat saved as JSON (`/save FILE`) and read back (`/load FILE`).

The file keeps what is needed to carry on: the system prompt, the settings, and every turn's
role, text, image sources (absolute paths or URLs, never pixels) and whether an answer was cut
off. Loading opens the images again; the ones that cannot be opened any more are reported one
line each and left out, and the rest of the chat is kept.

    {"format": "aria-chat", "version": 1, "model": "aria", "system": "Be brief.",
     "settings": {"max_tokens": 1024, "temperature": 0.0, ...},
     "turns": [{"role": "user", "text": "What is this?", "images": ["/home/me/cat.png"],
                "interrupted": false}, ...]}
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from runtime.assistant import Conversation
from runtime.errors import AriaError, UsageError

from .chat_settings import settings_json, updated_from_json
from .options import RunOptions
from .settings import not_utf8

FORMAT = "aria-chat"
VERSION = 1
_ROLES = ("user", "assistant")


def transcript_json(conversation: Conversation, settings: RunOptions, model: str) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": model,
        "system": conversation.system,
        "settings": settings_json(settings),
        "turns": [
            {"role": t.role, "text": t.text, "images": list(t.image_sources), "interrupted": t.interrupted}
            for t in conversation.turns
            if t.role != "system"
        ],
    }


def save_transcript(path: Path, conversation: Conversation, settings: RunOptions, model: str) -> None:
    """Write the transcript whole or not at all (a temporary file renamed into place)."""
    path = path.expanduser().absolute()  # `.` and `/` have no name to put the temporary file beside
    if path.is_dir():
        raise UsageError(f"{path} is a directory; give a file name, e.g. /save {path / 'chat.json'}")
    record = transcript_json(conversation, settings, model)
    text = json.dumps(record, ensure_ascii=False, indent=2) + "\n"
    if not_utf8(text):  # an image path with bytes that are not UTF-8 (legal in Linux file names)
        text = json.dumps(record, indent=2) + "\n"  # \u escapes read back to the same path
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):  # removing fails too where writing did (read-only, not a directory)
            temporary.unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}; choose another file") from None


@dataclass
class LoadedTranscript:
    conversation: Conversation
    settings: RunOptions  # the current options with the file's settings
    model: str | None
    missing_images: list[str] = field(default_factory=list)  # one line each: which image, why


def load_transcript(
    path: Path, settings: RunOptions, open_image: Callable[[str], Image.Image]
) -> LoadedTranscript:
    """Read a transcript; `settings` are the current ones, which the file's settings override.

    Images are opened with `open_image(source)`; one that raises an AriaError is left out of its
    turn and described in `missing_images`.
    """
    path = path.expanduser()
    raw = _read_json(path)
    name = str(path)
    if raw.get("format") != FORMAT:
        raise UsageError(f"{name} is not an aria chat transcript (no \"format\": \"{FORMAT}\"); use a file made by /save")
    if raw.get("version") != VERSION:
        raise UsageError(f"{name} is a version {raw.get('version')} transcript; this aria reads version {VERSION}")
    system = raw.get("system")
    if system is not None and not isinstance(system, str):
        raise UsageError(f"{name}: 'system' must be a string or null")
    loaded_settings = updated_from_json(settings, raw.get("settings", {}), name)
    turns = raw.get("turns")
    if not isinstance(turns, list):
        raise UsageError(f"{name}: 'turns' must be a list")
    conversation = Conversation()
    conversation.set_system(system)
    missing: list[str] = []
    for number, turn in enumerate(turns, 1):
        role, text, sources, interrupted = _turn_fields(turn, number, name)
        images, kept = [], []
        for source in sources:
            try:
                images.append(open_image(source))
                kept.append(source)
            except AriaError as exc:
                missing.append(f"turn {number}: {exc}")
        conversation.add(role, text, images, kept, interrupted)
    model = raw.get("model")
    return LoadedTranscript(conversation, loaded_settings, model if isinstance(model, str) else None, missing)


# Far beyond any saved chat (its pictures are paths, not pixels): a bound on what /load reads, so
# a wrong path (/dev/zero, a video) is an error, not all of memory.
MAX_TRANSCRIPT_BYTES = 64 * 2**20


def _read_json(path: Path) -> dict[str, Any]:
    try:
        if path.exists() and not path.is_dir() and not path.is_file():
            raise UsageError(f"{path} is not a regular file; give the file you saved with /save")
        with path.open("rb") as file:
            data = file.read(MAX_TRANSCRIPT_BYTES + 1)
        if len(data) > MAX_TRANSCRIPT_BYTES:
            raise UsageError(f"{path} is over {MAX_TRANSCRIPT_BYTES // 2**20} MB, too big for a chat transcript; "
                             "give the file you saved with /save")
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist; give the file you saved with /save") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory; give the file you saved with /save") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except (ValueError, RecursionError) as exc:  # an integer of thousands of digits, nesting thousands deep
        raise UsageError(f"{path} is not an aria chat transcript ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path} is not an aria chat transcript (not a JSON object)")
    return raw


def _turn_fields(turn: Any, number: int, name: str) -> tuple[str, str, list[str], bool]:
    where = f"{name}: turn {number}"
    if not isinstance(turn, dict):
        raise UsageError(f"{where} must be a JSON object")
    role, text = turn.get("role"), turn.get("text")
    sources, interrupted = turn.get("images", []), turn.get("interrupted", False)
    if role not in _ROLES:
        raise UsageError(f"{where}: 'role' must be one of {', '.join(_ROLES)} (got {role!r})")
    if not isinstance(text, str):
        raise UsageError(f"{where}: 'text' must be a string")
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise UsageError(f"{where}: 'images' must be a list of paths or URLs")
    if not isinstance(interrupted, bool):
        raise UsageError(f"{where}: 'interrupted' must be true or false")
    return role, text, sources, interrupted
