"""Two runs on one task, paired on the test examples both answered: is the difference real? (issue 13)

Opened from the results matrix: `v` on a cell compares its run (A) with the baseline marked with `b` in the same
column, or else with the column's best cell (B). The numbers are app.compare.compare_task's, the same as
`clfbench compare A B --task T` prints: McNemar's exact test for accuracy (for a token task, utterances with
every tag right), the paired bootstrap for F1-type metrics, each difference with its 95% interval. The
comparison reads every prediction of both runs and resamples them, so it runs in a thread worker; the screen
says what it is doing meanwhile.

Tabs: 1 the metrics, the 2×2 agreement table and the verdicts; 2 per-label F1 of both runs, largest differences
first (sequence tasks); 3 the examples exactly one of them got right, with both runs' raw outputs.
"""
from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static, TabbedContent, TabPane

from clfbench.app import render
from clfbench.app.compare import (METRIC_COLUMNS, TaskComparison, compare_task, metric_rows, shared_note,
                                  verdict)
from clfbench.app.tui.screen_parts import KeyTable, TitleBar, call_if_open, copy_for_user, copy_key, show_in, tab_keys
from clfbench.engine.types import ClfbenchError
from clfbench.storage import queries
from clfbench.storage.db import Store

ALPHA = 0.05  # the verdicts' level; `clfbench compare --alpha` sets another
EXAMPLES_PER_SIDE = 50  # disagreements listed per side: enough to see a pattern, few enough to read quickly


def side_line(side: str, run: dict, role: str = "") -> str:
    return (f"{side} = #{run['id']} {render.run_label(run['model'], run['method'], run['shots'])} · seed "
            f"{run.get('seed', 0)}{role}")


def agreement_text(comparison: TaskComparison) -> str:
    """McNemar's 2×2 table as a reader draws it: A's rightness down, B's across."""
    a = comparison.agreement
    right = "every tag right" if comparison.kind == "token" else "label right"
    width = max(len(f"{n:,}") for n in a.values()) + 2
    return "\n".join([f"agreement ({right})   {'B right':>{width + 5}} {'B wrong':>{width + 5}}",
                      f"  A right               {a['both right']:>{width + 5},} {a['only a right']:>{width + 5},}",
                      f"  A wrong               {a['only b right']:>{width + 5},} {a['both wrong']:>{width + 5},}"])


