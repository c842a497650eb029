"""Rank 0's writer of metric points, progress and phase: batched, and never on the training thread.

`log_metric` only appends the point to an in-memory buffer (bounded: past `max_buffered` points, and whenever the
store is unreachable, points go to a spill file in the run's folder, oldest first). One background thread writes:
the buffered points every `flush_s` seconds or as soon as `flush_every` are waiting (the spill file first, so the
store receives them in the order they were logged), and the run's heartbeat with the latest progress and phase
every `heartbeat_s` (at once when the phase changes), so a run stuck in a long model load still shows as alive.
A slow store (another process holding SQLite's write lock for 30 s) therefore never stalls a training step.

Outages (storage.outage): a write that fails because the store cannot be reached is retried with backoff while
training goes on; the points wait in memory and on local disk, and are written in order when the store answers.
If the store stays unreachable for CLFBENCH_STORE_OUTAGE_S seconds (default 600), the training thread's next call
raises StoreUnreachable: the worker stops training (its last checkpoint stays for the next attempt), waits for the
store, writes every waiting point and exits so that its engine marks the run interrupted (requeued while retries
are left). Any other write error is raised on the training thread at its next call, the points kept: a failed
flush is never dropped silently.

Fencing: every write names (run, attempt) and the store writes only while the run is `running` under that
attempt. When a heartbeat or a flush is refused, the run is no longer this worker's (cancelled, or re-claimed by
an engine that judged it dead): the Recorder then writes nothing more (its buffer and spill file are dropped) and
the training thread's next `log_metric` / `set_progress` / `set_phase` raises RunNotOurs, which the worker turns
into a prompt exit. Two attempts training at once must not mix their points, and the owner of the new attempt is
the only one entitled to write the run's status and results. A refusal is final; an outage is not a refusal.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import time
from pathlib import Path

from clfbench.storage import queue
from clfbench.storage.db import Store
from clfbench.storage.outage import (FIRST_DELAY_S, MAX_DELAY_S, StoreUnreachable, first_line, is_outage,
                                     outage_window_s, retrying)

Point = tuple[int, str, float, float]  # (step, name, value, time)
MAX_BUFFERED = 10_000  # points held in memory; more wait in the spill file
WRITE_CHUNK = 2_000  # points per write transaction when catching up


class RunNotOurs(Exception):
    """The store refused a write: this attempt of the run is no longer running (cancelled or re-claimed)."""

    def __init__(self, run_id: int, attempt: int):
        super().__init__(f"run {run_id} attempt {attempt} is no longer ours (cancelled or re-claimed)")
        self.run_id, self.attempt = run_id, attempt


class SpillFile:
    """Points waiting on local disk, one JSON list per line, oldest first. Appended under the Recorder's lock;
    read and advanced only by the one writer at a time; removed once every point in it reached the store."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0  # bytes of the file already written to the store
        self.pending = 0  # points in the file not yet written to the store

    def append(self, points: list[Point]) -> None:
        """Append whole lines or nothing: a failed write (a full disk) is cut back, so no half line is left."""
        data = "".join(json.dumps(list(point)) + "\n" for point in points).encode()
        with open(self.path, "ab") as handle:
            size = handle.tell()
            try:
                handle.write(data)
                handle.flush()
            except OSError:
                handle.truncate(size)
                raise
        self.pending += len(points)

    def prepend(self, points: list[Point]) -> None:
        """Put older points before those waiting (a batch that was in flight when newer ones spilled): the file is
        rewritten whole (new file, then rename), which is rare and small next to an outage."""
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            rest = handle.read()
        fresh = self.path.with_name(self.path.name + ".new")
        with open(fresh, "wb") as handle:
            handle.write("".join(json.dumps(list(point)) + "\n" for point in points).encode() + rest)
        os.replace(fresh, self.path)
        self.offset, self.pending = 0, self.pending + len(points)

    def read(self, limit: int) -> tuple[list[Point], int]:
        """Up to `limit` points not yet written, and the offset after them."""
        points = []
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            for _ in range(limit):
                line = handle.readline()
                if not line.endswith(b"\n"):
                    break
                step, name, value, at = json.loads(line)
                points.append((step, name, value, at))
            return points, handle.tell() if points else self.offset

    def written(self, offset: int, count: int) -> None:
        self.offset, self.pending = offset, self.pending - count
        if self.pending <= 0:
            self.drop()

    def drop(self) -> None:
        self.path.unlink(missing_ok=True)
        self.offset = self.pending = 0


