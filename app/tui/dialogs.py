"""Small modal screens shared by every screen: a yes/no confirmation, the key help, a file name to write."""
from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Static

from clfbench.app.tui.screen_parts import KeyTable


class ConfirmScreen(ModalScreen[bool]):
    """Ask before doing something that cannot be undone; dismisses with True (y) or False (n / escape)."""

    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical { width: 60; height: auto; border: thick $error; background: $surface; padding: 1 2; }
    ConfirmScreen Horizontal { height: auto; margin-top: 1; align-horizontal: right; }
    ConfirmScreen Button { margin-left: 2; }
    """
    BINDINGS = [
        Binding("y", "answer(True)", "Yes"),
        # Capital N too (caps lock, shift held): a slip towards "no" is harmless, one towards "yes" is not, so
        # only y means yes.
        Binding("n,N,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question
        self.answered = False

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(self.question, id="question")
            with Horizontal():
                yield Button("Yes (y)", variant="error", id="yes")
                yield Button("No (n)", variant="primary", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()  # the safe answer is the default

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_answer(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        # The first answer only: on a busy box keys queue up (Escape, then Enter on the focused button), and a
        # second dismiss, before or after the first one's pop completes, sets the answer twice (InvalidStateError)
        # or pops the screen underneath (ScreenStackError); both found by the soak test.
        if self.answered or not self.is_current:
            return
        self.answered = True
        self.dismiss(yes)


class HelpScreen(ModalScreen[None]):
    """The keys of the screen it was opened from (given as (key, description) pairs)."""

    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Vertical { width: 64; max-height: 90%; height: auto; border: thick $primary; background: $surface; }
    HelpScreen #title { padding: 0 1; text-style: bold; }
    HelpScreen DataTable { height: auto; max-height: 18; }
    HelpScreen #hint { padding: 0 1; color: $text-muted; }
    """
    BINDINGS = [Binding("escape,q,question_mark,f1", "close", "Close")]

    def __init__(self, title: str, keys: list[tuple[str, str]]) -> None:
        super().__init__()
        self.title_text = title
        self.keys = keys
        self.closed = False

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(f"Keys · {self.title_text}", id="title")
            with VerticalScroll():
                table = KeyTable(cursor_type="row", show_header=False, zebra_stripes=True)
                table.add_columns("key", "what it does")
                for key, description in self.keys:
                    table.add_row(key, description)
                yield table
            yield Static("ctrl+p: command palette · escape: close", id="hint")

    def action_close(self) -> None:
        if self.closed or not self.is_current:  # a queued second close: see ConfirmScreen.action_answer
            return
        self.closed = True
        self.dismiss(None)


class ExportScreen(ModalScreen[str | None]):
    """Ask for a file name to write `what` to; the extension (one of `extensions`) picks the format. Dismisses
    with the path, or None. The results matrix's exports and the plot's SVG."""

    DEFAULT_CSS = """
    ExportScreen { align: center middle; }
    ExportScreen > Vertical { width: 70; height: auto; border: thick $primary; background: $surface; padding: 0 1; }
    ExportScreen #export-error { color: $error; height: auto; }
    """
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, default: str, what: str, extensions: tuple[str, ...]) -> None:
        super().__init__()
        self.default = default
        self.what = what
        self.extensions = extensions
        self.answered = False

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(f"{self.what} (enter: write, escape: cancel)")
            yield Input(value=self.default, id="export-path")
            yield Static("", id="export-error")

    @on(Input.Submitted)
    def submitted(self, event: Input.Submitted) -> None:
        path = event.value.strip()
        if Path(path).suffix.lower() not in self.extensions:
            self.query_one("#export-error", Static).update(
                f"unknown extension '{Path(path).suffix}': use {', '.join(self.extensions)}")
            return
        self.answer(path)

    def action_cancel(self) -> None:
        self.answer(None)

    def answer(self, path: str | None) -> None:
        # The first answer only, as in dialogs.ConfirmScreen: a second Enter queued behind the first dismissed
        # again after the pop and popped the screen underneath (ScreenStackError, soak seed 1011).
        if self.answered or not self.is_current:
            return
        self.answered = True
        self.dismiss(path)
