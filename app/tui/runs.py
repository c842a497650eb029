"""The runs screen (home): every run with its live state, a filter, run actions and the engine panel.

Reads that scale (issue 15): a store may hold 10,000 runs on a machine whose cores are all busy training.
- One read at a time. A tick (every REFRESH_S) or a key that asks for a read while one runs only marks that
  another is wanted; the running worker reads once more before it ends. Thread workers cannot be stopped, so
  starting one per tick (`exclusive=True` cancels nothing in a thread) piled reads up until none finished.
- The first paint reads one page, the newest FIRST_PAGE runs. Each later read takes the rows whose change
  counter (runs.change_seq, see storage.queries) moved since the last read, merges them into the rows held in
  memory, and reads one more page of older runs (OLDER_PAGE) until every run is held; so a tick on a quiet
  store reads almost nothing, and the filter soon searches every run without touching the store.
- Deletes bump no counter: each read counts the runs at or above the oldest page read and, when the count
  differs from the rows held, reads their ids and drops the missing ones.
- On PostgreSQL a counter value can become visible after a higher one (a sequence orders by statement start, not
  commit), so reads there start from the value seen PG_MARGIN_S earlier: a few rows are read twice, none missed.
- The table holds the first SHOWN_STEP rows that pass the filter and takes SHOWN_STEP more when the cursor or
  the scroll reaches its end: a keystroke in the filter rebuilds at most that many rows, whatever the store's size.
- Only the screen on top reads (and the one under a dialog); coming back to it reads at once.

A refresh that keeps the same rows in the same order only rewrites the cells that changed; otherwise the table
is rebuilt in one batch and the cursor goes back to the run it was on, so a live list neither flickers nor
loses the user's place.

The columns fit 80 terminal columns (issue 15 item 6): id and status stay put when scrolling sideways, every
column is as wide as its widest shown cell (run 10000 reads 10000), and after the live state come the headline
result, the attempt (2/3: the second of three tries) and what the run is: model · method · shots · task, then
the run's name, or else the options it sets away from their defaults (decision=score); its GPUs last.
"""
from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

from rich.cells import cell_len
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Static

from clfbench.app import render
from clfbench.app.tui.dialogs import ConfirmScreen
from clfbench.app.tui.messages import OpenErrors, OpenNewRun, OpenRun
from clfbench.app.tui.screen_parts import KeyTable, OneRead, TitleBar, copy_for_user, copy_key, show_in
from clfbench.storage import queries
from clfbench.storage.db import Store
from clfbench.storage.models import RunStatus

REFRESH_S = 1.5
FIRST_PAGE = 200  # runs read before the first paint (the newest)
OLDER_PAGE = 1000  # older runs read per later read, until every run is held
SHOWN_STEP = 200  # rows the table takes at a time (the filter searches every run held)
PG_MARGIN_S = 30.0  # PostgreSQL: re-read changes from the counter value seen this long ago,
PG_MARGIN_SEQ = 500  # less this many values (writes in flight when that value was read)
COLUMNS = ["id", "status", "progress", "age", "result", "try", "run", "gpu"]
FIXED_COLUMNS = 2  # id and status stay on screen when the table scrolls sideways
SEARCHED = ("id", "status", "method", "model", "task", "name", "gpus_assigned")  # what plain filter words look in


@lru_cache(maxsize=1)
def _option_catalog() -> tuple[dict, dict]:
    from clfbench.engine.methods.catalog import execution_options, option_defaults

    return option_defaults(), execution_options()


def set_options(spec_json: str, method: str) -> str:
    """`decision=score lr=0.0001`: the options a run's spec sets away from the method's defaults (the ones that
    change what it computes), which is what tells apart runs of one model, method and task."""
    try:
        options = json.loads(spec_json).get("options") or {}
    except (ValueError, AttributeError):
        return ""
    defaults, execution = _option_catalog()
    default, skipped = defaults.get(method, {}), execution.get(method, frozenset())
    return " ".join(f"{key}={value if isinstance(value, str) else json.dumps(value)}"
                    for key, value in sorted(options.items())
                    if key not in skipped and not (key in default and default[key] == value))


def result_text(run: dict) -> str:
    """The headline result, in %: accuracy (slot F1 for slot filling) per task, in the order of the run's tasks."""
    headline = run.get("headline") or {}
    order = run["task"].split("+")
    tasks = sorted(headline, key=lambda task: order.index(task) if task in order else len(order))
    return "/".join(f"{headline[task][1] * 100:.1f}" for task in tasks)


def attempt_text(run: dict) -> str:
    """`2/3`: the run's try and how many it gets (the first plus its automatic retries); blank before its first."""
    if not run.get("attempt"):
        return ""
    return f"{(run.get('interruptions') or 0) + 1}/{(run.get('max_interruptions') or 0) + 1}"


