"""The Results and Errors screens through Textual's pilot, on the seeded store with a frozen clock.

What a user does (filter, sort, switch metric, paper layout, export, pick a label or a confusion cell, look
at what other runs said) and what they then see; exports are compared byte for byte with `clfbench results`.
Snapshot tests at the end pin both screens at 80×24 (`pytest --snapshot-update` after a deliberate change).
"""
from __future__ import annotations

import asyncio
import pytest
from textual.widgets import DataTable, Input, Select, Static, TabbedContent

from clfbench.app import render
from clfbench.app.error_analysis import UNPARSED_COLUMN, error_report, examples_for
from clfbench.app.tui.app import ClfbenchApp
from clfbench.app.tui.errors import ErrorsScreen
from clfbench.app.tui.matrix_view import MatrixView
from clfbench.app.tui.results import ExportScreen, ResultsScreen, parse_query, QueryError
from clfbench.storage import queries
from clfbench.storage.db import open_store
from tests.tui_seed import SEED_NOW, seed_store

PROMPT_INTENT_0SHOT = 11  # smollm2-135m prompt, zero-shot, massive-intent: many errors and parse failures
ENCODER_MASSIVE_MULTI = 10  # minilm encoder-finetune on massive-intent+massive-slots


@pytest.fixture
def seeded(home, tmp_path) -> str:
    folder = tmp_path / "store"
    folder.mkdir()
    return seed_store(folder / "clfbench.db")


def make_app(url: str) -> ClfbenchApp:
    return ClfbenchApp(db=url, now=lambda: SEED_NOW, start_engine=False)


async def settle(pilot) -> None:
    """Let the store reads in thread workers finish and their results paint.

    A worker's result arrives as a message that may start another read (the run list, then the report), and a
    table measures its columns on a later refresh; a snapshot taken between the two has the wrong widths.
    """
    for _ in range(3):
        await pilot.pause()
        await pilot.app.workers.wait_for_complete()
    await pilot.pause(0.2)


def run_app(app: ClfbenchApp, scenario, size=(100, 30)) -> None:
    async def main():
        async with app.run_test(size=size) as pilot:
            await settle(pilot)
            await scenario(pilot)

    asyncio.run(main())


async def open_results(pilot) -> ResultsScreen:
    await pilot.press("m")
    await settle(pilot)
    screen = pilot.app.screen
    assert isinstance(screen, ResultsScreen)
    return screen


async def open_errors(pilot, run_id: int | None, task: str | None = None) -> ErrorsScreen:
    pilot.app.push_screen(ErrorsScreen(pilot.app.store, run_id=run_id, task=task))
    await settle(pilot)
    await settle(pilot)  # the run list, then the report
    screen = pilot.app.screen
    assert isinstance(screen, ErrorsScreen)
    return screen


def shown_rows(screen: ResultsScreen) -> list[str]:
    view = screen.query_one("#matrix", MatrixView)
    return [view.visible_text(i, 0) for i in range(view.row_count)]


def column_values(screen: ResultsScreen, column: str) -> list[str]:
    view = screen.query_one("#matrix", MatrixView)
    index = screen.columns.index(column) + 1
    return [view.visible_text(i, index) for i in range(view.row_count)]


def status(screen) -> str:
    return str(screen.query_one("#status", Static).render())


# ---- results matrix ------------------------------------------------------------------------------

def test_results_show_the_cli_matrix_with_the_best_cell_of_each_column_highlighted(seeded):
    expected = queries.results_matrix(open_store(seeded))

    async def scenario(pilot):
        screen = await open_results(pilot)
        assert shown_rows(screen) == [render.row_label(r) for r in expected.rows]
        assert screen.shown.columns == expected.columns
        view = screen.query_one("#matrix", MatrixView)
        best = render.best_per_column(expected)
        for column in expected.columns:
            index = expected.columns.index(column) + 1
            for row_index, row in enumerate(expected.rows):
                assert view.visible_text(row_index, index) == render.cell_text(expected, row, column)
                highlighted = (screen.rows[row_index], index) in view.data.best
                assert highlighted == (best.get(column) == row), (row, column)
        assert "4/4 rows · 8 columns" in status(screen)

    run_app(make_app(seeded), scenario)


