"""`aria download`: a Hub model into the standard HF cache, only the files aria reads.

Files fetched (top level of the repo): every *.json (config.json, generation_config.json, the
safetensors index, tokenizer_config.json, special_tokens_map.json, added_tokens.json,
preprocessor/processor configs, chat_template.json), *.jinja chat templates, *.safetensors, and
tokenizer.model. Skipped: *.bin / *.pt / *.pth pickles and their pytorch_model*.json indexes,
remote *.py code, READMEs and images. tokenizer.json (the 11 MB fast-tokenizer file) is skipped
when tokenizer.model exists, because aria tokenizes with SentencePiece from tokenizer.model; a
repo without tokenizer.model gets tokenizer.json instead.

The repo listing (one Hub call) gives every file's size: it decides what to fetch, drives the byte
progress, and is what completeness is checked against. huggingface_hub does the transfer: it
writes each file to a temporary name and renames it when whole, so a file already in the cache is
never fetched again, and an interrupted run leaves only whole files behind. "Done" is said only
after snapshot_check confirms every listed file and every indexed shard is present and whole.
"""

from __future__ import annotations

import contextlib
import glob
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from runtime.errors import CheckpointError, UsageError

from . import console
from .errors import STOPPED
from .hub import hub_cache_dir, hub_endpoint, hub_errors, repo_folder
from .models import cached_snapshot, not_downloaded, parse_model
from .settings import format_size
from .snapshot_check import indexed_shards, snapshot_problems

T = TypeVar("T")

_WANTED_NAMES = {"tokenizer.model"}
_WANTED_SUFFIXES = (".json", ".jinja", ".safetensors")


def select_files(listing: Mapping[str, int | None]) -> dict[str, int | None]:
    """The files of a repo listing (name -> size) that aria downloads."""
    chosen = {
        name: size
        for name, size in listing.items()
        if "/" not in name
        and (name in _WANTED_NAMES or name.endswith(_WANTED_SUFFIXES))
        and not name.startswith("pytorch_model")
    }
    if "tokenizer.model" in chosen:
        chosen.pop("tokenizer.json", None)
    return chosen


@dataclass(frozen=True)
class DownloadResult:
    name: str
    repo_id: str
    revision: str
    commit: str
    path: Path
    files: tuple[str, ...]
    size_bytes: int

    def to_json(self) -> dict:
        return {
            "model": self.name, "repo_id": self.repo_id, "revision": self.revision, "commit": self.commit,
            "path": str(self.path), "files": list(self.files), "size_bytes": self.size_bytes, "complete": True,
        }


def download_model(name: str, *, revision: str = "main", offline: bool = False, max_workers: int = 8) -> DownloadResult:
    """Download (or, offline, check) a Hub model; returns only when the snapshot is complete."""
    ref = parse_model(name)
    if ref.kind != "hub":
        what = {"demo": "is bundled with aria", "managed": "is made locally by `aria quantize`",
                "local": "is a local directory"}[ref.kind]
        raise UsageError(f"{name} {what}; there is nothing to download")
    assert ref.repo_id is not None
    if offline:
        return _check_offline(name, ref.repo_id, revision)
    return _download(name, ref.repo_id, revision, max_workers)


def _check_offline(name: str, repo_id: str, revision: str) -> DownloadResult:
    snapshot = cached_snapshot(repo_id, revision)
    if snapshot is None:
        raise not_downloaded(name)
    problems = snapshot_problems(snapshot)
    if problems:
        raise not_downloaded(name, problems[0])
    files = sorted(p.name for p in snapshot.iterdir() if p.is_file())
    size = sum((snapshot / f).stat().st_size for f in files)
    return DownloadResult(name, repo_id, revision, snapshot.name, snapshot, tuple(files), size)


def _listing(repo_id: str, revision: str) -> tuple[str, dict[str, int | None]]:
    """(commit, chosen files with sizes) of the repo at `revision`: the one Hub call before downloading."""
    from huggingface_hub import HfApi

    with hub_errors(repo_id, revision, lookup=True):
        info = HfApi(endpoint=hub_endpoint()).model_info(repo_id, revision=revision, files_metadata=True)
    chosen = select_files({s.rfilename: s.size for s in info.siblings or []})
    if "config.json" not in chosen:
        raise CheckpointError(f"{repo_id} has no config.json; it is not a model aria can run")
    if not any(n.endswith(".safetensors") for n in chosen):
        raise CheckpointError(f"{repo_id} has no .safetensors weights (aria does not load .bin/.pt pickles)")
    return str(info.sha), chosen