def spill_path(folder: Path, run_id: int, attempt: int) -> Path:
    return folder / f"metrics-spill-run{run_id}-attempt{attempt}.jsonl"


def drop_stale_spills(folder: Path, run_id: int) -> None:
    """Delete the spill files that earlier workers of this run left, saying how many points they held: their worker
    died before the store came back, and the fence refuses an earlier attempt's points, so nothing can write them
    (and this worker's own file must start empty)."""
    for path in folder.glob(f"metrics-spill-run{run_id}-attempt*.jsonl"):
        if path.is_file():
            lines = sum(1 for _ in open(path, "rb"))
            print(f"clfbench: {lines} metric point(s) of an earlier attempt never reached the store ({path.name}, "
                  "its worker died during a store outage); deleted", flush=True)
            path.unlink(missing_ok=True)


class Recorder:
    def __init__(self, store: Store, run_id: int, attempt: int, *, enabled: bool, flush_every: int = 200,
                 flush_s: float = 0.5, heartbeat_s: float = 5.0, spill_dir: Path | None = None,
                 max_buffered: int = MAX_BUFFERED, outage_s: float | None = None):
        self.store, self.run_id, self.attempt, self.enabled = store, run_id, attempt, enabled
        self.flush_every, self.flush_s, self.heartbeat_s = flush_every, flush_s, heartbeat_s
        self.max_buffered = max_buffered
        self.outage_s = outage_window_s() if outage_s is None else outage_s
        if spill_dir is not None:
            path = spill_path(Path(spill_dir), run_id, attempt)
            if enabled:
                drop_stale_spills(Path(spill_dir), run_id)
        else:  # no run folder (a test, a bench): a name no other process uses
            unique = f"clfbench-{os.getpid()}-{id(self)}-"
            path = Path(tempfile.gettempdir()) / (unique + spill_path(Path(), run_id, attempt).name)
        self._spill = SpillFile(path)
        self._spill_failed = False  # the spill file could not be written: points stay in memory until it drains
        self._buffer: list[Point] = []
        self._progress: tuple[int, int] | None = None
        self._phase: tuple[str, int | None, int | None] | None = None
        self._phase_new = False
        self._wake = threading.Event()  # points are due, or a new phase is written at once
        self._lock = threading.Lock()  # buffer, spill file, progress, phase
        self._write_lock = threading.Lock()  # one writer of points at a time, so none is written twice
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._not_ours = threading.Event()  # set once a write was refused; never cleared
        self._outage_since: float | None = None  # monotonic time of the first failure of this outage
        self._retry_delay = FIRST_DELAY_S
        self._last_drain = time.monotonic()
        self._gave_up: StoreUnreachable | None = None  # the outage outlasted the window; final
        self._broken: BaseException | None = None  # a write failed for another reason; final

    @property
    def not_ours(self) -> bool:
        """Whether the store has refused a write of this attempt (the run is someone else's now)."""
        return self._not_ours.is_set()

    @property
    def waiting_points(self) -> int:
        """Points logged and not yet written to the store (in memory and in the spill file)."""
        with self._lock:
            return len(self._buffer) + self._spill.pending

    def check_ours(self) -> None:
        """Raise RunNotOurs if a write of this attempt was refused, StoreUnreachable if the store stayed
        unreachable past the window, or the error of a write that failed otherwise."""
        if self._not_ours.is_set():
            raise RunNotOurs(self.run_id, self.attempt)
        if self._gave_up is not None:
            raise self._gave_up
        if self._broken is not None:
            raise RuntimeError(f"writing metric points failed: {first_line(self._broken)}") from self._broken

    def _refused(self) -> None:
        with self._lock:
            self._buffer = []  # points of an attempt that lost the run are never written
            self._spill.drop()
        self._not_ours.set()

    # Safe to call on every rank: only rank 0 (enabled) records.
    def log_metric(self, step: int, name: str, value: float) -> None:
        """Queue one point (never writes: the writer thread does). NaN and inf are kept as they are: the store
        keeps them on every backend."""
        if not self.enabled:
            return
        self.check_ours()
        point = (int(step), name, float(value), time.time())
        with self._lock:
            if self._spill.pending and not self._spill_failed:  # older points wait on disk: keep the order
                self._to_spill([point])
            else:
                self._buffer.append(point)
                if len(self._buffer) >= self.max_buffered and not self._spill_failed:
                    waiting, self._buffer = self._buffer, []
                    self._to_spill(waiting)
            due = len(self._buffer) >= self.flush_every
        if due:
            self._wake.set()

    def _to_spill(self, points: list[Point]) -> None:
        """Append to the spill file (the caller holds the lock); where it cannot be written, points stay in
        memory, said once."""
        if not self._spill_failed:
            try:
                self._spill.append(points)
                return
            except OSError as error:
                self._spill_failed = True
                print(f"clfbench: cannot spill metric points to {self._spill.path} ({error}); they wait in memory",
                      flush=True)
        self._buffer.extend(points)

    def set_progress(self, step: int, total: int) -> None:
        if self.enabled:
            self.check_ours()
            with self._lock:
                self._progress = (int(step), int(total))

    def set_phase(self, name: str, step: int | None = None, total: int | None = None) -> None:
        """What the worker is doing now ("loading model", "evaluating on dev", ...) and its progress in it. A new
        phase wakes the writer thread so the list shows it at once; a step within a phase waits for the beat."""
        if not self.enabled:
            return
        self.check_ours()
        with self._lock:
            changed = self._phase is None or self._phase[0] != name
            self._phase = (name, None if step is None else int(step), None if total is None else int(total))
        if changed:
            self._phase_new = True
            self._wake.set()

    # ---- writing (the writer thread; close() and flush() on the caller's thread) -----------------------
    def _next_batch(self) -> tuple[list[Point], int | None]:
        """The oldest waiting points (the spill file's before the buffer's) and, for spilled ones, the file offset
        after them; buffered ones are taken out of the buffer."""
        with self._lock:
            if self._spill.pending:
                return self._spill.read(WRITE_CHUNK)
            batch, self._buffer = self._buffer[:WRITE_CHUNK], self._buffer[WRITE_CHUNK:]
            return batch, None

    def _put_back(self, batch: list[Point]) -> None:
        """A batch taken from the buffer that was not written goes back before the newer points: to the spill file
        (the store is unreachable, points may pile up) or, where that fails, to memory."""
        with self._lock:
            if self._spill.pending and not self._spill_failed:  # newer points spilled while it was in flight
                try:
                    self._spill.prepend(batch)
                    return
                except OSError:  # no room on the local disk either: kept in memory (written after the file's)
                    self._spill_failed = True
            waiting, self._buffer = batch + self._buffer, []
            self._to_spill(waiting)

    def _drain(self) -> None:
        """Write every waiting point, oldest first, in batches, until none is left or the store refuses. An error
        leaves the points waiting, and is raised."""
        with self._write_lock:
            while not self.not_ours:
                batch, offset = self._next_batch()
                if not batch:
                    return
                try:
                    ours = queue.add_metric_points(self.store, self.run_id, self.attempt, batch)
                except BaseException:
                    if offset is None:
                        self._put_back(batch)
                    raise
                if not ours:
                    self._refused()
                    return
                if offset is not None:
                    with self._lock:
                        self._spill.written(offset, len(batch))
                        self._spill_failed = self._spill_failed and self._spill.pending > 0

    def _beat_once(self) -> None:
        with self._lock:
            progress, phase = self._progress, self._phase
        if not queue.heartbeat(self.store, self.run_id, self.attempt, progress, phase):
            self._refused()
            print(f"clfbench: run {self.run_id} attempt {self.attempt}: heartbeat refused, the run is no longer "
                  "ours", flush=True)

    def flush(self) -> None:
        """Write every waiting point now, on the caller's thread, riding out an outage for what is left of the
        window (then StoreUnreachable)."""
        if self.enabled and not self.not_ours:
            self._within_window(self._drain, "writing metric points")

    def _within_window(self, write, what: str) -> None:
        """write(), riding out an outage for what is left of the window (an outage the writer thread already saw
        counts from its start); past it, StoreUnreachable naming the whole outage and the configured limit."""
        began = self._outage_since
        left = self.outage_s if began is None else max(0.0, self.outage_s - (time.monotonic() - began))
        try:
            retrying(write, what, left)
        except StoreUnreachable as lost:
            began = time.monotonic() - lost.seconds if began is None else began
            raise StoreUnreachable(what, time.monotonic() - began, lost.error, self.outage_s) from lost.error

    def start_heartbeat(self) -> None:
        if not self.enabled:
            return
        self._thread = threading.Thread(target=self._run, name="clfbench-recorder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        """The writer thread: heartbeat every heartbeat_s (at once on a new phase), points every flush_s or when
        due; during an outage, both are retried with backoff (0.2 s doubling to 5 s)."""
        next_beat = time.monotonic() + self.heartbeat_s
        while not self._stop.is_set() and not self.not_ours and self._broken is None:
            if self._outage_since is None:
                self._wake.wait(max(0.0, min(self.flush_s, next_beat - time.monotonic())))
            else:
                self._stop.wait(self._retry_delay)  # log_metric's wake-ups must not hammer a store that is down
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if self._phase_new or self._outage_since is not None or time.monotonic() >= next_beat:
                    self._phase_new = False
                    self._beat_once()
                    next_beat = time.monotonic() + self.heartbeat_s
                if self._drain_due():
                    self._drain()
            except Exception as error:
                self._store_failed(error)
            else:
                self._store_answered()

    def _drain_due(self) -> bool:
        """flush_s since the last write, flush_every points waiting, or points left over from an outage."""
        with self._lock:
            waiting, spilled = len(self._buffer), self._spill.pending
        if spilled or waiting >= self.flush_every or self._outage_since is not None or \
                time.monotonic() - self._last_drain >= self.flush_s:
            self._last_drain = time.monotonic()
            return True
        return False

    def _store_failed(self, error: Exception) -> None:
        """An outage: note when it began and say so once, back off, give up past the window. Anything else: keep
        the error for the training thread (the points stay waiting) and stop writing."""
        if not is_outage(error):
            self._broken = error
            print(f"clfbench: run {self.run_id}: writing to the store failed: {first_line(error)}", flush=True)
            return
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since, self._retry_delay = now, FIRST_DELAY_S
            print(f"clfbench: run {self.run_id} attempt {self.attempt}: store unreachable ({first_line(error)}); "
                  f"training goes on, metric points wait (in memory, then {self._spill.path.name}); giving up "
                  f"after {self.outage_s:g} s (CLFBENCH_STORE_OUTAGE_S)", flush=True)
        else:
            self._retry_delay = min(self._retry_delay * 2, MAX_DELAY_S)
        if now - self._outage_since >= self.outage_s and self._gave_up is None:
            self._gave_up = StoreUnreachable("training", now - self._outage_since, error, self.outage_s)
            print(f"clfbench: run {self.run_id} attempt {self.attempt}: {self._gave_up}: stopping training",
                  flush=True)

    def _store_answered(self) -> None:
        if self._outage_since is not None:
            print(f"clfbench: run {self.run_id}: store reachable again after "
                  f"{time.monotonic() - self._outage_since:.1f} s; waiting metric points written", flush=True)
            self._outage_since = None

    def close(self, wait_for_store: bool = False) -> None:
        """Stop the writer thread and write everything waiting plus a last heartbeat, unless the run is no longer
        ours (then nothing). Rides out an outage for what is left of the window (then StoreUnreachable), or, with
        `wait_for_store`, for as long as it takes (a worker that gave up on training still owes its points). A call
        after one that raised tries again; one after a successful close writes nothing."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)  # an in-flight write finishes; the write lock serialises a slow one
        if not self.enabled or self.not_ours or self._closed:
            return
        what = "writing the last metric points and heartbeat"
        if wait_for_store:
            retrying(self._write_the_rest, what, math.inf)
        else:
            self._within_window(self._write_the_rest, what)
        self._closed = True

    def _write_the_rest(self) -> None:
        self._drain()
        if not self.not_ours and (self._progress or self._phase) is not None:
            self._beat_once()