def test_the_open_matrix_follows_runs_that_finish_or_are_deleted(seeded, monkeypatch):
    from clfbench.app.tui import results as results_module
    from clfbench.storage import queue

    monkeypatch.setattr(results_module, "POLL_S", 0.2)
    store = open_store(seeded)
    matrix = queries.results_matrix(store)
    gone = "smollm2-135m · prompt · 5-shot"
    row = next(r for r in matrix.rows if render.row_label(r) == gone)
    run_ids = {run_id for (key, _), cell in matrix.cells.items() if key == row for run_id in cell.run_ids}

    async def scenario(pilot):
        screen = await open_results(pilot)
        assert gone in shown_rows(screen)
        for run_id in run_ids:  # as `clfbench rm` from another terminal would
            assert queue.delete_run(store, run_id)
        for _ in range(20):
            await pilot.pause(0.1)
            await settle(pilot)
            if gone not in shown_rows(screen):
                break
        assert gone not in shown_rows(screen) and len(shown_rows(screen)) == len(matrix.rows) - 1

    run_app(make_app(seeded), scenario)


def test_filter_query_keeps_matching_rows_and_columns_without_reading_the_store(seeded, monkeypatch):
    def no_store_reads(*args, **kwargs):
        raise AssertionError("a filter keystroke read the store")

    async def scenario(pilot):
        screen = await open_results(pilot)
        monkeypatch.setattr(queries, "results_matrix", no_store_reads)
        monkeypatch.setattr(queries, "result_metric_names", no_store_reads)
        await pilot.press("slash", *"model:smollm method:prompt")
        await settle(pilot)
        assert shown_rows(screen) == ["smollm2-135m · prompt", "smollm2-135m · prompt · 5-shot"]
        await pilot.press(*" task:massive")
        await pilot.pause()
        assert screen.shown.columns == ["massive-intent", "massive-intent (multi)", "massive-slots",
                                        "massive-slots (multi)"]
        await pilot.press(*" 5-shot")  # a free word matches the row's name
        await pilot.pause()
        assert shown_rows(screen) == ["smollm2-135m · prompt · 5-shot"]
        screen.query_one("#query", Input).value = "colour:red"
        await pilot.pause()
        assert "unknown filter key 'colour:'" in status(screen)
        screen.query_one("#query", Input).value = "shots:5"
        await pilot.pause()
        assert shown_rows(screen) == ["smollm2-135m · prompt · 5-shot"]

    run_app(make_app(seeded), scenario)


def test_sort_by_the_cursor_column_best_first_then_reversed_then_by_row_name(seeded):
    async def scenario(pilot):
        screen = await open_results(pilot)
        column = "massive-intent"
        table = screen.query_one("#matrix", MatrixView)
        table.move_cursor(row=0, column=screen.columns.index(column) + 1)
        await pilot.press("o")
        await pilot.pause()
        means = [screen.shown.cells[(r, column)].mean for r in screen.shown.rows if (r, column) in screen.shown.cells]
        assert means == sorted(means, reverse=True) and len(means) == 4
        assert "sort: massive-intent, best first" in status(screen)
        await pilot.press("o")
        await pilot.pause()
        reversed_means = [screen.shown.cells[(r, column)].mean for r in screen.shown.rows
                          if (r, column) in screen.shown.cells]
        assert reversed_means == sorted(means)
        table.move_cursor(column=0)
        await pilot.press("o")
        await pilot.pause()
        assert shown_rows(screen) == sorted(shown_rows(screen))

    run_app(make_app(seeded), scenario)


def test_metric_switch_reloads_and_lower_failure_rates_are_best(seeded):
    store = open_store(seeded)

    async def scenario(pilot):
        screen = await open_results(pilot)
        await pilot.press("right_square_bracket")  # ] next metric, [ back
        await settle(pilot)
        assert screen.metric == "accuracy"
        await pilot.press("left_square_bracket")
        await settle(pilot)
        assert screen.metric == "auto"
        await pilot.press("right_square_bracket")
        await settle(pilot)
        assert screen.query_one("#metric", Select).value == "accuracy"
        # accuracy has no slot columns, unlike "auto" (accuracy / slot F1)
        assert "massive-slots" not in screen.shown.columns
        for _ in range(10):
            if screen.metric == "parse_failure_rate":
                break
            await pilot.press("right_square_bracket")
            await settle(pilot)
        assert screen.metric == "parse_failure_rate"
        expected = queries.results_matrix(store, metric="parse_failure_rate")
        column = "massive-intent"
        assert column_values(screen, column) == [render.cell_text(expected, r, column) for r in expected.rows]
        best_row = screen.shown.rows[[str(v) for v in column_values(screen, column)].index(
            min((v for v in column_values(screen, column) if v != "–"), key=lambda v: float(v.split()[0])))]
        assert render.best_per_column(screen.shown)[column] == best_row
        # An encoder cannot fail to parse: its stored 0.0 is blank, and never the best (lowest) rate.
        encoder = screen.shown.rows.index(("minilm", "encoder-finetune", 0, ""))
        assert (("minilm", "encoder-finetune", 0, ""), column) in screen.shown.cells  # stored as 0.0
        assert column_values(screen, column)[encoder] == "–"
        assert best_row[1] != "encoder-finetune"
        assert "parse_failure_rate (%)" in str(screen.query_one("#results-title", Static).render())

    run_app(make_app(seeded), scenario)


