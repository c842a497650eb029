"""Live progress of the runs an engine in this terminal works on (`clfbench demo`, `clfbench engine --until-idle`).

The watcher only reads the store (queries.list_runs / get_run), at most once a second, from the engine loop's tick
hook (EngineConfig.on_tick) so it needs no thread of its own and never writes. Each run gets one bar: id,
method · model · task, status, its phase with the phase's progress (`eval 120/400`; the bar follows the phase),
rate and ETA (in a phase, render.eta_seconds: an evaluation's rest plus the training left). The rate comes from the first and the latest (time, step)
samples this process saw for the run's current attempt, so a resumed attempt or a counter that starts over
(a new phase) does not report a rate from numbers that belong to something else; there is no ETA before the first
step, when there is nothing to extrapolate from.

When stdout is not a terminal (CI, a pipe, a log file) a live display would write control codes and redraws, so
the watcher prints one plain line per status change instead.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn

from clfbench.app import render
from clfbench.storage import queries
from clfbench.storage.models import TERMINAL_STATUSES, RunStatus

POLL_S = 1.0


@dataclass
class Samples:
    """The (time, step) samples of one attempt of one run: the first seen and the latest."""

    attempt: int | None = None
    first: tuple[float, int] | None = None
    last: tuple[float, int] | None = None

    def add(self, attempt: int | None, at: float, step: int | None) -> None:
        if step is None:
            return
        if attempt != self.attempt or (self.last is not None and step < self.last[1]):
            self.attempt, self.first = attempt, None  # a new attempt or a counter that starts over
        if self.first is None:
            self.first = (at, step)
        self.last = (at, step)


def rate_and_eta(first: tuple[float, int] | None, last: tuple[float, int] | None,
                 total: int | None) -> tuple[float | None, float | None]:
    """(steps per second, seconds left) from two (time, step) samples; None where the samples cannot say.

    No rate until time has passed between the samples; no ETA before a step was made (a rate of 0 extrapolates
    to forever) or without a total.
    """
    if first is None or last is None or last[0] <= first[0]:
        return None, None
    rate = (last[1] - first[1]) / (last[0] - first[0])
    if rate <= 0 or not total or last[1] <= 0:
        return rate, None
    return rate, max(0.0, (total - last[1]) / rate)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def run_label(run: dict) -> str:
    return f"run {run['id']} {run['method']} · {run['model']} · {run['task']}"


def status_text(run: dict) -> str:
    """The run's status; a failed or interrupted run's with the first line of its error (the reason)."""
    status = run["status"]
    if status in (RunStatus.failed, RunStatus.interrupted) and run.get("error"):
        return f"{status}: {run['error'].strip().splitlines()[0]}"
    return str(status)


def steps_text(run: dict) -> str:
    """A running run's phase and its progress (`train 12/47`, `eval 120/400`, `loading`); otherwise, or from a
    worker older than phases, its steps."""
    if run.get("status") == RunStatus.running and run.get("phase"):
        return render.phase_text(run)
    step, total = run.get("progress_step"), run.get("progress_total")
    if step is None:
        return ""
    return f"step {step}/{total}" if total else f"step {step}"


def bar_position(run: dict) -> tuple[int, int | None]:
    """(completed, total) of a run's bar: the phase's when it counts something, else the training steps."""
    if run.get("status") == RunStatus.running and run.get("phase_total"):
        return run.get("phase_step") or 0, run["phase_total"]
    return run.get("progress_step") or 0, run.get("progress_total") or None


def progress_fields(run: dict, samples: Samples) -> dict[str, str]:
    """The text of one run's bar: label, status, steps, rate and ETA (blank where unknown or over)."""
    rate, eta = rate_and_eta(samples.first, samples.last, run.get("progress_total"))
    running = run["status"] == RunStatus.running
    if running and run.get("phase"):  # the ETA adds an evaluation's rest to the training's (render.eta_seconds)
        eta = render.eta_seconds(run, time.time())
        eta = eta if eta is not None and eta <= render.MAX_ETA_S else None
        rate = rate if run["phase"] == "training" else None
    if running and render.engine_gone(run, time.time()):
        return {"label": run_label(run), "status": "engine gone", "steps": steps_text(run), "rate": "", "eta": ""}
    return {
        "label": run_label(run),
        "status": status_text(run),
        "steps": steps_text(run),
        "rate": f"{rate:.2f} steps/s" if running and rate is not None else "",
        "eta": f"ETA {format_duration(eta)}" if running and eta is not None else "",
    }


def progress_line(run: dict, samples: Samples) -> str:
    """One plain line for a run: what the live bar shows, without the bar."""
    fields = progress_fields(run, samples)
    return "  ".join(text for text in (fields["label"], fields["status"], fields["steps"], fields["rate"],
                                       fields["eta"]) if text)


@dataclass
class RunWatcher:
    """Follows the store's queued and running runs (and those that appear later) until each ends."""

    store: object
    console: Console
    runs: dict[int, dict] = field(default_factory=dict)
    samples: dict[int, Samples] = field(default_factory=dict)
    bars: dict[int, TaskID] = field(default_factory=dict)
    progress: Progress | None = None
    last_poll: float = 0.0

    def start(self) -> None:
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn("{task.fields[label]}"), BarColumn(), TextColumn("{task.fields[status]}"),
                TextColumn("{task.fields[steps]}"), TextColumn("{task.fields[rate]}"),
                TextColumn("{task.fields[eta]}"), console=self.console, refresh_per_second=4)
            self.progress.start()
        self.poll()

    def tick(self) -> None:
        """The engine loop's hook: poll the store at most every POLL_S."""
        if time.monotonic() - self.last_poll >= POLL_S:
            self.poll()

    def stop(self) -> None:
        """A last poll (the final statuses), then leave the display as it is on the screen."""
        self.poll()
        if self.progress is not None:
            self.progress.stop()

    def poll(self) -> None:
        self.last_poll = time.monotonic()
        current = {run["id"]: run for status in (RunStatus.queued, RunStatus.running)
                   for run in queries.list_runs(self.store, status=status)}
        for run_id in self.runs:
            if run_id not in current:  # ended (or requeued as something else) since the last poll
                run = queries.get_run(self.store, run_id)
                if run is not None:
                    current[run_id] = run
        at = time.time()
        for run_id in sorted(current):
            self.update(current[run_id], at)

    def update(self, run: dict, at: float) -> None:
        previous = self.runs.get(run["id"])
        if previous is not None and previous["status"] in TERMINAL_STATUSES and run["status"] == previous["status"]:
            return  # ended and already shown
        self.runs[run["id"]] = run
        samples = self.samples.setdefault(run["id"], Samples())
        if run["status"] == RunStatus.running:
            samples.add(run["attempt"], at, run["progress_step"])
        if self.progress is None:
            if previous is None or previous["status"] != run["status"] or previous.get("phase") != run.get("phase"):
                self.console.print(progress_line(run, samples), highlight=False, soft_wrap=True)
            return
        self.show(run, samples)

    def show(self, run: dict, samples: Samples) -> None:
        fields = progress_fields(run, samples)
        completed, total = bar_position(run)
        if run["status"] in TERMINAL_STATUSES:  # a full bar for success, the bar where it stopped otherwise
            succeeded = run["status"] == RunStatus.succeeded
            total = total or 1
            completed = total if succeeded else min(completed, total)
        if run["id"] not in self.bars:
            self.bars[run["id"]] = self.progress.add_task("", total=total, completed=completed, **fields)
        else:
            self.progress.update(self.bars[run["id"]], total=total, completed=completed, **fields)
