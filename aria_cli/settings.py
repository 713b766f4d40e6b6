"""User settings: where aria keeps its files, and how one setting is resolved.

Every setting comes from, in order: the command-line flag, an `ARIA_*` environment variable,
the TOML config file (`$XDG_CONFIG_HOME/aria/config.toml`), then the built-in default. All three
sources are parsed and validated by the same code, so a bad value gets the same one-line message
wherever it came from, naming where it came from ("--temperature must be >= 0 (got -1)").
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import UsageError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package
    import tomli as tomllib  # type: ignore[no-redef]

APP_NAME = "aria"
CONFIG_FILE_NAME = "config.toml"


def config_dir() -> Path:
    """`$XDG_CONFIG_HOME/aria`, else `~/.config/aria` (read at call time so tests can redirect it)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / APP_NAME


def config_file() -> Path:
    return config_dir() / CONFIG_FILE_NAME


def data_dir() -> Path:
    """`$XDG_DATA_HOME/aria`, else `~/.local/share/aria`: home of locally made models (aria-int4, ...)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser() / APP_NAME


# ---------------------------------------------------------------------------------------------
# Value parsing. Each parser takes a value from text (flag, environment) or from TOML (already
# typed) and returns the typed value, or raises _Bad with the requirement that failed.


class _Bad(Exception):
    """A value that does not parse; the message is the requirement, e.g. 'must be an integer'."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _as_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
        return raw.strip().lower() in _TRUE
    raise _Bad("must be true or false")


def _as_int(raw: Any) -> int:
    if isinstance(raw, bool):
        raise _Bad("must be an integer")
    if isinstance(raw, int):
        return raw
    try:
        return int(str(raw).strip())
    except ValueError:
        raise _Bad("must be an integer") from None


def _as_float(raw: Any) -> float:
    if isinstance(raw, bool):
        raise _Bad("must be a number")
    try:
        value = float(raw) if isinstance(raw, (int, float)) else float(str(raw).strip())
    except (ValueError, OverflowError):
        raise _Bad("must be a number") from None
    # float() reads "inf" and "nan" (and TOML has them): no setting means anything by them.
    if not math.isfinite(value):
        raise _Bad("must be a finite number")
    return value


def _as_str(raw: Any) -> str:
    if not isinstance(raw, str):
        raise _Bad("must be a string")
    return raw


def not_utf8(text: str) -> str | None:
    """What in `text` is not UTF-8 ("byte 0xff"), or None when it all is.

    Python decodes command-line arguments, environment variables and (in a C or UTF-8 locale)
    standard input with surrogateescape: each byte that is not UTF-8 becomes a lone surrogate
    U+DC80..U+DCFF, which the tokenizer cannot encode (a JSON escape can make other lone ones).
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        return f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"character U+{code:04X}"
    return None


def utf8_text(text: str, what: str) -> str:
    """`text` unchanged, or a UsageError saying that `what` ("the question") is not UTF-8 text.

    Text for the model passes here where it enters aria (arguments, chat lines, settings, saved
    chats); text on standard input is decoded strictly where it is read."""
    problem = not_utf8(text)
    if problem:
        raise UsageError(f"{what} is not UTF-8 text ({problem}); write it in UTF-8 (check the encoding of "
                         "your terminal or file)")
    return text


def _as_str_list(raw: Any) -> tuple[str, ...]:
    # A list in TOML or from a repeated flag; in the environment a JSON list or one plain string.
    if isinstance(raw, str):
        if raw.lstrip().startswith("["):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError:
                raise _Bad('must be a string or a JSON list of strings like ["a", "b"]') from None
        else:
            return (raw,) if raw else ()
    if isinstance(raw, (list, tuple)) and all(isinstance(x, str) for x in raw):
        return tuple(raw)
    raise _Bad("must be a string or a list of strings")


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(raw: Any) -> str:
        value = raw.strip().lower() if isinstance(raw, str) else raw
        if value not in choices:
            raise _Bad("must be one of " + ", ".join(choices))
        return value

    return parse


def _int_choice(*choices: int) -> Callable[[Any], int]:
    def parse(raw: Any) -> int:
        try:
            value = _as_int(raw)
        except _Bad:
            value = None
        if value not in choices:
            raise _Bad("must be one of " + ", ".join(map(str, choices)))
        return value

    return parse


_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def _as_device(raw: Any) -> str:
    value = raw.strip().lower() if isinstance(raw, str) else None
    if value is None or not _DEVICE.match(value):
        raise _Bad("must be auto, cpu, cuda or cuda:N")
    return value


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_size(raw: Any) -> int:
    """'24GiB' -> bytes. The unit is required: a bare number is ambiguous between GB and GiB."""
    match = _SIZE.match(raw) if isinstance(raw, str) else None
    if match is None:
        raise _Bad("must be a size with a unit, like 24GiB, 20GB or 16000MiB")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def format_size(n: float) -> str:
    """Bytes for people: binary units, as `aria models` and downloads print them."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            break
        n /= 1024
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


