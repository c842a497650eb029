"""The TUI's own screens through Textual's pilot: what a user presses and what they then see.

Every test runs the real app on the seeded store (tests/tui_seed.py) with the clock frozen at SEED_NOW, and
keeps the engine out unless the test is about the engine. Snapshot tests at the end pin what each screen
looks like at a fixed terminal size (`pytest --snapshot-update` after a deliberate change).
"""
from __future__ import annotations

import asyncio
import json
import time

import pytest
from textual.widgets import DataTable, Input, Log

from clfbench.app.tui.app import ClfbenchApp
from clfbench.app.tui.detail import DetailScreen
from clfbench.app.tui.dialogs import ConfirmScreen, HelpScreen
from clfbench.app.tui.messages import OpenErrors
from clfbench.app.tui.new_run import NewRunScreen, parse_value, sweep_size
from clfbench.app.tui.runs import RunsScreen
from clfbench.storage import queries, queue
from clfbench.storage.db import open_store
from tests.conftest import SAMPLES
from tests.tui_seed import SEED_NOW, seed_store

RUNNING_ENCODER, QUEUED_PROMPT, FAILED, SUCCEEDED_ENCODER = 22, 24, 26, 1


@pytest.fixture
def seeded(home, tmp_path) -> str:
    """A seeded store in its own folder (its URL); the isolated home keeps any engine lock private."""
    folder = tmp_path / "store"
    folder.mkdir()
    return seed_store(folder / "clfbench.db")


def make_app(url: str, **kwargs) -> ClfbenchApp:
    return ClfbenchApp(db=url, now=lambda: SEED_NOW, start_engine=kwargs.pop("start_engine", False), **kwargs)


def run_app(app: ClfbenchApp, scenario, size=(100, 30)) -> None:
    async def main():
        async with app.run_test(size=size) as pilot:
            await settle(pilot)
            await scenario(pilot)

    asyncio.run(main())


async def settle(pilot) -> None:
    """Let the store reads in thread workers finish and their results paint."""
    await pilot.pause()
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


