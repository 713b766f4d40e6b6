"""Open an Aria checkpoint directory in any layout and load it strictly into a model.

`open_checkpoint` reads the index (or the single file), maps every shard, detects the layout and
presents the weights under canonical names (see checkpoint_layouts) with shapes and dtypes known
before any data is read. `load_weights` fills a model built on the meta device: it refuses a
checkpoint whose names or shapes differ from the model's, then hands the model mmap views (no
copy) or, when a dtype/device change forces a copy, the copy while releasing the source pages,
so the weights are never resident twice.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint_layouts import ExpertSplit, Layout, detect_layout, get_layout
from .errors import CheckpointError
from .safetensors_io import INDEX_FILE, SINGLE_FILE, SafetensorsFile

_SHOW = 5  # names listed per kind of mismatch before "and N more"


@dataclass
class _Entry:
    """Where one canonical tensor comes from: one stored tensor, or per-expert parts to join."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    source: tuple[SafetensorsFile, str] | None = None
    split: ExpertSplit | None = None
    parts: list[dict[int, tuple[SafetensorsFile, str]]] = field(default_factory=list)  # [part][expert]

    def stored(self) -> list[tuple[SafetensorsFile, str]]:
        if self.source is not None:
            return [self.source]
        return [src for part in self.parts for _, src in sorted(part.items())]


class Checkpoint:
    """Weights of one checkpoint directory under canonical names; tensors are read lazily."""

    def __init__(self, directory: Path, layout: Layout, files: list[SafetensorsFile], entries: dict[str, _Entry]):
        self.directory = directory
        self.layout = layout.name
        self.files = [f.path for f in files]
        self._entries = entries

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype."""
        return self._entry(name).dtype

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: e.shape for n, e in self._entries.items()}

    @property
    def nbytes(self) -> int:
        """Bytes of all canonical tensors as stored."""
        return sum(math.prod(e.shape) * e.dtype.itemsize for e in self._entries.values())

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(f"{self.directory} has no weight '{name}'") from None

    def get(
        self,
        name: str,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        release_source: bool = False,
    ) -> torch.Tensor:
        """The tensor `name`, as `dtype` (floating-point tensors only; None = as stored) on `device`.

        On the CPU in the stored dtype this is a view of the mapped file (no copy, writable,
        private). Otherwise it is a new tensor; with `release_source` the pages it was read
        from are handed back to the kernel (do not keep earlier views of `name` then).
        """
        entry = self._entry(name)
        device = torch.device(device)
        if dtype is None or not entry.dtype.is_floating_point:
            dtype = entry.dtype
        if entry.source is not None:
            file, key = entry.source
            view = file.get(key)
            if dtype == entry.dtype and device.type == "cpu":
                return view
            result = view.to(device=device, dtype=dtype)
        else:
            per_part = [[file.get(key) for _, (file, key) in sorted(part.items())] for part in entry.parts]
            result = entry.split.join(per_part, dtype).to(device)
        if release_source:
            self.release(name)
        return result

    def release(self, name: str) -> None:
        """Drop the file pages behind `name` from memory (they are re-read if used again)."""
        for file, key in self._entry(name).stored():
            file.release(key)


def _weight_files(directory: Path) -> tuple[list[str], dict[str, str]]:
    """Shard file names and key -> shard file, from the single file or the index."""
    if (directory / SINGLE_FILE).is_file():
        return [SINGLE_FILE], {}
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        shards = sorted(p.name for p in directory.glob("model-*-of-*.safetensors"))
        if shards:
            raise CheckpointError(
                f"{directory} has shards like {shards[0]} but no {INDEX_FILE}; the download is incomplete, "
                "download the model again"
            )
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}; is this a model directory?")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{index_path} is corrupt (no valid weight_map); download the model again") from None
    return sorted(set(weight_map.values())), weight_map


def open_checkpoint(directory: str | Path) -> Checkpoint:
    """Map every shard of the checkpoint in `directory` and index its weights by canonical name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory; point at a downloaded model")
    shard_names, weight_map = _weight_files(directory)
    for name in shard_names:
        if Path(name).name != name:
            raise CheckpointError(f"{directory / INDEX_FILE} names a shard outside the directory ('{name}')")
    files = {name: SafetensorsFile(directory / name) for name in shard_names}
    if not weight_map:
        weight_map = {key: shard_names[0] for key in files[shard_names[0]].tensors}
    for key, shard in weight_map.items():
        if key not in files[shard].tensors:
            raise CheckpointError(
                f"{directory / shard} lacks '{key}' although the index lists it there; download the model again"
            )
    layout = get_layout(detect_layout(list(weight_map), source=str(directory)))
    return Checkpoint(directory, layout, list(files.values()), _index_entries(directory, layout, files, weight_map))


