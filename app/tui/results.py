"""The results matrix: rows = model × method × shots (seeds as mean ± std), columns = task, one metric per cell.

The matrix is read in a thread worker (storage.queries.results_matrix, the query behind `clfbench results`),
one read at a time (a poll or key during a read asks for one more; thread workers cannot be stopped), and it is
computed once per store version: PREPARED keeps each metric's prepared matrix with the queries.matrix_version it
was read at, so opening the screen again or going back to a metric costs one version read (three index lookups)
while no run added, lost or replaced results. Filtering, sorting and the paper layout then work on that matrix
in memory, and MatrixView draws only the lines on screen, so a keystroke in the filter never touches the store
and never rebuilds a table. While the screen is on top it polls the version every POLL_S, so runs that finish
appear without a keystroke. Cells and exports use app.render, the CLI's own formatting, so an exported file has
exactly the numbers `clfbench results --format md/csv/latex` prints.

Query syntax: `model:smollm method:prompt task:massive shots:5` (each key may repeat: any value matches,
case-insensitive substring as in the CLI's --model/--method/--task), plus free words that must all occur
in the row's name ("smollm 5-shot").
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Footer, Input, Select, Static

from clfbench.app import render
from clfbench.app.tui.matrix_view import MatrixData, MatrixView
from clfbench.app.tui.dialogs import ExportScreen
from clfbench.app.tui.messages import OpenCompare, OpenErrors, OpenPlot
from clfbench.app.tui.screen_parts import OneRead, TitleBar, call_if_open, copy_for_user, copy_key, show_in
from clfbench.engine.methods.catalog import execution_options, option_defaults
from clfbench.storage import queries
from clfbench.storage.db import Store
from clfbench.storage.queries import Matrix

MULTI_SUFFIX = " (multi)"  # how results_matrix names a task measured inside a multi-task run
QUERY_KEYS = ("model", "method", "task", "shots")
EXPORT_FORMATS = {".md": "md", ".markdown": "md", ".csv": "csv", ".tex": "latex", ".latex": "latex",
                  ".json": "json"}
# Metrics listed first in the metric picker (the rest of the store's metrics follow alphabetically).
PREFERRED_METRICS = ("auto", "accuracy", "macro_f1", "slot_f1", "exact_match", "parse_failure_rate",
                     "token_accuracy", "examples_per_s", "wall_time_s")
ROW_NAME = "row"  # the sort key of the row-name column
POLL_S = 3.0  # how often the open matrix checks whether results changed (queries.matrix_version)


# Prepared matrices by (store URL, metric): (queries.matrix_version it was read at, the matrix, the store's metric
# names). Opening the screen again, or going back to a metric, costs one version read while no result changed.
PREPARED: dict[tuple[str, str], tuple[tuple, "PreparedMatrix", list[str]]] = {}


def read_matrix(store: Store, metric: str, known: tuple[str, tuple] | None
                ) -> tuple[tuple, "PreparedMatrix | None", list[str]]:
    """(version, prepared matrix, metric names) for `metric`; the matrix None when `known` (metric, version) is
    still current. In a worker thread: the matrix is computed once per version, not per screen or poll."""
    version = queries.matrix_version(store)
    if known == (metric, version):
        return version, None, []
    cached = PREPARED.get((store.url, metric))
    if cached is not None and cached[0] == version:
        return cached
    prepared = PreparedMatrix(queries.results_matrix(store, metric=metric, ignore=execution_options(),
                                                     defaults=option_defaults()))
    names = queries.result_metric_names(store)
    PREPARED[(store.url, metric)] = (version, prepared, names)
    return version, prepared, names


class QueryError(ValueError):
    """A filter the user typed that cannot be applied (unknown key, key without value)."""


@dataclass(frozen=True)
class Query:
    terms: dict[str, tuple[str, ...]] = field(default_factory=dict)  # key -> accepted substrings
    words: tuple[str, ...] = ()

    def matches_row(self, row: tuple[str, str, int, str], lower_name: str | None = None) -> bool:
        model, method, shots, _variant = row
        for key, value in (("model", model), ("method", method), ("shots", str(shots))):
            wanted = self.terms.get(key)
            if wanted and not any((w == value) if key == "shots" else (w in value.lower()) for w in wanted):
                return False
        name = lower_name if lower_name is not None else render.row_label(row).lower()
        return all(word in name for word in self.words)

    def matches_column(self, column: str) -> bool:
        wanted = self.terms.get("task")
        return not wanted or any(w in base_task(column).lower() for w in wanted)


def parse_query(text: str) -> Query:
    terms: dict[str, list[str]] = {}
    words = []
    for token in text.lower().split():
        key, colon, value = token.partition(":")
        if not colon:
            words.append(token)
            continue
        if key not in QUERY_KEYS:
            raise QueryError(f"unknown filter key '{key}:' (use {', '.join(k + ':' for k in QUERY_KEYS)})")
        if not value:
            raise QueryError(f"'{key}:' needs a value, e.g. {key}:{'5' if key == 'shots' else 'mini'}")
        terms.setdefault(key, []).append(value)
    return Query({key: tuple(values) for key, values in terms.items()}, tuple(words))


def base_task(column: str) -> str:
    return column.removesuffix(MULTI_SUFFIX)


def is_consolidated(column: str) -> bool:
    return column.endswith(MULTI_SUFFIX)


def dataset_of(task: str) -> str:
    """The dataset part of a task name: '20ng-7class' -> '20ng', 'massive-intent' -> 'massive'."""
    return task.split("-", 1)[0]


def paper_order(column: str) -> tuple:
    """The main paper's Table 3 order: per dataset, the single-task ("dual") columns, then the same tasks
    measured in one consolidated multi-task run; datasets and tasks by name."""
    return (dataset_of(base_task(column)), is_consolidated(column), base_task(column))


class PreparedMatrix:
    """A matrix read from the store with everything a keystroke needs precomputed (in the reading worker).

    Filtering, layout and sorting work on row indices, so they cost microseconds per row; `sub_matrix`
    turns a selection back into a storage Matrix for app.render (exports, identical to the CLI).
    """

    def __init__(self, matrix: Matrix) -> None:
        self.matrix = matrix
        self.names = [render.row_label(row) for row in matrix.rows]
        self.lower_names = [name.lower() for name in self.names]
        self.position = {column: i for i, column in enumerate(matrix.columns)}
        percent = render.is_percent_metric(matrix.metric)
        self.texts: list[list[str]] = []
        self.means: list[list[float]] = []  # nan where a row has no value in a column
        self.first_runs: list[list[int | None]] = []
        for row, name in zip(matrix.rows, self.names):
            cells = [matrix.cells.get((row, column)) for column in matrix.columns]
            applies = render.metric_applies(matrix.metric, row[1])  # an encoder's parse failure rate: blank, not 0
            self.texts.append([name] + [render.cell_text(matrix, row, column, percent) for column in matrix.columns])
            self.means.append([cell.mean if cell and applies else math.nan for cell in cells])
            self.first_runs.append([min(cell.run_ids) if cell else None for cell in cells])
        self.lower_is_better = render.lower_is_better(matrix.metric)
        self._views: dict[tuple, MatrixData] = {}

    def select(self, query: Query, paper: bool = False, sort_key: str | None = None,
               reverse: bool = False) -> tuple[list[int], list[str]]:
        """Row indices and columns the query keeps, laid out and sorted as the screen shows them.

        Rows keep the store's order (results_matrix lists them by first run id); a row that loses columns to
        a task filter is placed by its first run among the columns kept, which is the order
        `clfbench results --task` prints.
        """
        matrix = self.matrix
        columns = [c for c in matrix.columns if query.matches_column(c)]
        if paper:
            columns.sort(key=paper_order)
        kept = [self.position[c] for c in columns]
        rows = [i for i, row in enumerate(matrix.rows)
                if query.matches_row(row, self.lower_names[i]) and any(self.first_runs[i][k] is not None for k in kept)]
        if len(columns) != len(matrix.columns):
            rows.sort(key=lambda i: min(self.first_runs[i][k] for k in kept if self.first_runs[i][k] is not None))
        if sort_key == ROW_NAME:
            rows.sort(key=lambda i: self.names[i])
        elif sort_key is not None and sort_key in self.position:
            k = self.position[sort_key]
            sign = 1.0 if self.lower_is_better else -1.0
            # Best first, empty cells last; the sort is stable, so ties keep the order above.
            rows.sort(key=lambda i: (1, 0.0) if math.isnan(self.means[i][k]) else (0, sign * self.means[i][k]))
        if reverse:
            rows.reverse()
        return rows, columns

    def sub_matrix(self, rows: list[int], columns: list[str]) -> Matrix:
        matrix = self.matrix
        keys = [matrix.rows[i] for i in rows]
        cells = {(r, c): matrix.cells[(r, c)] for r in keys for c in columns if (r, c) in matrix.cells}
        return Matrix(metric=matrix.metric, rows=keys, columns=columns, cells=cells, warnings=matrix.warnings,
                      rules={c: matrix.rules[c] for c in columns if c in matrix.rules},
                      column_tasks={c: matrix.column_tasks[c] for c in columns if c in matrix.column_tasks})

    def best(self, rows: list[int], columns: list[str]) -> set[tuple[int, int]]:
        """(row index, shown column position) of each column's best cell: render.best_per_column's rule
        (highest, or lowest for failure rates and times; the first shown row on a tie)."""
        sign = -1.0 if self.lower_is_better else 1.0
        best = set()
        for shown_position, column in enumerate(columns, 1):
            k = self.position[column]
            top, top_value = None, -math.inf
            for i in rows:
                value = self.means[i][k]
                if not math.isnan(value) and sign * value > top_value:
                    top, top_value = i, sign * value
            if top is not None:
                best.add((top, shown_position))
        return best

    def view_data(self, columns: list[str], paper: bool) -> MatrixData:
        """Texts of every row for these columns, with widths from all rows so filtering never reflows."""
        key = (tuple(columns), paper)
        if key not in self._views:
            kept = [self.position[c] + 1 for c in columns]
            texts = [[row[0]] + [row[k] for k in kept] for row in self.texts]
            headers = [["model · method · shots"]] + [column_header(c, paper) for c in columns]
            widths = [max([len(line) for line in headers[0]] + [len(row[0]) for row in texts])]
            for position, column_headers in enumerate(headers[1:], 1):
                widths.append(max([len(line) for line in column_headers] + [len(row[position]) for row in texts]))
            self._views[key] = MatrixData(headers=headers, texts=texts, widths=widths)
        return self._views[key]


def short_task(task: str) -> str:
    """'20ng-20class' -> '20-class', 'massive-intent' -> 'intent' (the dataset is in the group line)."""
    rest = task.split("-", 1)[1] if "-" in task else task
    return re.sub(r"^(\d+)class$", r"\1-class", rest)


def column_header(column: str, paper: bool) -> list[str]:
    """Header lines: the task and whether it was measured in a multi-task run. Paper layout: dataset,
    dual or consolidated, task, as the paper's grouped header (and narrow enough for 80 columns)."""
    if paper:
        setting = "consolidated" if is_consolidated(column) else "dual"
        return [dataset_of(base_task(column)).upper(), setting, short_task(base_task(column))]
    return [base_task(column), "(multi)" if is_consolidated(column) else ""]