async def until(pilot, predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await pilot.pause(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def table_ids(screen: RunsScreen) -> list[int]:
    table = screen.query_one(DataTable)
    return [int(table.coordinate_to_cell_key((row, 0)).row_key.value) for row in range(table.row_count)]


async def select_run(pilot, run_id: int) -> None:
    screen = pilot.app.screen
    table = screen.query_one(DataTable)
    table.move_cursor(row=table.get_row_index(str(run_id)))
    await pilot.pause()
    assert screen.selected_run_id() == run_id


def cell(screen: RunsScreen, run_id: int, column: str) -> str:
    return str(screen.query_one(DataTable).get_cell(str(run_id), column))


# ---- the runs screen ------------------------------------------------------------------------------

def test_runs_screen_lists_every_run_with_live_state(seeded):
    async def scenario(pilot):
        screen = pilot.app.screen
        assert isinstance(screen, RunsScreen)
        assert table_ids(screen) == list(range(28, 0, -1))  # newest first
        # 120 of 400 steps after 6 h - 10 min since the start: the rest at the same rate takes ~12h50.
        assert cell(screen, RUNNING_ENCODER, "progress").startswith("120/400 ~")
        assert cell(screen, RUNNING_ENCODER, "status") == "running"
        assert cell(screen, RUNNING_ENCODER, "gpu") == "0"
        assert cell(screen, 1, "age") == "6h"
        engine = str(screen.query_one("#engine").render())
        assert "stopped" in engine and "queued 2" in engine and "running 2" in engine and "failed 1" in engine

    run_app(make_app(seeded), scenario)


def test_filter_narrows_and_escape_clears(seeded):
    async def scenario(pilot):
        screen = pilot.app.screen
        await pilot.press("slash")
        await pilot.pause()
        assert screen.query_one("#filter", Input).has_focus
        await pilot.press(*"status:running")
        await pilot.pause()
        assert table_ids(screen) == [23, 22]
        await pilot.press("space", *"minilm")
        await pilot.pause()
        assert table_ids(screen) == [22]
        assert "1 of 28 runs" in str(screen.query_one("#shown").render())
        await pilot.press("escape")
        await pilot.pause()
        assert len(table_ids(screen)) == 28

    run_app(make_app(seeded), scenario)


def test_live_refresh_keeps_the_cursor_on_its_run(seeded):
    async def scenario(pilot):
        screen = pilot.app.screen
        await select_run(pilot, 5)
        store = pilot.app.store
        queue.heartbeat(store, RUNNING_ENCODER, attempt=1, progress=(200, 400))
        (new_id,) = queue.enqueue(store, [queue.NewRun(method="prompt", model="smollm2-135m", task="massive-intent",
                                                        shots=0, seed=0, spec_json="{}", spec_hash="x",
                                                        launch="torchrun", gpus_requested=None, nproc=1)])
        screen.reload()
        await settle(pilot)
        assert table_ids(screen)[0] == new_id
        assert cell(screen, RUNNING_ENCODER, "progress").startswith("200/400")
        assert screen.selected_run_id() == 5  # the new row above did not move the cursor to another run

    run_app(make_app(seeded), scenario)


def test_cancel_retry_and_delete_with_confirmation(seeded):
    async def scenario(pilot):
        app = pilot.app
        store = app.store
        await select_run(pilot, QUEUED_PROMPT)
        await pilot.press("c")  # cancel asks first; n (or escape) keeps the run
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        assert "Cancel run 24" in str(app.screen.query_one("#question").render())
        await pilot.press("n")
        await settle(pilot)
        assert queries.get_run(store, QUEUED_PROMPT)["status"] == "queued"
        await pilot.press("c")
        await pilot.pause()
        await pilot.press("y")
        await until(pilot, lambda: queries.get_run(store, QUEUED_PROMPT)["status"] == "cancelled", what="cancel")
        await settle(pilot)
        assert cell(app.screen, QUEUED_PROMPT, "status") == "cancelled"

        await select_run(pilot, FAILED)
        await pilot.press("r")  # a failed run loses nothing by a retry: no question
        await until(pilot, lambda: queries.get_run(store, FAILED)["status"] == "queued", what="retry")
        await select_run(pilot, 2)  # a succeeded run would lose its results: asked
        await pilot.press("r")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("escape")
        await settle(pilot)
        assert queries.get_run(store, 2)["status"] == "succeeded"

        await select_run(pilot, SUCCEEDED_ENCODER)
        await pilot.press("x")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")  # no: nothing happens
        await settle(pilot)
        assert queries.get_run(store, SUCCEEDED_ENCODER) is not None
        await pilot.press("x")
        await pilot.pause()
        await pilot.press("y")
        await until(pilot, lambda: queries.get_run(store, SUCCEEDED_ENCODER) is None, what="delete")
        assert queries.run_results(store, SUCCEEDED_ENCODER) == {}
        await settle(pilot)
        assert SUCCEEDED_ENCODER not in table_ids(app.screen)

    run_app(make_app(seeded), scenario)


def test_cancelling_a_running_run_says_its_progress_is_lost_and_a_finished_one_has_nothing_to_cancel(seeded):
    async def scenario(pilot):
        app = pilot.app
        await select_run(pilot, RUNNING_ENCODER)
        await pilot.press("c")
        await pilot.pause()
        question = str(app.screen.query_one("#question").render())
        assert "Cancel run 22" in question and "progress is lost" in question
        await pilot.press("escape")
        await settle(pilot)
        run = queries.get_run(app.store, RUNNING_ENCODER)
        assert run["status"] == "running" and not run["cancel_requested"]
        await select_run(pilot, SUCCEEDED_ENCODER)
        await pilot.press("c")
        await pilot.pause()
        assert isinstance(app.screen, RunsScreen)  # nothing to ask: it finished

    run_app(make_app(seeded), scenario)


def test_j_k_g_and_G_move_in_the_run_list(seeded):
    async def scenario(pilot):
        screen = pilot.app.screen
        ids = table_ids(screen)
        assert screen.selected_run_id() == ids[0]
        await pilot.press("j", "j")
        assert screen.selected_run_id() == ids[2]
        await pilot.press("k")
        assert screen.selected_run_id() == ids[1]
        await pilot.press("G")
        assert screen.selected_run_id() == ids[-1]
        await pilot.press("g")
        assert screen.selected_run_id() == ids[0]

    run_app(make_app(seeded), scenario)


def test_copy_puts_the_run_id_and_spec_on_the_clipboard(seeded):
    async def scenario(pilot):
        await select_run(pilot, 3)
        await pilot.press("y")
        assert pilot.app.clipboard == "3"
        await pilot.press("Y")
        assert pilot.app.clipboard == queries.get_run(pilot.app.store, 3)["spec_json"]

    run_app(make_app(seeded), scenario)


# ---- run detail -----------------------------------------------------------------------------------

def test_detail_shows_curves_results_spec_and_log_tail(seeded):
    async def scenario(pilot):
        await select_run(pilot, SUCCEEDED_ENCODER)
        await pilot.press("enter")
        await settle(pilot)
        screen = pilot.app.screen
        assert isinstance(screen, DetailScreen)
        assert len(screen.points["train_loss"]) == 30 and len(screen.points["eval_loss"]) == 6
        assert "train_loss" in screen.query_one("#loss-plot").render().plain
        await pilot.press("2")  # a chart draws at its size, so only once its tab is shown
        await pilot.pause()
        assert "eval_accuracy" in screen.query_one("#eval-plot").render().plain
        results = screen.query_one("#results-table", DataTable)
        rows = [tuple(map(str, results.get_row_at(i))) for i in range(results.row_count)]
        accuracy = queries.run_results(pilot.app.store, SUCCEEDED_ENCODER)["20ng-20class"]["accuracy"]
        low, high, _resamples = queries.run_result_intervals(pilot.app.store, SUCCEEDED_ENCODER)["20ng-20class"][
            "accuracy"]
        assert low < accuracy < high
        assert ("20ng-20class", "accuracy", f"{accuracy:.4g}", f"[{low:.4g}, {high:.4g}]", "") in rows
        assert '"batch_size": 16' in str(screen.query_one("#spec").render())
        await pilot.press("5")
        log = screen.query_one("#log-view", Log)
        last_line = lambda: [line for line in log.lines if line][-1]  # noqa: E731 (the log ends with a newline)
        assert last_line() == "[clfbench] finished"
        # The log is followed: appended lines show up at the next read.
        with open(queries.get_run(pilot.app.store, SUCCEEDED_ENCODER)["log_path"], "a") as handle:
            handle.write("one more line\n")
        screen.reload()
        await settle(pilot)
        assert last_line() == "one more line"
        await pilot.press("escape")
        assert isinstance(pilot.app.screen, RunsScreen)

    run_app(make_app(seeded), scenario)


def test_detail_of_a_prompt_run_shows_parse_failures_and_throughput(seeded):
    async def scenario(pilot):
        await select_run(pilot, 12)  # prompt, 5-shot MASSIVE intent, 8% parse failures drawn
        await pilot.press("enter")
        await settle(pilot)
        screen = pilot.app.screen
        rate = queries.run_results(pilot.app.store, 12)["massive-intent"]["parse_failure_rate"]
        assert f"massive-intent {rate:.1%}" in str(screen.query_one("#parse-failures").render())
        assert "examples_per_s" in str(screen.query_one("#throughput").render())
        assert "examples/s" in screen.query_one("#loss-plot").render().plain  # no loss: throughput is charted

    run_app(make_app(seeded), scenario)


def test_an_encoder_has_no_parse_failure_rate_a_blank_not_zero(seeded):
    async def scenario(pilot):
        assert queries.run_results(pilot.app.store, SUCCEEDED_ENCODER)["20ng-20class"]["parse_failure_rate"] == 0.0
        await select_run(pilot, SUCCEEDED_ENCODER)
        await pilot.press("enter")
        await settle(pilot)
        screen = pilot.app.screen
        assert str(screen.query_one("#parse-failures").render()) == "parse failures: –"
        results = screen.query_one("#results-table", DataTable)
        rows = [tuple(map(str, results.get_row_at(i))) for i in range(results.row_count)]
        assert ("20ng-20class", "parse_failure_rate", "–", "", "") in rows  # no interval for a blank either

    run_app(make_app(seeded), scenario)


# ---- new run --------------------------------------------------------------------------------------

def test_parse_value_and_sweep_size():
    assert parse_value("1e-5,3e-5") == ["1e-5", "3e-5"]  # pydantic reads YAML 1.1's '1e-5' strings as floats
    assert parse_value("[1.0e-5, 3.0e-5]") == [1e-5, 3e-5]
    assert parse_value("  ") is None and parse_value("7") == 7
    assert parse_value("a,b", sweepable=False) == "a,b"
    assert sweep_size({"model": ["a", "b"], "seed": [0, 1, 2]}, {"lr": [1, 2]}) == 12


async def fill(pilot, field_id: str, text: str) -> None:
    field = pilot.app.screen.query_one(f"#{field_id}", Input)
    field.value = text
    await pilot.pause()


def test_new_run_form_counts_the_sweep_and_queues_it(seeded):
    async def scenario(pilot):
        app = pilot.app
        await pilot.press("n")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, NewRunScreen)
        assert screen.query_one("#option-lr", Input).placeholder == "5e-05"  # the default is shown
        await fill(pilot, "field-model", "tiny-bert")
        await fill(pilot, "field-task", "massive-intent")
        await fill(pilot, "field-data_dir", str(SAMPLES))
        await fill(pilot, "field-seed", "[0, 1]")
        await fill(pilot, "option-lr", "1e-5,3e-5")
        await fill(pilot, "option-epochs", "1")
        summary = str(screen.query_one("#summary").render())
        assert "4 runs will be queued" in summary and "seed × lr" in summary
        await pilot.press("ctrl+s")
        await until(pilot, lambda: isinstance(app.screen, RunsScreen), what="the form to close after queueing")
        queued = [r for r in queries.list_runs(app.store) if r["model"] == "tiny-bert"]
        assert len(queued) == 4 and {r["status"] for r in queued} == {"queued"}
        specs = [json.loads(r["spec_json"]) for r in queued]
        assert sorted((s["seed"], s["options"]["lr"]) for s in specs) == [(0, 1e-5), (0, 3e-5), (1, 1e-5), (1, 3e-5)]
        assert {s["options"]["epochs"] for s in specs} == {1.0}
        assert {s["data_dir"] for s in specs} == {str(SAMPLES)}

    run_app(make_app(seeded), scenario)


def test_new_run_form_shows_an_invalid_option_under_its_field(seeded):
    async def scenario(pilot):
        app = pilot.app
        before = len(queries.list_runs(app.store))
        await pilot.press("n")
        await pilot.pause()
        await fill(pilot, "field-model", "tiny-bert")
        await fill(pilot, "field-task", "massive-intent")
        await fill(pilot, "field-data_dir", str(SAMPLES))
        await fill(pilot, "option-warmup_ratio", "2")
        await pilot.press("ctrl+s")
        screen = app.screen
        error = screen.query_one("#error-option-warmup_ratio")
        await until(pilot, lambda: "warmup_ratio" in str(error.render()), what="the inline error")
        assert error.has_class("shown")
        assert "less than 1" in str(error.render())
        assert isinstance(app.screen, NewRunScreen)  # the form stays open to fix it
        await fill(pilot, "field-task", "no-such-task")
        await fill(pilot, "option-warmup_ratio", "")
        await pilot.press("ctrl+s")
        task_error = screen.query_one("#error-task")
        await until(pilot, lambda: "no-such-task" in str(task_error.render()), what="the task error")
        assert len(queries.list_runs(app.store)) == before  # nothing was queued

    run_app(make_app(seeded), scenario)


def test_duplicate_opens_the_form_prefilled_from_the_spec(seeded):
    async def scenario(pilot):
        await select_run(pilot, SUCCEEDED_ENCODER)
        await pilot.press("d")
        await pilot.pause()
        screen = pilot.app.screen
        assert isinstance(screen, NewRunScreen)
        values = {name: screen.query_one(f"#field-{name}", Input).value for name in ("model", "task", "seed")}
        assert values == {"model": "minilm", "task": "20ng-20class", "seed": "0"}
        assert screen.query_one("#option-batch_size", Input).value == "16"  # differs from the default 32
        assert screen.query_one("#option-epochs", Input).value == ""  # 3 is the default: left empty

    run_app(make_app(seeded), scenario)


# ---- help, palette, quit, other screens ---------------------------------------------------------

def test_help_lists_the_keys_of_the_current_screen(seeded):
    async def scenario(pilot):
        await pilot.press("question_mark")
        await pilot.pause()
        help_screen = pilot.app.screen
        assert isinstance(help_screen, HelpScreen)
        table = help_screen.query_one(DataTable)
        rows = {str(table.get_row_at(i)[1]) for i in range(table.row_count)}
        assert {"Cancel", "Retry", "Delete", "Dup+edit", "Filter", "Engine start", "Engine stop", "Quit"} <= rows
        keys = ", ".join(str(table.get_row_at(i)[0]) for i in range(table.row_count)).split(", ")
        assert {"j", "k", "g", "G"} <= set(keys)  # the focused list's vi keys, beside its arrows
        await pilot.press("escape")
        await pilot.press("enter")
        await settle(pilot)
        await pilot.press("question_mark")
        await pilot.pause()
        table = pilot.app.screen.query_one(DataTable)
        rows = {str(table.get_row_at(i)[1]) for i in range(table.row_count)}
        assert {"Curves", "Log", "Errors", "Back"} <= rows and "Delete" not in rows

    run_app(make_app(seeded), scenario)


def test_command_palette_opens_the_new_run_form(seeded):
    async def scenario(pilot):
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"new run")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(pilot.app.screen, NewRunScreen), what="the new-run form")

    run_app(make_app(seeded), scenario)


