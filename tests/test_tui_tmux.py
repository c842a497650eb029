"""`clfbench tui` in a real terminal (a detached tmux session): queue a run with the keyboard and watch it
finish, with the engine the TUI started itself; cancel asks first; a real run's phase shows in the list while it
evaluates. What is asserted is what the pane shows a user.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import ROOT, SAMPLES

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")


class Pane:
    def __init__(self, name: str) -> None:
        self.name = name

    def keys(self, *keys: str) -> None:
        for key in keys:  # one at a time: tmux would read "Escape" + a key sent together as alt+key
            subprocess.run(["tmux", "send-keys", "-t", self.name, key], check=True)
            time.sleep(0.15)

    def type(self, text: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, "-l", text], check=True)
        time.sleep(0.3)

    def text(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True, text=True,
                              check=True).stdout

    def wait_for(self, pattern: str, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.text()
            if re.search(pattern, screen, re.MULTILINE):
                return screen
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}; the pane shows:\n{self.text()}")


def tui_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a TUI (and of the CLI beside it) on the private home: the sample data, the shared model
    cache (tiny models build once), this checkout on the path."""
    home.mkdir(parents=True, exist_ok=True)
    return {"CLFBENCH_HOME": str(home), "CLFBENCH_DATA": str(SAMPLES), "PYTHONPATH": str(ROOT),
            "CLFBENCH_MODEL_CACHE": str(ROOT / ".pytest_cache" / "clfbench-models"), "TERM": "xterm-256color",
            **extra}


@contextmanager
def tui_session(env: dict[str, str], arguments: str, size: tuple[int, int]) -> Iterator[Pane]:
    """`clfbench <arguments>` in a detached tmux session of `size` columns × rows; killed on the way out. The pane
    stays 5 s after the TUI exits, so a test can see that it quit."""
    exports = " ".join(f"{key}={value}" for key, value in env.items())
    name = f"clfbench-tui-{uuid.uuid4().hex[:8]}"
    command = f"cd {ROOT} && env {exports} {sys.executable} -m clfbench.app.cli {arguments}; sleep 5"
    subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", str(size[0]), "-y", str(size[1]), command],
                   check=True)
    try:
        yield Pane(name)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)


def stop_engines(home: Path, url: str) -> None:
    """Stop the engine a TUI started (it outlives the TUI by design)."""
    from clfbench.engine.daemon import stop_engine

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CLFBENCH_HOME", str(home))
        stop_engine(url)


def test_queue_a_run_in_the_tui_and_see_it_succeed(home):
    from clfbench.engine.daemon import engine_lock_holder

    url = f"sqlite:///{home / 'clfbench.db'}"
    try:
        with tui_session(tui_env(home), "tui", (100, 30)) as pane:
            pane.wait_for(r"engine ● running", 60, "the engine the TUI starts")
            assert engine_lock_holder(url)
            pane.keys("n")
            pane.wait_for(r"new run", 20, "the new-run form")
            time.sleep(1)  # the form takes the keyboard once mounted (slow on a loaded machine)
            pane.type("tiny-bert")  # the model field has the focus; the next field is the task
            pane.wait_for(r"model\s+tiny-bert", 10, "the model typed in")
            pane.keys("Tab")
            time.sleep(0.5)
            pane.type("massive-intent")
            pane.wait_for(r"task\(s\)\s+massive-intent", 10, "the task typed in")
            pane.wait_for(r"1 run will be queued", 10, "the run count")
            pane.keys("C-s")
            pane.wait_for(r"^\s*1\s+(queued|running)", 60, "run 1 in the runs list")
            pane.wait_for(r"^\s*1\s+succeeded", 600, "run 1 to succeed")
            # The row's cells are rewritten one by one, so a capture can fall between two of them: wait for the
            # whole row rather than asserting on the first capture that shows the status. The run column (model ·
            # method · task) can be cut at the pane's edge, so the task is not required whole.
            whole_row = r"^\s*1\s+succeeded\b.*tiny-bert · encoder-finetune · mass"
            screen = pane.wait_for(whole_row, 30, "run 1's whole row")
            assert re.search(whole_row, screen, re.MULTILINE)
            pane.keys("S")
            pane.wait_for(r"engine ○ stopped", 60, "the engine to stop")
            assert not engine_lock_holder(url)
            pane.keys("q")
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and "clfbench · runs" in pane.text():
                time.sleep(0.3)
            assert "clfbench · runs" not in pane.text()  # q quit the TUI
    finally:
        stop_engines(home, url)
    assert os.path.exists(home / "clfbench.db")


def test_cancel_asks_first_and_n_or_N_keeps_the_run(home, tmp_path):
    """On the seeded store, without an engine: c on a queued run asks; n keeps it queued, so does N (shift held
    by mistake), y cancels it."""
    from tests.tui_seed import seed_store

    home.mkdir(parents=True, exist_ok=True)
    url = seed_store(home / "clfbench.db")
    with tui_session(tui_env(home), f"--db {url} tui --no-engine", (80, 24)) as pane:
        pane.wait_for(r"^\s*28\s+interrupted", 60, "the seeded runs")
        pane.keys("/")
        pane.type("status:queued")
        pane.keys("Enter")
        pane.wait_for(r"2 of 28 runs", 10, "the two queued runs")  # 25 then 24; the cursor is on 25
        for keep in ("n", "N"):
            pane.keys("c")
            pane.wait_for(r"Cancel run 25", 10, "the question")
            pane.keys(keep)
            screen = pane.wait_for(r"2 of 28 runs", 10, "the list again")
            assert "Cancel run 25" not in screen and re.search(r"^\s*25\s+queued", screen, re.MULTILINE), keep
        pane.keys("c")
        pane.wait_for(r"Cancel run 25", 10, "the question again")
        pane.keys("y")
        pane.wait_for(r"run 25: cancelled", 20, "the run cancelled")


def test_the_run_list_shows_a_real_runs_phase_while_it_evaluates(home):
    """A tiny random BERT run through the engine the TUI starts; its dev evaluation slowed (a test-only delay per
    batch) so that a person, and this test, can see it: the list says `eval N/100` while it evaluates."""
    from clfbench.engine.training import TEST_EVAL_DELAY_ENV

    url = f"sqlite:///{home / 'clfbench.db'}"
    env = tui_env(home, **{TEST_EVAL_DELAY_ENV: "2"})
    options = ["epochs=1", "batch_size=8", "train_limit=64", "test_limit=16", "eval_every=0"]
    subprocess.run([sys.executable, "-m", "clfbench.app.cli", "queue", "--method", "encoder-finetune", "--model",
                    "tiny-bert", "--task", "massive-intent", *[part for o in options for part in ("-o", o)]],
                   cwd=ROOT, env={**os.environ, **env}, check=True, capture_output=True, timeout=120)
    try:
        with tui_session(env, "tui", (100, 30)) as pane:
            # 100 dev examples in batches of 16, 2 s each: the phase is on screen for about 14 s.
            # Cells may be cut to their column's width ("runnin", "eval 48/"): run 1's row, the phase after it.
            screen = pane.wait_for(r"^\s*1\s+runn\w*\s+eval \d+/", 300, "run 1 evaluating on dev")
            assert re.search(r"^\s*1\s+runn\w*\s+eval \d+/", screen, re.MULTILINE)
            pane.wait_for(r"^\s*1\s+succe", 300, "run 1 to succeed")
    finally:
        stop_engines(home, url)
