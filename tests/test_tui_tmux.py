"""`clfbench tui` in a real terminal (a detached tmux session): queue a run with the keyboard and watch it
finish, with the engine the TUI started itself. What is asserted is what the pane shows a user.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid

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


def test_queue_a_run_in_the_tui_and_see_it_succeed(home):
    from clfbench.engine.daemon import engine_lock_holder, stop_engine

    home.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{home / 'clfbench.db'}"
    env = {"CLFBENCH_HOME": str(home), "CLFBENCH_DATA": str(SAMPLES), "PYTHONPATH": str(ROOT),
           "CLFBENCH_MODEL_CACHE": str(ROOT / ".pytest_cache" / "clfbench-models"), "TERM": "xterm-256color"}
    exports = " ".join(f"{key}={value}" for key, value in env.items())
    name = f"clfbench-tui-{uuid.uuid4().hex[:8]}"
    command = f"cd {ROOT} && env {exports} {sys.executable} -m clfbench.app.cli tui; sleep 5"
    subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "100", "-y", "30", command], check=True)
    pane = Pane(name)
    try:
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
        # whole row rather than asserting on the first capture that shows the status. At 100 columns the model
        # column can be cut at the pane's edge ("tiny-ber"), so its last letter is not required.
        screen = pane.wait_for(r"^\s*1\s+succeeded\b.*massive-intent\s+tiny-ber", 30, "run 1's whole row")
        assert re.search(r"^\s*1\s+succeeded\b.*massive-intent\s+tiny-ber", screen, re.MULTILINE)
        pane.keys("S")
        pane.wait_for(r"engine ○ stopped", 60, "the engine to stop")
        assert not engine_lock_holder(url)
        pane.keys("q")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "clfbench · runs" in pane.text():
            time.sleep(0.3)
        assert "clfbench · runs" not in pane.text()  # q quit the TUI
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("CLFBENCH_HOME", str(home))
            stop_engine(url)
    assert os.path.exists(home / "clfbench.db")


def test_cancel_asks_first_and_n_keeps_the_run(home, tmp_path):
    """On the seeded store, without an engine: c on a queued run asks; n keeps it queued, y cancels it."""
    from tests.tui_seed import seed_store

    home.mkdir(parents=True, exist_ok=True)
    url = seed_store(home / "clfbench.db")
    env = {"CLFBENCH_HOME": str(home), "PYTHONPATH": str(ROOT), "TERM": "xterm-256color"}
    exports = " ".join(f"{key}={value}" for key, value in env.items())
    name = f"clfbench-tui-{uuid.uuid4().hex[:8]}"
    command = f"cd {ROOT} && env {exports} {sys.executable} -m clfbench.app.cli --db {url} tui --no-engine; sleep 5"
    subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "80", "-y", "24", command], check=True)
    pane = Pane(name)
    try:
        pane.wait_for(r"^\s*28\s+interrupted", 60, "the seeded runs")
        pane.keys("/")
        pane.type("status:queued")
        pane.keys("Enter")
        pane.wait_for(r"2 of 28 runs", 10, "the two queued runs")  # 25 then 24; the cursor is on 25
        pane.keys("c")
        pane.wait_for(r"Cancel run 25", 10, "the question")
        pane.keys("n")
        screen = pane.wait_for(r"2 of 28 runs", 10, "the list again")
        assert "Cancel run 25" not in screen and re.search(r"^\s*25\s+queued", screen, re.MULTILINE)
        pane.keys("c")
        pane.wait_for(r"Cancel run 25", 10, "the question again")
        pane.keys("y")
        pane.wait_for(r"run 25: cancelled", 20, "the run cancelled")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
