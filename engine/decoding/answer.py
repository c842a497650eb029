"""What a decision mode returns per example, and the progress it reports while deciding."""
from __future__ import annotations

import time
from dataclasses import dataclass

from clfbench.engine.context import TESTING, RunContext
from clfbench.engine.prompting.parse import Parsed

LOG = "prompt:"


@dataclass
class Answer:
    """One example's answer: the text the model produced (or the chosen label), parsed per task."""

    raw: str
    parsed: dict[str, Parsed]
    generated: int = 0  # tokens the model produced (stop token included)


class Progress:
    """Examples decided so far: the run's progress and its "testing" phase on every batch; a log line and the
    `examples_per_s` metric at most every 10 s, and at the end."""

    def __init__(self, ctx: RunContext, total: int):
        self.ctx, self.total, self.done, self.started, self.last_log = ctx, total, 0, time.perf_counter(), 0.0
        ctx.set_progress(0, total)
        ctx.set_phase(TESTING, 0, total)

    def add(self, count: int) -> None:
        self.done += count
        self.ctx.set_progress(self.done, self.total)
        self.ctx.set_phase(TESTING, self.done, self.total)
        now = time.perf_counter()
        if now - self.last_log > 10 or self.done == self.total:
            self.last_log = now
            rate = self.done / max(now - self.started, 1e-9)
            self.ctx.log_metric(self.done, "examples_per_s", rate)
            print(f"{LOG} {self.done}/{self.total} examples ({rate:.2f} ex/s)", flush=True)

