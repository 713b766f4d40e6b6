"""Is a downloaded model complete? Checked before `aria download` says "done", and before a
model found offline is used.

A snapshot is complete when every file the Hub listed is present with the listed size (when
the listing is known), config.json is a JSON object, a tokenizer is there, and the weights are whole: every shard the
safetensors index names exists, its header parses and covers the file exactly (safetensors
checks that a truncated or padded file does not), and it holds every tensor the index assigns to it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

INDEX_SUFFIX = ".safetensors.index.json"


def snapshot_problems(folder: Path, expected_sizes: Mapping[str, int | None] | None = None) -> list[str]:
    """What is missing or broken in `folder`, one short phrase each; empty when it is complete."""
    problems: list[str] = []
    for name, size in sorted((expected_sizes or {}).items()):
        file = folder / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif size is not None and file.stat().st_size != size:
            problems.append(f"{name} has {file.stat().st_size} of {size} bytes")
    problems += _config_problems(folder)
    if not (folder / "tokenizer.model").is_file() and not (folder / "tokenizer.json").is_file():
        problems.append("tokenizer.model is missing")
    problems += _weight_problems(folder)
    # A file missing from the listing is also reported by the weight check: say it once.
    return list(dict.fromkeys(problems))


def _config_problems(folder: Path) -> list[str]:
    file = folder / "config.json"
    if not file.is_file():
        return ["config.json is missing"]
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return ["config.json is not valid JSON"]
    return [] if isinstance(raw, dict) else ["config.json is not a JSON object"]


def _weight_map(index: Path) -> dict[str, str] | None:
    """tensor name -> shard file of a safetensors index, or None when it is not one."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return None
    return {str(k): str(v) for k, v in weight_map.items()} if isinstance(weight_map, dict) else None


def indexed_shards(folder: Path) -> set[str]:
    """Every shard file the safetensors index(es) in `folder` name."""
    return {
        shard
        for index in folder.glob("*" + INDEX_SUFFIX)
        for shard in (_weight_map(index) or {}).values()
    }


def _weight_problems(folder: Path) -> list[str]:
    indexes = sorted(folder.glob("*" + INDEX_SUFFIX))
    if not indexes:
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
        if not shards:
            return ["no .safetensors weights"]
        return [p for name in shards for p in _shard_problems(folder / name, wanted=())]
    problems: list[str] = []
    for index in indexes:
        weight_map = _weight_map(index)
        if weight_map is None:
            problems.append(f"{index.name} is not a safetensors index")
            continue
        by_shard: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(key)
        for shard, keys in sorted(by_shard.items()):
            file = folder / shard
            if not file.is_file():
                problems.append(f"{shard} is missing (named in {index.name})")
            else:
                problems += _shard_problems(file, wanted=keys)
    return problems


def _shard_problems(file: Path, wanted: list[str] | tuple[str, ...]) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="numpy") as handle:
            present = set(handle.keys())
    except (SafetensorError, OSError):
        return [f"{file.name} is truncated or corrupt"]
    absent = [key for key in wanted if key not in present]
    if absent:
        return [f"{file.name} lacks {len(absent)} tensor(s) the index names, e.g. {absent[0]}"]
    return []
