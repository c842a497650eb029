"""Run detail: live loss and eval curves (plotext charts), throughput, parse failures, results, spec, log, and
the calibration of its answers' confidences (ECE and the reliability diagram, where the method has them).

Everything is read in thread workers on a timer. Metric points are fetched incrementally (only points newer
than the last one seen) and the log is followed from the byte offset read so far, so a long run's detail view
costs the same per tick as a short one's.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Log, Static, TabbedContent, TabPane
from textual.worker import get_current_worker
from textual_plotext import PlotextPlot

from clfbench.app import render
from clfbench.app.tui.messages import OpenErrors, OpenNewRun
from clfbench.app.tui.screen_parts import KeyTable, TitleBar, call_if_open, copy_for_user, copy_key, tab_keys
from clfbench.engine.runlog import LauncherNoise
from clfbench.storage import queries
from clfbench.storage.db import Store

REFRESH_S = 1.5
LOG_TAIL_BYTES = 64_000  # the first read of a log shows its last 64 kB; later reads follow from there
TABS = [("curves", "Curves"), ("eval", "Eval"), ("results", "Results"), ("config", "Config"), ("log", "Log"),
        ("calibration", "Calibration")]


def is_loss(name: str) -> bool:
    return "loss" in name


def is_eval_curve(name: str) -> bool:
    """Quality over time: eval metrics and, for generation jobs, the parse-failure rate."""
    return (name.startswith("eval_") and not is_loss(name)) or name.startswith("parse_failure")


def is_throughput(name: str) -> bool:
    return name.endswith("examples_per_s")


def read_log(path: str | None, offset: int) -> tuple[str, int]:
    """New text of the log from `offset` (the last LOG_TAIL_BYTES on the first read), and the new offset."""
    if not path or not os.path.exists(path):
        return "", offset
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        if size < offset:  # the file was replaced (a retry rewrote it): start again
            offset = 0
        start = max(offset, size - LOG_TAIL_BYTES) if offset == 0 else offset
        handle.seek(start)
        data = handle.read(size - start)
    return data.decode("utf-8", errors="replace"), size


def read_run_log(store, run: dict, cursor: tuple[str, int]) -> tuple[str, tuple[str, int]]:
    """New text of a run's log after `cursor` and the cursor after it: ("store", last chunk id) from the copy its
    engines keep in the store, or ("file", byte offset) from its log file where render.log_source says so. A cursor
    of the other source starts the log again."""
    path = render.log_source(store, run)
    if path is not None:
        text, offset = read_log(path, cursor[1] if cursor[0] == "file" else 0)
        return text, ("file", offset)
    chunks = queries.log_chunks(store, run["id"], after_id=cursor[1] if cursor[0] == "store" else 0)
    if not chunks:
        return "", cursor
    text = "".join(chunk["text"] for chunk in chunks)
    if cursor[0] != "store":
        text = text[-LOG_TAIL_BYTES:]
    return text, ("store", chunks[-1]["id"])


class DetailScreen(Screen):
    """One run, live: its curves, results, spec and log in tabs (1-5)."""

    HELP_TITLE = "run detail"
    BINDINGS = [
        Binding("escape,backspace", "close", "Back"),
        *tab_keys(TABS),
        Binding("e", "errors", "Errors"),
        Binding("d", "duplicate", "Dup+edit", show=False),
        copy_key("copy_spec", "Copy spec"),
    ]
    DEFAULT_CSS = """
    DetailScreen #header { height: auto; max-height: 3; padding: 0 1; background: $panel; }
    DetailScreen TabbedContent { height: 1fr; }
    DetailScreen PlotextPlot { height: 1fr; }
    DetailScreen .summary { height: auto; padding: 0 1; }
    DetailScreen Log { height: 1fr; }
    DetailScreen #calibration-text { padding: 0 1; }
    DetailScreen DataTable { height: 1fr; }
    """

    def __init__(self, store: Store, run_id: int) -> None:
        super().__init__()
        self.store = store
        self.run_id = run_id
        self.run: dict | None = None
        self.points: dict[str, list[tuple[int, float]]] = {}  # the charted attempt's: name → (step, value)
        # Every attempt's points as read (attempt → name → points): the charts show the run's current attempt,
        # even when a retry's first points arrive in the same read as the row that still names the old one.
        self.points_by_attempt: dict[int, dict[str, list[tuple[int, float]]]] = {}
        self.last_point_id = 0
        self.log_cursor: tuple[str, int] = ("none", 0)
        self.log_noise = LauncherNoise()  # the log tab shows the run's lines, not torchrun's traceback
        self.results: dict[str, dict[str, float]] = {}
        self.result_rules: dict[str, dict[str, str]] = {}  # task -> metric -> the rule it was computed under
        self.intervals: dict[str, dict[str, tuple]] = {}  # task -> metric -> (low, high, resamples)
        self.calibrated: tuple | None = None  # the tasks with an ECE whose calibration was read (read once)

    def compose(self) -> ComposeResult:
        yield TitleBar(f"run {self.run_id}", id="title")
        yield Static("loading…", id="header")
        with TabbedContent(initial="curves"):
            with TabPane("1 Curves", id="curves"):
                yield PlotextPlot(id="loss-plot")
                yield Static("", classes="summary", id="throughput")
            with TabPane("2 Eval", id="eval"):
                yield PlotextPlot(id="eval-plot")
                yield Static("", classes="summary", id="parse-failures")
            with TabPane("3 Results", id="results"):
                table = KeyTable(cursor_type="row", zebra_stripes=True, id="results-table")
                table.add_columns("task", "metric", "value", "95% interval", "rule")
                yield table
            with TabPane("4 Config", id="config"):
                with VerticalScroll():
                    yield Static("", id="spec")
            with TabPane("5 Log", id="log"):
                yield Log(id="log-view", max_lines=5000, auto_scroll=True)
            with TabPane("6 Calibration", id="calibration"):
                with VerticalScroll():
                    yield Static("no confidences yet: they come with the results of a method that gives "
                                 "probabilities (encoder heads, ls-llama, llmembed, tfidf)", id="calibration-text",
                                 markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.draw_charts()
        self.reload()
        self.set_interval(REFRESH_S, self.reload)

    # ---- reading ------------------------------------------------------------------------------
    @work(thread=True, group="detail-reload", exclusive=True)
    def reload(self) -> None:
        run = queries.get_run(self.store, self.run_id)
        if run is None:
            call_if_open(self, self.gone)
            return
        if run["status"] == "running" and run["engine_id"] is not None:  # else its progress says "engine gone"
            engines = queries.live_engines(self.store, stale_after_s=render.STALE_AFTER_S, now=self.app.now())
            run["engine_alive"] = any(engine["id"] == run["engine_id"] for engine in engines)
        new_points = queries.metric_series(self.store, self.run_id, after_id=self.last_point_id)
        results = queries.run_results(self.store, self.run_id)
        rules = queries.run_result_rules(self.store, self.run_id)
        intervals = queries.run_result_intervals(self.store, self.run_id)
        log_text, log_cursor = read_run_log(self.store, run, self.log_cursor)
        if not get_current_worker().is_cancelled:
            call_if_open(self, self.show, run, new_points, results, log_text, log_cursor, rules, intervals)

    def gone(self) -> None:
        self.notify(f"run {self.run_id} no longer exists", severity="warning")
        self.action_close()

    def show(self, run: dict, new_points: list[dict], results: dict, log_text: str, log_cursor: tuple[str, int],
             rules: dict | None = None, intervals: dict | None = None) -> None:
        spec_changed = self.run is None or self.run["spec_json"] != run["spec_json"] or \
            self.run["error"] != run["error"]
        attempt_changed = self.run is None or run["attempt"] != self.run["attempt"]
        self.run = run
        self.update_header()
        for point in new_points:
            by_name = self.points_by_attempt.setdefault(point["attempt"], {})
            by_name.setdefault(point["name"], []).append((point["step"], point["value"]))
        if new_points:
            self.last_point_id = new_points[-1]["id"]
        self.points = self.points_by_attempt.setdefault(run["attempt"], {})
        if new_points or attempt_changed:  # a retry charts its own points, not the first attempt's
            self.draw_charts()
        # `clfbench rescore` changes rules and adds intervals
        if results != self.results or (rules or {}) != self.result_rules or (intervals or {}) != self.intervals:
            self.results, self.result_rules, self.intervals = results, rules or {}, intervals or {}
            self.fill_results()
        self.calibrate(results)
        self.update_summaries()
        if spec_changed:
            self.update_spec()
        if log_text:
            log = self.query_one("#log-view", Log)
            if log_cursor[0] != self.log_cursor[0] or log_cursor[1] < self.log_cursor[1]:
                log.clear()
                self.log_noise = LauncherNoise()
            log.write(self.log_noise.feed(log_text))
        self.log_cursor = log_cursor

    # ---- drawing ------------------------------------------------------------------------------
    def update_header(self) -> None:
        run = self.run
        now = self.app.now()
        line = Text()
        line.append_text(render.status_text(run["status"]))
        line.append(f" · {run['method']} · {run['model']} · {run['task']} · shots {run['shots']} · seed {run['seed']}")
        second = []
        progress = render.progress_with_eta(run, now)
        if progress:
            second.append(f"progress {progress}")
        second.append(f"time {render.duration(run['started_at'], run['finished_at'], now)}")
        second.append(f"attempt {run['attempt']}")
        if run.get("attempt_note"):
            second.append(run["attempt_note"])  # why it was retried, and how the retry began
        if run["gpus_assigned"]:
            second.append(f"GPU {run['gpus_assigned']}")
        if run["error"]:
            second.append(run["error"].splitlines()[0])
        line.append("\n" + " · ".join(second))
        self.query_one("#header", Static).update(line)

    def draw_charts(self) -> None:
        # A run without a loss (prompting) charts its throughput in the first tab instead.
        has_loss = any(is_loss(name) for name in self.points)
        first = (is_loss, "loss") if has_loss or not self.points else (is_throughput, "examples/s")
        for plot_id, (wanted, title) in (("#loss-plot", first), ("#eval-plot", (is_eval_curve, "eval"))):
            plot = self.query_one(plot_id, PlotextPlot)
            plt = plot.plt
            plt.clear_figure()
            names = sorted(name for name in self.points if wanted(name))
            for name in names:
                # plotext cannot scale an axis holding NaN or inf (a diverged loss): chart the finite points only.
                finite = [(step, value) for step, value in self.points[name] if math.isfinite(value)]
                if not finite:
                    continue
                steps, values = zip(*finite)
                if len(finite) < len(self.points[name]):
                    name = f"{name} (not finite at step {self.first_nonfinite_step(name)})"
                if len(steps) > 1:
                    plt.plot(list(steps), list(values), label=name, marker="braille")
                else:  # a lone point (the first evaluation) would be invisible as a line
                    plt.scatter(list(steps), list(values), label=name, marker="dot")
            plt.title(title if names else f"{title}: no points yet")
            plt.xlabel("step")
            plot.refresh()

    def first_nonfinite_step(self, name: str) -> int:
        return next(step for step, value in self.points[name] if not math.isfinite(value))

    def update_summaries(self) -> None:
        parts = []
        for name in sorted(n for n in self.points if is_throughput(n)):
            values = [v for _, v in self.points[name]]
            parts.append(f"{name} {values[-1]:.1f} now, {sum(values) / len(values):.1f} mean")
        for task, values in sorted(self.results.items()):
            for metric in sorted(m for m in values if is_throughput(m)):
                parts.append(f"{task} {metric} {values[metric]:.1f}")
        self.query_one("#throughput", Static).update("throughput: " + ("; ".join(parts) or "–"))
        failures = [f"{task} {values['parse_failure_rate']:.1%}" for task, values in sorted(self.results.items())
                    if "parse_failure_rate" in values and self.metric_applies("parse_failure_rate")]
        self.query_one("#parse-failures", Static).update("parse failures: " + (", ".join(failures) or "–"))

    def metric_applies(self, metric: str) -> bool:
        """False for a rate this run's method cannot have (an encoder's parse failures): shown '–', not 0."""
        return self.run is None or render.metric_applies(metric, self.run["method"])

    def fill_results(self) -> None:
        table = self.query_one("#results-table", DataTable)
        table.clear()
        for task, values in sorted(self.results.items()):
            for metric, value in sorted(values.items()):
                rule = self.result_rules.get(task, {}).get(metric, "")  # how slot spans were read
                applies = self.metric_applies(metric)
                interval = self.intervals.get(task, {}).get(metric)  # bootstrap over test examples
                ends = f"[{interval[0]:.4g}, {interval[1]:.4g}]" if interval and applies else ""
                table.add_row(task, metric, f"{value:.4g}" if applies else "–", ends, rule)

    def calibrate(self, results: dict) -> None:
        """Read the calibration of the tasks with an ECE, once per run's results: it reads every prediction."""
        with_ece = tuple(sorted(task for task, values in results.items() if "ece" in values))
        if with_ece and with_ece != self.calibrated:
            self.calibrated = with_ece
            self.read_calibration(with_ece)

    @work(thread=True, group="detail-calibration", exclusive=True)
    def read_calibration(self, tasks: tuple[str, ...]) -> None:
        from clfbench.app.calibration import calibration

        found = [calibration(self.store, self.run_id, task) for task in tasks]
        call_if_open(self, self.show_calibration, [c for c in found if c is not None])

    def show_calibration(self, found: list) -> None:
        from clfbench.app.calibration import diagram_lines, summary_line

        blocks = ["\n".join([summary_line(c), *diagram_lines(c)]) for c in found]
        self.query_one("#calibration-text", Static).update("\n\n".join(blocks) + "\n\n`clfbench calibration "
                                                          f"{self.run_id} -o diagram.svg` writes it for a paper")

    def update_spec(self) -> None:
        try:
            spec = json.dumps(json.loads(self.run["spec_json"]), indent=2, sort_keys=True)
        except ValueError:
            spec = self.run["spec_json"]
        text = Text(spec)
        if self.run["error"]:
            text.append("\n\nerror:\n", style="bold red").append(self.run["error"])
        if self.run["log_path"]:
            text.append(f"\n\nlog: {Path(self.run['log_path']).name} · code {self.run['code_version']}",
                        style="dim")
        self.query_one("#spec", Static).update(text)

    # ---- actions ------------------------------------------------------------------------------
    def action_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab

    def action_close(self) -> None:
        if self.is_current:  # a second Escape queued behind the first must not pop the screen underneath
            self.dismiss()

    def action_errors(self) -> None:
        self.post_message(OpenErrors(self.run_id))

    def action_duplicate(self) -> None:
        if self.run is not None:
            self.post_message(OpenNewRun(prefill=json.loads(self.run["spec_json"])))

    def action_copy_spec(self) -> None:
        if self.run is not None:
            copy_for_user(self, self.run["spec_json"], f"the spec of run {self.run_id}")

    def selected_run_id(self) -> int:
        return self.run_id