def _download(name: str, repo_id: str, revision: str, max_workers: int) -> DownloadResult:
    from huggingface_hub import snapshot_download

    commit, chosen = _listing(repo_id, revision)
    cache = hub_cache_dir()
    total = sum(size or 0 for size in chosen.values())
    console.info(f"downloading {repo_id} ({len(chosen)} files, {format_size(total)}) into {cache}")
    progress = _ByteProgress(repo_folder(repo_id, cache), commit, chosen)

    def fetch() -> str:
        return snapshot_download(
            repo_id, revision=revision, cache_dir=cache, endpoint=hub_endpoint(),
            allow_patterns=[glob.escape(n) for n in chosen], max_workers=max_workers,
        )

    _sweep_orphaned_partials(repo_folder(repo_id, cache), cache)
    with _library_quiet(), progress, hub_errors(repo_id, revision):
        try:
            path = Path(_wait_for(fetch, tick=progress.refresh))
        except STOPPED:
            console.info(f"completed files are kept; run `aria download {name}` again to resume")
            raise
    if path.name != commit:  # the repo moved on between the listing and the download
        commit, chosen = _listing(repo_id, path.name)
    not_on_hub = sorted(indexed_shards(path) - set(chosen))
    if not_on_hub:  # running again cannot help: the commit itself lacks the file
        raise CheckpointError(
            f"{repo_id} is broken on the Hub at commit {commit[:10]}: its index names {not_on_hub[0]} but the "
            "repo does not contain it; try another --revision or wait for the repo to be fixed"
        )
    problems = snapshot_problems(path, chosen)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise CheckpointError(
            f"download of {repo_id} is incomplete: {problems[0]}{more}; run `aria download {name}` again"
        )
    return DownloadResult(name, repo_id, revision, commit, path, tuple(sorted(chosen)), total)


def _sweep_orphaned_partials(storage: Path, cache: Path) -> None:
    """Delete partial files that no running download owns (left by an interrupted or killed run).

    huggingface_hub holds `.locks/<repo folder>/<etag>.lock` while it writes
    `blobs/<etag>.<attempt>.incomplete`, and never resumes such a per-attempt file: one whose lock
    is free is litter. (`<etag>.incomplete`, which older huggingface_hub versions resume, is kept.)
    """
    from filelock import FileLock, Timeout

    for partial in (storage / "blobs").glob("*.*.incomplete"):
        etag = partial.name.split(".", 1)[0]
        try:
            with FileLock(str(cache / ".locks" / storage.name / f"{etag}.lock"), timeout=0):
                partial.unlink(missing_ok=True)
        except (Timeout, OSError):
            continue  # a download in another process is writing it


def _wait_for(work: Callable[[], T], tick: Callable[[], None]) -> T:
    """Run `work` in a helper thread while this one ticks the progress and stays responsive.

    snapshot_download waits for its thread pool in a way Ctrl-C cannot interrupt until every file
    in flight is done; waiting here instead lets Ctrl-C through at once (AriaTyper then exits
    without waiting for the pool).
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread, which raises it
            outcome["error"] = exc

    worker = threading.Thread(target=run, name="aria-download", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.25)
        tick()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@contextlib.contextmanager
def _library_quiet() -> Iterator[None]:
    """Silence huggingface_hub's own bars and retry chatter (aria draws one byte bar), unless --verbose."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from huggingface_hub.utils import logging as hf_logging

    bars_were_off = are_progress_bars_disabled()
    level = hf_logging.get_verbosity()
    disable_progress_bars()
    if not console.is_verbose():
        hf_logging.set_verbosity_error()
    interrupted = False
    try:
        yield
    except STOPPED:
        interrupted = True  # the thread pool is still winding down: keep it quiet until exit
        raise
    finally:
        if not interrupted:
            hf_logging.set_verbosity(level)
            if not bars_were_off:
                enable_progress_bars()


class _ByteProgress:
    """A byte progress bar on stderr, fed by watching the cache rather than the library's internals.

    Bytes done = listed files already in the snapshot + partial `blobs/*.incomplete` files.
    Drawn only on a terminal and without --quiet; otherwise the start/finish lines say enough.
    """

    def __init__(self, storage: Path, commit: str, files: Mapping[str, int | None]):
        self._storage = storage
        self._snapshot = storage / "snapshots" / commit
        self._files = files
        self._total = sum(size or 0 for size in files.values())
        self._bar: Any = None
        self._task: Any = None

    def bytes_done(self) -> int:
        done = 0
        partials = (self._storage / "blobs").glob("*.incomplete")
        for path in [*(self._snapshot / name for name in self._files), *partials]:
            with contextlib.suppress(OSError):  # renamed into place while we looked
                done += path.stat().st_size
        return min(done, self._total)

    def refresh(self) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self.bytes_done())

    def __enter__(self) -> None:
        self._bar = console.byte_progress("downloading")
        if self._bar is not None:
            self._task = self._bar.add_task("download", total=self._total, completed=self.bytes_done())

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
