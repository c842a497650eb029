"""The clfbench terminal UI (Textual), started by `clfbench tui`.

Screens: runs (home, `runs.py`), new run (`new_run.py`), run detail (`detail.py`), results matrix
(`results.py`), errors (`errors.py`), plus the help and confirmation dialogs (`dialogs.py`); the app shell
(engine start, command palette, global keys) is `app.py`.

Import rule: nothing under app/tui imports torch, transformers or datasets (tests/test_boundaries.py), so the
TUI paints in well under a second over SSH.
"""
