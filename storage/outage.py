"""Riding out a store outage: which errors say "the store is unreachable for now", and a bounded retry loop.

The rule (docs/ARCHITECTURE.md, "Store outages"): an error that says the database cannot be reached or cannot
take the write now (a PostgreSQL server restarting or stopped, a dropped connection, SQLite's "database or disk is
full", "database is locked" past the busy timeout, a disk I/O error) is an OUTAGE: the caller retries with backoff
for a bounded window, CLFBENCH_STORE_OUTAGE_S seconds (default 600), because a restart takes seconds and a run
that dies with it loses hours. Any other error (a constraint, a missing table, a bug) is raised at once: retrying
would only hide it. A refusal by a fence (the run is no longer ours) is not an error at all and is final.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError

from clfbench.storage.db import seconds_from_env

DEFAULT_OUTAGE_S = 600.0
FIRST_DELAY_S = 0.2
MAX_DELAY_S = 5.0

# sqlite3 raises OperationalError for syntax errors and missing tables too: only these say "not now".
_SQLITE_TRANSIENT = ("database is locked", "database table is locked", "database or disk is full", "disk i/o error",
                     "unable to open database file")

T = TypeVar("T")


class StoreUnreachable(Exception):
    """The store stayed unreachable for the whole outage window."""

    def __init__(self, what: str, seconds: float, error: BaseException, window_s: float):
        super().__init__(f"the store was unreachable for {seconds:.0f} s while {what} ({first_line(error)}; "
                         f"limit CLFBENCH_STORE_OUTAGE_S={window_s:g})")
        self.seconds, self.error = seconds, error


def outage_window_s() -> float:
    """CLFBENCH_STORE_OUTAGE_S (seconds, >= 0), default 600. A bad value is a one-line StoreError."""
    return seconds_from_env("CLFBENCH_STORE_OUTAGE_S", DEFAULT_OUTAGE_S, zero_allowed=True)


def _chain(error: BaseException):
    """The error and the ones it was raised from or during (open_store's StoreError hides its cause with `from
    None`, but keeps it as __context__)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _is_outage_one(error: BaseException) -> bool:
    if not isinstance(error, DBAPIError):
        return False
    if error.connection_invalidated:
        return True
    if not isinstance(error, OperationalError):
        return False
    if type(error.orig).__module__.startswith("sqlite3"):
        return any(words in str(error.orig).lower() for words in _SQLITE_TRANSIENT)
    return True  # psycopg: connection failures, an admin shutdown, a disk full, a server starting up


def is_outage(error: BaseException) -> bool:
    """Whether `error` (or the error it was raised from) says the store is unreachable for now."""
    return any(_is_outage_one(link) for link in _chain(error))


def first_line(error: BaseException) -> str:
    """The driver's own first line of a store error (SQLAlchemy adds lines of SQL and a link)."""
    orig = getattr(error, "orig", None)
    text = str(orig if orig is not None else error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def retrying(fn: Callable[[], T], what: str, window_s: float | None = None, *,
             log: Callable[[str], None] | None = None, stop: Callable[[], bool] | None = None) -> T:
    """fn(), retried with backoff (0.2 s doubling to 5 s) while it fails with an outage, for up to `window_s`
    seconds (default CLFBENCH_STORE_OUTAGE_S); then StoreUnreachable. Any other error is raised at once. One line
    when the outage starts and one when the store answers again (`log`, default print). `stop()` true ends the
    wait early with StoreUnreachable (a process shutting down)."""
    window = outage_window_s() if window_s is None else window_s
    say = log or (lambda line: print(line, flush=True))
    started, delay = None, FIRST_DELAY_S
    while True:
        try:
            result = fn()
        except Exception as error:
            if not is_outage(error):
                raise
            now = time.monotonic()
            if started is None:
                started = now
                bound = "until it answers" if window == float("inf") else f"for up to {window:g} s"
                say(f"clfbench: store unreachable while {what} ({first_line(error)}); retrying {bound}")
            if now - started >= window or (stop is not None and stop()):
                raise StoreUnreachable(what, now - started, error, window) from error
            time.sleep(min(delay, max(0.0, started + window - now)))
            delay = min(delay * 2, MAX_DELAY_S)
            continue
        if started is not None:
            say(f"clfbench: store reachable again after {time.monotonic() - started:.1f} s ({what})")
        return result