def test_q_quits(seeded):
    app = make_app(seeded)

    async def scenario(pilot):
        await pilot.press("q")
        await pilot.pause()

    run_app(app, scenario)
    assert app.return_code == 0 and not app.is_running


def test_m_and_e_open_the_results_and_errors_screens(seeded):
    pytest.importorskip("clfbench.app.tui.results")
    pytest.importorskip("clfbench.app.tui.errors")
    from clfbench.app.tui.errors import ErrorsScreen
    from clfbench.app.tui.results import ResultsScreen

    async def scenario(pilot):
        await pilot.press("m")
        await pilot.pause()
        assert isinstance(pilot.app.screen, ResultsScreen)
        await pilot.press("m")  # again: no second matrix on the stack
        await pilot.pause()
        assert [type(s).__name__ for s in pilot.app.screen_stack] == ["RunsScreen", "ResultsScreen"]
        pilot.app.post_message(OpenErrors(SUCCEEDED_ENCODER))  # a cell's errors, then m: back to that matrix
        await pilot.pause()
        assert isinstance(pilot.app.screen, ErrorsScreen)
        await pilot.press("m")
        await pilot.pause()
        assert [type(s).__name__ for s in pilot.app.screen_stack] == ["RunsScreen", "ResultsScreen"]
        await pilot.press("escape")
        await pilot.pause()
        await select_run(pilot, SUCCEEDED_ENCODER)
        await pilot.press("e")
        await pilot.pause()
        assert isinstance(pilot.app.screen, ErrorsScreen)

    run_app(make_app(seeded), scenario)


