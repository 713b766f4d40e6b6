"""Safetensors files: a zero-copy mmap reader and a sharded, crash-safe writer.

Reading parses the header here (not with the `safetensors` package) so that every tensor is a
`torch.frombuffer` view into one copy-on-write mapping of the file: no bytes are copied when the
stored dtype is the wanted one, tensors are writable without touching the file, and the kernel
can drop clean pages under memory pressure. A file whose header or offsets do not add up raises
CheckpointError naming it, before any tensor is handed out.

Writing uses the `safetensors` package, one shard at a time, into temporary names that are
renamed only when everything is on disk; the index (or the single `model.safetensors`) appears
last, so an interrupted write never looks like a complete checkpoint.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_PARTIAL_SUFFIX = ".partial"
# A real header is a few MB at most (Aria's biggest shard has ~1,500 entries); a larger length
# field means the file is not safetensors at all, and we refuse before allocating it.
_MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file (offsets are absolute file offsets)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is truncated or corrupt ({why}); delete it and download the model again")


class SafetensorsFile:
    """One safetensors file mapped copy-on-write; `get` returns views, never copies.

    The mapping lives as long as any tensor handed out from it (each view holds a reference to
    the mmap object), so dropping this object early is safe.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise _corrupt(self.path, f"{size} bytes, too short for a header")
                header_len = int.from_bytes(f.read(8), "little")
                if header_len > min(_MAX_HEADER_BYTES, size - 8):
                    raise _corrupt(self.path, f"header length {header_len} does not fit in {size} bytes")
                header_bytes = f.read(header_len)
                # ACCESS_COPY = MAP_PRIVATE: views are writable and writes stay in this process.
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path} is missing; download the model again") from None
        except OSError as exc:
            raise CheckpointError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        self.tensors, self.metadata = self._parse_header(header_bytes, 8 + header_len, size)

    def _parse_header(
        self, raw: bytes, data_start: int, size: int
    ) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _corrupt(self.path, "header is not valid JSON") from None
        if not isinstance(header, dict):
            raise _corrupt(self.path, "header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise _corrupt(self.path, f"bad header entry for '{name}'") from None
            expected = math.prod(shape) * dtype.itemsize
            if min(shape, default=0) < 0 or begin < 0 or end - begin != expected:
                raise _corrupt(self.path, f"'{name}' has {end - begin} bytes for shape {list(shape)}")
            if data_start + end > size:
                raise _corrupt(self.path, f"'{name}' ends at byte {data_start + end} but the file has {size}")
            tensors[name] = TensorInfo(dtype, shape, data_start + begin, data_start + end)
        return tensors, metadata

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str) -> torch.Tensor:
        """A view of the stored bytes (no copy). Writes to it stay private to this process."""
        info = self.tensors[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        flat = torch.frombuffer(self._map, dtype=info.dtype, count=info.nbytes // info.dtype.itemsize,
                                offset=info.start)
        return flat.view(info.shape)

    def release(self, name: str) -> None:
        """Tell the kernel we are done with a tensor's pages (after copying it elsewhere).

        Without this, a load that converts dtype or moves to another device keeps every source
        page resident until the end and peaks at source + result. Only pages wholly inside the
        tensor are dropped; a view of it obtained earlier would lose private writes (re-reads the
        file), so call this only when no view is kept.
        """
        info = self.tensors[name]
        page = mmap.PAGESIZE
        start = -(-info.start // page) * page
        end = info.end // page * page
        if end > start and hasattr(self._map, "madvise"):
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)


# ----------------------------------------------------------------------------------------------
# Writing


def _is_weight_file(name: str) -> bool:
    return name in (SINGLE_FILE, INDEX_FILE) or bool(_SHARD_NAME.match(name))


class ShardedWriter:
    """Write tensors one by one into `model.safetensors` or `model-0000N-of-0000M.safetensors` + index.

    `add(name, tensor)` buffers tensors until the next one would push the shard past
    `max_shard_bytes` (None = one file), then writes that shard to a temporary name. `close()`
    writes the last shard, renames all shards to their final names (the count is known only
    then) and writes the index last. A tensor bigger than the cap gets a shard of its own.
    Only one shard's tensors are held at a time, so a converter can stream a model through.
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int | None = None, overwrite: bool = False):
        if max_shard_bytes is not None and max_shard_bytes <= 0:
            raise ValueError("max_shard_bytes must be positive")
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._stale = sorted(p.name for p in self.out_dir.iterdir() if _is_weight_file(p.name))
        if self._stale and not overwrite:
            raise CheckpointError(
                f"{self.out_dir} already contains weights ({self._stale[0]}); choose an empty directory"
            )
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._parts: list[tuple[Path, list[str]]] = []  # written temp shard -> its tensor names
        self._names: set[str] = set()
        self.total_size = 0
        self._closed = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._closed:
            raise RuntimeError("writer is closed")
        if name in self._names:
            raise ValueError(f"tensor '{name}' added twice")
        tensor = tensor.detach().to("cpu")
        # safetensors refuses tensors that share storage with another one (slices of a bigger
        # tensor, e.g. halves of fc1); give those their own compact storage. mmap views from
        # SafetensorsFile own their storage exactly and pass through without a copy.
        if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.contiguous().clone()
        size = tensor.nbytes
        if self.max_shard_bytes is not None and self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += size
        self._names.add(name)
        self.total_size += size

    def _flush(self) -> None:
        tmp = self.out_dir / f".shard-{len(self._parts) + 1:05d}.safetensors{_PARTIAL_SUFFIX}"
        save_file(self._pending, str(tmp), metadata={"format": "pt"})
        default_permissions(tmp)  # safetensors creates its files owner-only (0600)
        self._parts.append((tmp, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0

    def close(self) -> list[Path]:
        """Finish the checkpoint; returns the weight files written (index last)."""
        if self._closed:
            raise RuntimeError("writer is closed")
        self._closed = True
        if self._pending or not self._parts:
            self._flush()
        # The old index/single file go first, so that until we finish the directory never
        # looks like a complete checkpoint mixing old and new shards.
        for name in (INDEX_FILE, SINGLE_FILE):
            if name in self._stale:
                (self.out_dir / name).unlink(missing_ok=True)
        count = len(self._parts)
        if count == 1:
            final = self.out_dir / SINGLE_FILE
            os.replace(self._parts[0][0], final)
            written = [final]
        else:
            written, weight_map = [], {}
            for i, (tmp, names) in enumerate(self._parts, start=1):
                final = self.out_dir / f"model-{i:05d}-of-{count:05d}.safetensors"
                os.replace(tmp, final)
                written.append(final)
                weight_map.update({n: final.name for n in names})
        for name in self._stale:
            if name not in (INDEX_FILE, SINGLE_FILE) and self.out_dir / name not in written:
                (self.out_dir / name).unlink(missing_ok=True)
        if count > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            written.append(write_json_atomic(self.out_dir / INDEX_FILE, index))
        return written

    def abort(self) -> None:
        """Remove temporary shards after a failure; the directory keeps no partial checkpoint."""
        self._closed = True
        self._pending = {}
        for tmp, _ in self._parts:
            tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if not self._closed:
                self.close()
        else:
            self.abort()


def default_permissions(path: Path) -> None:
    """Give a file or directory made by a private-by-default API (safetensors' writer,
    tempfile.mkdtemp) the mode a plain open()/mkdir would have: 0666 / 0777 minus the umask."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_json_atomic(path: Path, obj: object) -> Path:
    tmp = path.with_name(path.name + _PARTIAL_SUFFIX)
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def save_sharded(
    tensors: Iterable[tuple[str, torch.Tensor]] | dict[str, torch.Tensor],
    out_dir: str | Path,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """One-shot form of ShardedWriter: write all `tensors` (a dict or (name, tensor) pairs)."""
    items: Iterator[tuple[str, torch.Tensor]] = iter(tensors.items() if isinstance(tensors, dict) else tensors)
    with ShardedWriter(out_dir, max_shard_bytes, overwrite=overwrite) as writer:
        for name, tensor in items:
            writer.add(name, tensor)
        return writer.close()
