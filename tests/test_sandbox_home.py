"""The test command stays in its sandbox: with HOME pointed at a temp folder, a run of the tests that resolve real
models (SmolLM2's GGUF conversion once wrote 517 MB into the user's ~/.clfbench) and drive the CLI, the engine and
a worker leaves that folder exactly as it was."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

# Tests that reach the places a home could be written: SmolLM2's resolution and the shared model cache, and a real
# run queued through the CLI, run under the engine, torchrun and the worker, with its results and errors read back.
# (The whole suite is checked too, for the user's own clfbench folders: conftest.pytest_sessionfinish.)
SUBSET = ["tests/test_models.py::test_smollm2_is_converted_once_and_cached",
          "tests/test_e2e.py::test_queue_run_results_errors[sqlite]"]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(path.relative_to(folder)): (path.lstat().st_size if path.is_file() else 0, path.lstat().st_mtime_ns)
            for path in folder.rglob("*")}


def test_the_tests_leave_a_temp_home_exactly_as_they_found_it(tmp_path):
    home = tmp_path / "home"
    # A home that already has a user's clfbench folders and caches in it: they must come out untouched, and nothing
    # may be added beside them.
    (home / ".clfbench").mkdir(parents=True)
    (home / ".clfbench" / "clfbench.db").write_bytes(b"the user's store")
    (home / ".cache" / "clfbench" / "models").mkdir(parents=True)
    (home / ".config").mkdir()
    before = snapshot(home)

    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("CLFBENCH_", "XDG_", "HF_", "TRANSFORMERS_"))}
    env["HOME"] = str(home)
    finished = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *SUBSET],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = "\n".join((finished.stdout + finished.stderr).splitlines()[-15:])
    assert finished.returncode == 0, f"the subset failed with HOME at a temp folder:\n{tail}"
    assert " passed" in tail, tail

    after = snapshot(home)
    added = sorted(after.keys() - before.keys())
    changed = sorted(path for path in before.keys() & after.keys() if before[path] != after[path])
    assert not added and not changed, (f"the tests wrote into $HOME: {len(added)} paths added, e.g. {added[:5]}; "
                                       f"{len(changed)} changed, e.g. {changed[:5]}")