def test_the_detail_keys_open_the_errors_and_a_prefilled_form(seeded):
    from clfbench.app.tui.errors import ErrorsScreen

    async def scenario(pilot):
        await select_run(pilot, SUCCEEDED_ENCODER)
        await pilot.press("enter")
        await settle(pilot)
        assert isinstance(pilot.app.screen, DetailScreen)
        await pilot.press("e")
        await pilot.pause()
        assert isinstance(pilot.app.screen, ErrorsScreen) and pilot.app.screen.run_id == SUCCEEDED_ENCODER
        await pilot.press("escape")
        await pilot.pause()
        await pilot.press("d")
        await pilot.pause()
        assert isinstance(pilot.app.screen, NewRunScreen)
        assert pilot.app.screen.query_one("#field-model", Input).value == "minilm"

    run_app(make_app(seeded), scenario)


def test_screens_navigate_by_messages_and_never_import_each_other():
    # A screen posts OpenRun / OpenErrors / OpenNewRun / OpenCompare / OpenPlot; only the app shell imports the
    # screen modules.
    from tests.architecture import ROOT, import_graph

    graph = import_graph()
    screens = {f"app.tui.{name}" for name in ("runs", "detail", "errors", "results", "new_run", "compare", "plot")}
    assert sorted(f"{module} -> {other}" for module in graph if module != "app.tui.app"
                  for other in graph[module] & screens) == []
    reaching_into_the_app = [path.name for path in (ROOT / "app" / "tui").glob("*.py")
                             if "self.app.open_" in path.read_text(encoding="utf-8")]
    assert reaching_into_the_app == []


