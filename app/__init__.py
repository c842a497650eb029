"""The command line and the terminal UI.

Ctrl-C at start-up: the package's __init__ runs before `cli.py` is even read, so the one-line handler is in place
before the command line's own module is compiled and imported (seconds on a busy box, or where bytecode is not
cached: PYTHONDONTWRITEBYTECODE, a read-only install). Only in the command line's own process.
"""
import os
import signal
import sys


def _interrupted(_signum, _frame) -> None:
    """Ctrl-C in a command: one line and exit 130, at any moment (typer turns a KeyboardInterrupt into a silent
    exit, and one during the imports would be a traceback). Store writes are transactions, so nothing is
    half-written; the engine puts its own handler in place (a graceful stop) once it runs."""
    try:
        sys.stdout.flush()
    finally:
        os.write(2, b"error: interrupted\n")
        os._exit(130)


def _is_the_command_line() -> bool:
    """`clfbench ...` (the console script) or `python -m clfbench.app.cli ...`; not a test or a program that
    imports the package. runpy imports this package before it sets argv[0], so the interpreter's own argv says."""
    argv = getattr(sys, "orig_argv", [])
    as_module = any(flag == "-m" and name == "clfbench.app.cli" for flag, name in zip(argv, argv[1:]))
    return as_module or os.path.basename(sys.argv[0] if sys.argv else "") == "clfbench"


if _is_the_command_line():
    signal.signal(signal.SIGINT, _interrupted)