def what_text(run: dict) -> str:
    shown = render.run_label(run["model"], run["method"], run["shots"]) + f" · {run['task']}"
    extra = run.get("name") or run.get("options_text", "")
    return f"{shown} · {extra}" if extra else shown


def run_cells(run: dict, now: float) -> tuple:
    gpu = run["gpus_assigned"] or ("cpu" if run["status"] == RunStatus.running else "")
    return (str(run["id"]), render.status_text(run["status"]), render.progress_with_eta(run, now),
            render.age(run["created_at"], now), result_text(run), attempt_text(run), what_text(run), gpu)


def column_widths(rows: Iterable[tuple]) -> list[int]:
    """Each column's width: its widest cell among `rows` (run_cells tuples), or its name."""
    widths = [len(name) for name in COLUMNS]
    for row in rows:
        for k, value in enumerate(row):
            widths[k] = max(widths[k], cell_len(value.plain if isinstance(value, Text) else value))
    return widths


def search_text(run: dict) -> str:
    return " ".join(str(run.get(key) or "") for key in SEARCHED).lower() + " " + run.get("options_text", "")


def matches(run: dict, terms: list[str], haystack: str | None = None) -> bool:
    """Every term must match: `field:text` looks in one field (status:running), plain text in any."""
    for term in terms:
        field_name, _, wanted = term.partition(":") if ":" in term else ("", "", term)
        if field_name and field_name in run:
            if wanted not in str(run[field_name]).lower():
                return False
        elif term not in (haystack if haystack is not None else search_text(run)):
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
    hosts: list[dict] = field(default_factory=list)  # queries.hosts_overview: one row per host with a live engine

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
        if len(self.hosts) > 1 or (self.hosts and not self.pid):  # other hosts work on this store too
            line.append(f" · {len(self.hosts)} host{'s' if len(self.hosts) > 1 else ''}: ")
            line.append(", ".join(host_summary(host) for host in self.hosts))
        line.append("\nqueue ")
        for status in (s.value for s in RunStatus):
            count = self.counts.get(status, 0)
            line.append(f"{status} ", style=render.STATUS_STYLES[status]).append(f"{count}  ")
        return line


def host_summary(host: dict) -> str:
    """`box-a 3/8 GPUs` (busy of all), or `laptop cpu 1 run`: one host in the engine panel."""
    if host["gpus"]:
        return f"{host['host']} {len(host['busy'])}/{len(host['gpus'])} GPUs"
    return f"{host['host']} cpu {host['running']} run{'s' if host['running'] != 1 else ''}"


def read_engine_info(store: Store, now: float, read_counts: bool) -> EngineInfo:
    """The engine panel as the store has it; the runs per status only when `read_counts` (a list that holds every
    run counts them itself), and the busy GPUs are the list's to fill in (busy_gpus)."""
    from clfbench.engine.daemon import engine_lock_holder, host_label

    engines = queries.live_engines(store, stale_after_s=30, now=now)
    here = host_label()  # the panel's GPUs are this host's; other hosts get one summary each (hosts)
    gpus = sorted({g for e in engines if e["host"] == here for g in (e["gpus"] or "").split(",") if g})
    return EngineInfo(pid=engine_lock_holder(store.url), gpus=gpus, busy=set(),
                      counts=queries.count_by_status(store) if read_counts else {},
                      hosts=queries.hosts_overview(store, engines, now=now))


def busy_gpus(runs: Iterable[dict]) -> set[str]:
    """This host's GPUs that its running runs hold (another host's GPU 0 is not this one's)."""
    from clfbench.engine.daemon import host_label

    here = host_label()
    return {g for r in runs if r["status"] == RunStatus.running and r.get("host") in (here, None)
            for g in (r["gpus_assigned"] or "").split(",") if g}


# ---- incremental reading (in the worker thread; the screen's state is copied into a ListCursor first) ----

@dataclass(frozen=True)
class ListCursor:
    """Where the list stands, copied on the UI thread for one read."""

    since: int | None  # read rows whose change counter is above this; None: nothing read yet (first page)
    floor_id: int  # every run with an id at or above this is held (0: every run)
    held: frozenset[int]  # ids held at or above floor_id


@dataclass
class ListRead:
    """What one read found."""

    rows: list[dict]  # changed runs and the next older page
    seq: int  # the highest change counter among the changed rows (where the next read starts)
    floor_id: int
    present: set[int] | None  # when the count said runs went away: the ids at or above the read's floor that remain
    present_floor: int  # the floor `present` was read above
    engine: EngineInfo
    total: int  # runs in the store, as far as this read knows


