"""Which model a name means, where its files are, and what is on this machine.

A model name (the `-m/--model` value, or the MODEL argument of download/rm) is one of:
- an alias: `aria` -> the Hub repo rhymes-ai/Aria; `aria-int4` / `aria-int8` (or any other
  folder name under `<data dir>/models/`) -> a locally quantized model there; `demo` -> the tiny
  demo model bundled with the package (DEMO_MODEL_DIR);
- a local directory holding a checkpoint;
- a Hub repo id `org/name`, looked up in the standard HF cache.

`resolve_model_dir` is the one entry point commands use to get a checkpoint directory. A Hub
model that is already completely downloaded is used without any network call; with --offline
(or HF_HUB_OFFLINE=1) nothing else is tried.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.demo_paths import DEMO_MODEL_DIR
from runtime.errors import ConfigError, ModelNotFoundError, UsageError

from .hub import hub_cache_dir, repo_folder
from .settings import data_dir
from .snapshot_check import snapshot_problems

HUB_ALIASES = {"aria": "rhymes-ai/Aria"}
QUANTIZED_ALIASES = ("aria-int4", "aria-int8")
DEMO_ALIAS = "demo"
# The demo checkpoint ships as package data of `runtime` (provided by the runtime side).

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_KNOWN = "aria, aria-int4, aria-int8, demo"


def local_models_dir() -> Path:
    """Where locally made models live (`aria quantize` writes aria-int4 / aria-int8 here by default)."""
    return data_dir() / "models"


def quantized_model_dir(scheme: str) -> Path:
    """The directory the `aria-<scheme>` alias points at, e.g. quantized_model_dir('int4')."""
    return local_models_dir() / f"aria-{scheme}"


@dataclass(frozen=True)
class ModelRef:
    """What a model name means. Exactly one of `repo_id` (Hub) and `path` (local) is set."""

    name: str
    kind: str  # "hub" | "local" (a directory the user named) | "managed" (under the data dir) | "demo"
    repo_id: str | None = None
    path: Path | None = None


def parse_model(name: str) -> ModelRef:
    """Interpret a model name without touching the network."""
    name = name.strip()
    if not name:
        raise UsageError("the model name is empty; give a Hub repo id, a directory, or one of: " + _KNOWN)
    if name == DEMO_ALIAS:
        return ModelRef(name, "demo", path=DEMO_MODEL_DIR)
    if name in QUANTIZED_ALIASES or ("/" not in name and (local_models_dir() / name).is_dir()):
        return ModelRef(name, "managed", path=local_models_dir() / name)
    if name in HUB_ALIASES:
        return ModelRef(name, "hub", repo_id=HUB_ALIASES[name])
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelRef(name, "local", path=path.resolve())
    if path.exists() and not _REPO_ID.match(name):  # "org/name" stays a Hub repo id even where such a file exists
        raise ModelNotFoundError(f"{name} is a file, not a model directory; give the directory that holds the "
                                 "model's config.json and weights")
    if name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1:
        raise ModelNotFoundError(f"no such directory: {name}")
    if _REPO_ID.match(name):
        return ModelRef(name, "hub", repo_id=name)
    raise ModelNotFoundError(
        f"unknown model '{name}'; give a Hub repo id (org/name), a directory, or one of: {_KNOWN}"
    )


def cached_snapshot(repo_id: str, revision: str = "main", cache_dir: Path | None = None) -> Path | None:
    """The cache's snapshot folder of `repo_id` at `revision` (a branch, tag or commit), if any."""
    folder = repo_folder(repo_id, cache_dir)
    ref = folder / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = folder / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def not_downloaded(name: str, problem: str | None = None) -> ModelNotFoundError:
    """The error for a Hub model that is not (completely) in the cache while offline."""
    if problem is None:
        return ModelNotFoundError(f"model {name} is not downloaded; run `aria download {name}` (or drop --offline)")
    return ModelNotFoundError(
        f"model {name} is only partly downloaded ({problem}); run `aria download {name}` (or drop --offline)"
    )


def resolve_model_dir(name: str, *, offline: bool, revision: str = "main") -> Path:
    """The checkpoint directory for `name`, downloading a missing Hub model unless offline."""
    ref = parse_model(name)
    if ref.kind == "demo":
        if not DEMO_MODEL_DIR.is_dir():
            raise ModelNotFoundError(f"the demo model is not installed with this copy of aria (expected {DEMO_MODEL_DIR})")
        return DEMO_MODEL_DIR
    if ref.kind == "managed":
        assert ref.path is not None
        if not ref.path.is_dir():
            scheme = name.removeprefix("aria-")
            raise ModelNotFoundError(
                f"{name} is not on this machine (looked in {ref.path}); make it with "
                f"`aria quantize aria --scheme {scheme}`"
            )
        return ref.path
    if ref.kind == "local":
        assert ref.path is not None
        return ref.path
    assert ref.repo_id is not None
    snapshot = cached_snapshot(ref.repo_id, revision)
    problems = snapshot_problems(snapshot) if snapshot is not None else ["not downloaded"]
    if not problems:
        return snapshot  # type: ignore[return-value]
    if offline:
        raise not_downloaded(name, None if snapshot is None else problems[0])
    from .download import download_model  # download imports this module

    return download_model(name, revision=revision).path