def _index_entries(
    directory: Path, layout: Layout, files: dict[str, SafetensorsFile], weight_map: dict[str, str]
) -> dict[str, _Entry]:
    entries: dict[str, _Entry] = {}

    def claim(name: str, key: str, per_expert: bool) -> _Entry:
        # Only per-expert parts may share a canonical name; anything else is a duplicate.
        if name in entries and not (per_expert and entries[name].split is not None):
            raise CheckpointError(f"{directory} stores '{name}' twice (second time as '{key}'); download it again")
        return entries.setdefault(name, _Entry((), torch.float32))

    for key in sorted(weight_map):
        file = files[weight_map[key]]
        info = file.tensors[key]
        part = layout.expert_part(key)
        if part is None:
            name = layout.to_canonical(key)
            if name is not None:
                entry = claim(name, key, per_expert=False)
                entry.shape, entry.dtype, entry.source = info.shape, info.dtype, (file, key)
            continue
        split, name, p, e = part
        entry = claim(name, key, per_expert=True)
        if entry.split is None:
            entry.split, entry.parts, entry.dtype = split, [{} for _ in split.parts], info.dtype
        if entry.split is not split or e in entry.parts[p] or len(info.shape) != 2 or info.dtype != entry.dtype:
            raise CheckpointError(f"{directory}: per-expert weight '{key}' clashes with the others of '{name}'")
        entry.parts[p][e] = (file, key)

    for name, entry in entries.items():
        if entry.split is not None:
            entry.shape = _joined_shape(directory, name, entry)
    return entries


def _joined_shape(directory: Path, name: str, entry: _Entry) -> tuple[int, ...]:
    """Shape of the grouped tensor [E, in, sum(out)], after checking every expert is there."""
    experts = max(max(part, default=-1) for part in entry.parts) + 1
    widths = []
    in_features = None
    for p, part in enumerate(entry.parts):
        missing = [e for e in range(experts) if e not in part]
        if missing:
            template = entry.split.parts[p].text
            raise CheckpointError(
                f"{directory} lacks {len(missing)} per-expert weights of '{name}', e.g. '{template}' "
                f"for expert {missing[0]}; download the model again"
            )
        shapes = {part[e][0].tensors[part[e][1]].shape for e in range(experts)}
        if len(shapes) != 1:
            raise CheckpointError(f"{directory}: the experts of '{name}' have different shapes {sorted(shapes)}")
        (out_features, inner), = shapes
        if in_features not in (None, inner):
            raise CheckpointError(f"{directory}: the parts of '{name}' disagree on input size")
        in_features = inner
        widths.append(out_features)
    return (experts, in_features, sum(widths))


def _mismatch_message(directory: Path, layout: str, missing: list[str], unexpected: list[str],
                      misshaped: list[str]) -> str:
    def some(kind: str, items: list[str]) -> str:
        shown = ", ".join(items[:_SHOW])
        more = f" and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
        return f"{len(items)} {kind} ({shown}{more})"

    kinds = [some(k, v) for k, v in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if v]
    return (
        f"checkpoint {directory} (layout {layout}) does not fit the model built from its config.json: "
        + "; ".join(kinds)
        + "; check that config.json belongs to these weights, or download the model again"
    )


def check_fits(ckpt: Checkpoint, expected: dict[str, tuple[int, ...]]) -> None:
    """Refuse (CheckpointError) unless the checkpoint has exactly the expected names and shapes."""
    missing = [n for n in expected if n not in ckpt]
    unexpected = [n for n in ckpt.names() if n not in expected]
    misshaped = [
        f"{n}: checkpoint {list(ckpt.shape(n))} vs model {list(shape)}"
        for n, shape in expected.items()
        if n in ckpt and tuple(ckpt.shape(n)) != tuple(shape)
    ]
    if missing or unexpected or misshaped:
        raise CheckpointError(_mismatch_message(ckpt.directory, ckpt.layout, missing, unexpected, misshaped))


def load_weights(
    model: torch.nn.Module,
    ckpt_dir: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> Checkpoint:
    """Give a meta-device `model` the weights in `ckpt_dir`, strictly, without a second copy.

    Floating-point weights become `dtype` (None = as stored). Non-persistent buffers are not in
    the state dict and stay as they are (the model rebuilds them). Returns the opened checkpoint.
    """
    ckpt = open_checkpoint(ckpt_dir)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    check_fits(ckpt, expected)
    state = {name: ckpt.get(name, dtype, device, release_source=True) for name in expected}
    model.load_state_dict(state, strict=True, assign=True)
    return ckpt
