"""The compare and plot screens (issue 13) through Textual's pilot, on the seeded store with a frozen clock.

What a user does on the results matrix (v on a cell, b to mark a baseline, f for the cost plot, ] for another cost,
w to write the SVG) and what they then see, checked against the numbers the CLI computes from the same store
(`clfbench compare` and `clfbench plot` use the same functions, so the TUI and the CLI cannot drift apart).
Snapshots pin both screens at 80×24.
"""
from __future__ import annotations

import pytest
from textual.widgets import DataTable, Static

from clfbench.app import render
from clfbench.app.compare import compare_task, metric_rows
from clfbench.app.plot import axis_name, points_of, svg_plot
from clfbench.app.tui.compare import CompareScreen
from clfbench.app.tui.matrix_view import MatrixView
from clfbench.app.tui.plot import PlotScreen
from clfbench.app.tui.results import ExportScreen
from clfbench.storage import queries
from tests.test_tui_results import make_app, open_results, run_app, seeded, settle  # noqa: F401 (fixture)

assert seeded  # the fixture, imported for pytest


def text_of(screen, selector: str) -> str:
    return str(screen.query_one(selector, Static).render())


def table_rows(screen, selector: str) -> list[list[str]]:
    table = screen.query_one(selector, DataTable)
    return [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]


async def move_to(pilot, screen, row_label: str, column: str) -> None:
    """Put the matrix cursor on the cell of `row_label` (as shown) in `column`."""
    view = screen.query_one("#matrix", MatrixView)
    names = [view.visible_text(i, 0) for i in range(view.row_count)]
    view.cursor_row = names.index(row_label)
    view.cursor_column = screen.columns.index(column) + 1
    await pilot.pause()


def column_cells(screen, column: str) -> dict[str, int]:
    """Row label -> the first run of its cell in `column`."""
    matrix = screen.prepared.matrix
    return {render.row_label(row): matrix.cells[(row, column)].run_ids[0] for row in matrix.rows
            if (row, column) in matrix.cells}


def test_v_compares_a_cell_with_its_columns_best_with_the_clis_paired_numbers(seeded):
    async def scenario(pilot):
        results = await open_results(pilot)
        runs = column_cells(results, "massive-intent")
        best_row = render.row_label(results.prepared.matrix.rows[
            next(i for i, column in results.prepared.best(results.rows, results.columns)
                 if results.columns[column - 1] == "massive-intent")])
        worse = next(label for label in runs if label != best_row)
        await move_to(pilot, results, worse, "massive-intent")
        await pilot.press("v")
        await settle(pilot)
        screen = pilot.app.screen
        assert isinstance(screen, CompareScreen)
        assert screen.run_ids == (runs[worse], runs[best_row])
        store = pilot.app.store
        expected = compare_task(store, queries.get_run(store, runs[worse]), queries.get_run(store, runs[best_row]),
                                "massive-intent", examples=50)
        shown = table_rows(screen, "#metrics")
        assert [row[:6] for row in shown] == [list(row[:6]) for row in metric_rows(expected)]
        assert shown[0][6] == "McNemar" and shown[1][6] == "bootstrap"
        agreement = text_of(screen, "#agreement")
        for count in expected.agreement.values():
            assert f"{count:,}" in agreement
        assert "(the column's best)" in text_of(screen, "#sides")
        assert f"{expected.shared:,} test examples both answered" in text_of(screen, "#status")
        verdicts = text_of(screen, "#verdicts")
        assert verdicts.startswith("accuracy: ") and "macro_f1: " in verdicts
        # 2: per-label F1 of both runs, largest difference first; 3: the examples only one got right.
        await pilot.press("2")
        labels = table_rows(screen, "#per-label")
        assert [row[0] for row in labels] == [label for label, *_ in expected.per_label]
        await pilot.press("3")
        await pilot.pause()
        examples = table_rows(screen, "#examples")
        assert len(examples) == len(expected.disagreements)
        assert {row[0] for row in examples} <= {"A", "B"}
        await pilot.press("down")
        await pilot.pause()
        second = expected.disagreements[1]
        detail = text_of(screen, "#example-text")
        assert second["example_id"] in detail and f"gold: {second['gold']}" in detail
        await pilot.press("escape")
        assert pilot.app.screen is results

    run_app(make_app(seeded), scenario, size=(80, 24))