@pytest.mark.parametrize("extension, fmt", [("md", "md"), ("csv", "csv"), ("tex", "latex")])
def test_export_writes_exactly_what_clfbench_results_prints(seeded, cli, tmp_path, extension, fmt):
    target = tmp_path / f"smollm.{extension}"

    async def scenario(pilot):
        screen = await open_results(pilot)
        await pilot.press("slash", *"model:smollm", "enter")
        await pilot.press("w")
        await pilot.pause()
        assert isinstance(pilot.app.screen, ExportScreen)
        pilot.app.screen.query_one(Input).value = str(target)
        await pilot.press("enter")
        await pilot.pause()
        assert pilot.app.screen is screen

    run_app(make_app(seeded), scenario)
    printed = cli.run("--db", seeded, "results", "--model", "smollm", "--format", fmt).stdout
    assert target.read_text() == printed
    assert "smollm2-135m" in printed and "minilm" not in printed


def test_clfbench_results_leaves_an_encoders_parse_failure_rate_blank_in_every_format(seeded, cli):
    table = cli.run("--db", seeded, "results", "--metric", "parse_failure_rate", "--task", "massive-intent").stdout
    encoder_line = next(line for line in table.splitlines() if "encoder-finetune" in line)
    assert "–" in encoder_line and "0.0" not in encoder_line
    rows = cli.json("--db", seeded, "results", "--metric", "parse_failure_rate", "--format", "json")["rows"]
    assert all(row["cells"] == {} for row in rows if row["method"] == "encoder-finetune")
    assert any(row["cells"] for row in rows if row["method"] == "prompt")  # the generating methods keep theirs
    csv_lines = cli.run("--db", seeded, "results", "--metric", "parse_failure_rate", "--format", "csv").stdout
    assert any(line.startswith("minilm,encoder-finetune,0,,,") for line in csv_lines.splitlines())


def test_export_refuses_an_unknown_extension_inline(seeded, tmp_path):
    async def scenario(pilot):
        await open_results(pilot)
        await pilot.press("w")
        await pilot.pause()
        dialog = pilot.app.screen
        dialog.query_one(Input).value = str(tmp_path / "table.xlsx")
        await pilot.press("enter")
        await pilot.pause()
        assert pilot.app.screen is dialog
        assert "unknown extension '.xlsx'" in str(dialog.query_one("#export-error", Static).render())
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(pilot.app.screen, ResultsScreen)

    run_app(make_app(seeded), scenario)
    assert not (tmp_path / "table.xlsx").exists()


def test_paper_layout_groups_columns_as_table_3_dual_then_consolidated(seeded, tmp_path):
    target = tmp_path / "table3.md"

    async def scenario(pilot):
        screen = await open_results(pilot)
        await pilot.press("p")
        await pilot.pause()
        assert screen.shown.columns == [
            "20ng-20class", "20ng-7class", "20ng-20class (multi)", "20ng-7class (multi)",
            "massive-intent", "massive-slots", "massive-intent (multi)", "massive-slots (multi)"]
        view = screen.query_one("#matrix", MatrixView)
        headers = ["/".join(lines) for lines in view.data.headers[1:]]
        assert headers[:4] == ["20NG/dual/20-class", "20NG/dual/7-class", "20NG/consolidated/20-class",
                               "20NG/consolidated/7-class"]
        assert headers[4:] == ["MASSIVE/dual/intent", "MASSIVE/dual/slots", "MASSIVE/consolidated/intent",
                               "MASSIVE/consolidated/slots"]
        assert view.data.header_height == 3
        await pilot.press("w")
        await pilot.pause()
        pilot.app.screen.query_one(Input).value = str(target)
        await pilot.press("enter")
        await pilot.pause()
        await pilot.press("p")
        await pilot.pause()
        assert screen.shown.columns == sorted(screen.shown.columns)  # back to the CLI's order

    run_app(make_app(seeded), scenario)
    header = target.read_text().splitlines()[0]
    assert header.index("20ng-7class |") < header.index("20ng-20class (multi)")