# ---- the engine (a real detached engine on a private store) --------------------------------------

def test_tui_starts_the_engine_and_its_keys_stop_and_start_it(home):
    from clfbench.engine.daemon import engine_lock_holder, stop_engine

    url = f"sqlite:///{home / 'clfbench.db'}"
    open_store(url)
    app = ClfbenchApp(db=url, start_engine=True)

    async def scenario(pilot):
        screen = pilot.app.screen
        engine_text = lambda: str(screen.query_one("#engine").render())  # noqa: E731
        await until(pilot, lambda: engine_lock_holder(url), what="the engine the TUI starts")
        await until(pilot, lambda: "● running" in engine_text(), what="the panel to show it")
        await pilot.press("S")
        await until(pilot, lambda: not engine_lock_holder(url), what="the engine to stop")
        await until(pilot, lambda: "stopped" in engine_text(), what="the panel to show it stopped")
        await pilot.press("s")
        await until(pilot, lambda: engine_lock_holder(url), what="the engine to start again")
        await until(pilot, lambda: "● running" in engine_text(), what="the panel to show it running again")
        await pilot.press("S")
        await until(pilot, lambda: not engine_lock_holder(url), what="the engine to stop again")

    try:
        run_app(app, scenario)
    finally:
        stop_engine(url)


