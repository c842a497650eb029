"""Errors of one run on one task: per-label precision/recall/F1, the confusion matrix, the wrong examples.

Reads (the run list, a task's predictions, another example's predictions across runs) run in thread
workers; the report is app.error_analysis.error_report, the same numbers as `clfbench errors`. Token tasks
(slots) are analysed per tag, after MASSIVE's normalisation.

At 80×24 the confusion matrix shows the TOP_K labels most involved in errors (as gold or as prediction),
numbered, with keys to show more, fewer or all of them; the table scrolls both ways.

The run list follows the store (every REFRESH_S, one read at a time): a run that finishes joins the picker, and
a screen opened on a run that is still queued or running says so in one line, shows no other run, and opens
that run's errors once it has predictions.
"""
from __future__ import annotations

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Select, Static, TabbedContent, TabPane

from clfbench.app import render
from clfbench.app.error_analysis import UNPARSED_COLUMN, ErrorReport, error_report, examples_for
from clfbench.app.tui.screen_parts import KeyTable, TitleBar, call_if_open, copy_for_user, copy_key, tab_keys
from clfbench.storage import queries
from clfbench.storage.db import Store

TOP_K = 12
REFRESH_S = 2.0
WAITING_STATUSES = ("queued", "running")  # a run in these has no predictions yet: wait for it, show no other
LABEL_WIDTH = 22  # characters of a label in the confusion matrix's row names


def run_title(run: dict) -> str:
    return f"#{run['id']} {render.run_label(run['model'], run['method'], run['shots'])} · {run['task']}"


def top_labels(report: ErrorReport, k: int | None) -> list[str]:
    """The k labels most involved in errors (off-diagonal counts as gold plus as prediction), in label order.

    k None: all labels. Columns that are not labels (<unparsed>) never count as rows.
    """
    labels = [label for label in report.labels if label != UNPARSED_COLUMN]
    if k is None or k >= len(labels):
        return labels
    errors = dict.fromkeys(report.labels, 0)
    for i, gold in enumerate(report.labels):
        for j, predicted in enumerate(report.labels):
            if i != j:
                errors[gold] += report.confusion[i][j]
                errors[predicted] += report.confusion[i][j]
    chosen = set(sorted(labels, key=lambda label: (-errors[label], label))[:k])
    return [label for label in labels if label in chosen]


def count_cell(count: int, diagonal: bool, largest_error: int) -> Text:
    """Green on the diagonal; errors red, brighter the more examples they hold; zero a dim dot."""
    if count == 0:
        return Text("·", style="dim", justify="right")
    if diagonal:
        return Text(str(count), style="bold green", justify="right")
    heat = count / max(1, largest_error)
    style = "bold white on red" if heat > 0.66 else "red" if heat > 0.33 else "yellow"
    return Text(str(count), style=style, justify="right")


