"""A virtual table for the results matrix: only the lines on screen are drawn.

DataTable measures and stores every cell of every row, which costs hundreds of milliseconds for a
2,000-row matrix on each filter keystroke. Here the cell texts are formatted once per store read (in the
worker), a filter only swaps the list of row indices, and render_line draws the visible lines, so a
keystroke costs the same on 20 rows or 20,000. The first column (row names) stays put when scrolling
sideways; the header lines stay put when scrolling down.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rich.segment import Segment
from rich.style import Style
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

HEADER_STYLE = Style(bold=True)
BEST_STYLE = Style(bold=True, color="green")
CURSOR_STYLE = Style(reverse=True)
STRIPE_STYLE = Style(bgcolor="grey11")
GAP = 2  # spaces between columns


@dataclass
class MatrixData:
    """What the view draws: texts[r][c] for data row r and column c (c = 0 is the row name)."""

    headers: list[list[str]]  # per column, its header lines (top to bottom)
    texts: list[list[str]]
    widths: list[int]
    best: set[tuple[int, int]] = field(default_factory=set)  # (row, column) cells drawn as the best

    @property
    def header_height(self) -> int:
        return max((len(lines) for lines in self.headers), default=1)


class MatrixView(ScrollView, can_focus=True):
    """Shows the rows `order` (indices into data.texts) of a MatrixData, with a cell cursor."""

    BINDINGS = [
        Binding("up", "move(-1, 0)", show=False),
        Binding("down", "move(1, 0)", show=False),
        Binding("left", "move(0, -1)", show=False),
        Binding("right", "move(0, 1)", show=False),
        Binding("pageup", "page(-1)", show=False),
        Binding("pagedown", "page(1)", show=False),
        Binding("home", "edge(-1)", show=False),
        Binding("end", "edge(1)", show=False),
        # The vi keys every table of the TUI answers to (app.tui.screen_parts.KeyTable).
        Binding("j", "move(1, 0)", "Down", show=False),
        Binding("k", "move(-1, 0)", "Up", show=False),
        Binding("g", "edge(-1)", "First row", show=False),
        Binding("G", "edge(1)", "Last row", show=False),
        Binding("enter", "select", show=False),
    ]
    DEFAULT_CSS = "MatrixView { height: 1fr; }"

    class CellSelected(Message):
        """Enter on a cell: `row` is a position in the shown order, `column` 0 for the row name."""

        def __init__(self, view: "MatrixView", row: int, column: int) -> None:
            super().__init__()
            self.view = view
            self.row = row
            self.column = column

        @property
        def control(self) -> "MatrixView":
            return self.view

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.data = MatrixData(headers=[[""]], texts=[], widths=[1])
        self.order: list[int] = []
        self.cursor_row = 0
        self.cursor_column = 0

    # ---- content -----------------------------------------------------------------------------
    def show(self, data: MatrixData, order: list[int]) -> None:
        self.data = data
        self.order = order
        self.cursor_row = max(0, min(self.cursor_row, len(order) - 1))
        self.cursor_column = max(0, min(self.cursor_column, len(data.widths) - 1))
        width = sum(self.data.widths) + GAP * len(self.data.widths)
        self.virtual_size = Size(width, self.data.header_height + len(order))
        self.refresh()

    @property
    def row_count(self) -> int:
        return len(self.order)

    def visible_text(self, row: int, column: int) -> str:
        """The text of a cell by its position on screen (tests and copy use it)."""
        return self.data.texts[self.order[row]][column]

    # ---- drawing -----------------------------------------------------------------------------
    def _cell(self, text: str, column: int, style: Style) -> Segment:
        width = self.data.widths[column]
        padded = text.ljust(width) if column == 0 else text.rjust(width)
        return Segment(" " + padded + " " * (GAP - 1), style)

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        data = self.data
        base = self.rich_style
        header_height = data.header_height
        if y < header_height:
            cells = []
            for column, lines in enumerate(data.headers):
                offset = header_height - len(lines)  # short headers sit on the bottom line
                text = lines[y - offset] if y >= offset else ""
                cells.append(self._cell(text, column, base + HEADER_STYLE))
            row = None
        else:
            row = scroll_y + y - header_height
            if row >= len(self.order):
                return Strip.blank(self.size.width, base)
            texts = data.texts[self.order[row]]
            index = self.order[row]
            stripe = base + STRIPE_STYLE if row % 2 else base
            cells = []
            for column, text in enumerate(texts):
                style = stripe + BEST_STYLE if (index, column) in data.best else stripe
                if row == self.cursor_row and column == self.cursor_column and self.has_focus:
                    style = style + CURSOR_STYLE
                cells.append(self._cell(text, column, style))
        fixed = Strip(cells[:1])
        moving = Strip(cells[1:]).crop(scroll_x, scroll_x + max(0, self.size.width - fixed.cell_length))
        return Strip.join([fixed, moving]).extend_cell_length(self.size.width, base).crop(0, self.size.width)

    # ---- the cursor ----------------------------------------------------------------------------
    def _column_span(self, column: int) -> tuple[int, int]:
        """Start and end x of a scrolling column, relative to the scrolling part."""
        widths = [w + GAP for w in self.data.widths]
        start = sum(widths[1:column])
        return start, start + widths[column]

    def scroll_to_cursor(self) -> None:
        visible_rows = max(1, self.size.height - self.data.header_height)
        y = self.scroll_offset.y
        if self.cursor_row < y:
            y = self.cursor_row
        elif self.cursor_row >= y + visible_rows:
            y = self.cursor_row - visible_rows + 1
        x = self.scroll_offset.x
        if self.cursor_column > 0:
            start, end = self._column_span(self.cursor_column)
            room = self.size.width - (self.data.widths[0] + GAP)
            if start < x:
                x = start
            elif end > x + room:
                x = end - room
        self.scroll_to(x=x, y=y, animate=False)

    def move_cursor(self, row: int | None = None, column: int | None = None) -> None:
        if row is not None:
            self.cursor_row = max(0, min(row, len(self.order) - 1))
        if column is not None:
            self.cursor_column = max(0, min(column, len(self.data.widths) - 1))
        self.scroll_to_cursor()
        self.refresh()

    def action_move(self, rows: int, columns: int) -> None:
        self.move_cursor(self.cursor_row + rows, self.cursor_column + columns)

    def action_page(self, direction: int) -> None:
        self.move_cursor(self.cursor_row + direction * max(1, self.size.height - self.data.header_height - 1))

    def action_edge(self, direction: int) -> None:
        self.move_cursor(0 if direction < 0 else len(self.order) - 1)

    def action_select(self) -> None:
        if self.order:
            self.post_message(self.CellSelected(self, self.cursor_row, self.cursor_column))

    def on_focus(self) -> None:
        self.refresh()

    def on_blur(self) -> None:
        self.refresh()
