"""Screens that follow the store (issue 15 items 5 and 7): the errors screen shows a run that finishes without being
reopened, and `e` on a run that is still running says so in one line instead of showing another run; the run
detail charts the current attempt of a retried run, not its first."""
from __future__ import annotations

import asyncio
import time

from textual.widgets import Static

from sqlalchemy import text

from clfbench.app.tui.app import ClfbenchApp
from clfbench.app.tui.detail import DetailScreen
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


def test_the_detail_of_a_retried_run_charts_its_current_attempt(home, tmp_path):
    url = seed_store(tmp_path / "clfbench.db")
    store = open_store(url)
    running = next(run for run in queries.list_runs(store, status="running") if run["method"] == "encoder-finetune")

    def chart(screen: DetailScreen) -> str:
        return screen.query_one("#loss-plot").plt.build()

    async def scenario(pilot):
        screen = DetailScreen(pilot.app.store, running["id"])
        pilot.app.push_screen(screen)
        await until(pilot, lambda: screen.run is not None and "train_loss" in screen.points, "attempt 1's points")
        assert "no points yet" not in chart(screen)
        # The engine requeued the run and a second attempt claimed it: it loads its model, no point of its own yet.
        with store.write() as connection:
            connection.execute(text("UPDATE runs SET attempt = 2, attempt_note = :note WHERE id = :id"),
                               {"id": running["id"], "note": "attempt 1: worker killed by signal SIGKILL; "
                                                             "attempt 2 resumed from step 300"})
        await until(pilot, lambda: screen.run["attempt"] == 2, "the retry")
        await pilot.pause(0.2)
        assert screen.points == {} and "loss: no points yet" in chart(screen)  # not attempt 1's curves
        header = str(screen.query_one("#header", Static).render())
        assert "attempt 2" in header and "resumed from step 300" in header
        assert queue.add_metric_points(store, running["id"], 2, [(301, "train_loss", 9.5, SEED_NOW),
                                                                 (302, "train_loss", 9.25, SEED_NOW)])
        await until(pilot, lambda: "train_loss" in screen.points, "attempt 2's points")
        assert screen.points["train_loss"] == [(301, 9.5), (302, 9.25)]

    run_screen(url, scenario)
