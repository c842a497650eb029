"""Rank 0's writer of metric points and progress: batched, never one row per step per transaction.

Points are buffered and written every `flush_every` points or `flush_s` seconds, whichever comes first.
A background thread writes the run's heartbeat (with the latest progress) every `heartbeat_s`, so a
run stuck in a long model load still shows as alive.
"""
from __future__ import annotations

import threading
import time

from clfbench.storage import queue
from clfbench.storage.db import Store


class Recorder:
    def __init__(self, store: Store, run_id: int, attempt: int, *, enabled: bool,
                 flush_every: int = 200, flush_s: float = 0.5, heartbeat_s: float = 5.0):
        self.store, self.run_id, self.attempt, self.enabled = store, run_id, attempt, enabled
        self.flush_every, self.flush_s, self.heartbeat_s = flush_every, flush_s, heartbeat_s
        self._buffer: list[tuple[int, str, float, float]] = []
        self._last_flush = time.monotonic()
        self._progress: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # Safe to call on every rank: only rank 0 (enabled) records.
    def log_metric(self, step: int, name: str, value: float) -> None:
        if not self.enabled:
            return
        value = float(value)  # NaN and inf are kept as they are: the store keeps them on every backend
        with self._lock:
            self._buffer.append((int(step), name, value, time.time()))
            due = len(self._buffer) >= self.flush_every or time.monotonic() - self._last_flush >= self.flush_s
        if due:
            self.flush()

    def set_progress(self, step: int, total: int) -> None:
        if self.enabled:
            self._progress = (int(step), int(total))

    def flush(self) -> None:
        with self._lock:
            batch, self._buffer = self._buffer, []
            self._last_flush = time.monotonic()
        if batch:
            queue.add_metric_points(self.store, self.run_id, self.attempt, batch)

    def start_heartbeat(self) -> None:
        if not self.enabled:
            return
        self._thread = threading.Thread(target=self._beat, name="clfbench-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                queue.heartbeat(self.store, self.run_id, self.attempt, self._progress)
                if time.monotonic() - self._last_flush >= self.flush_s:
                    self.flush()
            except Exception as error:  # a busy store must not kill the run; the next beat retries
                print(f"clfbench: heartbeat failed: {error}", flush=True)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.enabled:
            self.flush()
            if self._progress is not None:
                queue.heartbeat(self.store, self.run_id, self.attempt, self._progress)
