"""The runs screen (home): every run with its live state, a filter, run actions and the engine panel.

The table is refreshed every REFRESH_S from a thread worker. A refresh that keeps the same rows in the same
order only rewrites the cells that changed; otherwise the table is rebuilt in one batch and the cursor goes
back to the run it was on, so a live list neither flickers nor loses the user's place.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Static
from textual.worker import get_current_worker

from clfbench.app import render
from clfbench.app.tui.dialogs import ConfirmScreen
from clfbench.app.tui.messages import OpenErrors, OpenNewRun, OpenRun
from clfbench.app.tui.screen_parts import KeyTable, TitleBar, call_if_open, copy_for_user, copy_key
from clfbench.storage import queries, queue
from clfbench.storage.db import Store
from clfbench.storage.models import RunStatus

REFRESH_S = 1.5
# Rows shown at once: the newest runs; the filter searches all of them. A 10k-run store stays responsive.
MAX_ROWS = 1000
# Ordered so that at 80 columns the live state (status, progress, age) and what the run is come first.
COLUMNS = [("id", 4), ("status", 11), ("progress", 14), ("age", 4), ("task", 28), ("model", 12),
           ("method", 16), ("shots", 5), ("gpu", 4)]


def run_cells(run: dict, now: float) -> tuple:
    gpu = run["gpus_assigned"] or ("cpu" if run["status"] == RunStatus.running else "")
    return (str(run["id"]), render.status_text(run["status"]), render.progress_with_eta(run, now),
            render.age(run["created_at"], now), run["task"], run["model"], run["method"], str(run["shots"]), gpu)


def matches(run: dict, terms: list[str]) -> bool:
    """Every term must match: `field:text` looks in one field (status:running), plain text in any."""
    for term in terms:
        field, _, wanted = term.partition(":") if ":" in term else ("", "", term)
        if field and field in run:
            if wanted not in str(run[field]).lower():
                return False
        elif not any(term in str(run[key]).lower()
                     for key in ("id", "status", "method", "model", "task", "name", "gpus_assigned")):
            return False
    return True


def describe(run: dict) -> str:
    """`7 (prompt · smollm2-135m · massive-intent, running)`: enough to be sure which run a question is about."""
    return f"{run['id']} ({run['method']} · {run['model']} · {run['task']}, {run['status']})"


@dataclass
class EngineInfo:
    pid: int | None
    gpus: list[str]  # GPUs the live engines of this store manage
    busy: set[str]  # GPUs assigned to running runs
    counts: dict[str, int]

    def text(self) -> Text:
        line = Text("engine ")
        if self.pid:
            line.append("● running", style="bold green").append(f" (pid {self.pid})")
        else:
            line.append("○ stopped", style="bold red").append(" (s: start)")
        if self.gpus:
            free = [g for g in self.gpus if g not in self.busy]
            line.append(f" · GPUs {len(self.busy & set(self.gpus))} busy, {len(free)} free")
        elif self.pid:
            line.append(" · CPU only")
        line.append("\nqueue ")
        for status in (s.value for s in RunStatus):
            count = self.counts.get(status, 0)
            line.append(f"{status} ", style=render.STATUS_STYLES[status]).append(f"{count}  ")
        return line


def read_engine_info(store: Store, now: float, running: list[dict]) -> EngineInfo:
    from clfbench.engine.daemon import engine_lock_holder

    engines = queries.live_engines(store, stale_after_s=30, now=now)
    gpus = sorted({g for e in engines for g in (e["gpus"] or "").split(",") if g})
    busy = {g for r in running for g in (r["gpus_assigned"] or "").split(",") if g}
    return EngineInfo(pid=engine_lock_holder(store.url), gpus=gpus, busy=busy,
                      counts=queries.count_by_status(store))


class RunsScreen(Screen):
    """Home: every run, live; the keys act on the selected run."""

    HELP_TITLE = "runs"
    BINDINGS = [
        Binding("enter", "open", "Open", show=False),  # the table's enter opens too (RowSelected)
        Binding("slash", "filter", "Filter"),
        Binding("n", "new_run", "New"),
        Binding("c", "cancel", "Cancel"),
        Binding("r", "retry", "Retry"),
        Binding("d", "duplicate", "Dup+edit"),
        Binding("x", "delete", "Delete"),
        Binding("e", "errors", "Errors"),
        Binding("s", "app.start_engine", "Engine start", show=False),
        Binding("S", "app.stop_engine", "Engine stop", show=False),
        copy_key("copy_id", "Copy run id"),
        copy_key("copy_spec", "Copy spec", key="Y"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]
    DEFAULT_CSS = """
    RunsScreen #filter { display: none; height: 1; border: none; }
    RunsScreen #filter.shown { display: block; }
    RunsScreen DataTable { height: 1fr; }
    RunsScreen #engine { height: 2; background: $panel; padding: 0 1; }
    RunsScreen #shown { height: 1; color: $text-muted; padding: 0 1; }
    """

    def __init__(self, store: Store) -> None:
        super().__init__()
        self.store = store
        self.runs: dict[int, dict] = {}  # every run read at the last refresh, by id
        self.order: list[int] = []  # ids in display order (newest first)
        self.shown_cells: dict[int, tuple] = {}  # what the table shows now, by id
        self.filter_terms: list[str] = []

    def compose(self) -> ComposeResult:
        yield TitleBar("runs", self.store.label())
        yield Input(placeholder="filter: text, or field:text (status:running model:minilm)", id="filter",
                    compact=True)
        table = KeyTable(cursor_type="row", zebra_stripes=True, id="runs")
        for name, width in COLUMNS:
            table.add_column(name, key=name, width=width)
        yield table
        yield Static("", id="shown")
        yield Static("", id="engine")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).focus()
        self.reload()
        self.set_interval(REFRESH_S, self.reload)

    # ---- reading ------------------------------------------------------------------------------
    @work(thread=True, group="runs-reload", exclusive=True)
    def reload(self) -> None:
        runs = queries.list_runs(self.store)
        now = self.app.now()
        engine = read_engine_info(self.store, now, [r for r in runs if r["status"] == RunStatus.running])
        if not get_current_worker().is_cancelled:
            call_if_open(self, self.show, runs, engine)

    def show(self, runs: list[dict], engine: EngineInfo) -> None:
        self.runs = {r["id"]: r for r in runs}
        self.order = [r["id"] for r in runs]
        self.query_one("#engine", Static).update(engine.text())
        self.fill_table()

    def fill_table(self) -> None:
        table = self.query_one(DataTable)
        now = self.app.now()
        wanted = [i for i in self.order if matches(self.runs[i], self.filter_terms)]
        visible = wanted[:MAX_ROWS]
        cells = {i: run_cells(self.runs[i], now) for i in visible}
        if visible == list(self.shown_cells):
            for run_id in visible:  # same rows: touch only the changed cells (no flicker)
                for (column, _), old, new in zip(COLUMNS, self.shown_cells[run_id], cells[run_id]):
                    if old != new:
                        table.update_cell(str(run_id), column, new)
        else:
            selected = self.selected_run_id()
            scroll_y = table.scroll_y
            with self.app.batch_update():
                table.clear()
                for run_id in visible:
                    table.add_row(*cells[run_id], key=str(run_id))
                if selected in cells:
                    table.move_cursor(row=table.get_row_index(str(selected)), scroll=False)
                table.scroll_y = scroll_y
        self.shown_cells = cells
        total = len(self.order)
        note = f"{len(visible)} of {total} runs" if len(visible) < total else f"{total} runs"
        if len(wanted) > len(visible):
            note += f" (newest {MAX_ROWS} shown; filter to narrow)"
        if self.filter_terms:
            note += f" · filter: {' '.join(self.filter_terms)}"
        self.query_one("#shown", Static).update(note)

    # ---- the selection ------------------------------------------------------------------------
    def selected_run_id(self) -> int | None:
        table = self.query_one(DataTable)
        if table.row_count == 0:
            return None
        try:
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
        except Exception:  # the cursor is outside the table (it was just emptied)
            return None
        return int(key.value) if key.value is not None else None

    def selected_run(self) -> dict | None:
        run_id = self.selected_run_id()
        if run_id is None:
            self.notify("no run selected", severity="warning")
            return None
        return self.runs.get(run_id)

    # ---- the filter ---------------------------------------------------------------------------
    def action_filter(self) -> None:
        field = self.query_one("#filter", Input)
        field.add_class("shown")
        self.call_after_refresh(field.focus)  # a widget can take focus once it is displayed

    @on(Input.Changed, "#filter")
    def filter_changed(self, event: Input.Changed) -> None:
        self.filter_terms = event.value.lower().split()
        self.fill_table()

    @on(Input.Submitted, "#filter")
    def filter_done(self) -> None:
        self.query_one(DataTable).focus()

    def action_clear_filter(self) -> None:
        field = self.query_one("#filter", Input)
        field.value = ""
        field.remove_class("shown")
        self.query_one(DataTable).focus()

    # ---- actions on the selected run ----------------------------------------------------------
    @on(DataTable.RowSelected, "#runs")
    def row_selected(self) -> None:
        self.action_open()

    def action_open(self) -> None:
        run = self.selected_run()
        if run is not None:
            self.post_message(OpenRun(run["id"]))

    def action_new_run(self) -> None:
        self.post_message(OpenNewRun())

    def action_duplicate(self) -> None:
        run = self.selected_run()
        if run is not None:
            self.post_message(OpenNewRun(prefill=json.loads(run["spec_json"])))

    def action_errors(self) -> None:
        run = self.selected_run()
        if run is not None:
            self.post_message(OpenErrors(run["id"]))

    # Cancel, delete and the retry of a succeeded run cannot be undone (a cancelled run loses its progress, a
    # retried one its results), and c/x/r sit beside keys pressed all the time: each asks first, the safe
    # answer focused. Retrying a failed, cancelled or interrupted run loses nothing, so it does not ask.
    def action_cancel(self) -> None:
        run = self.selected_run()
        if run is None:
            return
        if run["status"] not in (RunStatus.queued, RunStatus.running):
            self.notify(f"run {run['id']} is {run['status']}: nothing to cancel", severity="warning")
            return
        lost = ("its worker is stopped and its progress is lost" if run["status"] == RunStatus.running
                else "it will not start")
        self.confirm_change("cancel", run, f"Cancel run {describe(run)}? {lost[0].upper()}{lost[1:]}.")

    def action_retry(self) -> None:
        run = self.selected_run()
        if run is None:
            return
        if run["status"] == RunStatus.succeeded:
            self.confirm_change("retry", run, f"Run {describe(run)} again? Its results are replaced by the new "
                                              "attempt's.")
        else:
            self.change_run("retry", run["id"])

    def action_delete(self) -> None:
        run = self.selected_run()
        if run is not None:
            self.confirm_change("delete", run, f"Delete run {describe(run)} with its metrics, predictions and "
                                               "results?")

    def confirm_change(self, what: str, run: dict, question: str) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self.change_run(what, run["id"])

        self.app.push_screen(ConfirmScreen(question), answered)

    @work(thread=True, group="runs-change")
    def change_run(self, what: str, run_id: int) -> None:
        """Cancel, retry or delete through the same storage.queue functions as the CLI."""
        if what == "cancel":
            outcome = queue.request_cancel(self.store, run_id)
            message = {"cancelled": "cancelled", "requested": "cancel requested (its engine stops it)"}.get(
                outcome, f"nothing to cancel (status {outcome})")
        elif what == "retry":
            message = "queued again" if queue.requeue(self.store, run_id) else "not retried (it is queued or running)"
        else:
            from clfbench.engine.daemon import delete_run

            message = "deleted" if delete_run(self.store.url, self.store, run_id) else "not deleted (it is running)"
        self.app.notify_from_thread(f"run {run_id}: {message}")
        self.app.call_from_thread(self.reload)

    def action_copy_id(self) -> None:
        run = self.selected_run()
        if run is not None:
            copy_for_user(self, str(run["id"]), f"run id {run['id']}")

    def action_copy_spec(self) -> None:
        run = self.selected_run()
        if run is not None:
            copy_for_user(self, run["spec_json"], f"the spec of run {run['id']}")