# ---------------------------------------------------------------------------------------------
# The registry of settings.


def _at_least(lo: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= lo else f"must be >= {lo:g}"


def _top_p(v: float) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


_MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed


def _seed_range(v: int) -> str | None:
    return _at_least(0)(v) or (None if v <= _MAX_SEED else f"must be at most {_MAX_SEED}")


def _port_range(v: int) -> str | None:
    return None if 0 <= v <= 65535 else "must be a port number from 0 to 65535 (0: any free port)"


@dataclass(frozen=True)
class Setting:
    name: str  # dataclass field and config-file key
    flag: str  # the long flag, as named in messages
    parse: Callable[[Any], Any]
    default: Any
    check: Callable[[Any], str | None] | None = None  # returns the failed requirement, or None
    # After ARIA_<NAME>: the value another tool's variables give, read by that tool's own rules
    # (None when they say nothing), e.g. huggingface_hub's offline switch.
    foreign_env: Callable[[Mapping[str, str]], Any] | None = None
    text: bool = False  # text the model reads or matches, so it must be UTF-8 (see utf8_text)

    @property
    def env_name(self) -> str:
        return f"ARIA_{self.name.upper()}"


def _hub_offline(env: Mapping[str, str]) -> bool | None:
    """huggingface_hub's rule: HF_HUB_OFFLINE, or if it is empty TRANSFORMERS_OFFLINE, is on when it
    reads 1, ON, YES or TRUE (any case); anything else is off, never an error."""
    value = env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE")
    return None if not value else value.upper() in {"1", "ON", "YES", "TRUE"}


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in [
        # model and generation
        Setting("model", "--model", _as_str, "aria", lambda v: None if v.strip() else "must not be empty"),
        Setting("max_tokens", "--max-tokens", _as_int, 1024, _at_least(1)),
        Setting("temperature", "--temperature", _as_float, 0.0, _at_least(0)),
        Setting("top_p", "--top-p", _as_float, 1.0, _top_p),
        Setting("top_k", "--top-k", _as_int, 0, _at_least(0)),
        Setting("seed", "--seed", _as_int, None, _seed_range),
        Setting("stop", "--stop", _as_str_list, (), text=True),
        Setting("system", "--system", _as_str, None, text=True),
        Setting("split_image", "--split-image", _as_bool, False),
        Setting("image_size", "--image-size", _int_choice(490, 980), 980),
        # runtime placement
        Setting("device", "--device", _as_device, "auto"),
        Setting("dtype", "--dtype", _choice("auto", "bfloat16", "float16", "float32"), "auto"),
        Setting("quant", "--quant", _choice("none", "int4", "int8", "nf4"), "none"),
        Setting("quant_lm_head", "--quant-lm-head", _as_bool, False),
        Setting("gpu_memory", "--gpu-memory", parse_size, None, lambda v: None if v > 0 else "must be more than 0"),
        Setting("cpu_moe", "--cpu-moe", _as_bool, False),
        Setting("n_cpu_moe", "--n-cpu-moe", _as_int, 0, _at_least(0)),
        Setting("expert_slots", "--expert-slots", _as_int, None, _at_least(0)),
        Setting("max_context", "--max-context", _as_int, 8192, _at_least(1)),
        Setting("compile", "--compile", _as_bool, False),
        # aria serve
        Setting("host", "--host", _as_str, "127.0.0.1", lambda v: None if v.strip() else "must not be empty"),
        Setting("port", "--port", _as_int, 8000, _port_range),
        Setting("api_key", "--api-key", _as_str, None, lambda v: None if v.strip() else "must not be empty"),
        Setting("max_queue", "--max-queue", _as_int, 16, _at_least(0)),
        # hub and output
        Setting("offline", "--offline", _as_bool, False, foreign_env=_hub_offline),
        Setting("verbose", "--verbose", _as_bool, False),
        Setting("debug", "--debug", _as_bool, False),
        Setting("json", "--json", _as_bool, False),
        Setting("quiet", "--quiet", _as_bool, False),
    ]
}


