"""The Hugging Face Hub side: cache location, endpoint, and errors in aria's words.

huggingface_hub reads HF_HOME / HF_HUB_CACHE / HF_ENDPOINT once, when it is imported; aria reads
them when a command runs and passes them explicitly, so the environment of the command is what
counts (and tests can point a command at a scratch cache and a local fake Hub). HF_TOKEN is left
to huggingface_hub, which sends it with every request.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from runtime.errors import AriaError, ModelNotFoundError

DEFAULT_ENDPOINT = "https://huggingface.co"


def hub_cache_dir() -> Path:
    """The HF cache as huggingface_hub finds it: $HF_HUB_CACHE, else the legacy
    $HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub; ~ and $VARs
    expanded. Read at each call, not at import as the library does, so tests can move it."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return _expanded(os.environ[variable])
    if os.environ.get("HF_HOME"):
        return _expanded(os.environ["HF_HOME"]) / "hub"
    xdg_cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return _expanded(xdg_cache) / "huggingface" / "hub"


def _expanded(path: str) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(path)))


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def repo_folder(repo_id: str, cache_dir: Path | None = None) -> Path:
    """The cache folder of a model repo (`models--org--name`), whether or not it exists."""
    return (cache_dir or hub_cache_dir()) / ("models--" + repo_id.replace("/", "--"))


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str = "main", *, lookup: bool = False) -> Iterator[None]:
    """Turn huggingface_hub and network failures into one-line AriaErrors that say what to do.

    `lookup`: the block only asks the Hub about the repo (nothing is being downloaded yet).
    Only the Hub call sits inside this block, so a bug in aria is never disguised as a network error.
    """
    from huggingface_hub import constants
    from huggingface_hub import errors as hf

    # Only a run aria decided is online gets here (--online and ARIA_OFFLINE win over
    # HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE), but huggingface_hub read those variables once, at
    # import, and would refuse every request: tell it what aria decided.
    constants.HF_HUB_OFFLINE = False
    try:
        yield
    except hf.GatedRepoError:
        raise AriaError(
            f"{repo_id} is gated: accept its terms on {hub_endpoint()}/{repo_id} and set HF_TOKEN"
        ) from None
    except hf.RevisionNotFoundError:
        raise ModelNotFoundError(f"{repo_id} has no revision '{revision}'; check --revision") from None
    except hf.RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"no model {repo_id} on {hub_endpoint()} (if it is private, set HF_TOKEN); check the name"
        ) from None
    except hf.HfHubHTTPError as exc:
        status = exc.response.status_code if getattr(exc, "response", None) is not None else "?"
        if status == 401:
            raise AriaError(f"the Hub refused HF_TOKEN for {repo_id} (HTTP 401); set a valid HF_TOKEN") from None
        raise AriaError(
            f"the Hub failed while fetching {repo_id} (HTTP {status}); try again later; "
            "completed files are kept"
        ) from exc
    except (AriaError, KeyboardInterrupt):
        raise
    except Exception as exc:  # connection refused, reset, timeout, truncated transfer, disk full ...
        if _local_failure(exc):
            raise _cache_error(exc, repo_id) from exc
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if lookup:
            raise AriaError(
                f"cannot reach {hub_endpoint()} to look up {repo_id} ({type(exc).__name__}: {reason}); "
                "check your connection, or use --offline for models already downloaded"
            ) from exc
        raise AriaError(
            f"download of {repo_id} did not finish ({type(exc).__name__}: {reason}); "
            f"run `aria download {repo_id}` again to resume; completed files are kept"
        ) from exc


# OS errors that are about this machine's disk, never the network's.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR}


def _local_failure(exc: BaseException) -> bool:
    """Whether the failure is the local disk or cache directory (HF_HOME is a file, the disk is full or
    read-only), which a working connection would not fix. Such an OSError names its file or has a
    disk errno; network errors (refused, reset, timeout, name lookup) have neither."""
    return (isinstance(exc, OSError) and not isinstance(exc, (ConnectionError, TimeoutError))
            and (exc.filename is not None or exc.errno in _DISK_ERRNOS))


def _cache_error(exc: OSError, repo_id: str) -> AriaError:
    where = str(exc.filename) if exc.filename is not None else str(hub_cache_dir())
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return AriaError(f"no space left for {repo_id} in {where}; free some space, or set HF_HOME to a directory "
                         "on a disk with room (completed files are kept)")
    return AriaError(f"cannot use the Hugging Face cache: {exc.strerror or exc} ({where}); set HF_HOME (or "
                     "HF_HUB_CACHE) to a directory you can write to")
