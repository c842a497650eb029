"""The app shell: the store, the engine, global keys (q, ?, m, ctrl+p), the command palette and navigation.

The TUI is one more client of the store: it reads through storage.queries and writes through the same
queue functions as the CLI. Every store read and every engine start/stop runs in a thread worker, so the
keyboard never waits on SQLite's writer lock or on a process starting.

Navigation: a screen posts a message (app.tui.messages: OpenRun, OpenErrors, OpenNewRun, OpenCompare, OpenPlot)
and the handlers here push the screen, so only this module imports the screen modules (a screen imports only
dialogs).
Screens other than the runs list are imported when first opened, which keeps the first paint fast.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable

from textual import on, work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from clfbench.app.tui.dialogs import HelpScreen
from clfbench.app.tui.messages import OpenCompare, OpenErrors, OpenNewRun, OpenPlot, OpenRun
from clfbench.app.tui.palette import GuardedCommandPalette
from clfbench.app.tui.runs import RunsScreen
from clfbench.engine.types import ClfbenchError
from clfbench.storage.db import open_store


class ClfbenchApp(App):
    """`clfbench tui`: the runs list is home; other screens are pushed on top and popped with escape."""

    TITLE = "clfbench"
    CSS = """
    Screen { background: $background; }
    """
    # The palette keeps Textual's default ctrl+p; q quits from every screen that has no text field focused.
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark,f1", "help", "Help"),
        Binding("m", "results", "Results"),
    ]

    def __init__(self, db: str | None = None, now: Callable[[], float] = time.time,
                 start_engine: bool = True) -> None:
        super().__init__()
        self.store = open_store(db)  # a StoreError here is one line, printed by the CLI
        # The clock for ages and ETAs; tests freeze it so snapshots do not drift.
        self.now = now
        self.start_engine_on_mount = start_engine

    def get_default_screen(self) -> Screen:
        return RunsScreen(self.store)

    def on_mount(self) -> None:
        if self.start_engine_on_mount:
            self.ensure_engine()

    # ---- the engine ---------------------------------------------------------------------------
    def notify_from_thread(self, message: str, severity: str = "information") -> None:
        self.call_from_thread(self.notify, message, severity=severity)

    def reload_screens(self) -> None:
        """Ask every open screen that shows store data to read it again now (not at its next tick)."""
        for screen in self.screen_stack:
            reload = getattr(screen, "reload", None)
            if reload is not None:
                reload()

    @work(thread=True, group="engine", exclusive=True)
    def ensure_engine(self) -> None:
        """Start the engine detached when none runs for this store on this host (as `clfbench tui` promises)."""
        from clfbench.engine.daemon import engine_lock_holder

        if engine_lock_holder(self.store.url):
            return
        self._start_engine()

    @work(thread=True, group="engine", exclusive=True)
    def start_engine(self) -> None:
        from clfbench.engine.daemon import engine_lock_holder

        holder = engine_lock_holder(self.store.url)
        if holder:
            self.notify_from_thread(f"an engine already runs for this store (pid {holder})")
            return
        self._start_engine()

    def _start_engine(self) -> None:
        from clfbench.engine.daemon import start_detached

        try:
            pid = start_detached(self.store.url, None, 1)
        except ClfbenchError as error:
            self.notify_from_thread(f"engine not started: {error}", "error")
            return
        self.notify_from_thread(f"engine started (pid {pid})")
        self.call_from_thread(self.reload_screens)

    @work(thread=True, group="engine", exclusive=True)
    def stop_engine(self) -> None:
        from clfbench.engine.daemon import stop_engine

        pid = stop_engine(self.store.url)
        self.notify_from_thread(f"engine (pid {pid}) stopped; running workers go on" if pid
                                else "no engine runs for this store on this host")
        self.call_from_thread(self.reload_screens)

    def action_start_engine(self) -> None:
        self.start_engine()

    def action_stop_engine(self) -> None:
        self.stop_engine()

    # ---- screens ------------------------------------------------------------------------------
    def action_results(self) -> None:
        """Open the results matrix; when one is open already (under the errors of a cell, say), go back to it
        with its filter and sort rather than stacking a second one."""
        from clfbench.app.tui.results import ResultsScreen

        open_matrices = [screen for screen in self.screen_stack if isinstance(screen, ResultsScreen)]
        if not open_matrices:
            self.push_screen(ResultsScreen(self.store))
            return
        while self.screen is not open_matrices[-1]:
            self.pop_screen()

    @on(OpenRun)
    def open_run(self, message: OpenRun) -> None:
        from clfbench.app.tui.detail import DetailScreen

        self.push_screen(DetailScreen(self.store, message.run_id))

    @on(OpenErrors)
    def open_errors(self, message: OpenErrors) -> None:
        from clfbench.app.tui.errors import ErrorsScreen

        self.push_screen(ErrorsScreen(self.store, message.run_id, task=message.task))

    @on(OpenCompare)
    def open_compare(self, message: OpenCompare) -> None:
        from clfbench.app.tui.compare import CompareScreen

        self.push_screen(CompareScreen(self.store, message.run_a, message.run_b, message.task, message.role_b))

    @on(OpenPlot)
    def open_plot(self, message: OpenPlot) -> None:
        from clfbench.app.tui.plot import PlotScreen

        self.push_screen(PlotScreen(self.store, message.quality, message.column))

    @on(OpenNewRun)
    def open_new_run(self, message: OpenNewRun) -> None:
        from clfbench.app.tui.new_run import NewRunScreen

        self.push_screen(NewRunScreen(self.store, prefill=message.prefill))

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        # The screen's keys first, then the app's, then the focused widget's (cursor moves...); keys that do
        # the same thing share a line ("q, ^q  Quit").
        def rank(active) -> int:
            return 0 if isinstance(active.node, Screen) else 1 if isinstance(active.node, App) else 2

        by_action: dict[str, tuple[list[str], str]] = {}
        for active in sorted(self.active_bindings.values(), key=rank):
            binding = active.binding
            if binding.description:
                keys_of, _ = by_action.setdefault(binding.action, ([], binding.description))
                keys_of.append(self.get_key_display(binding))
        keys = [(", ".join(dict.fromkeys(keys_of)), description) for keys_of, description in by_action.values()]
        keys.append(("ctrl+p", "command palette"))
        title = getattr(self.screen, "HELP_TITLE", type(self.screen).__name__)
        self.push_screen(HelpScreen(title, keys))

    # ---- the command palette: Textual's, guarded against bursts of keys (see app.tui.palette) -------------
    def action_command_palette(self) -> None:
        if self.use_command_palette and not GuardedCommandPalette.is_open(self):
            self.push_screen(GuardedCommandPalette(id="--command-palette"))

    def search_themes(self) -> None:
        from textual.theme import ThemeProvider

        self.push_screen(GuardedCommandPalette(providers=[ThemeProvider], placeholder="Search for themes…"))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield SystemCommand("New run", "Open the form that queues a run or a sweep",
                            lambda: self.post_message(OpenNewRun()))
        yield SystemCommand("Results matrix", "Models × tasks, mean ± std over seeds", self.action_results)
        selected = getattr(screen, "selected_run_id", lambda: None)()
        yield SystemCommand("Errors", "Confusion matrix and misclassified examples of the selected run",
                            lambda: self.post_message(OpenErrors(selected)))
        yield SystemCommand("Start engine", "Start the engine (detached) for this store", self.start_engine)
        yield SystemCommand("Stop engine", "Stop this host's engine; running workers go on", self.stop_engine)
        yield from super().get_system_commands(screen)  # Quit, Keys, Theme, Screenshot