# ---------------------------------------------------------------------------------------------
# What is on this machine.


@dataclass(frozen=True)
class InstalledModel:
    name: str  # what to pass to -m / rm
    variant: str  # quantization scheme, else weight dtype
    size_bytes: int
    path: Path
    problem: str | None  # None when complete

    @property
    def complete(self) -> bool:
        return self.problem is None

    def to_json(self) -> dict:
        return {
            "name": self.name, "variant": self.variant, "size_bytes": self.size_bytes,
            "path": str(self.path), "complete": self.complete, "problem": self.problem,
        }


def _aria_variant(folder: Path) -> str | None:
    """'int4', 'bfloat16', ... for an Aria checkpoint folder; None when it is not an Aria model."""
    from runtime.config import load_config

    try:
        config = load_config(folder)
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (ConfigError, OSError, ValueError):
        return None
    if config.quantization:  # written by `aria quantize`
        return str(config.quantization["scheme"])
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
    return str(raw.get("torch_dtype") or raw.get("dtype") or text.get("torch_dtype") or "bfloat16")


def _dir_size(folder: Path) -> int:
    # Symlinks are not counted: in the HF cache they point at blobs already counted, and removing
    # a symlink frees nothing.
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _hub_models(cache_dir: Path) -> list[InstalledModel]:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return []
    found = []
    for repo in info.repos:
        if repo.repo_type != "model" or not repo.revisions:
            continue
        on_main = [r for r in repo.revisions if "main" in r.refs]
        revision = on_main[0] if on_main else max(repo.revisions, key=lambda r: r.last_modified)
        folder = Path(revision.snapshot_path)
        variant = _aria_variant(folder)
        if variant is None and (folder / "config.json").is_file():
            continue  # some other model in the shared HF cache
        problems = snapshot_problems(folder)
        found.append(InstalledModel(repo.repo_id, variant or "?", repo.size_on_disk, folder,
                                    problems[0] if problems else None))
    return found


def _local_models() -> list[InstalledModel]:
    found = []
    candidates = sorted(local_models_dir().iterdir()) if local_models_dir().is_dir() else []
    if DEMO_MODEL_DIR.is_dir():
        candidates.append(DEMO_MODEL_DIR)
    for folder in candidates:
        if not folder.is_dir():
            continue
        problems = snapshot_problems(folder)
        name = DEMO_ALIAS if folder == DEMO_MODEL_DIR else folder.name
        found.append(InstalledModel(name, _aria_variant(folder) or "?", _dir_size(folder), folder,
                                    problems[0] if problems else None))
    return found


def installed_models() -> list[InstalledModel]:
    """Aria models in the HF cache and in aria's data dir, sorted by name."""
    return sorted(_hub_models(hub_cache_dir()) + _local_models(), key=lambda m: m.name.lower())


@dataclass(frozen=True)
class Removal:
    """What `aria rm NAME` would delete."""

    name: str
    paths: tuple[Path, ...]  # the first one is the model; the rest is bookkeeping (locks)
    size_bytes: int
    # For a download: huggingface_hub's own deletion of its revisions. Since huggingface_hub 2,
    # a repo's blobs may be links into one store shared by the whole cache (Xet downloads), so
    # deleting the repo folder alone would leave the weights on disk; the library's deletion
    # also frees the shared blobs no other repo uses.
    hub_deletion: Any = None


def plan_removal(name: str) -> Removal:
    ref = parse_model(name)
    if ref.kind == "demo":
        raise UsageError("the demo model is part of the aria package and cannot be removed")
    if ref.kind == "local":
        inside = local_models_dir().resolve()
        if ref.path is None or inside not in ref.path.parents:
            raise UsageError(
                f"{name} is a directory aria did not create; aria rm only removes downloaded models "
                "and those in its data dir (delete it yourself if you mean to)"
            )
    if ref.kind in ("local", "managed"):
        assert ref.path is not None
        if not ref.path.is_dir():
            raise ModelNotFoundError(f"model {name} is not on this machine; nothing to remove (see `aria models`)")
        return Removal(name, (ref.path,), _dir_size(ref.path))
    assert ref.repo_id is not None
    folder = repo_folder(ref.repo_id)
    if not folder.is_dir():
        raise ModelNotFoundError(f"model {name} is not downloaded; nothing to remove (see `aria models`)")
    locks = hub_cache_dir() / ".locks" / folder.name
    deletion = _hub_deletion(ref.repo_id)
    if deletion is None:  # the cache scan cannot read this repo (e.g. a broken snapshot): the folder goes as it is
        return Removal(name, (folder, locks), _dir_size(folder))
    # Partial downloads are the repo's own files, not part of any revision.
    partials = sum(p.stat().st_size for p in (folder / "blobs").glob("*.incomplete"))
    return Removal(name, (folder, locks), deletion.expected_freed_size + partials, deletion)


def _hub_deletion(repo_id: str):
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(hub_cache_dir())
    except CacheNotFound:
        return None
    repo = next((r for r in info.repos if r.repo_id == repo_id and r.repo_type == "model"), None)
    if repo is None or not repo.revisions:
        return None
    return info.delete_revisions(*(revision.commit_hash for revision in repo.revisions))


def remove(removal: Removal) -> None:
    if removal.hub_deletion is not None:
        removal.hub_deletion.execute()
    for path in removal.paths:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
