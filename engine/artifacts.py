"""Checkpoints in a place every host reaches, so that a run requeued on another host resumes where it stopped.

`CLFBENCH_ARTIFACTS` names the place:
- a folder (a shared mount, NFS or the like): run folders live there instead of under the home
  (`storage.paths.run_dir`), checkpoints included; nothing to copy;
- an fsspec URL (`s3://bucket/clfbench`, `gs://...`, `file:///...`; the backend is the user's install, e.g. s3fs):
  the run folder stays on the host's disk and each checkpoint is mirrored to `<URL>/runs/<store id>/<run id>/`
  after it is saved (`mirror_checkpoint`, rank 0), and fetched from there before an attempt starts on a host that
  does not have it (`fetch_checkpoint`, once per host).

An object store has no rename, so a mirrored checkpoint is never overwritten in place: each save goes to a new
`checkpoint-<step>` prefix, then the small `LATEST` object is written to name it (a single object is written
whole), then older prefixes are deleted. A reader follows `LATEST`, so it finds a whole checkpoint or none.
No torch here: plain files.
"""
from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from clfbench.engine.types import ClfbenchError

URL_ENV = "CLFBENCH_ARTIFACT_URL"  # set by the engine for one run: <CLFBENCH_ARTIFACTS URL>/runs/<store>/<run>
LATEST = "LATEST"
CHECKPOINT_DIR = "checkpoint"  # as engine.training.CHECKPOINT_DIR (not imported: that module imports torch)


def run_url() -> str | None:
    return os.environ.get(URL_ENV) or None


def _filesystem(url: str):
    try:
        import fsspec
    except ImportError:
        raise ClfbenchError("CLFBENCH_ARTIFACTS is a URL but fsspec is not installed (pip install fsspec)") from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as error:  # an unknown protocol, or its backend (s3fs, gcsfs) is missing
        raise ClfbenchError(f"CLFBENCH_ARTIFACTS {url}: {error}") from None


def mirror_checkpoint(folder: Path, step: int, log_prefix: str = "") -> None:
    """Copy the checkpoint just saved in `folder` to this run's artifact URL (when it has one), as described above."""
    url = run_url()
    if url is None:
        return
    fs, root = _filesystem(url)
    name = f"{CHECKPOINT_DIR}-{step:09d}"
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            target = f"{root}/{name}/{path.relative_to(folder).as_posix()}"
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(path), target)
    fs.pipe_file(f"{root}/{LATEST}", name.encode())
    for old in fs.ls(root, detail=False):
        if old.rstrip("/").rsplit("/", 1)[-1].startswith(f"{CHECKPOINT_DIR}-") and not old.rstrip("/").endswith(name):
            fs.rm(old, recursive=True)
    if log_prefix:
        print(f"{log_prefix} checkpoint at step {step} mirrored to {url}/{name}", flush=True)


def delete_mirror(url: str) -> None:
    """Delete everything mirrored under a run's artifact URL (`clfbench rm`): a later run given the same id (SQLite
    reuses ids) must not fetch the deleted run's checkpoint. Nothing there is no error."""
    fs, root = _filesystem(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)


def fetch_checkpoint(output_dir: Path, log_prefix: str = "") -> bool:
    """Before an attempt: when this host has no checkpoint of the run and its artifact URL names one, download it
    into `output_dir/checkpoint`. Every local rank calls it; a lock file makes the first do it and the others wait
    and find it there. Returns whether one was downloaded."""
    url = run_url()
    output_dir = Path(output_dir)
    if url is None:
        return False
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / ".fetch.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for unfinished in output_dir.glob(f".{CHECKPOINT_DIR}.fetch-*"):  # a fetch killed midway
            shutil.rmtree(unfinished, ignore_errors=True)
        if (output_dir / CHECKPOINT_DIR).exists():
            return False
        fs, root = _filesystem(url)
        if not fs.exists(f"{root}/{LATEST}"):
            return False
        name = fs.cat_file(f"{root}/{LATEST}").decode().strip()
        tmp = output_dir / f".{CHECKPOINT_DIR}.fetch-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        source = f"{root}/{name}"
        for remote in fs.find(source):
            local = tmp / remote[len(source):].lstrip("/")
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(local))
        os.rename(tmp, output_dir / CHECKPOINT_DIR)  # whole or not at all
    if log_prefix:
        print(f"{log_prefix} fetched checkpoint {name} from {url}", flush=True)
    return True
