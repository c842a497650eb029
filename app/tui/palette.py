"""Textual's command palette, guarded against keys that arrive faster than it can lay itself out.

On a busy machine keys come in bursts (ctrl+p, a few letters, escape/enter/pagedown before the app has caught
up). Textual's CommandPalette (tested with textual 8.2) then crashed the whole app in two ways, both found by
tests/test_tui_soak.py:
- its search worker (`_gather_commands`), started by a letter that was queued before the escape or enter that
  closed the palette, runs after the palette's widgets are gone and `query_one(CommandList)` raises
  `NoMatches: No nodes match 'CommandList' on CommandPalette` (issue 15);
- page up/down (and other cursor keys) on a list whose options were added but not yet laid out index the
  list's line map before it exists (KeyError in OptionList);
- an enter queued behind the enter or escape that already closed the palette dismisses it a second time
  (ScreenStackError: Can't pop screen), or, when both enters select before the first pop, sets its result twice
  (InvalidStateError).
GuardedCommandPalette drops the work or the key in exactly those states (a closed palette has nothing to show
or run; a key pressed before the list is drawn is lost, as a key pressed too early is) and re-raises anything
else.
"""
from __future__ import annotations

import asyncio

from textual import on, work
from textual.await_complete import AwaitComplete
from textual.command import CommandList, CommandPalette
from textual.css.query import NoMatches
from textual.message import Message
from textual.widgets import Button, Input, OptionList


class GuardedCommandPalette(CommandPalette):
    """CommandPalette that survives being closed while it searches, and cursor keys before its first layout."""

    def _has_list(self) -> bool:
        return self.is_attached and bool(self.query(CommandList))

    def dismiss(self, result=None) -> AwaitComplete:
        """Once. Two enters in one burst each select a command before the first pop has taken the palette off the
        stack; the second dismiss set the result future again (InvalidStateError, found by the soak on a busy box)."""
        if getattr(self, "_clfbench_dismissed", False):
            return AwaitComplete(asyncio.sleep(0))
        self._clfbench_dismissed = True
        return super().dismiss(result)

    @work(exclusive=True, group=CommandPalette._GATHER_COMMANDS_GROUP)
    async def _gather_commands(self, search_value: str) -> None:
        if not self._has_list():  # closed before this search started
            return
        try:
            await CommandPalette._gather_commands.__wrapped__(self, search_value)
        except NoMatches:
            if self._has_list():  # still open: a real fault, not the race
                raise

    def _action_command_list(self, action: str) -> None:
        try:
            super()._action_command_list(action)
        except (KeyError, IndexError):
            if self._has_list() and self.query_one(CommandList).size.height > 0:
                raise  # laid out and still failing: a real fault


    @on(Input.Submitted)
    @on(Button.Pressed)
    @on(OptionList.OptionSelected)
    def _drop_when_closed(self, event: Message) -> None:
        """Runs before CommandPalette's own handlers (a subclass comes first): once the palette is no longer
        the current screen, the choice came from a key queued behind the one that closed it."""
        if not self.is_current:
            event.stop()
            event.prevent_default()
