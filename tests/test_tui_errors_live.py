"""The errors screen follows the store (issue 15 item 7): a run that finishes appears without reopening the screen,
and `e` on a run that is still running says so in one line instead of showing another run."""
from __future__ import annotations

import asyncio
import time

from textual.widgets import Static

from clfbench.app.tui.app import ClfbenchApp
from clfbench.app.tui.errors import REFRESH_S, ErrorsScreen
from clfbench.storage import queries, queue
from clfbench.storage.db import open_store
from tests.tui_seed import SEED_NOW, seed_store


def summary(screen: ErrorsScreen) -> str:
    found = screen.query("#summary")  # empty until the screen has mounted
    return str(found.first(Static).render()) if found else ""


async def until(pilot, predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await pilot.pause(0.1)


def finish(store, run: dict) -> None:
    """What a worker writes at the end: predictions for the run's task, a result, succeeded."""
    task = run["task"].split("+")[0]
    rows = [{"task": task, "example_id": f"x{i}", "text": f"text {i}", "gold": "a", "predicted": "a" if i else "b",
             "raw_output": None, "parse_status": "ok"} for i in range(4)]
    assert queue.finish_succeeded(store, run["id"], run["attempt"], rows,
                                  [{"task": task, "metric": "accuracy", "value": 0.75}])


def run_screen(url: str, scenario) -> None:
    async def main():
        app = ClfbenchApp(db=url, now=lambda: SEED_NOW, start_engine=False)
        async with app.run_test(size=(100, 30)) as pilot:
            await scenario(pilot)

    asyncio.run(main())


def test_e_on_a_running_run_says_so_and_opens_its_errors_when_it_succeeds(home, tmp_path):
    seeded = seed_store(tmp_path / "clfbench.db")
    store = open_store(seeded)
    running = queries.list_runs(store, status="running")[0]

    async def scenario(pilot):
        screen = ErrorsScreen(pilot.app.store, run_id=running["id"])
        pilot.app.push_screen(screen)
        await pilot.pause()
        await until(pilot, lambda: "running" in summary(screen), "the one line")
        assert summary(screen) == f"run {running['id']} is running: its errors appear here when it succeeds"
        assert screen.run_id == running["id"] and screen.report is None  # no other run's errors
        assert not [n for n in pilot.app._notifications if "showing run" in n.message]
        finish(store, running)
        await until(pilot, lambda: screen.report is not None, "the finished run's report", timeout=REFRESH_S * 10)
        assert screen.run_id == running["id"]
        assert summary(screen).startswith(f"{running['task'].split('+')[0]}: accuracy 75.0%")

    run_screen(seeded, scenario)


def test_the_screen_follows_runs_that_finish_after_it_opened(home, tmp_path):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    store = open_store(url)
    run_id = queue.enqueue(store, [queue.NewRun(
        method="encoder-finetune", model="tiny-bert", task="massive-intent", shots=0, seed=0, spec_json="{}",
        spec_hash="live", launch="torchrun", gpus_requested=None, nproc=1)])[0]
    claimed = queue.claim(store, host="h", engine_id=1, default_gpus=0, free_gpus=0, cpu_free=True, api_free=True)

    async def scenario(pilot):
        screen = ErrorsScreen(pilot.app.store)
        pilot.app.push_screen(screen)
        await pilot.pause()
        await until(pilot, lambda: "no run has predictions yet" in summary(screen), "the empty store's line")
        finish(store, claimed)
        await until(pilot, lambda: screen.report is not None, "the run that finished", timeout=REFRESH_S * 10)
        assert screen.run_id == run_id and "no run has predictions" not in summary(screen)

    run_screen(url, scenario)
