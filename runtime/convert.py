"""`aria quantize`: stream a float checkpoint (any layout) into a self-describing quantized one.

Tensor by tensor from mmap: each target weight is packed and its source pages are released
before the next is read, so memory stays near one source tensor plus one output shard however
large the checkpoint. The output is written into a temporary directory beside the destination
and renamed at the end: an interrupted run leaves nothing that loads as a model.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from quant import Scheme

from .checkpoint import open_checkpoint
from .checkpoint_writer import write_checkpoint
from .config import load_config
from .errors import AriaError, UsageError
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
_FREE_SPACE_MARGIN = 256 * 1024**2


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
    src, out = Path(src), Path(out)
    config = load_config(src)
    if config.quantization is not None:
        raise UsageError(f"{src} is already quantized ({config.quantization['scheme']}); quantize the original")
    if out.resolve() == src.resolve():
        raise UsageError("the output directory must differ from the source; choose another -o")
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; choose another -o or pass --force to replace it")
    ckpt = open_checkpoint(src)
    # Refuse before writing anything if some weight cannot be packed.
    problem = first_unsupported(scheme, ((name, ckpt.shape(name)) for name in ckpt.names()), families)
    if problem:
        raise UsageError(f"{problem}; choose another --scheme")
    needed = _output_bytes(ckpt, scheme, families)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < needed + _FREE_SPACE_MARGIN:
        raise AriaError(
            f"{out.parent} has {human_size(free)} free but the {scheme.name} model needs "
            f"{human_size(needed)}; free some space or choose another -o"
        )

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
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    default_permissions(tmp)  # mkdtemp makes it owner-only; a model directory is shared like any other
    try:
        write_checkpoint(tmp, stream(), quant_config, layout="c1", max_shard_bytes=max_shard_bytes, overwrite=True)
        if report.unquantized_experts():  # cannot happen by construction; never ship it if it does
            raise AriaError("some routed experts were left unquantized; nothing was written")
        for side in SIDE_FILES:
            if (src / side).is_file():
                shutil.copy2(src / side, tmp / side)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConvertResult(out, report, time.perf_counter() - started, total)


def _output_bytes(ckpt, scheme: Scheme, families: tuple[str, ...]) -> int:
    return sum(tensor_bytes(name, ckpt.shape(name), scheme, ckpt.dtype(name), families) for name in ckpt.names())


def _replace_dir(new: Path, dest: Path) -> None:
    """Put `new` at `dest`; an existing `dest` (--force) is only deleted once `new` is in place."""
    if not dest.exists():
        new.rename(dest)
        return
    old = dest.with_name(f".{dest.name}.old-{int(time.time())}")
    dest.rename(old)
    new.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