class CompareScreen(Screen):
    """Run A against run B on one task: metrics with paired tests (1), per-label F1 (2), disagreements (3)."""

    HELP_TITLE = "Compare two runs"
    BINDINGS = [
        Binding("escape", "back", "Back"),
        *tab_keys([("summary", "Summary"), ("labels", "Per label"), ("examples", "Disagreements")]),
        copy_key("copy_text", "Copy example"),
    ]
    DEFAULT_CSS = """
    CompareScreen #sides { height: 3; padding: 0 1; }
    CompareScreen #status { height: auto; max-height: 2; padding: 0 1; color: $text-muted; }
    CompareScreen #status.error { color: $error; }
    CompareScreen #tabs, CompareScreen #tabs ContentSwitcher, CompareScreen TabPane { height: 1fr; }
    CompareScreen TabPane { padding: 0; }
    CompareScreen #metrics { height: auto; max-height: 5; }
    CompareScreen #agreement, CompareScreen #verdicts { height: auto; padding: 0 1; }
    CompareScreen #per-label { height: 1fr; }
    CompareScreen #examples { height: 1fr; min-height: 4; }
    CompareScreen #example-detail { height: auto; max-height: 7; padding: 0 1; background: $boost; }
    """

    def __init__(self, store: Store, run_a: int, run_b: int, task: str, role_b: str = "") -> None:
        super().__init__()
        self.store = store
        self.run_ids = (run_a, run_b)
        self.task_name = task
        self.role_b = role_b  # why B: "the column's best" or "the baseline"
        self.comparison: TaskComparison | None = None

    def compose(self) -> ComposeResult:
        yield TitleBar("compare", f"#{self.run_ids[0]} vs #{self.run_ids[1]} · {self.task_name}", id="compare-title")
        yield Static("", id="sides", markup=False)
        yield Static(f"pairing the runs' predictions and resampling them ({self.task_name})…", id="status",
                     markup=False)
        with TabbedContent(id="tabs"):
            with TabPane("Summary (1)", id="summary"):
                yield KeyTable(id="metrics", cursor_type="row")
                yield Static("", id="agreement", markup=False)
                yield Static("", id="verdicts", markup=False)
            with TabPane("Per label (2)", id="labels"):
                yield KeyTable(id="per-label", cursor_type="row", zebra_stripes=True)
            with TabPane("Disagreements (3)", id="examples-tab"):
                yield KeyTable(id="examples", cursor_type="row")
                with VerticalScroll(id="example-detail"):
                    yield Static("", id="example-text", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        metrics_table = self.query_one("#metrics", DataTable)
        # Fixed widths: measured from rows that arrive later, the header would be drawn before they fit, and the
        # 80-column screen holds the table whole.
        for column, width in zip(METRIC_COLUMNS, (14, 5, 5, 6, 14, 8, 9)):
            metrics_table.add_column(column, key=column, width=width)
        for table, columns in (("#per-label", (("label", 30), ("F1 A", 5), ("F1 B", 5), ("A − B", 6), ("support", 7))),
                               ("#examples", (("right", 5), ("gold", 15), ("A said", 15), ("B said", 15),
                                              ("text", 60)))):
            for name, width in columns:
                self.query_one(table, DataTable).add_column(name, width=width)
        metrics_table.focus()
        self.compare_runs()

    @work(thread=True, group="compare")
    def compare_runs(self) -> None:
        try:
            runs = [queries.get_run(self.store, run_id) for run_id in self.run_ids]
            missing = [run_id for run_id, run in zip(self.run_ids, runs) if run is None]
            if missing:
                raise ClfbenchError(f"run {missing[0]} is no longer in the store")
            comparison = compare_task(self.store, runs[0], runs[1], self.task_name, examples=EXAMPLES_PER_SIDE)
        except ClfbenchError as error:
            call_if_open(self, self.failed, str(error))
            return
        call_if_open(self, self.compared, runs, comparison)

    def failed(self, message: str) -> None:
        status = self.query_one("#status", Static)
        show_in(status, f"cannot compare: {message}")
        status.add_class("error")

    def compared(self, runs: list[dict], comparison: TaskComparison) -> None:
        self.comparison = comparison
        show_in(self.query_one("#sides", Static), "\n".join([
            side_line("A", runs[0]), side_line("B", runs[1], f" ({self.role_b})" if self.role_b else ""),
            f"task {comparison.task} ({comparison.kind})"]))
        show_in(self.query_one("#status", Static), shared_note(comparison)
                + (f"\nnote: {comparison.labels_note}" if comparison.labels_note else ""))
        metrics_table = self.query_one("#metrics", DataTable)
        for row in metric_rows(comparison):
            # The test's name without its resamples (said under the verdicts): the table fits 80 columns.
            metrics_table.add_row(*row[:-1], "McNemar" if row[-1].startswith("McNemar") else "bootstrap")
        show_in(self.query_one("#agreement", Static), agreement_text(comparison))
        tests = sorted({m.difference.test for m in comparison.metrics})
        show_in(self.query_one("#verdicts", Static),
                "\n".join([verdict(m.metric, m.difference, ALPHA) for m in comparison.metrics]
                          + [f"tests: {', '.join(tests)}"]))
        self.fill_per_label(comparison)
        self.fill_examples(comparison)

    def fill_per_label(self, comparison: TaskComparison) -> None:
        table = self.query_one("#per-label", DataTable)
        if not comparison.per_label:  # a token task: its tags are compared in the metrics, not per label
            table.add_row("(per-label F1 is for sequence tasks; see the summary's slot F1)", "", "", "", "")
        for label, f1_a, f1_b, support in comparison.per_label:
            table.add_row(label, f"{f1_a * 100:.1f}", f"{f1_b * 100:.1f}", f"{(f1_a - f1_b) * 100:+.1f}",
                          str(support))

    def fill_examples(self, comparison: TaskComparison) -> None:
        table = self.query_one("#examples", DataTable)
        for index, example in enumerate(comparison.disagreements):
            # Labels cut to 15 so the text starts on an 80-column screen; the pane below shows it whole.
            table.add_row("A" if example["right"] == "a" else "B", short(example["gold"], 15),
                          short(example["a"], 15), short(example["b"], 15), short(example["text"], 60),
                          key=str(index))
        if not comparison.disagreements:
            show_in(self.query_one("#example-text", Static), "the runs are right and wrong on the same examples")
        else:
            self.show_example(0)

    @on(DataTable.RowHighlighted, "#examples")
    def example_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key is not None and event.row_key.value is not None:
            self.show_example(int(event.row_key.value))

    def show_example(self, index: int) -> None:
        example = self.comparison.disagreements[index]
        lines = [f"[{example['example_id']}] {example['text']}", f"gold: {example['gold']}"]
        for side in ("a", "b"):
            raw = example[f"{side}_raw"]
            lines.append(f"{side.upper()}: {example[side]}" + (f"   raw: {raw!r}" if raw and raw != example[side]
                                                                 else ""))
        show_in(self.query_one("#example-text", Static), "\n".join(lines))

    def action_tab(self, tab: str) -> None:
        pane = {"summary": "summary", "labels": "labels", "examples": "examples-tab"}[tab]
        self.query_one("#tabs", TabbedContent).active = pane
        table = {"summary": "#metrics", "labels": "#per-label", "examples": "#examples"}[tab]
        # A table in a pane that was hidden can take focus only once the pane is shown.
        self.call_after_refresh(self.query_one(table, DataTable).focus)

    def action_copy_text(self) -> None:
        if self.comparison is None or not self.comparison.disagreements:
            return
        table = self.query_one("#examples", DataTable)
        example = self.comparison.disagreements[min(table.cursor_row, len(self.comparison.disagreements) - 1)]
        copy_for_user(self, example["text"], f"example {example['example_id']}'s text")

    def action_back(self) -> None:
        self.app.pop_screen()


def short(value, width: int) -> str:
    """A cell's text cut to `width` characters (a token task's tags are a list: shown joined)."""
    text = " ".join(value) if isinstance(value, list) else "∅" if value is None else str(value)
    return text if len(text) <= width else text[:width - 1] + "…"