def read_list(store: Store, cursor: ListCursor, now: float) -> ListRead:
    if cursor.since is None:
        seq = queries.max_change_seq(store)  # before the page: a row changed meanwhile is read again next time
        rows = queries.runs_page(store, None, FIRST_PAGE)
        floor_id = rows[-1]["id"] if len(rows) == FIRST_PAGE else 0
        present, present_floor = None, floor_id
    else:
        rows = queries.runs_changed_since(store, cursor.since)
        seq = max([cursor.since] + [row["change_seq"] or 0 for row in rows])
        floor_id = present_floor = cursor.floor_id
        held = cursor.held | {row["id"] for row in rows if row["id"] >= floor_id}
        present = queries.run_ids(store, floor_id) if queries.count_runs(store, floor_id) != len(held) else None
        if floor_id:
            older = queries.runs_page(store, floor_id, OLDER_PAGE)
            rows += older
            floor_id = older[-1]["id"] if len(older) == OLDER_PAGE else 0
    finished = [row["id"] for row in rows if row["status"] == RunStatus.succeeded]
    headlines = queries.headline_results(store, finished) if finished else {}
    for row in rows:
        row["headline"] = headlines.get(row["id"], {})
        row["options_text"] = set_options(row["spec_json"], row["method"])
    engine = read_engine_info(store, now, read_counts=floor_id != 0)
    return ListRead(rows=rows, seq=seq, floor_id=floor_id, present=present, present_floor=present_floor,
                    engine=engine, total=sum(engine.counts.values()))


