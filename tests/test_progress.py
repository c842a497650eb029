"""Progress of the runs a foreground engine works on (`clfbench engine --until-idle`, `clfbench demo`):
the text of a bar, the plain lines a pipe gets, and the live display a terminal gets."""
from __future__ import annotations

import io
import re
import socket

from conftest import SAMPLES
from rich.console import Console

from clfbench.app.progress import RunWatcher, Samples, progress_fields, progress_line, rate_and_eta
from clfbench.storage import queue
from clfbench.storage.db import open_store

RUN = {"id": 7, "method": "tfidf", "model": "tfidf", "task": "massive-intent", "status": "running", "attempt": 1,
       "progress_step": 30, "progress_total": 100, "error": None}


def test_rate_and_eta_come_from_two_samples():
    rate, eta = rate_and_eta((100.0, 10), (110.0, 30), 100)
    assert rate == 2.0 and eta == 35.0
    samples = Samples()
    samples.add(1, 100.0, 10)
    samples.add(1, 110.0, 30)
    fields = progress_fields(RUN, samples)
    assert (fields["steps"], fields["rate"], fields["eta"]) == ("step 30/100", "2.00 steps/s", "ETA 35s")


def test_no_eta_before_the_first_step_nor_from_one_sample():
    assert rate_and_eta((100.0, 0), (130.0, 0), 100) == (0.0, None)
    assert rate_and_eta((100.0, 5), (100.0, 5), 100) == (None, None)
    samples = Samples()
    samples.add(1, 100.0, 0)
    samples.add(1, 200.0, 0)
    fields = progress_fields({**RUN, "progress_step": 0}, samples)
    assert fields["eta"] == "" and fields["steps"] == "step 0/100"


def test_a_new_attempt_or_a_counter_that_starts_over_restarts_the_rate():
    samples = Samples()
    samples.add(1, 100.0, 10)
    samples.add(1, 110.0, 90)
    samples.add(2, 200.0, 40)  # resumed from a checkpoint: the first attempt's speed says nothing
    assert samples.first == (200.0, 40)
    samples.add(2, 210.0, 5)  # a new phase counts from 0 again
    assert samples.first == (210.0, 5)


def test_a_failed_run_shows_the_first_line_of_its_error_and_no_rate():
    run = {**RUN, "status": "failed", "error": "CUDA out of memory\nTraceback (most recent call last): ..."}
    samples = Samples()
    samples.add(1, 100.0, 10)
    samples.add(1, 110.0, 30)
    line = progress_line(run, samples)
    assert line == "run 7 tfidf · tfidf · massive-intent  failed: CUDA out of memory  step 30/100"


def queued_store(cli):
    cli.run("queue", "--method", "tfidf", "--model", "tfidf", "--task", "massive-intent", "--data-dir", str(SAMPLES))
    return open_store(f"sqlite:///{cli.home / 'clfbench.db'}")


def claim(store) -> dict:
    return queue.claim(store, host=socket.gethostname(), engine_id=1, default_gpus=0, free_gpus=0, cpu_free=True,
                       api_free=True)


def watch_a_run_to_step_5_of_10(cli, terminal: bool):
    """A watcher that saw the queued run, then saw it running at step 5/10: (store, screen, watcher, run)."""
    store = queued_store(cli)
    screen = io.StringIO()
    watcher = RunWatcher(store=store, console=Console(file=screen, force_terminal=terminal, width=160))
    watcher.start()
    run = claim(store)
    queue.heartbeat(store, run["id"], run["attempt"], progress=(5, 10))
    watcher.poll()
    return store, screen, watcher, run


def test_the_live_display_renders_a_bar_per_run_on_a_terminal(cli):
    store, screen, watcher, run = watch_a_run_to_step_5_of_10(cli, terminal=True)
    queue.finish_failed(store, run["id"], run["attempt"], "the tokenizer is missing\nmore detail")
    watcher.stop()
    text = screen.getvalue()
    assert "\x1b[" in text  # a live display, not plain lines
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    assert "run 1 tfidf · tfidf · massive-intent" in plain
    assert "step 5/10" in plain
    assert "failed: the tokenizer is missing" in plain and "more detail" not in plain


def test_a_pipe_gets_one_plain_line_per_status_change(cli):
    store, screen, watcher, run = watch_a_run_to_step_5_of_10(cli, terminal=False)
    queue.heartbeat(store, run["id"], run["attempt"], progress=(8, 10))
    watcher.poll()  # progress alone is no status change: no line
    watcher.stop()
    assert screen.getvalue().splitlines() == [
        "run 1 tfidf · tfidf · massive-intent  queued",
        "run 1 tfidf · tfidf · massive-intent  running  step 5/10",
    ]


def test_engine_until_idle_prints_a_line_when_a_run_starts_and_when_it_succeeds(cli):
    cli.run("queue", "--method", "tfidf", "--model", "tfidf", "--task", "massive-intent", "--data-dir", str(SAMPLES))
    output = cli.run("engine", "--until-idle").stdout.splitlines()
    lines = [line for line in output if line.startswith("run ")]  # the progress lines, between the engine's own
    assert any(line.startswith("run 1 tfidf · tfidf · massive-intent  running") for line in lines[:-1]), output
    assert re.fullmatch(r"run 1 tfidf · tfidf · massive-intent  succeeded  step (\d+)/\1", lines[-1]), output
    events = [line.split("clfbench engine: ", 1)[1] for line in output if "clfbench engine: " in line]
    assert events[0].startswith("started on ") and events[-1] == "stopped", output
    assert any(event.startswith("run 1 attempt 1: launched tfidf tfidf massive-intent") for event in events), output