def test_b_marks_a_baseline_that_v_compares_other_cells_of_its_column_with(seeded):
    async def scenario(pilot):
        results = await open_results(pilot)
        runs = column_cells(results, "20ng-7class")
        labels = list(runs)
        baseline, other = labels[1], labels[2]
        await move_to(pilot, results, baseline, "20ng-7class")
        await pilot.press("b")
        assert any("baseline:" in n.message for n in pilot.app._notifications)
        await move_to(pilot, results, other, "20ng-7class")
        await pilot.press("v")
        await settle(pilot)
        screen = pilot.app.screen
        assert isinstance(screen, CompareScreen)
        assert screen.run_ids == (runs[other], runs[baseline])
        assert "(the baseline)" in text_of(screen, "#sides")
        await pilot.press("escape")
        # In another column the baseline does not apply: v there compares with that column's best.
        await move_to(pilot, results, other, "20ng-20class")
        await pilot.press("v")
        await settle(pilot)
        assert "(the column's best)" in text_of(pilot.app.screen, "#sides")

    run_app(make_app(seeded), scenario, size=(80, 24))


def test_v_on_the_best_cell_itself_says_what_to_do_and_opens_nothing(seeded):
    async def scenario(pilot):
        results = await open_results(pilot)
        (best_row, _column), = [cell for cell in results.prepared.best(results.rows, results.columns)
                                if results.columns[cell[1] - 1] == "massive-intent"]
        await move_to(pilot, results, results.prepared.names[best_row], "massive-intent")
        await pilot.press("v")
        await settle(pilot)
        assert pilot.app.screen is results
        assert any("this is the column's best" in n.message for n in pilot.app._notifications)

    run_app(make_app(seeded), scenario)


def test_a_run_deleted_before_the_compare_gives_one_line_naming_it(seeded):
    async def scenario(pilot):
        pilot.app.push_screen(CompareScreen(pilot.app.store, 3, 999, "20ng-7class"))
        await settle(pilot)
        status = pilot.app.screen.query_one("#status", Static)
        assert str(status.render()) == "cannot compare: run 999 is no longer in the store"
        assert status.has_class("error")

    run_app(make_app(seeded), scenario)


def test_f_plots_the_shown_rows_of_the_column_as_the_cli_does_and_w_writes_its_svg(seeded, tmp_path):
    async def scenario(pilot):
        results = await open_results(pilot)
        await pilot.press("slash", *"method:prompt", "enter")
        await pilot.pause()
        shown = [results.prepared.matrix.rows[i] for i in results.rows]
        await move_to(pilot, results, render.row_label(shown[0]), "massive-intent")
        await pilot.press("f")
        await settle(pilot)
        screen = pilot.app.screen
        assert isinstance(screen, PlotScreen)
        store = pilot.app.store
        quality = queries.results_matrix(store, method="prompt")
        cost = queries.results_matrix(store, metric="test_examples_per_s", method="prompt")
        expected = points_of(quality, cost, "massive-intent")
        assert screen.cost == "test_examples_per_s" and screen.points == expected
        drawn = text_of(screen, "#plot")
        assert "test_examples_per_s" in drawn and "minilm" not in drawn  # the filter applies
        for number, point in enumerate(expected, 1):
            assert f"{number:>2} {'◆' if point.on_front else '·'} {point.label}" in drawn
        assert f"{sum(p.on_front for p in expected)} on the Pareto front" in text_of(screen, "#status")
        # w: the SVG `clfbench plot --method prompt -o` writes, byte for byte.
        target = tmp_path / "front.svg"
        await pilot.press("w")
        await pilot.pause()
        assert isinstance(pilot.app.screen, ExportScreen)
        export_input = pilot.app.screen.query_one("#export-path")
        export_input.value = str(target)
        await pilot.press("enter")
        await pilot.pause()
        y_name = axis_name("auto", token_column=False)
        assert target.read_text() == svg_plot(expected, "test_examples_per_s", y_name,
                                              title=f"massive-intent: {y_name} against test_examples_per_s")
        # ]: the next cost the runs recorded; the title follows.
        await pilot.press("right_square_bracket")
        await settle(pilot)
        assert screen.cost == "wall_time_s"
        assert "vs wall_time_s" in str(screen.query_one("#plot-title", Static).render())

    run_app(make_app(seeded), scenario, size=(80, 24))


