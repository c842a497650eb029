"""Where clfbench keeps its files: the home folder and every folder under it, defined here and nowhere else.

    $CLFBENCH_HOME (default ~/.clfbench)
        clfbench.db                      the default store (SQLite)
        tasks/                           the user's task and dataset YAML files
        runs/<store key>/<run id>/       a run's log, checkpoints and caches (survives retries)
        logs/engine-<store key>.log      a detached engine's own output
        locks/engine-<store key>.lock    one engine per store per host (flock)
        cache/models/                    models converted, unpacked or built locally
        cache/features/                  LLMEmbed's pooled features

It lives in storage/ because every side needs it (the CLI, the TUI, the engine, the worker) and storage is the
package all of them may import. The store key separates two stores under one home.
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


def run_dir(url: str, run_id: int) -> Path:
    return home() / "runs" / store_key(url) / str(run_id)


def engine_log_path(url: str) -> Path:
    return home() / "logs" / f"engine-{store_key(url)}.log"


def engine_lock_path(url: str) -> Path:
    return home() / "locks" / f"engine-{store_key(url)}.lock"


def model_cache_dir() -> Path:
    """Models converted (GGUF), unpacked (zipped wheels) or built (tiny test models) once, then reused."""
    return home() / "cache" / "models"


def feature_cache_dir() -> Path:
    return home() / "cache" / "features"
