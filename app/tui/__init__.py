"""The clfbench terminal UI (Textual), started by `clfbench tui`.

Screens: runs (home, `runs.py`), new run (`new_run.py`), run detail (`detail.py`), results matrix
(`results.py`), errors (`errors.py`), plus the help and confirmation dialogs (`dialogs.py`); the app shell
(engine start, command palette, global keys, navigation) is `app.py`. What the screens share: the title bar
and common keys (`screen_parts.py`) and the navigation messages (`messages.py`); run formatting (status
colours, progress, ETA) is app.render's, shared with the CLI.

Navigation rule: a screen posts OpenRun / OpenErrors / OpenNewRun and app.py opens the screen; no screen
module imports another screen module, so the package has no import circle.

Import rule: nothing under app/tui imports torch, transformers or datasets (tests/test_boundaries.py), so the
TUI paints in well under a second over SSH.
"""