def test_enter_on_a_cell_opens_its_run_in_the_errors_screen(seeded):
    async def scenario(pilot):
        screen = await open_results(pilot)
        row = ("smollm2-135m", "prompt", 0, "")
        column = "massive-intent"
        table = screen.query_one("#matrix", MatrixView)
        table.move_cursor(row=screen.shown.rows.index(row), column=screen.columns.index(column) + 1)
        await pilot.press("enter")
        await settle(pilot)
        await settle(pilot)
        errors = pilot.app.screen
        assert isinstance(errors, ErrorsScreen)
        assert (errors.run_id, errors.task_name) == (PROMPT_INTENT_0SHOT, "massive-intent")
        await pilot.press("escape")
        await pilot.pause()
        assert pilot.app.screen is screen

    run_app(make_app(seeded), scenario)


def test_query_parser_names_the_problem():
    query = parse_query("model:smollm METHOD:prompt method:encoder big")
    assert query.terms == {"model": ("smollm",), "method": ("prompt", "encoder")}
    assert query.words == ("big",)
    with pytest.raises(QueryError, match="'model:' needs a value"):
        parse_query("model:")


# ---- errors --------------------------------------------------------------------------------------

def test_errors_per_label_table_matches_clfbench_errors(seeded, cli):
    report = cli.json("--db", seeded, "errors", str(PROMPT_INTENT_0SHOT), "--task", "massive-intent")

    async def scenario(pilot):
        screen = await open_errors(pilot, PROMPT_INTENT_0SHOT)
        table = screen.query_one("#per-label", DataTable)
        assert table.row_count == len(report["per_label"])
        shown = {str(table.get_row_at(i)[0]): [str(v) for v in table.get_row_at(i)[1:5]]
                 for i in range(table.row_count)}
        for label, scores in report["per_label"].items():
            assert shown[label] == [f"{scores['precision']:.3f}", f"{scores['recall']:.3f}",
                                    f"{scores['f1']:.3f}", str(scores["support"])]
        assert f"accuracy {report['accuracy']:.1%}" in str(screen.query_one("#summary", Static).render())

    run_app(make_app(seeded), scenario)


def test_pick_a_label_lists_its_misclassified_examples(seeded):
    rows = queries.predictions(open_store(seeded), PROMPT_INTENT_0SHOT, "massive-intent")
    expected = examples_for(error_report(rows), "calendar_set")
    assert expected

    async def scenario(pilot):
        screen = await open_errors(pilot, PROMPT_INTENT_0SHOT)
        table = screen.query_one("#per-label", DataTable)
        table.move_cursor(row=table.get_row_index("calendar_set"))
        await pilot.press("enter")
        await settle(pilot)
        assert screen.query_one("#tabs", TabbedContent).active == "examples-tab"
        examples = screen.query_one("#examples", DataTable)
        ids = [str(examples.get_row_at(i)[0]) for i in range(examples.row_count)]
        assert ids == [r["example_id"] for r in expected]
        assert all(r["gold"] == "calendar_set" and r["predicted"] != "calendar_set" for r in expected)
        title = str(screen.query_one("#examples-title", Static).render())
        assert title == f"{len(expected)} misclassified examples with gold calendar_set"

    run_app(make_app(seeded), scenario)