# ---- snapshots (seeded store, frozen clock, fixed terminal size) ----------------------------------

async def wait_for_data(pilot) -> None:
    await settle(pilot)


async def steady(pilot) -> None:
    """Wait for every read, and stop text cursors blinking, so a snapshot never catches a half state."""
    for field in pilot.app.screen.query(Input):
        field.cursor_blink = False
    await settle(pilot)


def snapshot_app(url: str) -> ClfbenchApp:
    return make_app(url)


def test_snapshot_runs(seeded, snap_compare):
    assert snap_compare(snapshot_app(seeded), terminal_size=(80, 24), run_before=wait_for_data)


def test_snapshot_runs_filtered(seeded, snap_compare):
    async def before(pilot):
        await settle(pilot)
        await pilot.press("slash", *"prompt")
        await steady(pilot)

    assert snap_compare(snapshot_app(seeded), terminal_size=(80, 24), run_before=before)


def test_snapshot_delete_confirmation(seeded, snap_compare):
    async def before(pilot):
        await settle(pilot)
        await pilot.press("x")
        await pilot.pause()

    assert snap_compare(snapshot_app(seeded), terminal_size=(80, 24), run_before=before)


def test_snapshot_help(seeded, snap_compare):
    async def before(pilot):
        await settle(pilot)
        await pilot.press("question_mark")
        await pilot.pause()

    assert snap_compare(snapshot_app(seeded), terminal_size=(80, 24), run_before=before)


@pytest.mark.parametrize("tab", ["1", "2", "3", "4", "5"])
def test_snapshot_detail(seeded, snap_compare, tab):
    async def before(pilot):
        await settle(pilot)
        screen = pilot.app.screen
        table = screen.query_one(DataTable)
        table.move_cursor(row=table.get_row_index(str(SUCCEEDED_ENCODER)))
        await pilot.press("enter")
        await settle(pilot)
        await pilot.press(tab)
        await settle(pilot)

    assert snap_compare(snapshot_app(seeded), terminal_size=(100, 30), run_before=before)


def test_snapshot_new_run(seeded, snap_compare):
    async def before(pilot):
        await settle(pilot)
        await pilot.press("n")
        await settle(pilot)
        pilot.app.screen.query_one("#field-model", Input).value = "minilm"
        pilot.app.screen.query_one("#option-lr", Input).value = "1e-5,3e-5"
        await steady(pilot)

    assert snap_compare(snapshot_app(seeded), terminal_size=(80, 24), run_before=before)