def test_the_plot_of_a_slot_column_names_its_axis_slot_f1_in_the_cli_and_the_tui(seeded, cli, tmp_path):
    cli.env["CLFBENCH_DB"] = seeded
    target = tmp_path / "slots.svg"
    printed = cli.run("plot", "--task", "massive-slots", "--x", "test_examples_per_s", "-o", str(target)).stdout
    assert "massive-slots: slot F1 (%) against test_examples_per_s" in target.read_text()
    assert f"wrote {target}" in printed

    async def scenario(pilot):
        results = await open_results(pilot)
        await move_to(pilot, results, results.prepared.names[0], "massive-slots")
        await pilot.press("f")
        await settle(pilot)
        assert "massive-slots · slot F1 (%) vs test_examples_per_s" in str(
            pilot.app.screen.query_one("#plot-title", Static).render())

    run_app(make_app(seeded), scenario)


# ---- snapshots (seeded store, frozen clock, 80×24) --------------------------------------------------

@pytest.mark.parametrize("keys", [(), ("3",)], ids=["summary", "disagreements"])
def test_snapshot_compare(seeded, snap_compare, keys):
    async def before(pilot):
        await settle(pilot)
        pilot.app.push_screen(CompareScreen(pilot.app.store, 11, 5, "massive-intent", role_b="the column's best"))
        await settle(pilot)
        for key in keys:
            await pilot.press(key)
            await pilot.pause()
        await settle(pilot)

    assert snap_compare(make_app(seeded), terminal_size=(80, 24), run_before=before)


def test_snapshot_plot(seeded, snap_compare):
    async def before(pilot):
        await settle(pilot)
        results = await open_results(pilot)
        await move_to(pilot, results, results.prepared.names[0], "20ng-7class")
        await pilot.press("f")
        await settle(pilot)

    assert snap_compare(make_app(seeded), terminal_size=(80, 24), run_before=before)


def test_t_bolds_the_cells_tied_with_the_best_as_results_significance_does_and_a_filter_drops_them(seeded):
    from clfbench.app.compare import mark_ties
    from clfbench.engine.methods.catalog import execution_options, option_defaults

    async def scenario(pilot):
        results = await open_results(pilot)
        best_only = set(results.query_one("#matrix", MatrixView).data.best)
        await pilot.press("t")
        await settle(pilot)
        store = pilot.app.store
        matrix = render.applicable_cells(queries.results_matrix(store, ignore=execution_options(),
                                                                 defaults=option_defaults()))
        mark_ties(store, matrix, render.best_per_column(matrix))
        assert results.ties == matrix.ties and any(matrix.ties.values())
        drawn = set(results.query_one("#matrix", MatrixView).data.best)
        tied = sum(len(rows) for rows in matrix.ties.values())
        assert drawn > best_only and len(drawn) == len(best_only) + tied
        status = str(results.query_one("#status", Static).render())
        assert f"{tied} cell(s) not significantly different" in status and "not tested" not in status
        # MiniLM's two-seed cells were tested too (over examples and seeds), not left out.
        two_seeds = [column for column in matrix.columns
                     if any(cell.n > 1 for (_row, name), cell in matrix.cells.items() if name == column)]
        assert two_seeds and all(column in results.ties for column in two_seeds)
        # The export bolds them too, as `clfbench results --significance --format md` does.
        assert results.shown.ties == matrix.ties
        # Another view has other best cells: the marks go, and the status says how to get them back.
        await pilot.press("slash", *"method:prompt", "enter")
        await pilot.pause()
        assert results.ties == {} and "t marks it again" in str(results.query_one("#status", Static).render())

    run_app(make_app(seeded), scenario, size=(100, 30))