def _shown(raw: Any) -> str:
    if isinstance(raw, float):
        return f"{raw:g}"
    return str(raw) if isinstance(raw, (int, str)) else repr(raw)


def _validated(setting: Setting, raw: Any, source: str) -> Any:
    try:
        value = setting.parse(raw)
    except _Bad as bad:
        raise UsageError(f"{source} {bad} (got {_shown(raw)!s})") from None
    problem = setting.check(value) if (setting.check and value is not None) else None
    if problem:
        raise UsageError(f"{source} {problem} (got {_shown(raw)})")
    if setting.text and value is not None:
        for text in (value,) if isinstance(value, str) else value:  # --stop is a list of texts
            utf8_text(text, source)
    return value


def parse_setting(name: str, raw: Any, source: str) -> Any:
    """One setting's value from text or JSON typed anywhere else (a chat `/set`, a saved transcript),
    with the same parser and checks as flags; `source` starts the error message ("/set temperature")."""
    return _validated(SETTINGS[name], raw, source)


def _given(flag_value: Any) -> bool:
    # Typer hands a repeatable option that was not used as None or an empty list.
    return flag_value is not None and not (isinstance(flag_value, (list, tuple)) and not flag_value)


def resolve_setting(
    name: str,
    flag_value: Any = None,
    *,
    env: Mapping[str, str] | None = None,
    file_values: Mapping[str, Any] | None = None,
    file_path: Path | None = None,
) -> Any:
    """The value of one setting: flag, else environment, else config file, else default."""
    setting = SETTINGS[name]
    if _given(flag_value):
        return _validated(setting, flag_value, setting.flag)
    env = os.environ if env is None else env
    if setting.env_name in env:
        return _validated(setting, env[setting.env_name], setting.env_name)
    foreign = setting.foreign_env(env) if setting.foreign_env is not None else None
    if foreign is not None:
        return foreign
    if file_values and name in file_values:
        return _validated(setting, file_values[name], f"'{name}' in {file_path or config_file()}")
    return setting.default


def load_settings_file(path: Path | None = None) -> dict[str, Any]:
    """The config file's settings (empty when there is none). Unknown keys are errors: they are typos."""
    path = config_file() if path is None else path
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}; fix its permissions or delete it") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                         "fix or delete it") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path} is not valid TOML ({exc}); fix or delete it") from None
    values = {key.replace("-", "_"): value for key, value in raw.items()}
    unknown = sorted(set(values) - set(SETTINGS))
    if unknown:
        raise UsageError(
            f"unknown setting '{unknown[0]}' in {path}; known settings: {', '.join(SETTINGS)}"
        )
    return values