def ordered_metrics(names: list[str]) -> list[str]:
    known = [m for m in PREFERRED_METRICS if m == "auto" or m in names]
    return known + sorted(n for n in names if n not in known and n != "n")


def metric_title(metric: str) -> str:
    name = "accuracy / slot F1" if metric == "auto" else metric
    return f"{name} (%)" if render.is_percent_metric(metric) else name


class ResultsScreen(Screen):
    """The results matrix, filtered, sorted and exported in memory; the store is read in thread workers."""

    HELP_TITLE = "Results matrix"
    BINDINGS = [
        # One meaning per key across the screens (issue 15): c and r cancel and retry runs, s starts the engine,
        # so the metric cycles with ] and [, sorting is o (order) and a reload is ctrl+r.
        Binding("escape", "back", "Back"),
        Binding("slash", "filter", "Filter"),
        Binding("right_square_bracket", "next_metric(1)", "Metric"),
        Binding("left_square_bracket", "next_metric(-1)", "Previous metric", show=False),
        Binding("o", "sort", "Order by column"),
        Binding("p", "toggle_paper", "Paper layout"),
        Binding("w", "export", "Export"),
        Binding("v", "versus", "Compare"),
        Binding("b", "baseline", "Baseline", show=False),
        Binding("f", "front", "Cost plot"),
        Binding("t", "significance", "Ties with best", show=False),
        copy_key("copy_cell", "Copy cell"),
        Binding("ctrl+r", "reload", "Reload", show=False),
    ]
    DEFAULT_CSS = """
    ResultsScreen #controls { height: 3; }
    ResultsScreen #query { width: 1fr; }
    ResultsScreen #metric { width: 28; }
    ResultsScreen #status { height: auto; max-height: 3; color: $text-muted; padding: 0 1; }
    ResultsScreen #status.error { color: $error; }
    ResultsScreen #notice { height: auto; max-height: 1; color: $warning; padding: 0 1; display: none; }
    ResultsScreen #notice.shown { display: block; }
    ResultsScreen #rules { height: auto; max-height: 2; color: $text-muted; padding: 0 1; display: none; }
    ResultsScreen #rules.shown { display: block; }
    """

    def __init__(self, store: Store, metric: str = "auto") -> None:
        super().__init__()
        self.store = store
        self.metric = metric
        self.prepared: PreparedMatrix | None = None  # as read from the store, for self.metric
        self.rows: list[int] = []  # shown row indices into prepared.matrix.rows, in shown order
        self.columns: list[str] = []  # shown columns, in shown order
        self.query_text = ""
        self.sort_key: str | None = None
        self.sort_reverse = False
        self.paper = False
        self.metric_options = list(PREFERRED_METRICS)
        self.loaded_key: tuple[str, tuple] | None = None  # (metric, queries.matrix_version) of what is shown
        self.reads = OneRead(self.read_worker)
        self.baseline: tuple[tuple, str] | None = None  # (row, column) marked with b: what v compares against
        # t: column -> rows not significantly different from the column's best, for the view they were computed on
        # (ties_view); any other view drops them, since its best cells differ.
        self.ties: dict[str, set] = {}
        self.ties_view: tuple | None = None
        self.ties_note = ""

    def compose(self) -> ComposeResult:
        yield TitleBar("results", id="results-title")
        with Horizontal(id="controls"):
            yield Input(placeholder="filter: model:smollm method:prompt task:massive shots:5 words", id="query")
            yield Select([(m, m) for m in PREFERRED_METRICS], value=self.metric, allow_blank=False, id="metric")
        yield MatrixView(id="matrix")
        yield Static("", id="notice", markup=False)
        yield Static("", id="rules", markup=False)
        yield Static("loading…", id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#matrix", MatrixView).focus()
        self.load()
        # Runs finish while the matrix is open: a cheap poll, and the matrix is re-read only when results changed.
        self.set_interval(POLL_S, self.poll)

    @property
    def matrix(self) -> Matrix | None:
        return self.prepared.matrix if self.prepared else None

    @property
    def shown(self) -> Matrix | None:
        """What the screen shows, as a storage Matrix (exports render this with the CLI's code, bolding the cells
        tied with the best when t marked them)."""
        if self.prepared is None:
            return None
        matrix = self.prepared.sub_matrix(self.rows, self.columns)
        if self.ties and self.ties_view == self.view_key():
            matrix.ties = {column: set(rows) for column, rows in self.ties.items()}
        return matrix

    def view_key(self) -> tuple:
        return self.loaded_key, frozenset(self.rows), frozenset(self.columns)

    # ---- reading the store (one thread worker at a time) ----------------------------------------------
    def reload(self) -> None:
        self.load()

    def action_reload(self) -> None:
        """ctrl+r: read the matrix again even if the store says nothing changed."""
        PREPARED.pop((self.store.url, self.metric), None)
        self.loaded_key = None
        self.load()

    def poll(self) -> None:
        if self.is_current:  # under another screen nothing shows the matrix: it is read when the user comes back
            self.load()

    def on_screen_resume(self) -> None:
        if self.loaded_key is not None:
            self.load()

    def load(self) -> None:
        """Read the matrix if it changed, unless a read runs: then that read goes on once more before it ends."""
        self.reads.request()

    @work(thread=True, group="results-load")
    def read_worker(self) -> None:
        again = True
        while again:
            metric, known = self.metric, self.loaded_key
            version, prepared, names = read_matrix(self.store, metric, known)
            again = self.app.call_from_thread(self.take_read, metric, version, prepared, names)

    def take_read(self, metric: str, version: tuple, prepared: PreparedMatrix | None, names: list[str]) -> bool:
        """On the UI thread: show a read (prepared is None when nothing changed); True to read once more."""
        if metric != self.metric:  # the user switched metric meanwhile
            self.reads.wanted = True
        is_open = self.is_attached and self in self.app.screen_stack  # not after escape during the read
        if is_open and prepared is not None and metric == self.metric:
            self.loaded_key = (metric, version)
            self.loaded(metric, prepared, names)
        return self.reads.more(is_open)

    def loaded(self, metric: str, prepared: PreparedMatrix, names: list[str]) -> None:
        if metric != self.metric:  # the user switched metric again while this one was read
            return
        select = self.query_one("#metric", Select)
        options = ordered_metrics(names) if names else list(PREFERRED_METRICS)
        if self.metric not in options:
            options.append(self.metric)
        self.metric_options = options
        with select.prevent(Select.Changed):
            select.set_options([(m, m) for m in options])
            select.value = self.metric
        self.prepared = prepared
        self.show_notice(prepared.matrix.warnings)
        self.refresh_view()

    def show_notice(self, warnings: list[str]) -> None:
        """One line under the matrix when a task name stands for several tasks (queries.results_matrix's
        warnings): the first, and how many more."""
        notice = self.query_one("#notice", Static)
        more = f" (+{len(warnings) - 1} more: clfbench results lists them)" if len(warnings) > 1 else ""
        show_in(notice, f"warning: {warnings[0]}{more}" if warnings else "")
        notice.set_class(bool(warnings), "shown")

    # ---- the view: filter, layout, sort --------------------------------------------------------
    def refresh_view(self) -> None:
        """Recompute the shown rows and columns from the loaded matrix and redraw; no store access."""
        if self.prepared is None:
            return
        status = self.query_one("#status", Static)
        try:
            query = parse_query(self.query_text)
        except QueryError as error:
            show_in(status, f"error: {error}")
            status.add_class("error")
            return
        status.remove_class("error")
        if self.sort_key not in (None, ROW_NAME) and not query.matches_column(self.sort_key):
            self.sort_key, self.sort_reverse = None, False
        self.rows, self.columns = self.prepared.select(query, self.paper, self.sort_key, self.sort_reverse)
        data = self.prepared.view_data(self.columns, self.paper)
        if self.ties and self.ties_view != self.view_key():
            self.ties, self.ties_note = {}, "significance marks dropped: the view changed (t marks it again)"
        data = MatrixData(headers=data.headers, texts=data.texts, widths=data.widths,
                          best=self.prepared.best(self.rows, self.columns) | self.tie_cells())
        self.query_one("#matrix", MatrixView).show(data, self.rows)
        self.show_rules()
        self.update_status()

    def tie_cells(self) -> set[tuple[int, int]]:
        """(row index, shown column position) of the cells t found not significantly different from the best."""
        if not self.ties:
            return set()
        index = {row: i for i, row in enumerate(self.prepared.matrix.rows)}
        return {(index[row], position) for position, column in enumerate(self.columns, 1)
                for row in self.ties.get(column, ()) if row in index}

    def show_rules(self) -> None:
        """Under the matrix, the slot rules of the shown columns (render.rule_notes, the exports' footnote)."""
        matrix = self.prepared.matrix
        # Only the columns and their rules: rule_notes reads nothing else, and the cells need no copy per keystroke.
        notes = render.rule_notes(Matrix(metric=matrix.metric, rows=[], columns=self.columns, cells={},
                                         rules=matrix.rules))
        rules = self.query_one("#rules", Static)
        show_in(rules, "\n".join(notes))
        rules.set_class(bool(notes), "shown")

    def update_status(self) -> None:
        total = len(self.prepared.matrix.rows)
        sort = ("store order" if self.sort_key is None else
                "row name" if self.sort_key == ROW_NAME else f"{self.sort_key}, best first")
        if self.sort_reverse:
            sort += ", reversed"
        layout = " · paper layout" if self.paper else ""
        self.query_one("#results-title", TitleBar).set_title("results", metric_title(self.metric) + layout)
        text = (f"{len(self.rows)}/{total} rows · {len(self.columns)} columns · sort: {sort}"
                if total else "no results yet (runs appear here when they succeed)")
        if self.ties_note:
            text += f"\n{self.ties_note}"
        show_in(self.query_one("#status", Static), text)

    # ---- the cursor ------------------------------------------------------------------------------
    def cursor_cell(self) -> tuple[tuple, str | None] | None:
        """(row, column) under the cursor; column None on the row-name column."""
        view = self.query_one("#matrix", MatrixView)
        if self.prepared is None or not self.rows:
            return None
        row = self.prepared.matrix.rows[self.rows[view.cursor_row]]
        column = self.columns[view.cursor_column - 1] if view.cursor_column >= 1 else None
        return row, column

    # ---- actions -----------------------------------------------------------------------------
    def action_filter(self) -> None:
        self.query_one("#query", Input).focus()

    @on(Input.Changed, "#query")
    def query_changed(self, event: Input.Changed) -> None:
        self.query_text = event.value
        self.refresh_view()

    @on(Input.Submitted, "#query")
    def query_submitted(self) -> None:
        self.query_one("#matrix", MatrixView).focus()

    @on(Select.Changed, "#metric")
    def metric_chosen(self, event: Select.Changed) -> None:
        if event.value != self.metric and isinstance(event.value, str):
            self.set_metric(event.value)

    def set_metric(self, metric: str) -> None:
        self.metric = metric
        show_in(self.query_one("#status", Static), f"loading {metric}…")
        self.load()

    def action_next_metric(self, step: int = 1) -> None:
        options = self.metric_options
        position = options.index(self.metric) if self.metric in options else -1
        metric = options[(position + step) % len(options)]
        select = self.query_one("#metric", Select)
        with select.prevent(Select.Changed):
            select.value = metric
        self.set_metric(metric)

    def action_sort(self) -> None:
        """Sort by the column under the cursor (best first); again on the same column reverses it."""
        cell = self.cursor_cell()
        if cell is None:
            return
        key = cell[1] or ROW_NAME
        if key == self.sort_key:
            self.sort_reverse = not self.sort_reverse
        else:
            self.sort_key, self.sort_reverse = key, False
        self.refresh_view()

    def action_toggle_paper(self) -> None:
        self.paper = not self.paper
        self.refresh_view()

    def action_export(self) -> None:
        self.app.push_screen(ExportScreen(f"results-{self.metric}.md", "Export the matrix as shown: .md, .csv, .tex "
                                          "or .json", tuple(EXPORT_FORMATS)), self.export_to)

    def export_to(self, path: str | None) -> None:
        shown = self.shown
        if path is None or shown is None:
            return
        fmt = EXPORT_FORMATS[Path(path).suffix.lower()]
        target = Path(path).expanduser()
        try:
            # The CLI prints render_matrix's text plus a newline; the file is byte-for-byte that output.
            target.write_text(render.render_matrix(shown, fmt) + "\n")
        except OSError as error:
            self.notify(f"export failed: {error.strerror}: {target}", severity="error")
            return
        self.notify(f"wrote {len(shown.rows)} rows × {len(shown.columns)} columns to {target}")

    @on(MatrixView.CellSelected, "#matrix")
    def open_errors(self) -> None:
        """Enter on a cell: the Errors screen for the cell's first run and its task."""
        cell = self.cursor_cell()
        if cell is None or cell[1] is None:
            return
        row, column = cell
        values = self.prepared.matrix.cells.get((row, column))
        if values is None:
            self.notify("no run in this cell")
            return
        # "mytask (2)" is a label: the predictions are stored under the task's own name
        self.post_message(OpenErrors(values.run_ids[0], self.prepared.matrix.column_tasks.get(column,
                                                                                            base_task(column))))

    # ---- compare two cells, plot quality against cost (issue 13) -----------------------------------
    def cell_run(self, row: tuple, column: str) -> int | None:
        cell = self.prepared.matrix.cells.get((row, column))
        return cell.run_ids[0] if cell else None

    def action_baseline(self) -> None:
        """b: mark the cell under the cursor as what `v` compares other cells of its column with."""
        cell = self.cursor_cell()
        if cell is None or cell[1] is None or self.cell_run(*cell) is None:
            self.notify("move to a cell with a result to mark it as the baseline", severity="warning")
            return
        self.baseline = cell
        self.notify(f"baseline: {render.row_label(cell[0])} on {cell[1]} (run {self.cell_run(*cell)}); "
                    f"v on another cell of this column compares with it")

    def action_versus(self) -> None:
        """v: the cell under the cursor (A) against the baseline of its column, or else the column's best (B)."""
        cell = self.cursor_cell()
        if cell is None or cell[1] is None or self.cell_run(*cell) is None:
            self.notify("move to a cell with a result to compare it", severity="warning")
            return
        row, column = cell
        if self.baseline is not None and self.baseline[1] == column and self.baseline[0] != row:
            other, role = self.baseline[0], "the baseline"
        else:
            position = self.columns.index(column) + 1
            best = [self.prepared.matrix.rows[i] for i, shown in self.prepared.best(self.rows, self.columns)
                    if shown == position]
            other, role = (best[0] if best else None), "the column's best"
        if other is None or other == row:
            self.notify("this is the column's best: mark a baseline with b, or move to another row")
            return
        run_a, run_b = self.cell_run(row, column), self.cell_run(other, column)
        several = [r for r in (row, other) if self.prepared.matrix.cells[(r, column)].n > 1]
        if several:
            self.notify(f"{len(several)} of the two cells average several seeds: comparing their first runs "
                        f"({run_a} and {run_b})")
        task = self.prepared.matrix.column_tasks.get(column, base_task(column))
        self.post_message(OpenCompare(run_a, run_b, task, role))

    def action_front(self) -> None:
        """f: the shown rows of the column under the cursor (the first shown one on the row names) as points of
        quality against cost, with the Pareto front."""
        if self.prepared is None or not self.columns:
            self.notify("no results to plot yet", severity="warning")
            return
        cell = self.cursor_cell()
        column = cell[1] if cell and cell[1] else self.columns[0]
        # The matrix as shown (its filter applied): the plot reads only the cost.
        self.post_message(OpenPlot(self.prepared.sub_matrix(self.rows, [column]), column))

    def action_significance(self) -> None:
        """t: bold also the cells not significantly different from their column's best (the marks of `clfbench
        results --significance`), for the view as it is; again: without them."""
        if self.ties or self.prepared is None or not self.rows:
            self.ties, self.ties_view, self.ties_note = {}, None, ""
            self.refresh_view()
            return
        self.ties_note = "testing each column's cells against its best (paired on their test examples)…"
        self.update_status()
        self.mark_ties_worker(self.shown, self.view_key())

    @work(thread=True, group="results-ties")
    def mark_ties_worker(self, shown: Matrix, view: tuple) -> None:
        from clfbench.app.compare import mark_ties  # numpy and every prediction of the shown cells: only when asked

        matrix = render.applicable_cells(shown)
        note = mark_ties(self.store, matrix, render.best_per_column(matrix))
        call_if_open(self, self.ties_marked, view, matrix.ties, note)

    def ties_marked(self, view: tuple, ties: dict[str, set], note: str) -> None:
        if view != self.view_key():  # the user filtered or a run finished meanwhile: the marks are for another view
            self.ties_note = "significance marks dropped: the view changed (t marks it again)"
        else:
            # The CLI's note says how the cells were tested; here its short form, and what was left untested.
            untested = [part for part in note.split("; ") if "not tested" in part]
            tied = sum(len(rows) for rows in ties.values())
            self.ties, self.ties_view = ties, view
            self.ties_note = "; ".join([f"bold: each column's best and {tied} cell(s) not significantly different "
                                        f"(paired tests, Holm, alpha 0.05)", *untested])
        self.refresh_view()

    def action_copy_cell(self) -> None:
        view = self.query_one("#matrix", MatrixView)
        if not self.rows:
            return
        text = view.visible_text(view.cursor_row, view.cursor_column)
        copy_for_user(self, text, text)

    def action_back(self) -> None:
        if self.query_one("#query", Input).has_focus:
            self.query_one("#matrix", MatrixView).focus()
            return
        self.app.pop_screen()
