"""The run list on a store with more runs than one page (issue 15 items 1 and 6): what a user sees when the
list reads incrementally and pages older runs in, and that a slow read never has a second one beside it.

The app runs through Textual's pilot on a real SQLite store filled through storage.queue, as the CLI fills it.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from sqlalchemy import text
from textual.widgets import DataTable

from clfbench.app.tui import runs as runs_module
from clfbench.app.tui.app import ClfbenchApp
from clfbench.app.tui.runs import FIRST_PAGE, SHOWN_STEP, RunsScreen
from clfbench.storage import queries, queue
from clfbench.storage.db import open_store
from tests.test_tui import cell, table_ids, until

RUNS = FIRST_PAGE + SHOWN_STEP + 50  # more than the first page and more than the table takes at once
OLDEST_MODEL = "oldest-model"


def new_run(model: str, options: dict | None = None) -> queue.NewRun:
    spec = {"method": "prompt", "model": model, "task": "massive-intent", "options": options or {}}
    return queue.NewRun(method="prompt", model=model, task="massive-intent", shots=0, seed=0,
                        spec_json=json.dumps(spec), spec_hash="h", launch="process", gpus_requested=None, nproc=1)


@pytest.fixture
def many_runs(home) -> str:
    url = f"sqlite:///{home / 'clfbench.db'}"
    store = open_store(url)
    queue.enqueue(store, [new_run(OLDEST_MODEL)] + [new_run(f"model-{i}") for i in range(2, RUNS + 1)])
    return url


def run_app(url: str, scenario, size=(100, 30)) -> None:
    app = ClfbenchApp(db=url, start_engine=False)

    async def main():
        async with app.run_test(size=size) as pilot:
            await until(pilot, lambda: len(table_ids(pilot.app.screen)) > 0, what="the first paint")
            await scenario(pilot)

    asyncio.run(main())


def screen_lines(screen: RunsScreen) -> list[str]:
    table = screen.query_one(DataTable)
    return [table.render_line(y).text for y in range(table.size.height)]


def test_a_run_changed_after_the_first_paint_shows_without_a_key(many_runs):
    async def scenario(pilot):
        screen = pilot.app.screen
        assert table_ids(screen)[0] == RUNS  # the newest first
        assert len(table_ids(screen)) <= SHOWN_STEP  # one page painted, not every run
        assert queue.request_cancel(pilot.app.store, RUNS - 1) == "cancelled"
        (added,) = queue.enqueue(pilot.app.store, [new_run("brand-new")])
        # The list's own tick reads what changed: no key pressed, no reload asked for.
        await until(pilot, lambda: cell(screen, RUNS - 1, "status") == "cancelled", what="the cancelled status")
        assert "cancelled 1" in str(screen.query_one("#engine").render())  # the queue counts in the same paint
        await until(pilot, lambda: table_ids(screen)[:1] == [added], what="the new run on top")

    run_app(many_runs, scenario)


def test_a_deleted_run_leaves_the_list(many_runs):
    async def scenario(pilot):
        screen = pilot.app.screen
        assert queue.delete_run(pilot.app.store, RUNS - 2)  # as `clfbench rm` does, from another process
        await until(pilot, lambda: RUNS - 2 not in table_ids(screen), what="the deleted run to go")

    run_app(many_runs, scenario)


def test_runs_beyond_the_first_page_are_reached_by_scrolling_and_by_the_filter(many_runs):
    async def scenario(pilot):
        screen = pilot.app.screen
        await until(pilot, lambda: screen.total == RUNS and "reading" not in str(screen.query_one("#shown").render()),
                    what="every run read")
        assert 1 not in table_ids(screen)
        for _ in range(RUNS // SHOWN_STEP + 2):  # G goes to the last row; there the table takes the next rows
            await pilot.press("G")
            await pilot.pause()
        await until(pilot, lambda: table_ids(screen)[-1] == 1, what="the oldest run at the end of the list")
        await pilot.press("g", "slash", *OLDEST_MODEL, "enter")
        await until(pilot, lambda: table_ids(screen) == [1], what="the filter to find the oldest run")
        assert f"1 of {RUNS} runs" in str(screen.query_one("#shown").render())

    run_app(many_runs, scenario)


def test_no_second_read_starts_while_one_runs(many_runs, monkeypatch):
    """On a loaded machine a read can take longer than the tick: the ticks and keys meanwhile start no reads
    beside it (thread workers cannot be stopped; they piled up), and one read after it catches up."""
    real_read = runs_module.read_list
    lock = threading.Lock()
    state = {"running": 0, "most": 0, "reads": 0}

    def slow_read(store, cursor, now):
        with lock:
            state["running"] += 1
            state["reads"] += 1
            state["most"] = max(state["most"], state["running"])
        time.sleep(0.6)  # a read on a busy machine, four times slower than the ticks below
        try:
            return real_read(store, cursor, now)
        finally:
            with lock:
                state["running"] -= 1

    monkeypatch.setattr(runs_module, "read_list", slow_read)
    monkeypatch.setattr(runs_module, "REFRESH_S", 0.15)

    async def scenario(pilot):
        screen = pilot.app.screen
        started = state["reads"]
        queue.request_cancel(pilot.app.store, RUNS)
        for _ in range(10):
            screen.reload()  # what a tick or a key does
            await pilot.pause(0.05)
        # Half a second of asking: the read that ran and, at most, the one read asked for meanwhile.
        assert state["reads"] - started <= 2
        await until(pilot, lambda: cell(screen, RUNS, "status") == "cancelled", what="the change to show")
        assert state["most"] == 1

    run_app(many_runs, scenario)


def test_five_digit_ids_and_what_a_run_is_fit_80_columns(home):
    url = f"sqlite:///{home / 'clfbench.db'}"
    store = open_store(url)
    queue.enqueue(store, [new_run("smollm2-135m", {"decision": "score"}), new_run("smollm2-135m")])
    with store.write() as connection:  # a store that has seen ten thousand runs
        connection.execute(text("UPDATE runs SET id = 10000 WHERE id = 2"))

    async def scenario(pilot):
        screen = pilot.app.screen
        await until(pilot, lambda: any("10000" in line for line in screen_lines(screen)), what="the rows drawn")
        lines = screen_lines(screen)
        top = next(line for line in lines if "10000" in line)
        assert top.split()[:2] == ["10000", "queued"]  # the whole id, never "1000"
        options_row = next(line for line in lines if line.split()[:1] == ["1"])
        assert "decision=score" in cell(screen, 1, "run")  # the option that sets it apart from its default
        assert "smollm2-135m · prompt" in options_row  # what the run is, on screen at 80 columns
        assert all(len(line) <= 80 for line in lines)

    run_app(url, scenario, size=(80, 24))


def test_the_headline_result_and_the_attempt_show_for_a_finished_run(home):
    url = f"sqlite:///{home / 'clfbench.db'}"
    store = open_store(url)
    (run_id,) = queue.enqueue(store, [new_run("smollm2-135m")])
    with store.write() as connection:  # as an engine leaves a run that succeeded on its second try
        connection.execute(text("UPDATE runs SET status = 'succeeded', attempt = 2, interruptions = 1, "
                                "max_interruptions = 2 WHERE id = :id"), {"id": run_id})
        connection.execute(text("INSERT INTO results (run_id, task, metric, value) VALUES "
                                "(:id, 'massive-intent', 'accuracy', 0.8125), (:id, 'massive-intent', 'macro_f1', 0.5)"),
                           {"id": run_id})
    assert queries.headline_results(store, [run_id]) == {run_id: {"massive-intent": ("accuracy", 0.8125)}}

    async def scenario(pilot):
        screen = pilot.app.screen
        assert cell(screen, run_id, "result") == "81.2"
        assert cell(screen, run_id, "try") == "2/3"

    run_app(url, scenario, size=(80, 24))


def test_the_results_matrix_follows_a_retried_run_and_reopens_without_computing_again(home):
    from clfbench.app.tui import results as results_module
    from tests.tui_seed import seed_store

    url = seed_store(home / "clfbench.db")
    zero_shot_prompt = 11  # the one run of its cell (prompt · smollm2-135m · 0-shot on massive-intent)

    def shown_runs(screen) -> set[int]:
        return {run_id for cell in screen.shown.cells.values() for run_id in cell.run_ids} if screen.shown else set()

    async def scenario(pilot):
        await pilot.press("m")
        screen = pilot.app.screen
        await until(pilot, lambda: screen.shown is not None, what="the matrix")
        assert zero_shot_prompt in shown_runs(screen)
        prepared = screen.prepared
        await pilot.press("escape", "m")  # back and in again, nothing changed: the same matrix, not a new read
        await until(pilot, lambda: pilot.app.screen.prepared is not None, what="the matrix again")
        assert pilot.app.screen.prepared is prepared
        # A retried run's results stay stored but leave the matrix (it is no longer succeeded); the poll sees it.
        assert queue.requeue(pilot.app.store, zero_shot_prompt)
        await until(pilot, lambda: shown_runs(pilot.app.screen) and zero_shot_prompt not in shown_runs(pilot.app.screen),
                    what="the retried run to leave the matrix")
        assert results_module.PREPARED[(url, "auto")][1] is pilot.app.screen.prepared

    run_app(url, scenario)