class ErrorsScreen(Screen):
    """One run on one task: per-label scores (1), the confusion matrix (2), the examples behind a cell (3)."""

    HELP_TITLE = "Errors"
    BINDINGS = [
        Binding("escape", "back", "Back"),
        *tab_keys([("labels", "Labels"), ("confusion", "Confusion"), ("examples", "Examples")]),
        Binding("plus", "top_k(4)", "More labels", show=False),
        Binding("minus", "top_k(-4)", "Fewer labels", show=False),
        Binding("a", "all_labels", "All labels", show=False),
        # R and T, not r and t: r retries a run on the runs screen, and a key means one thing everywhere.
        Binding("R", "focus_run", "Pick run", show=False),
        Binding("T", "focus_task", "Pick task", show=False),
        copy_key("copy_text", "Copy text"),
    ]
    DEFAULT_CSS = """
    ErrorsScreen #pickers { height: 1; }
    ErrorsScreen #tabs, ErrorsScreen #tabs ContentSwitcher, ErrorsScreen TabPane { height: 1fr; }
    ErrorsScreen TabPane { padding: 0; }
    ErrorsScreen #per-label, ErrorsScreen #matrix { height: 1fr; }
    ErrorsScreen #run { width: 1fr; }
    ErrorsScreen #task { width: 26; }
    ErrorsScreen #summary, ErrorsScreen #confusion-help, ErrorsScreen #examples-title { height: 1; padding: 0 1; color: $text-muted; }
    ErrorsScreen #examples { height: 6; }
    ErrorsScreen #example-detail { height: auto; max-height: 7; padding: 0 1; background: $boost; }
    ErrorsScreen #others { height: 1fr; min-height: 4; }
    """

    def __init__(self, store: Store, run_id: int | None = None, task: str | None = None) -> None:
        super().__init__()
        self.store = store
        self.run_id = run_id
        self.task_name = task
        self.runs: dict[int, dict] = {}
        self.report: ErrorReport | None = None
        self.top_k: int | None = TOP_K
        self.matrix_labels: list[str] = []  # rows of the shown confusion matrix
        self.matrix_columns: list[str] = []
        self.example_rows: list[dict] = []
        self.reading = False  # a run-list read in flight: the next tick does not start another
        self.shown: tuple[int, str] | None = None  # the (run, task) chosen last: its report is shown or loading

    def compose(self) -> ComposeResult:
        yield TitleBar("errors", id="errors-title")
        with Horizontal(id="pickers"):
            yield Select([], prompt="run", id="run", compact=True)
            yield Select([], prompt="task", id="task", compact=True)
        yield Static("loading…", id="summary")
        with TabbedContent(id="tabs"):
            with TabPane("Labels (1)", id="labels"):
                yield KeyTable(id="per-label", cursor_type="row", zebra_stripes=True)
            with TabPane("Confusion (2)", id="confusion"):
                yield Static("", id="confusion-help")
                yield KeyTable(id="matrix", cursor_type="cell", fixed_columns=1)
            with TabPane("Examples (3)", id="examples-tab"):
                yield Static("pick a label (1) or a cell (2)", id="examples-title")
                yield KeyTable(id="examples", cursor_type="row")
                with VerticalScroll(id="example-detail"):
                    yield Static("", id="example-text")
                yield KeyTable(id="others", cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        per_label = self.query_one("#per-label", DataTable)
        # Fixed widths: the table does not re-measure (and jump) as a report of another size arrives.
        for name, width in (("label", LABEL_WIDTH + 2), ("precision", 9), ("recall", 6), ("f1", 5),
                            ("support", 7), ("wrong", 5)):
            per_label.add_column(name, width=width)
        self.query_one("#examples", DataTable).add_columns("id", "gold", "predicted", "parse", "text")
        self.query_one("#others", DataTable).add_columns("run", "model · method · shots", "predicted", "")
        per_label.focus()
        self.reload()
        self.set_interval(REFRESH_S, self.reload)

    # ---- reading the store (thread workers) ----------------------------------------------------
    def reload(self) -> None:
        """Read the run list again, unless the last read is still running (reads never pile up)."""
        if not self.reading:
            self.reading = True
            self.load_runs()

    # Not exclusive: `reading` already keeps reads from piling up, and an exclusive start cancels the read that is
    # just finishing (its flag is cleared before it delivers), which surfaced as WorkerCancelled in the soak test.
    @work(thread=True, group="errors-runs")
    def load_runs(self) -> None:
        try:
            runs = queries.runs_with_predictions(self.store)
            asked = None
            if self.run_id is not None and all(run["id"] != self.run_id for run in runs):
                asked = queries.get_run(self.store, self.run_id)  # why the asked run has none (still running?)
        finally:
            self.reading = False
        call_if_open(self, self.runs_loaded, runs, asked)

    def runs_loaded(self, runs: list[dict], asked: dict | None = None) -> None:
        changed = [(run["id"], run["tasks"]) for run in runs] != \
            [(run["id"], run["tasks"]) for run in self.runs.values()]
        self.runs = {run["id"]: run for run in runs}
        summary = self.query_one("#summary", Static)
        if self.run_id not in self.runs:
            if asked is not None and asked["status"] in WAITING_STATUSES:
                self.fill_run_picker(runs, changed)
                summary.update(f"run {self.run_id} is {asked['status']}: its errors appear here when it "
                               "succeeds")
                return
            if not runs:
                summary.update("no run has predictions yet (they appear when runs succeed)")
                return
            if self.run_id is not None:
                self.notify(f"run {self.run_id} has no predictions; showing run {runs[0]['id']}", severity="warning")
            self.run_id, changed = runs[0]["id"], True
        self.fill_run_picker(runs, changed)
        if self.shown != (self.run_id, self.task_name):
            self.choose_run(self.run_id, self.task_name)

    def fill_run_picker(self, runs: list[dict], changed: bool) -> None:
        """The run picker's options (only when the list changed: a refresh must not close an open picker)."""
        run_select = self.query_one("#run", Select)
        if not changed and run_select.value == self.run_id:
            return
        with run_select.prevent(Select.Changed):
            run_select.set_options([(run_title(run), run["id"]) for run in runs])
            if self.run_id in self.runs:
                run_select.value = self.run_id

    def choose_run(self, run_id: int, task: str | None) -> None:
        run = self.runs[run_id]
        self.run_id = run_id
        self.task_name = task if task in run["tasks"] else run["tasks"][0]
        task_select = self.query_one("#task", Select)
        with task_select.prevent(Select.Changed):
            task_select.set_options([(name, name) for name in run["tasks"]])
            task_select.value = self.task_name
        self.shown = (run_id, self.task_name)
        self.query_one("#summary", Static).update(f"loading run {run_id} · {self.task_name}…")
        self.load_report(run_id, self.task_name)

    @work(thread=True, exclusive=True, group="errors-report")
    def load_report(self, run_id: int, task: str) -> None:
        report = error_report(queries.predictions(self.store, run_id, task))
        call_if_open(self, self.report_loaded, run_id, task, report)

    def report_loaded(self, run_id: int, task: str, report: ErrorReport) -> None:
        if (run_id, task) != (self.run_id, self.task_name):  # the user picked another one meanwhile
            return
        self.report = report
        run = self.runs[run_id]
        self.query_one("#errors-title", TitleBar).set_title("errors", run_title(run))
        parse_failures = sum(1 for row in report.rows if row["parse_status"] != "ok")
        self.query_one("#summary", Static).update(
            f"{task}: accuracy {report.accuracy:.1%}{' per tag' if report.token_task else ''} · "
            f"{len(report.rows)} examples · {parse_failures} unparsed")
        self.fill_per_label()
        self.fill_matrix()
        self.show_examples([], "pick a label (1) or a cell (2)")

    # ---- tables ----------------------------------------------------------------------------
    def fill_per_label(self) -> None:
        report = self.report
        table = self.query_one("#per-label", DataTable)
        table.clear()
        index = {label: i for i, label in enumerate(report.labels)}
        # Worst first: that is where a user looks.
        for label, scores in sorted(report.per_label.items(), key=lambda item: (item[1]["f1"], item[0])):
            i = index[label]
            wrong = scores["support"] - report.confusion[i][i]
            table.add_row(label, f"{scores['precision']:.3f}", f"{scores['recall']:.3f}", f"{scores['f1']:.3f}",
                          str(scores["support"]), str(wrong), key=label)

    def fill_matrix(self) -> None:
        report = self.report
        labels = top_labels(report, self.top_k)
        columns = labels + ([UNPARSED_COLUMN] if UNPARSED_COLUMN in report.labels else [])
        self.matrix_labels, self.matrix_columns = labels, columns
        index = {label: i for i, label in enumerate(report.labels)}
        largest_error = max([report.confusion[index[g]][index[p]] for g in labels for p in columns if g != p] or [1])
        table = self.query_one("#matrix", DataTable)
        table.clear(columns=True)
        table.add_column("gold \\ predicted", key="gold")
        for number, column in enumerate(columns, 1):
            table.add_column("∅" if column == UNPARSED_COLUMN else str(number), key=column)
        for number, gold in enumerate(labels, 1):
            name = f"{number:>2} {gold}"
            cells = [name if len(name) <= LABEL_WIDTH else name[:LABEL_WIDTH - 1] + "…"]
            cells += [count_cell(report.confusion[index[gold]][index[p]], gold == p, largest_error) for p in columns]
            table.add_row(*cells, key=gold)
        total = len([label for label in report.labels if label != UNPARSED_COLUMN])
        shown = f"top {len(labels)}/{total} labels by errors" if len(labels) < total else f"all {total} labels"
        self.query_one("#confusion-help", Static).update(
            f"{shown} · rows gold, columns predicted · +/-/a: more/fewer/all")

    def show_examples(self, rows: list[dict], title: str) -> None:
        self.example_rows = rows
        self.query_one("#examples-title", Static).update(title)
        table = self.query_one("#examples", DataTable)
        table.clear()
        for row in rows:
            table.add_row(row["example_id"], row["gold"], row["predicted"] if row["predicted"] is not None else "∅",
                          Text(row["parse_status"], style="" if row["parse_status"] == "ok" else "bold red"),
                          row["text"].replace("\n", " ")[:60])
        self.query_one("#others", DataTable).clear()
        self.query_one("#example-text", Static).update("")
        if rows:
            self.show_example(0)

    def show_example(self, position: int) -> None:
        row = self.example_rows[position]
        detail = Text()
        for name, value in (("id", row["example_id"]), ("gold", row["gold"]),
                            ("predicted", row["predicted"] if row["predicted"] is not None else "∅ (not parsed)"),
                            ("parse", row["parse_status"]), ("raw output", row["raw_output"]),
                            ("text", row["text"])):
            if value is None:
                continue
            detail.append(f"{name}: ", style="bold")
            detail.append(f"{value}\n", style="red" if name == "parse" and value != "ok" else "")
        self.query_one("#example-text", Static).update(detail)
        self.load_others(self.task_name, row["example_id"])

    @work(thread=True, exclusive=True, group="errors-others")
    def load_others(self, task: str, example_id: str) -> None:
        rows = queries.predictions_for_example(self.store, task, example_id)
        call_if_open(self, self.others_loaded, task, example_id, rows)

    def others_loaded(self, task: str, example_id: str, rows: list[dict]) -> None:
        table = self.query_one("#others", DataTable)
        table.clear()
        for row in rows:
            right = row["predicted"] == row["gold"]
            marker = "▶" if row["run_id"] == self.run_id else ""
            table.add_row(f"{marker}{row['run_id']}", render.run_label(row["model"], row["method"], row["shots"]),
                          row["predicted"] if row["predicted"] is not None else "∅",
                          Text("✓", style="green") if right else Text("✗", style="red"))
        table.border_title = f"{len(rows)} runs on {task} for example {example_id}"

    # ---- picking ---------------------------------------------------------------------------
    @on(Select.Changed, "#run")
    def run_changed(self, event: Select.Changed) -> None:
        if isinstance(event.value, int) and event.value != self.run_id:
            self.choose_run(event.value, self.task_name)

    @on(Select.Changed, "#task")
    def task_changed(self, event: Select.Changed) -> None:
        if isinstance(event.value, str) and event.value != self.task_name:
            self.choose_run(self.run_id, event.value)

    @on(DataTable.RowSelected, "#per-label")
    def label_selected(self, event: DataTable.RowSelected) -> None:
        self.pick(str(event.row_key.value), None)

    @on(DataTable.CellSelected, "#matrix")
    def cell_selected(self, event: DataTable.CellSelected) -> None:
        gold = str(event.cell_key.row_key.value)
        predicted = str(event.cell_key.column_key.value)
        self.pick(gold, None if predicted == "gold" else predicted)

    def pick(self, gold: str, predicted: str | None) -> None:
        """A label (predicted None: its misclassified examples) or a confusion cell: list its examples."""
        if self.report is None:
            return
        rows = examples_for(self.report, gold, predicted)
        unit = "sentences" if self.report.token_task else "examples"
        if predicted is None:
            title = f"{len(rows)} misclassified {unit} with gold {gold}"
        else:
            shown = "∅ (unparsed)" if predicted == UNPARSED_COLUMN else predicted
            title = f"{len(rows)} {unit} with gold {gold}, predicted {shown}"
        self.show_examples(rows, title)
        self.query_one("#tabs", TabbedContent).active = "examples-tab"
        self.call_after_refresh(self.query_one("#examples", DataTable).focus)

    @on(DataTable.RowHighlighted, "#examples")
    def example_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if 0 <= event.cursor_row < len(self.example_rows):
            self.show_example(event.cursor_row)

    # ---- actions ---------------------------------------------------------------------------
    def action_tab(self, tab: str) -> None:
        pane = {"labels": "labels", "confusion": "confusion", "examples": "examples-tab"}[tab]
        self.query_one("#tabs", TabbedContent).active = pane
        table = {"labels": "#per-label", "confusion": "#matrix", "examples": "#examples"}[tab]
        # A table in a pane that was hidden can take focus only once the pane is shown.
        self.call_after_refresh(self.query_one(table, DataTable).focus)

    def action_top_k(self, change: int) -> None:
        if self.report is None:
            return
        total = len(self.report.labels)
        current = self.top_k if self.top_k is not None else total
        self.top_k = max(2, min(total, current + change))
        self.fill_matrix()

    def action_all_labels(self) -> None:
        if self.report is not None:
            self.top_k = None if self.top_k is not None else TOP_K
            self.fill_matrix()

    def action_focus_run(self) -> None:
        self.query_one("#run", Select).focus()

    def action_focus_task(self) -> None:
        self.query_one("#task", Select).focus()

    def action_copy_text(self) -> None:
        table = self.query_one("#examples", DataTable)
        if self.example_rows and table.cursor_row < len(self.example_rows):
            row = self.example_rows[table.cursor_row]
            copy_for_user(self, row["text"], f"the text of example {row['example_id']}")

    def action_back(self) -> None:
        self.app.pop_screen()