class RunsTable(KeyTable):
    """The run list's table: says when the user scrolled to its end, so the screen can add rows there."""

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        if new_value >= self.max_scroll_y and new_value > old_value:
            self.screen.call_later(getattr(self.screen, "show_more", lambda: None))


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
        self.runs: dict[int, dict] = {}  # every run held, by id (merged from the reads)
        self.haystacks: dict[int, str] = {}  # search_text of each held run, made when it is merged
        self.order: list[int] = []  # held ids in display order (newest first)
        self.shown_cells: dict[int, tuple] = {}  # what the table shows now, by id
        self.widths: list[int] = []  # the table's column widths now (column_widths of shown_cells)
        self.shown_limit = SHOWN_STEP
        self.filter_terms: list[str] = []
        self.seen_seq: int | None = None  # the highest change counter merged; None before the first page
        self.seen_at: deque[tuple[float, int]] = deque()  # (monotonic time, seen_seq) for PostgreSQL's margin
        self.floor_id = 0
        self.total = 0
        self.reads = OneRead(self.read_worker)

    def compose(self) -> ComposeResult:
        yield TitleBar("runs", self.store.label())
        yield Input(placeholder="filter: text, or field:text (status:running model:minilm)", id="filter",
                    compact=True)
        table = RunsTable(cursor_type="row", zebra_stripes=True, fixed_columns=FIXED_COLUMNS, id="runs")
        for name in COLUMNS:
            table.add_column(name, key=name, width=len(name))  # sized to the rows shown (fill_table)
        yield table
        yield Static("", id="shown")
        yield Static("", id="engine")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).focus()
        self.reload()
        self.set_interval(REFRESH_S, self.tick)

    def tick(self) -> None:
        if self.is_current:  # under another screen nothing shows the list: it is read when the user comes back
            self.reload()

    def on_screen_resume(self) -> None:
        if self.seen_seq is not None:
            self.reload()

    # ---- reading ------------------------------------------------------------------------------
    def reload(self) -> None:
        """Read what changed, unless a read runs: then that read goes on once more before it ends."""
        self.reads.request()

    @work(thread=True, group="runs-reload")
    def read_worker(self) -> None:
        again = True
        while again:
            cursor = self.app.call_from_thread(self.list_cursor)
            read = read_list(self.store, cursor, self.app.now())
            again = self.app.call_from_thread(self.take_read, read)

    def list_cursor(self) -> ListCursor:
        return ListCursor(since=self.read_since(), floor_id=self.floor_id,
                          held=frozenset(i for i in self.runs if i >= self.floor_id))

    def read_since(self) -> int | None:
        """The change counter to read above: the last one seen; on PostgreSQL one seen PG_MARGIN_S ago, less a
        margin (see the module's docstring)."""
        if self.seen_seq is None or queries.change_order_is_strict(self.store):
            return self.seen_seq
        now = time.monotonic()
        while len(self.seen_at) > 1 and self.seen_at[1][0] <= now - PG_MARGIN_S:
            self.seen_at.popleft()
        return max(0, self.seen_at[0][1] - PG_MARGIN_SEQ)

    def status_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for run in self.runs.values():
            counts[run["status"]] = counts.get(run["status"], 0) + 1
        return counts

    def take_read(self, read: ListRead) -> bool:
        """Merge a read on the UI thread and show it; True when another read was asked for meanwhile."""
        if self.is_attached:
            self.merge(read)
            read.engine.busy = busy_gpus(self.runs.values())
            if not self.floor_id:  # every run is held: the counts include this read's changes
                read.engine.counts = self.status_counts()
            show_in(self.query_one("#engine", Static), read.engine.text())
            self.fill_table()
        return self.reads.more(self.is_attached)

    def merge(self, read: ListRead) -> None:
        new_ids = False
        for row in read.rows:
            old = self.runs.get(row["id"])
            if old is None or (row["change_seq"] or 0) >= (old["change_seq"] or 0):
                new_ids = new_ids or old is None
                self.runs[row["id"]] = row
                self.haystacks[row["id"]] = search_text(row)
        if read.present is not None:
            for run_id in [i for i in self.runs if i >= read.present_floor and i not in read.present]:
                self.forget(run_id)
            new_ids = True
        if new_ids:
            self.order = sorted(self.runs, reverse=True)
        self.seen_seq = max(read.seq, self.seen_seq or 0)
        if not queries.change_order_is_strict(self.store):  # only PostgreSQL's margin looks back
            self.seen_at.append((time.monotonic(), self.seen_seq))
        self.floor_id = read.floor_id
        self.total = max(read.total, len(self.runs)) if read.floor_id else len(self.runs)

    def forget(self, run_id: int) -> None:
        self.runs.pop(run_id, None)
        self.haystacks.pop(run_id, None)

    # ---- the table ----------------------------------------------------------------------------
    def wanted_ids(self) -> list[int]:
        if not self.filter_terms:
            return self.order
        return [i for i in self.order if matches(self.runs[i], self.filter_terms, self.haystacks[i])]

    def fill_table(self) -> None:
        table = self.query_one(DataTable)
        now = self.app.now()
        wanted = self.wanted_ids()
        visible = wanted[:self.shown_limit]
        cells = {i: run_cells(self.runs[i], now) for i in visible}
        widths = column_widths(cells.values())
        shown = list(self.shown_cells)
        if widths == self.widths and visible[:len(shown)] == shown:
            for run_id in shown:  # the rows shown stay: touch only the changed cells (no flicker)
                for column, old, new in zip(COLUMNS, self.shown_cells[run_id], cells[run_id]):
                    if old != new:
                        table.update_cell(str(run_id), column, new)
            for run_id in visible[len(shown):]:  # rows further down (an older page, a scroll to the end)
                table.add_row(*cells[run_id], key=str(run_id))
        else:
            self.rebuild(table, visible, cells, widths)
        self.shown_cells, self.widths = cells, widths
        self.show_note(len(visible), len(wanted))

    def rebuild(self, table: DataTable, visible: list[int], cells: dict[int, tuple], widths: list[int]) -> None:
        selected = self.selected_run_id()
        scroll_y = table.scroll_y
        with self.app.batch_update():
            table.clear()
            # Fixed widths computed here, from the rows shown now: the table's own measuring waits for an idle
            # moment (a first frame could show every column cut to its name) and only ever grows.
            for column, width in zip(table.ordered_columns, widths):
                column.width, column.auto_width = width, False
            for run_id in visible:
                table.add_row(*cells[run_id], key=str(run_id))
            if selected in cells:
                table.move_cursor(row=table.get_row_index(str(selected)), scroll=False)
            table.scroll_y = scroll_y

    def show_note(self, visible: int, wanted: int) -> None:
        total = self.total
        note = f"{wanted} of {total} runs" if wanted < total else f"{total} runs"
        if visible < wanted:
            note += f" (first {visible} shown; more as you scroll)"
        if self.floor_id:
            note += " · reading older runs…"
        if self.filter_terms:
            note += f" · filter: {' '.join(self.filter_terms)}"
        show_in(self.query_one("#shown", Static), note)

    def show_more(self) -> None:
        """The cursor or the scroll reached the end of the table: add the next rows that pass the filter."""
        if len(self.shown_cells) >= self.shown_limit and self.is_attached:
            self.shown_limit += SHOWN_STEP
            self.fill_table()

    @on(DataTable.RowHighlighted, "#runs")
    def row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.cursor_row >= event.data_table.row_count - 1:
            self.show_more()

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
        self.shown_limit = SHOWN_STEP
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
        from clfbench.storage import queue

        if what == "cancel":
            outcome = queue.request_cancel(self.store, run_id)
            message = {"cancelled": "cancelled", "requested": "cancel requested (its engine stops it)"}.get(
                outcome, f"nothing to cancel (status {outcome})")
        elif what == "retry":
            message = "queued again" if queue.requeue(self.store, run_id) else "not retried (it is queued or running)"
        else:
            from clfbench.engine.daemon import delete_run

            deleted, left = delete_run(self.store.url, self.store, run_id)
            message = ("deleted" + (f"; {left}" if left else "")) if deleted else "not deleted (it is running)"
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
