"""Where the user wants to go next, as Textual messages: a screen posts one, the app opens the screen.

Navigation lives in one place (app.ClfbenchApp's handlers), so a screen never imports another screen and
never reaches into the app to open one: screens depend on this module, the app depends on the screens, and
the import graph has no circle. A message posted on a screen bubbles up to the app.
"""
from __future__ import annotations

from textual.message import Message


class OpenRun(Message):
    """Show one run's detail (curves, results, spec, log)."""

    def __init__(self, run_id: int) -> None:
        super().__init__()
        self.run_id = run_id


class OpenErrors(Message):
    """Show the errors of a run on one task; run None: the newest run with predictions, task None: its first."""

    def __init__(self, run_id: int | None, task: str | None = None) -> None:
        super().__init__()
        self.run_id = run_id
        self.task = task


class OpenNewRun(Message):
    """Open the new-run form, empty or filled in from a spec (to duplicate a run and edit it)."""

    def __init__(self, prefill: dict | None = None) -> None:
        super().__init__()
        self.prefill = prefill


class OpenCompare(Message):
    """Compare run A with run B on one task (paired tests); `role_b` says why B: the baseline, the column's best."""

    def __init__(self, run_a: int, run_b: int, task: str, role_b: str = "") -> None:
        super().__init__()
        self.run_a, self.run_b, self.task, self.role_b = run_a, run_b, task, role_b


class OpenPlot(Message):
    """Plot quality against cost for one column of a results matrix (as shown: its rows are the points)."""

    def __init__(self, quality, column: str) -> None:
        super().__init__()
        self.quality = quality  # storage.queries.Matrix
        self.column = column
