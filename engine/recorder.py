"""Rank 0's writer of metric points and progress: batched, never one row per step per transaction.

Points are buffered and written every `flush_every` points or `flush_s` seconds, whichever comes first.
A background thread writes the run's heartbeat (with the latest progress) every `heartbeat_s`, so a
run stuck in a long model load still shows as alive.

Fencing: every write names (run, attempt) and the store writes only while the run is `running` under that
attempt. When a heartbeat or a flush is refused, the run is no longer this worker's (cancelled, or re-claimed by
an engine that judged it dead): the Recorder then writes nothing more (its buffer is dropped) and the training
thread's next `log_metric` / `set_progress` raises RunNotOurs, which the worker turns into a prompt exit. Two
attempts training at once must not mix their points, and the owner of the new attempt is the only one entitled
to write the run's status and results.
"""
from __future__ import annotations

import threading
import time

from clfbench.storage import queue
from clfbench.storage.db import Store


class RunNotOurs(Exception):
    """The store refused a write: this attempt of the run is no longer running (cancelled or re-claimed)."""

    def __init__(self, run_id: int, attempt: int):
        super().__init__(f"run {run_id} attempt {attempt} is no longer ours (cancelled or re-claimed)")
        self.run_id, self.attempt = run_id, attempt


class Recorder:
    def __init__(self, store: Store, run_id: int, attempt: int, *, enabled: bool,
                 flush_every: int = 200, flush_s: float = 0.5, heartbeat_s: float = 5.0):
        self.store, self.run_id, self.attempt, self.enabled = store, run_id, attempt, enabled
        self.flush_every, self.flush_s, self.heartbeat_s = flush_every, flush_s, heartbeat_s
        self._buffer: list[tuple[int, str, float, float]] = []
        self._last_flush = time.monotonic()
        self._progress: tuple[int, int] | None = None
        self._phase: tuple[str, int | None, int | None] | None = None
        self._wake = threading.Event()  # a new phase is written at once, not at the next heartbeat
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._not_ours = threading.Event()  # set once a write was refused; never cleared

    @property
    def not_ours(self) -> bool:
        """Whether the store has refused a write of this attempt (the run is someone else's now)."""
        return self._not_ours.is_set()

    def check_ours(self) -> None:
        """Raise RunNotOurs if a write of this attempt was refused."""
        if self._not_ours.is_set():
            raise RunNotOurs(self.run_id, self.attempt)

    def _refused(self) -> None:
        with self._lock:
            self._buffer = []  # points of an attempt that lost the run are never written
        self._not_ours.set()

    # Safe to call on every rank: only rank 0 (enabled) records.
    def log_metric(self, step: int, name: str, value: float) -> None:
        if not self.enabled:
            return
        self.check_ours()
        value = float(value)  # NaN and inf are kept as they are: the store keeps them on every backend
        with self._lock:
            self._buffer.append((int(step), name, value, time.time()))
            due = len(self._buffer) >= self.flush_every or time.monotonic() - self._last_flush >= self.flush_s
        if due:
            self.flush()
            self.check_ours()

    def set_progress(self, step: int, total: int) -> None:
        if self.enabled:
            self.check_ours()
            self._progress = (int(step), int(total))

    def set_phase(self, name: str, step: int | None = None, total: int | None = None) -> None:
        """What the worker is doing now ("loading model", "evaluating on dev", ...) and its progress in it. A new
        phase wakes the heartbeat thread so the list shows it at once; a step within a phase waits for the beat."""
        if not self.enabled:
            return
        self.check_ours()
        changed = self._phase is None or self._phase[0] != name
        self._phase = (name, None if step is None else int(step), None if total is None else int(total))
        if changed:
            self._wake.set()

    def flush(self) -> None:
        """Write the buffered points (fenced by attempt); a refusal marks the run as not ours."""
        with self._lock:
            batch, self._buffer = self._buffer, []
            self._last_flush = time.monotonic()
        if batch and not self.not_ours and not queue.add_metric_points(self.store, self.run_id, self.attempt, batch):
            self._refused()

    def start_heartbeat(self) -> None:
        if not self.enabled:
            return
        self._thread = threading.Thread(target=self._beat, name="clfbench-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.is_set() and not self.not_ours:
            self._wake.wait(self.heartbeat_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if not queue.heartbeat(self.store, self.run_id, self.attempt, self._progress, self._phase):
                    self._refused()
                    print(f"clfbench: run {self.run_id} attempt {self.attempt}: heartbeat refused, the run is no "
                          "longer ours", flush=True)
                    return
                if time.monotonic() - self._last_flush >= self.flush_s:
                    self.flush()
            except Exception as error:  # a busy store must not kill the run; the next beat retries
                print(f"clfbench: heartbeat failed: {error}", flush=True)

    def close(self) -> None:
        """Stop the heartbeat and write what is buffered, unless the run is no longer ours (then nothing)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.enabled and not self.not_ours:
            self.flush()
            if (self._progress or self._phase) is not None and not self.not_ours and \
                    not queue.heartbeat(self.store, self.run_id, self.attempt, self._progress, self._phase):
                self._refused()
