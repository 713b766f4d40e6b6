"""Options shared by commands, declared once.

Option groups, each a frozen dataclass whose fields are settings (see settings.py):
- OutputOptions: -v/--verbose, --debug, --json, -q/--quiet (every command);
- HubOptions: OutputOptions + --offline (commands that may reach the Hub);
- RunOptions: HubOptions + model, generation and placement flags (ask, chat);
- ServeOptions: RunOptions + where to listen, the API key and the wait queue (serve);
- PlacementOptions: HubOptions + model and placement flags, no generation (plan).

A command asks for a group with `@with_options(RunOptions)` and a parameter `opts: RunOptions`:
the decorator adds the group's flags to the command's signature (Typer reads the signature),
resolves every value through flag > ARIA_* environment > config file > default, checks flag
combinations, configures the console and the error handler, and calls the command with `opts`.

    @app.command()
    @with_options(RunOptions)
    def ask(prompt: str, opts: RunOptions) -> None: ...
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import typer

from runtime.errors import UsageError

from . import console
from .errors import mark_debug
from .settings import SETTINGS, config_file, load_settings_file, resolve_setting


@dataclass(frozen=True)
class OutputOptions:
    verbose: bool
    debug: bool
    json: bool
    quiet: bool


@dataclass(frozen=True)
class HubOptions(OutputOptions):
    offline: bool


@dataclass(frozen=True)
class RunOptions(HubOptions):
    model: str
    max_tokens: int
    temperature: float  # 0 = greedy
    top_p: float
    top_k: int  # 0 = no top-k cut
    seed: int | None
    stop: tuple[str, ...]
    system: str | None
    split_image: bool
    device: str  # auto | cpu | cuda | cuda:N
    dtype: str  # auto | bfloat16 | float16 | float32
    quant: str  # none | int4 | int8 | nf4
    quant_lm_head: bool  # the lm_head too (runtime.quant_targets)
    gpu_memory: int | None  # bytes; None = what the device has free
    cpu_moe: bool
    n_cpu_moe: int
    image_size: int  # 490 | 980: the crop side, 128 or 256 tokens per crop
    max_context: int  # KV cache length in tokens (capped by the model's positions)
    expert_slots: int | None  # device slots per offloaded layer; None = as many as fit
    compile: bool  # compiled static-shape decode


@dataclass(frozen=True)
class ServeOptions(RunOptions):
    """`aria serve`: everything `ask` takes (defaults for each request) and where to listen."""

    host: str
    port: int  # 0: any free port (the one chosen is printed)
    api_key: str | None  # required as `Authorization: Bearer KEY` when set
    max_queue: int  # requests that may wait while one is answered; more get 429


@dataclass(frozen=True)
class PlacementOptions(HubOptions):
    """What `aria plan` needs: the model and where it would run, without generation settings."""

    model: str
    device: str
    dtype: str
    quant: str
    quant_lm_head: bool
    gpu_memory: int | None
    cpu_moe: bool
    n_cpu_moe: int
    max_context: int
    expert_slots: int | None
    compile: bool  # compiled decode: CUDA graphs need their own memory


_GEN, _RUN, _SRV, _HUB, _OUT = "Generation", "Runtime", "Server", "Hub", "Output"


def _default(name: str, shown: str | None = None) -> str:
    value = SETTINGS[name].default
    if shown is None:
        shown = {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else str(value)
    return f" (default: {shown}; env ARIA_{name.upper()})"


def _text(*names: str, help: str, panel: str, metavar: str, name: str, shown: str | None = None) -> Any:
    return Annotated[
        str | None,
        typer.Option(*names, help=help + _default(name, shown), rich_help_panel=panel, metavar=metavar,
                     show_default=False),
    ]


def _flag(*names: str, help: str, panel: str, name: str) -> Any:
    return Annotated[
        bool | None,
        typer.Option(*names, help=help + _default(name), rich_help_panel=panel, show_default=False),
    ]


# The Typer declaration of every option, keyed by setting name. Values arrive as text (or bool
# for flags) and are parsed by settings.py, so flag, environment and config file share one parser.
DECLARATIONS: dict[str, Any] = {
    "model": _text("-m", "--model", name="model", panel=_GEN, metavar="MODEL",
                   help="Hub repo id (org/name), local directory, or alias: aria, aria-int4, aria-int8, demo."),
    "max_tokens": _text("-n", "--max-tokens", name="max_tokens", panel=_GEN, metavar="INT",
                        help="Most tokens to generate."),
    "temperature": _text("-t", "--temperature", name="temperature", panel=_GEN, metavar="FLOAT",
                         help="Sampling temperature; 0 = greedy."),
    "top_p": _text("--top-p", name="top_p", panel=_GEN, metavar="FLOAT", help="Nucleus sampling mass, in (0, 1]."),
    "top_k": _text("--top-k", name="top_k", panel=_GEN, metavar="INT", help="Sample from the k likeliest; 0 = off."),
    "seed": _text("--seed", name="seed", panel=_GEN, metavar="INT", shown="random",
                  help="Random seed, for repeatable sampling."),
    "stop": Annotated[
        list[str] | None,
        typer.Option("--stop", metavar="TEXT", rich_help_panel=_GEN, show_default=False,
                     help="Stop when this text is generated; repeatable." + _default("stop", "none")),
    ],
    "system": _text("-s", "--system", name="system", panel=_GEN, metavar="TEXT", shown="none",
                    help="System prompt."),
    "split_image": _flag("--split-image/--no-split-image", name="split_image", panel=_GEN,
                         help="Tile large images into 980px crops (more image tokens, more detail)."),
    "image_size": _text("--image-size", name="image_size", panel=_GEN, metavar="490|980",
                        help="Crop size images are resized to: 980 (256 tokens each) or 490 (128, faster)."),
    "device": _text("--device", name="device", panel=_RUN, metavar="auto|cpu|cuda[:N]", help="Where to run."),
    "dtype": _text("--dtype", name="dtype", panel=_RUN, metavar="auto|bfloat16|float16|float32",
                   help="Compute dtype."),
    "quant": _text("--quant", name="quant", panel=_RUN, metavar="none|int4|int8|nf4",
                   help="Quantize bf16 weights while loading."),
    "quant_lm_head": _flag("--quant-lm-head/--no-quant-lm-head", name="quant_lm_head", panel=_RUN,
                           help="Quantize the lm_head too (with --quant, or made by aria quantize --quant-lm-head)."),
    "gpu_memory": _text("--gpu-memory", name="gpu_memory", panel=_RUN, metavar="SIZE", shown="free memory",
                        help="GPU memory to use, e.g. 24GiB, 20GB, 16000MiB."),
    "cpu_moe": _flag("--cpu-moe/--no-cpu-moe", name="cpu_moe", panel=_RUN,
                     help="Keep all routed experts in CPU memory and compute them there."),
    "n_cpu_moe": _text("--n-cpu-moe", name="n_cpu_moe", panel=_RUN, metavar="N",
                       help="Keep the routed experts of the first N layers on the CPU."),
    "expert_slots": _text("--expert-slots", name="expert_slots", panel=_RUN, metavar="N", shown="as many as fit",
                          help="GPU expert slots per offloaded layer (a cache over its experts)."),
    "max_context": _text("--max-context", name="max_context", panel=_RUN, metavar="N",
                         help="Context length the KV cache holds, in tokens (at most the model's)."),
    "compile": _flag("--compile/--no-compile", name="compile", panel=_RUN,
                     help="Compile the decode step (slow first token, faster after; needs a C++ compiler on CPU)."),
    "host": _text("--host", name="host", panel=_SRV, metavar="ADDRESS",
                  help="Address to listen on; 0.0.0.0 or :: listens on every interface (set an --api-key then)."),
    "port": _text("--port", name="port", panel=_SRV, metavar="N", help="Port to listen on; 0 picks a free one."),
    "api_key": _text("--api-key", name="api_key", panel=_SRV, metavar="KEY", shown="none",
                     help="Require `Authorization: Bearer KEY` on every request."),
    "max_queue": _text("--max-queue", name="max_queue", panel=_SRV, metavar="N",
                       help="Requests that may wait while one is answered; more are refused with 429."),
    "offline": _flag("--offline/--online", name="offline", panel=_HUB,
                     help="Use only downloaded models; make no network call (also HF_HUB_OFFLINE=1 or "
                          "TRANSFORMERS_OFFLINE=1; --online overrides them)."),
    "verbose": _flag("-v", "--verbose", name="verbose", panel=_OUT, help="Show speed stats and details on stderr."),
    "debug": _flag("--debug", name="debug", panel=_OUT, help="Show tracebacks for errors."),
    "json": _flag("--json", name="json", panel=_OUT, help="Print one JSON object on stdout."),
    "quiet": _flag("-q", "--quiet", name="quiet", panel=_OUT, help="Print only the result and errors."),
}

O = TypeVar("O", bound=OutputOptions)


def resolve_options(cls: type[O], flags: dict[str, Any], flag_only: tuple[str, ...] = ()) -> O:
    """Build `cls` from flag values (None = not given) through the settings layers, and check it.
    `flag_only`: settings taken from the flag alone (else their default): the environment and
    config file set them for other commands."""
    file_values = load_settings_file()
    path = config_file()
    values = {
        f.name: resolve_setting(f.name, flags.get(f.name), env={} if f.name in flag_only else None,
                                file_values=None if f.name in flag_only else file_values, file_path=path)
        for f in dataclasses.fields(cls)
    }
    _check_combinations(values)
    return cls(**values)


def _check_combinations(v: dict[str, Any]) -> None:
    if v.get("quiet") and v.get("verbose"):
        raise UsageError("--quiet and --verbose contradict each other; use one")
    if v.get("cpu_moe") and v.get("n_cpu_moe"):
        raise UsageError("--cpu-moe already puts every layer's experts on the CPU; drop --n-cpu-moe")
    if v.get("cpu_moe") and v.get("expert_slots") is not None:
        raise UsageError("--cpu-moe computes every expert on the CPU, so there are no GPU slots; drop --expert-slots")
    if v.get("device") == "cpu" and v.get("gpu_memory") is not None:
        raise UsageError("--gpu-memory needs a GPU device; drop it or use --device cuda")


def _early_debug(flags: dict[str, Any]) -> bool:
    # Known before anything else can fail, so that a failure while resolving still honours --debug.
    try:
        return bool(resolve_setting("debug", flags.get("debug")))
    except UsageError:
        return False


F = TypeVar("F", bound=Callable[..., Any])


def _hidden(declaration: Any) -> Any:
    """The same option, left out of --help."""
    kind, info = typing.get_args(declaration)
    info = copy.copy(info)
    info.hidden = True
    return Annotated[kind, info]


def with_options(cls: type[OutputOptions], hidden: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Add the flags of option group `cls` to a Typer command; it receives them as `opts`.
    `hidden`: flags the command takes (to refuse them with a pointer) but does not list in --help;
    ARIA_* variables and the config file do not set them (they are for the commands that list them)."""
    # In help, panels follow the order of DECLARATIONS (generation, runtime, hub, output).
    fields = sorted((f.name for f in dataclasses.fields(cls)), key=list(DECLARATIONS).index)

    def decorate(func: F) -> F:
        signature = inspect.signature(func, eval_str=True)
        if "opts" not in signature.parameters:
            raise TypeError(f"{func.__name__} must take an `opts` parameter to use @with_options")
        own = [p for p in signature.parameters.values() if p.name != "opts"]
        added = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                              annotation=_hidden(DECLARATIONS[name]) if name in hidden else DECLARATIONS[name])
            for name in fields
        ]

        @functools.wraps(func)
        def command(*args: Any, **kwargs: Any) -> Any:
            flags = {name: kwargs.pop(name, None) for name in fields}
            mark_debug(_early_debug(flags))
            opts = resolve_options(cls, flags, flag_only=hidden)
            mark_debug(opts.debug)
            console.configure(quiet=opts.quiet, verbose=opts.verbose)
            return func(*args, opts=opts, **kwargs)

        command.__signature__ = signature.replace(parameters=own + added)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in own + added}
        return command  # type: ignore[return-value]

    return decorate
