"""Quality against cost on one task, the Pareto front marked (issue 13): `f` on the results matrix.

One point per row the matrix shows (its filter applies) in the column under the cursor: y is the matrix's metric,
x a cost the runs recorded (test examples/s, wall time, GPU-seconds, memory, dollars; `]` and `[` step through the
ones in the store, as they step through metrics on the matrix). The points and the front are app.plot's, the same
as `clfbench plot` draws; `w` writes the SVG for a paper. The results screen hands over its matrix as shown; the
cost's matrix is read in a thread worker; drawing is plotext on the UI thread, a few milliseconds, again on every
resize.
"""
from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static

from clfbench.app.plot import (COST_SUFFIXES, Point, axis_name, is_cost_metric, points_of, quality_name, svg_plot,
                               terminal_plot)
from clfbench.app.report import COST_AXES
from clfbench.app.tui.dialogs import ExportScreen
from clfbench.app.tui.screen_parts import TitleBar, call_if_open, show_in
from clfbench.engine.methods.catalog import execution_options, option_defaults
from clfbench.storage import queries
from clfbench.storage.db import Store
from clfbench.storage.queries import Matrix

MIN_PLOT_HEIGHT = 10  # below this the axes leave no room for points; the legend scrolls instead


def only_rows(matrix: Matrix, rows: list[tuple]) -> Matrix:
    """The matrix cut to the rows the results screen shows (its filter), for points_of."""
    present = set(matrix.rows)
    kept = [row for row in rows if row in present]
    chosen = set(kept)
    return Matrix(metric=matrix.metric, rows=kept, columns=matrix.columns,
                  cells={key: cell for key, cell in matrix.cells.items() if key[0] in chosen},
                  column_tasks=matrix.column_tasks)


def cost_axes(names: list[str]) -> list[str]:
    """The store's cost metrics, the report's axes first (the throughput a reader compares first)."""
    costs = [name for name in names if is_cost_metric(name)]
    return [axis for axis in COST_AXES if axis in costs] + [name for name in costs if name not in COST_AXES]


class PlotScreen(Screen):
    """The shown rows of one results column as points: quality up, cost across, the Pareto front in red."""

    HELP_TITLE = "Quality against cost"
    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("right_square_bracket", "next_cost(1)", "Cost axis"),
        Binding("left_square_bracket", "next_cost(-1)", "Previous cost axis", show=False),
        Binding("w", "export", "Export SVG"),
    ]
    DEFAULT_CSS = """
    PlotScreen #status { height: auto; max-height: 2; padding: 0 1; color: $text-muted; }
    PlotScreen #status.error { color: $error; }
    PlotScreen #plot-scroll { height: 1fr; scrollbar-size-vertical: 1; }
    """

    def __init__(self, store: Store, quality: Matrix, column: str, cost: str | None = None) -> None:
        super().__init__()
        self.store = store
        self.quality = quality  # the results screen's matrix as shown: its rows are the points
        self.column = column
        self.cost = cost
        self.costs: list[str] = []
        self.y_name = axis_name(quality.metric)
        self.points: list[Point] = []

    def compose(self) -> ComposeResult:
        yield TitleBar("plot", self.column, id="plot-title")
        yield Static(f"reading {self.y_name} and the runs' costs…", id="status", markup=False)
        with VerticalScroll(id="plot-scroll"):
            yield Static("", id="plot")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#plot-scroll").focus()
        self.load()

    @work(thread=True, exclusive=True, group="plot")
    def load(self) -> None:
        costs = cost_axes(queries.result_metric_names(self.store))
        cost = self.cost if self.cost in costs else costs[0] if costs else None
        points: list[Point] = []
        y_name = quality_name(self.store, self.quality, self.column)
        if cost is not None:
            spent = queries.results_matrix(self.store, metric=cost, ignore=execution_options(),
                                           defaults=option_defaults())
            points = points_of(self.quality, only_rows(spent, self.quality.rows), self.column)
        call_if_open(self, self.loaded, costs, cost, y_name, points)

    def loaded(self, costs: list[str], cost: str | None, y_name: str, points: list[Point]) -> None:
        self.costs, self.cost, self.y_name, self.points = costs, cost, y_name, points
        self.draw()

    def draw(self) -> None:
        status = self.query_one("#status", Static)
        status.remove_class("error")
        if self.cost is None:
            show_in(status, f"no run in the store records a cost (metrics ending in {', '.join(COST_SUFFIXES)})")
            status.add_class("error")
            return
        self.query_one("#plot-title", TitleBar).set_title("plot", self.column, f"{self.y_name} vs {self.cost}")
        if not self.points:
            show_in(status, f"no shown row has both {self.y_name} and {self.cost} on {self.column} "
                            f"(] tries the next cost)")
            show_in(self.query_one("#plot", Static), "")
            return
        front = sum(point.on_front for point in self.points)
        show_in(status, f"{len(self.points)} rows · {front} on the Pareto front (red ◆: no row beats it on both)")
        scroll = self.query_one("#plot-scroll")
        height = max(MIN_PLOT_HEIGHT, scroll.size.height - len(self.points) - 2)  # the legend's header, a margin
        # One column for the scroll bar the legend may need: plotext's lines must not wrap.
        drawn = terminal_plot(self.points, self.cost, self.y_name, width=max(40, scroll.size.width - 2),
                              height=height, legend=False)
        self.query_one("#plot", Static).update(Text.from_ansi(drawn + "\n" + self.legend()))

    def legend(self) -> str:
        """One line per numbered point: the row, then y and x as on the axes (aligned, to compare by eye)."""
        width = max(len(point.label) for point in self.points)
        y_format = ".1f" if self.y_name.endswith("(%)") else ".4g"  # percent with one decimal, as the matrix
        lines = [f"{'':>4} {'row':<{width}}  {self.y_name:>12}  {self.cost}"]
        for number, point in enumerate(self.points, 1):
            lines.append(f"{number:>2} {'◆' if point.on_front else '·'} {point.label:<{width}}  "
                         f"{point.y:>12{y_format}}  {point.x:.4g}")
        return "\n".join(lines)

    def on_resize(self) -> None:
        if self.points:
            self.call_after_refresh(self.draw)

    def action_next_cost(self, step: int = 1) -> None:
        if not self.costs:
            return
        position = self.costs.index(self.cost) if self.cost in self.costs else -1
        self.cost = self.costs[(position + step) % len(self.costs)]
        show_in(self.query_one("#status", Static), f"reading {self.cost}…")
        self.load()

    def action_export(self) -> None:
        if not self.points:
            self.notify("nothing to export: no row has both numbers", severity="warning")
            return
        default = f"plot-{self.column.replace(' ', '')}-{self.cost}.svg"
        self.app.push_screen(ExportScreen(default, "Write the plot as SVG", (".svg",)), self.export_to)

    def export_to(self, path: str | None) -> None:
        if path is None:
            return
        target = Path(path).expanduser()
        # The title `clfbench plot -o` gives, so the file is the CLI's for the same rows.
        title = f"{self.column}: {self.y_name} against {self.cost}"
        try:
            target.write_text(svg_plot(self.points, self.cost, self.y_name, title=title))
        except OSError as error:
            self.notify(f"export failed: {error.strerror}: {target}", severity="error")
            return
        self.notify(f"wrote {target}: {len(self.points)} rows, {sum(p.on_front for p in self.points)} on the front")

    def action_back(self) -> None:
        self.app.pop_screen()
