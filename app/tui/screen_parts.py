"""What every screen is built from: the title bar, the keys the screens share, copying for the user.

One place for them, so that the screens look and answer alike: a screen's title reads `clfbench · <where>`,
the number keys switch its tabs, `y` copies the value under the cursor, j/k/g/G move in every table, a
store read finished in a thread worker is shown only while its screen is still open, and a screen that re-reads
on a timer runs one read at a time (OneRead).
"""
from __future__ import annotations

from typing import Callable
from weakref import WeakKeyDictionary

from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Static

APP_NAME = "clfbench"


def title_text(*parts: str) -> str:
    """`clfbench · runs · sqlite:~/.clfbench/clfbench.db`: where the user is, most general first."""
    return " · ".join((APP_NAME, *parts))


class TitleBar(Static):
    """The one-line bar atop every screen; set_title rewrites it when what the screen shows changes."""

    DEFAULT_CSS = """
    TitleBar { height: 1; background: $primary 30%; color: $text; padding: 0 1; text-style: bold; }
    """

    def __init__(self, *parts: str, id: str | None = None) -> None:
        super().__init__(title_text(*parts), id=id)

    def set_title(self, *parts: str) -> None:
        show_in(self, title_text(*parts))


def tab_keys(tabs: list[tuple[str, str]]) -> list[Binding]:
    """Keys 1, 2, 3... for a screen's tabs, given as (tab, name) in order; each calls action_tab(tab)."""
    return [Binding(str(number), f"tab('{tab}')", name) for number, (tab, name) in enumerate(tabs, 1)]


def copy_key(action: str, description: str, key: str = "y") -> Binding:
    """`y` copies (OSC 52, see copy_for_user); left out of the footer, listed by `?`."""
    return Binding(key, action, description, show=False)


def copy_for_user(screen: Screen, text: str, what: str) -> None:
    """Put text on the user's clipboard and say what was copied. The app copies through the terminal
    (OSC 52), which reaches the local clipboard over SSH and in tmux."""
    screen.app.copy_to_clipboard(text)
    screen.notify(f"copied {what}")


_SHOWN: WeakKeyDictionary = WeakKeyDictionary()  # what show_in last put in each widget


def show_in(widget: Static, content) -> None:
    """widget.update(content), skipped when the widget already shows it: an update lays the whole screen out
    again, which a tick of an idle list or a filter keystroke would otherwise pay for on every line it rewrites."""
    if widget in _SHOWN and _SHOWN[widget] == content:
        return
    _SHOWN[widget] = content
    widget.update(content)


def call_if_open(screen: Screen, callback: Callable, *args) -> None:
    """From a thread worker: run callback(*args) on the UI thread if the screen is still open.

    A read can finish after the user left its screen (escape while the matrix loads); the screen's widgets are
    being removed then, and filling them would raise NoMatches and stop the app (found by the soak test).
    """
    def deliver() -> None:
        if screen in screen.app.screen_stack:
            callback(*args)

    screen.app.call_from_thread(deliver)


class KeyTable(DataTable):
    """A DataTable that also moves with the vi keys every list and table of the TUI answers to."""

    BINDINGS = [
        Binding("j", "cursor_down", "Down", show=False),
        Binding("k", "cursor_up", "Up", show=False),
        Binding("g", "scroll_top", "First row", show=False),
        Binding("G", "scroll_bottom", "Last row", show=False),
    ]


class OneRead:
    """One store read at a time for a screen that re-reads on a timer.

    A Textual thread worker cannot be stopped (`exclusive=True` cancels nothing in a thread), so a worker per tick
    piles reads up on a busy machine until none finishes. Here a request while a read runs only marks that one
    more is wanted; the running worker asks `more()` at its end (on the UI thread) and reads once more if so.
    `start` starts the worker; only the UI thread calls request and more.
    """

    def __init__(self, start: Callable[[], None]) -> None:
        self.start = start
        self.running = False
        self.wanted = False

    def request(self) -> None:
        if self.running:
            self.wanted = True
            return
        self.running = True
        self.start()

    def more(self, go_on: bool = True) -> bool:
        """At the end of a read: True when another was requested meanwhile (and `go_on`: the screen is still
        open); otherwise the read is over and the next request starts a worker."""
        if self.wanted and go_on:
            self.wanted = False
            return True
        self.running = self.wanted = False
        return False
