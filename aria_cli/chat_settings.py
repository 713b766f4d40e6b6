"""The sampling settings a chat can change while it runs (`/set NAME VALUE`), with the names of
the command-line flags, parsed and checked by the same code as flags and the config file.

The chat keeps its settings as a RunOptions (the one the command started with) and /set makes a
changed copy, so an answer is asked for exactly as `aria ask` asks for one."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from runtime.errors import UsageError

from .options import RunOptions
from .settings import parse_setting

# Words that turn an optional setting off again: `/set seed random`, `/set stop none`.
_OFF = {"none", "off", "random", "default"}
# Short names users know from the flags (-t, -n) and from other tools.
_ALIASES = {"t": "temperature", "n": "max_tokens", "temp": "temperature", "max": "max_tokens"}


# The settings /set changes, as fields of RunOptions (and keys of a saved transcript).
NAMES = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")


def changed(opts: RunOptions, name: str, raw: str) -> RunOptions:
    """A copy of `opts` with setting `name` (a flag name, with or without dashes) set from the text `raw`."""
    field = setting_name(name)
    raw = raw.strip()
    if not raw:
        raise UsageError(f"/set {flag(field)} needs a value, e.g. {_EXAMPLES[field]}")
    if field in ("seed", "stop") and raw.lower() in _OFF:
        value: Any = None if field == "seed" else ()
    elif field == "stop" and len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        value = (_unquoted(raw),)
    else:
        value = parse_setting(field, raw, f"/set {flag(field)}")
    return dataclasses.replace(opts, **{field: value})


def shown(opts: RunOptions) -> list[tuple[str, str]]:
    """(flag name, value as people read it) for /set and /stats."""
    return [(flag(name), _show(name, getattr(opts, name))) for name in NAMES]


def settings_json(opts: RunOptions) -> dict[str, Any]:
    return {name: list(value) if isinstance(value := getattr(opts, name), tuple) else value for name in NAMES}


def updated_from_json(opts: RunOptions, values: Any, source: str) -> RunOptions:
    """A copy of `opts` with the settings a transcript saved, each checked like a flag; unknown keys refused."""
    if not isinstance(values, dict):
        raise UsageError(f"{source}: 'settings' must be a JSON object")
    unknown = sorted(set(values) - set(NAMES))
    if unknown:
        raise UsageError(f"{source}: unknown setting '{unknown[0]}'; known: {', '.join(NAMES)}")
    parsed = {
        name: None if raw is None and name == "seed" else parse_setting(name, raw, f"{source}: '{name}'")
        for name, raw in values.items()
    }
    return dataclasses.replace(opts, **parsed)


_EXAMPLES = {
    "max_tokens": "/set max-tokens 400",
    "temperature": "/set temperature 0.7",
    "top_p": "/set top-p 0.9",
    "top_k": "/set top-k 40",
    "seed": "/set seed 42 (or random)",
    "stop": '/set stop "###" or /set stop ["a", "b"] (or none)',
}


def setting_name(name: str) -> str:
    """The field a /set name means: `top-p`, `--top-p`, `top_p` -> top_p; unknown names are refused."""
    field = name.strip().lstrip("-").lower().replace("-", "_")
    field = _ALIASES.get(field, field)
    if field not in NAMES:
        known = ", ".join(flag(n) for n in NAMES)
        raise UsageError(f"unknown setting '{name}'; /set knows: {known}")
    return field


def flag(field: str) -> str:
    return field.replace("_", "-")


def usage_lines() -> list[str]:
    return [_EXAMPLES[name] for name in NAMES]


def _unquoted(text: str) -> str:
    """'###' -> ###; "\\n\\n" -> two newlines (double quotes read as a JSON string, for escapes)."""
    if text[0] == '"':
        try:
            return str(json.loads(text))
        except json.JSONDecodeError:
            pass
    return text[1:-1]


def _show(name: str, value: Any) -> str:
    if name == "seed" and value is None:
        return "random"
    if name == "stop":
        return json.dumps(list(value), ensure_ascii=False) if value else "none"
    if name == "temperature" and value == 0:
        return "0 (greedy)"
    if name == "top_k" and value == 0:
        return "0 (off)"
    return f"{value:g}" if isinstance(value, float) else str(value)
