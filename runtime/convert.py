"""`aria quantize`: stream a float checkpoint (any layout) into a self-describing quantized one.

Tensor by tensor from mmap: each target weight is packed and its source pages are released
before the next is read, so memory stays near one source tensor plus one output shard however
large the checkpoint. The output is written into a temporary directory beside the destination
and renamed at the end: an interrupted run leaves nothing that loads as a model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from quant import Scheme

from .checkpoint import open_checkpoint
from .checkpoint_writer import write_checkpoint
from .config import load_config
from .errors import AriaError, ConfigError, UsageError
from .quant_targets import (
    QUANTIZED_FAMILIES,
    first_unsupported,
    is_quantized,
    packed_name,
    to_stored_orientation,
)
from .quantized_model import QuantReport
from .safetensors_io import default_permissions
from .sizes import human_size
from .weight_bytes import tensor_bytes

# Files a model directory needs besides the weights; copied when present.
SIDE_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "preprocessor_config.json", "processor_config.json", "chat_template.json",
    "chat_template.jinja",
)
DEFAULT_SHARD_BYTES = 1024**3  # also the writer's buffer: part of the memory bound
_FREE_SPACE_MARGIN = 256 * 1024**2  # left free beyond the model: a full disk breaks more than this run


@dataclass
class ConvertResult:
    out_dir: Path
    report: QuantReport
    seconds: float
    source_bytes: int

    @property
    def mb_per_s(self) -> float:
        return self.source_bytes / 1e6 / max(self.seconds, 1e-9)


# progress(done_bytes, total_bytes, tensor_name)
Progress = Callable[[int, int, str], None]


def quantize_checkpoint(
    src: str | Path,
    out: str | Path,
    scheme: Scheme,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Progress | None = None,
    families: tuple[str, ...] = QUANTIZED_FAMILIES,
) -> ConvertResult:
    """Write a quantized copy of `src` to `out`: the weights of `families` (runtime.quant_targets)
    packed by `scheme`, the rest as stored."""
    src = Path(src)
    config = load_config(src)
    if config.quantization is not None:
        raise UsageError(f"{src} is already quantized ({config.quantization['scheme']}); quantize the original")
    out = Path(out).expanduser().resolve()
    if out == src.resolve() or out in src.resolve().parents:  # replacing it would delete the source
        raise UsageError("the output directory must differ from the source and not contain it; choose another -o")
    out = checked_output(out, force)
    ckpt = open_checkpoint(src)
    # Refuse before writing anything if some weight cannot be packed.
    problem = first_unsupported(scheme, ((name, ckpt.shape(name)) for name in ckpt.names()), families)
    if problem:
        raise UsageError(f"{problem}; choose another --scheme")
    _check_free_space(out, _output_bytes(ckpt, scheme, families), scheme)

    report = QuantReport()
    total, done = ckpt.nbytes, 0
    started = time.perf_counter()

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        nonlocal done
        for name in ckpt.names():
            tensor = ckpt.get(name)
            before = tensor.numel() * tensor.element_size()
            if is_quantized(name, families):
                packed = scheme.quantize(to_stored_orientation(name, tensor))
                ckpt.release(name)  # packed: the source pages are no longer needed
                report.add(name, before, sum(t.numel() * t.element_size() for t in packed.values()), True)
                for suffix, part in packed.items():
                    yield packed_name(name, suffix), part
            else:
                # A private copy lets the source pages go now; the writer frees the copy with its shard.
                kept = tensor.clone()
                ckpt.release(name)
                report.add(name, before, before, False)
                yield name, kept
            done += before
            if progress is not None:
                progress(done, total, name)

    quant_config = dataclasses.replace(
        config, quantization={**scheme.metadata(), "modules": list(families)}
    )
    with _write_errors(out, src), _partial_dir(out) as tmp:
        write_checkpoint(tmp, stream(), quant_config, layout="c1", max_shard_bytes=max_shard_bytes, overwrite=True)
        if report.unquantized_experts():  # cannot happen by construction; never ship it if it does
            raise AriaError("some routed experts were left unquantized; nothing was written")
        for side in SIDE_FILES:
            if (src / side).is_file():
                shutil.copy2(src / side, tmp / side)
        _replace_dir(tmp, out)
    return ConvertResult(out, report, time.perf_counter() - started, total)


def checked_output(out: str | Path, force: bool) -> Path:
    """`out` made absolute, once it is known that it can be written (and, if it exists, replaced
    with `force`); otherwise one line saying why and what to do. Creates nothing."""
    out = Path(out).expanduser().resolve()
    if out.exists():
        _check_replaceable(out)
        if not force:
            raise UsageError(f"{out} already exists; choose another -o or pass --force to replace it")
    _check_writable(out)
    return out


def _check_replaceable(out: Path) -> None:
    # Replacing is a rename of `out` then deleting the old one: only for an earlier model (or an
    # empty directory), never a folder of something else, and only one that can be renamed and
    # whose loss cannot pull the ground from under this process.
    if not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory; choose another -o (--force only replaces a directory)")
    if not _is_empty_or_model(out):
        raise UsageError(f"{out} exists and is not an Aria model directory; choose another -o "
                         "(--force only replaces a model directory)")
    if os.path.ismount(out):
        raise UsageError(f"{out} is a mount point and cannot be replaced; choose a new directory inside it "
                         f"(e.g. -o {out / 'NAME'})")
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise UsageError(f"{out} is the current directory or contains it and cannot be replaced; choose another -o")


def _is_empty_or_model(folder: Path) -> bool:
    try:
        if not any(folder.iterdir()):
            return True
        load_config(folder)
    except (ConfigError, OSError):
        return False
    return True


def _check_writable(out: Path) -> None:
    """The nearest existing folder above `out` must be a directory this process can create entries in."""
    base = _existing_ancestor(out.parent)
    if not base.is_dir():
        raise AriaError(f"cannot write {out}: {base} is not a directory; choose another -o")
    if not os.access(base, os.W_OK | os.X_OK):
        reason = "is on a read-only file system" if _read_only(base) else "is not writable (permission denied)"
        raise AriaError(f"cannot write {out}: {base} {reason}; choose another -o")


def _read_only(path: Path) -> bool:
    return hasattr(os, "statvfs") and bool(os.statvfs(path).f_flag & os.ST_RDONLY)  # no statvfs on Windows


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_free_space(out: Path, needed: int, scheme: Scheme) -> None:
    where = _existing_ancestor(out.parent)
    free = shutil.disk_usage(where).free
    if free < needed + _FREE_SPACE_MARGIN:
        raise AriaError(
            f"{where} has {human_size(free)} free but the {scheme.name} model needs "
            f"{human_size(needed)} plus {human_size(_FREE_SPACE_MARGIN)} of headroom; free some space or "
            "choose another -o"
        )


@contextlib.contextmanager
def _partial_dir(out: Path) -> Iterator[Path]:
    """A fresh temporary directory beside `out`, deleted if anything (even Ctrl-C) stops the block."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        default_permissions(tmp)  # mkdtemp makes it owner-only; a model directory is shared like any other
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _write_errors(out: Path, src: Path) -> Iterator[None]:
    """A failed write (read-only, full, gone...) -> one line naming the output and the reason; a
    failed read of the source (a side file it cannot open) names that file instead."""
    try:
        yield
    except (OSError, SafetensorError) as exc:
        error = _as_os_error(exc)
        if error is None:
            raise
        reason = error.strerror or str(error)
        reason = reason[:1].lower() + reason[1:]
        if error.filename is not None and Path(error.filename).resolve().is_relative_to(src.resolve()):
            raise AriaError(f"cannot read {error.filename}: {reason}; check the source model's files") from exc
        advice = "free some space or choose another -o" if error.errno in (errno.ENOSPC, errno.EDQUOT) else (
            "choose another -o")
        raise AriaError(f"cannot write {out}: {reason}; {advice}") from exc


def _as_os_error(exc: Exception) -> OSError | None:
    # safetensors' writer (Rust) reports an I/O failure as "... I/O error: <strerror> (os error N)".
    if isinstance(exc, OSError):
        return exc
    found = re.search(r"I/O error: (.+?)(?: \(os error (\d+)\))?$", str(exc))
    return OSError(int(found[2] or 0), found[1]) if found else None


def _output_bytes(ckpt, scheme: Scheme, families: tuple[str, ...]) -> int:
    return sum(tensor_bytes(name, ckpt.shape(name), scheme, ckpt.dtype(name), families) for name in ckpt.names())


def _replace_dir(new: Path, dest: Path) -> None:
    """Put `new` at `dest`; an existing `dest` (--force) is only deleted once `new` is in place."""
    if not dest.exists():
        new.rename(dest)
        return
    old = dest.with_name(f".{dest.name}.old-{int(time.time())}")
    dest.rename(old)
    try:
        new.rename(dest)
    except BaseException:
        old.rename(dest)  # the earlier model stays where it was
        raise
    shutil.rmtree(old, ignore_errors=True)