def test_pick_the_unparsed_cell_shows_raw_output_and_what_every_other_run_predicted(seeded):
    store = open_store(seeded)
    rows = queries.predictions(store, PROMPT_INTENT_0SHOT, "massive-intent")
    report = error_report(rows)
    gold = "calendar_remove"
    unparsed = examples_for(report, gold, UNPARSED_COLUMN)
    assert unparsed and all(r["predicted"] is None for r in unparsed)
    others = queries.predictions_for_example(store, "massive-intent", unparsed[0]["example_id"])

    async def scenario(pilot):
        screen = await open_errors(pilot, PROMPT_INTENT_0SHOT)
        await pilot.press("2")
        await pilot.pause()
        matrix = screen.query_one("#matrix", DataTable)
        assert matrix.has_focus
        assert gold in screen.matrix_labels and UNPARSED_COLUMN in screen.matrix_columns
        matrix.move_cursor(row=matrix.get_row_index(gold), column=len(screen.matrix_columns))
        await pilot.press("enter")
        await settle(pilot)
        examples = screen.query_one("#examples", DataTable)
        assert [str(examples.get_row_at(i)[0]) for i in range(examples.row_count)] == [
            r["example_id"] for r in unparsed]
        detail = str(screen.query_one("#example-text", Static).render())
        assert f"raw output: {unparsed[0]['raw_output']}" in detail or unparsed[0]["raw_output"] == ""
        assert f"parse: {unparsed[0]['parse_status']}" in detail
        assert "∅ (not parsed)" in detail
        table = screen.query_one("#others", DataTable)
        runs = [str(table.get_row_at(i)[0]).lstrip("▶") for i in range(table.row_count)]
        assert runs == [str(o["run_id"]) for o in others] and len(runs) >= 5
        assert f"▶{PROMPT_INTENT_0SHOT}" in [str(table.get_row_at(i)[0]) for i in range(table.row_count)]

    run_app(make_app(seeded), scenario)


def test_confusion_matrix_shows_top_labels_then_more_then_all(seeded):
    async def scenario(pilot):
        screen = await open_errors(pilot, PROMPT_INTENT_0SHOT)
        total = len([label for label in screen.report.labels if label != UNPARSED_COLUMN])
        assert len(screen.matrix_labels) == 12 < total
        await pilot.press("2", "plus")
        await pilot.pause()
        assert len(screen.matrix_labels) == 16
        await pilot.press("a")
        await pilot.pause()
        assert len(screen.matrix_labels) == total
        assert screen.query_one("#matrix", DataTable).row_count == total

    run_app(make_app(seeded), scenario)


def test_switch_task_of_a_multi_task_run_to_slots_reports_per_tag(seeded):
    async def scenario(pilot):
        screen = await open_errors(pilot, ENCODER_MASSIVE_MULTI, task="massive-intent")
        assert screen.task_name == "massive-intent" and not screen.report.token_task
        screen.query_one("#task", Select).value = "massive-slots"
        await settle(pilot)
        assert screen.task_name == "massive-slots" and screen.report.token_task
        assert "per tag" in str(screen.query_one("#summary", Static).render())
        screen.query_one("#run", Select).value = PROMPT_INTENT_0SHOT
        await settle(pilot)
        assert (screen.run_id, screen.task_name) == (PROMPT_INTENT_0SHOT, "massive-intent")

    run_app(make_app(seeded), scenario)


def test_a_run_without_predictions_falls_back_to_the_newest_with_a_warning(seeded):
    async def scenario(pilot):
        screen = await open_errors(pilot, 26)  # the failed run
        newest = queries.runs_with_predictions(pilot.app.store)[0]["id"]
        assert screen.run_id == newest
        assert any("run 26 has no predictions" in n.message for n in pilot.app._notifications)

    run_app(make_app(seeded), scenario)


# ---- snapshots (seeded store, frozen clock, 80×24) --------------------------------------------------

def test_snapshot_results(seeded, snap_compare):
    async def before(pilot):
        await settle(pilot)
        await open_results(pilot)

    assert snap_compare(make_app(seeded), terminal_size=(80, 24), run_before=before)


def test_snapshot_results_paper_layout_filtered(seeded, snap_compare):
    async def before(pilot):
        await settle(pilot)
        await open_results(pilot)
        await pilot.press("p", "slash", *"task:massive", "enter")
        await pilot.pause()

    assert snap_compare(make_app(seeded), terminal_size=(80, 24), run_before=before)


@pytest.mark.parametrize("keys", [(), ("2",), ("2", "down", "right", "enter")], ids=["labels", "confusion", "examples"])
def test_snapshot_errors(seeded, snap_compare, keys):
    async def before(pilot):
        await settle(pilot)
        await open_errors(pilot, PROMPT_INTENT_0SHOT)
        for key in keys:
            await pilot.press(key)
            await pilot.pause()
        await settle(pilot)

    assert snap_compare(make_app(seeded), terminal_size=(80, 24), run_before=before)
