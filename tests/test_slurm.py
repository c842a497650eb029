"""The Slurm launcher (engine.slurm, issue 12 item 4).

Fast unit tests of pure functions (the job script, the state table, squeue's output, the spec's `slurm:` keys),
then 20 tiny CPU runs through the real launcher on a real single-node Slurm started by the test
(tests/slurm_cluster.py): one run's node fails while it trains (requeued, resumed from its checkpoint), one job is
scancelled from outside, one run is cancelled with `clfbench cancel`; every run ends in a truthful state.
Multi-node runs can only be checked here as generated scripts: the test cluster has one node.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from clfbench.engine.slurm import (QUEUED_PHASE, JobRequest, JobState, job_outcome, parse_sacct, parse_squeue,
                                   sbatch_script)
from clfbench.engine.spec import parse_spec
from clfbench.engine.types import EXIT_STORE_UNREACHABLE, ClfbenchError
from clfbench.storage import queries
from clfbench.storage.db import open_store
from tests.conftest import ROOT, SAMPLES
from tests.slurm_cluster import running_slurm_cluster
from tests.test_e2e import wait_for

# ---- the job script ---------------------------------------------------------------------------------------------


def _sbatch_options(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ").strip("'") for line in script.splitlines() if line.startswith("#SBATCH")]


def test_a_one_node_cpu_script_is_standalone_torchrun_under_srun_with_the_runs_log_appended():
    script = sbatch_script(JobRequest(run_id=7, attempt=2, log_path="/runs/7/log.txt", comment="clfbench:k:7:2",
                                      python="/venv/bin/python", nproc=2, partition="debug", time="30"))
    options = _sbatch_options(script)
    assert options[:8] == ["--job-name=clfbench-7-2", "--output=/runs/7/log.txt", "--open-mode=append",
                           "--comment=clfbench:k:7:2", "--no-requeue", "--export=ALL", "--nodes=1",
                           "--ntasks-per-node=1"]
    assert "--cpus-per-task=2" in options and "--partition=debug" in options and "--time=30" in options
    assert not any(option.startswith(("--gres", "--nodelist", "--account")) for option in options)
    assert "exec srun /venv/bin/python -m torch.distributed.run --nnodes=$SLURM_NNODES --nproc-per-node=2 " \
           "--standalone -m clfbench.engine.worker 7" in script
    assert "export CLFBENCH_CPU_THREADS=${SLURM_CPUS_PER_TASK" in script
    assert "rdzv" not in script


def test_a_two_node_gpu_script_meets_on_the_first_node_with_typed_gres_and_the_pinned_nodes():
    script = sbatch_script(JobRequest(run_id=3, attempt=1, log_path="/l", comment="c", python="python", gpus=4,
                                      gpu_type="a100", nodes=2, account="lab", nodelist="gpu[01-02]",
                                      sbatch_args=("--qos=short",)))
    options = _sbatch_options(script)
    assert "--gres=gpu:a100:4" in options and "--nodes=2" in options and "--ntasks-per-node=1" in options
    assert "--nodelist=gpu[01-02]" in options and "--account=lab" in options and options[-1] == "--qos=short"
    assert not any(option.startswith("--cpus-per-task") for option in options)
    assert 'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert re.search(r"exec srun --kill-on-bad-exit=1 python -m torch.distributed.run --nnodes=\$SLURM_NNODES "
                     r"--nproc-per-node=4 --rdzv-backend=c10d --rdzv-endpoint=\$head:\$port "
                     r"--rdzv-id=\$SLURM_JOB_ID -m clfbench.engine.worker 3", script)
    assert "--standalone" not in script and "CLFBENCH_CPU_THREADS" not in script
    untyped = _sbatch_options(sbatch_script(JobRequest(run_id=3, attempt=1, log_path="/l", comment="c", gpus=1)))
    assert "--gres=gpu:1" in untyped


def test_an_api_run_is_one_worker_process_without_torchrun():
    script = sbatch_script(JobRequest(run_id=5, attempt=1, log_path="/l", comment="c", python="py",
                                      launch="process"))
    assert script.rstrip().endswith("exec srun py -m clfbench.engine.worker 5")
    assert "torch.distributed" not in script and "--cpus-per-task" not in script


# ---- the state table --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("state, reason, cancel_sent, action, says", [
    ("PENDING", "Resources", False, "wait", f"{QUEUED_PHASE} (job 9: Resources)"),
    ("CONFIGURING", "None", False, "wait", f"{QUEUED_PHASE} (job 9: configuring)"),
    ("RUNNING", "None", False, "run", ""),
    ("COMPLETING", "None", False, "run", ""),
    ("COMPLETED", "None", False, "result", "completed but its worker wrote no result"),
    ("PREEMPTED", "None", False, "requeue", "Slurm job 9 ended PREEMPTED"),
    ("NODE_FAIL", "NodeDown", False, "requeue", "Slurm job 9 ended NODE_FAIL (NodeDown)"),
    ("BOOT_FAIL", "None", False, "requeue", "BOOT_FAIL"),
    ("TIMEOUT", "TimeLimit", False, "interrupted", "hit its time limit (TIMEOUT)"),
    ("CANCELLED", "None", False, "cancelled", "cancelled on Slurm: Slurm job 9 was cancelled outside clfbench"),
    ("CANCELLED", "None", True, "cancelled", "cancelled by user"),
    ("FAILED", "NonZeroExitCode", False, "failed", "Slurm job 9 ended FAILED, exit code 1"),
    ("OUT_OF_MEMORY", "OutOfMemory", False, "failed", "ran out of memory (OUT_OF_MEMORY)"),
    ("", "no longer known to Slurm", False, "result", "without a result"),
])
def test_each_slurm_state_maps_to_a_truthful_run_state(state, reason, cancel_sent, action, says):
    outcome = job_outcome(JobState("9", state, reason, "1"), cancel_sent)
    assert outcome.action == action and says in outcome.reason


def test_a_worker_that_stopped_for_the_store_is_requeued_not_failed():
    outcome = job_outcome(JobState("9", "FAILED", "NonZeroExitCode", "1"), False, rank_code=EXIT_STORE_UNREACHABLE)
    assert outcome.action == "requeue"


def test_squeue_and_sacct_output_parse():
    jobs = parse_squeue("12|PENDING|ReqNodeNotAvail, UnavailableNodes:vm|0||\n13|RUNNING|None|0|vm|\n\n")
    assert jobs["12"] == JobState("12", "PENDING", "ReqNodeNotAvail, UnavailableNodes:vm", "0", "")
    assert jobs["13"].nodes == "vm"
    assert parse_sacct("14|CANCELLED by 0|None|0:15|vm\n")["14"] == JobState("14", "CANCELLED", "None", "0", "vm")


# ---- the spec's keys --------------------------------------------------------------------------------------------

BASE = {"method": "tfidf", "model": "tfidf", "task": "massive-intent"}


@pytest.mark.parametrize("slurm, message", [
    ({"time": "soon"}, "invalid spec: slurm.time: 'soon' is not a Slurm time"),
    ({"nodes": 0}, "invalid spec: slurm.nodes: Input should be greater than or equal to 1"),
    ({"partition": "gpu; rm"}, "invalid spec: slurm.partition: 'gpu; rm' is not a Slurm name"),
    ({"sbatch_args": ["--output=/tmp/x"]}, "invalid spec: slurm.sbatch_args: --output is set by clfbench"),
    ({"sbatch_args": ["-pgpu"]}, "slurm.sbatch_args: -p is set by clfbench (use slurm.partition)"),
    ({"queue": "x"}, "invalid spec: slurm.queue: unknown key"),
])
def test_bad_slurm_keys_are_one_line_errors(slurm, message):
    with pytest.raises(ClfbenchError) as caught:
        parse_spec({**BASE, "slurm": slurm})
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_slurm_keys_are_kept_and_a_spec_without_them_keeps_its_hash():
    plain = parse_spec(BASE)
    assert '"slurm"' not in plain.canonical_json()
    timed = parse_spec({**BASE, "slurm": {"time": "1-00:00:00", "nodes": 2, "sbatch_args": ["--qos=short"]}})
    assert timed.slurm.nodes == 2 and timed.spec_hash() != plain.spec_hash()


def test_the_launcher_is_refused_in_one_line_where_sbatch_is_missing(cli, tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    cli.env["PATH"] = str(empty)
    for args in (("engine", "start", "--launcher", "slurm"), ("engine", "--foreground", "--launcher", "slurm")):
        result = subprocess.run([sys.executable, "-m", "clfbench.app.cli", *args], cwd=ROOT, env=cli.env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1
        assert result.stderr == ("error: the Slurm launcher needs sbatch, squeue, scancel on PATH, and this host has "
                                 "none (start it on a Slurm login node)\n")


# ---- 20 runs through a real Slurm -------------------------------------------------------------------------------

TFIDF = ["--method", "tfidf", "--model", "tfidf", "--task", "massive-intent", "--data-dir", str(SAMPLES)]
# A tiny encoder fine-tune that checkpoints every 10 steps (6 epochs: ~8 s of training; 400: long enough to be
# cancelled whatever the box's speed: a job scancelled just after it completed stays COMPLETED).
LONG = ["--method", "encoder-finetune", "--model", "tiny-bert", "--task", "massive-intent", "--data-dir",
        str(SAMPLES), "-o", "batch_size=8", "-o", "train_limit=160", "-o", "test_limit=20",
        "-o", "checkpoint_every=10", "-o", "eval_every=0"]


class Scene:
    """One store, one Slurm engine (`clfbench engine --foreground --launcher slurm`) and the cluster."""

    def __init__(self, cli, cluster, tmp_path: Path):
        self.cli, self.cluster = cli, cluster
        cli.env.update(cluster.env({}))  # SLURM_CONF for the CLI, the engine and every job it submits
        cli.env.update(CLFBENCH_SLURM_POLL_S="0.5", CLFBENCH_LOCK_DIR=str(tmp_path / "locks"))
        cli.env["CLFBENCH_DB"] = self.url = f"sqlite:///{tmp_path / 'store.db'}"
        self.store = open_store(self.url)
        self.log_path = tmp_path / "engine.log"
        self.engine: subprocess.Popen | None = None

    def start_engine(self) -> None:
        with open(self.log_path, "ab") as log:
            self.engine = subprocess.Popen([sys.executable, "-m", "clfbench.app.cli", "engine", "--foreground",
                                            "--launcher", "slurm"], cwd=ROOT, env=self.cli.env, stdout=log,
                                           stderr=subprocess.STDOUT)

    def queue(self, *args: str) -> list[int]:
        return [run["id"] for run in self.cli.json("queue", *args, "--allow-duplicate")]

    def run(self, run_id: int) -> dict:
        with self.store.read() as connection:
            return dict(connection.execute(text("SELECT * FROM runs WHERE id = :r"), {"r": run_id}).mappings().one())

    def training(self, run_id: int, attempt: int) -> bool:
        with self.store.read() as connection:
            points = connection.execute(text("SELECT count(*) FROM metric_points WHERE run_id = :r AND attempt = :a"),
                                        {"r": run_id, "a": attempt}).scalar()
        return self.run(run_id)["attempt"] == attempt and points >= 1

    def checkpointed(self, run_id: int) -> bool:
        run = self.run(run_id)
        return run["status"] == "running" and bool(run["output_dir"]) \
            and (Path(run["output_dir"]) / "checkpoint").is_dir() and self.training(run_id, run["attempt"])

    def wait(self, predicate, timeout: float, what: str):
        try:
            return wait_for(predicate, timeout, what)
        except AssertionError as timed_out:
            with self.store.read() as connection:
                rows = connection.execute(text("SELECT id, status, attempt, job_id, phase, error FROM runs")).all()
            engine_log = self.log_path.read_text(errors="replace")[-4000:]
            raise AssertionError(f"{timed_out}\nruns: {rows}\n--- engine ---\n{engine_log}\n"
                                 f"{self.cluster.log_tails()}") from None

    def jobs(self) -> list[tuple[str, str, str]]:
        """Every job the cluster knows: (id, name, state)."""
        out = self.cluster.command("squeue", "--noheader", "--states=all", "-O", "JobID:|,Name:|,State:|")
        return [tuple(part.strip() for part in line.split("|")[:3]) for line in out.splitlines() if line.strip()]

    def stop(self) -> None:
        if self.engine is not None and self.engine.poll() is None:
            self.engine.send_signal(signal.SIGTERM)
            try:
                self.engine.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.engine.kill()


@pytest.fixture(scope="module")
def cluster():
    yield from running_slurm_cluster()


@pytest.fixture
def scene(cli, cluster, tmp_path):
    made = Scene(cli, cluster, tmp_path)
    yield made
    made.stop()
    if cluster.node_state().startswith(("DOWN", "DRAIN")):
        cluster.scontrol("update", f"nodename={cluster.node}", "state=resume")


def test_twenty_runs_through_a_real_slurm_end_truthfully(scene):
    started = time.monotonic()
    node = scene.cluster.node
    # 1. A node failure while a run trains: its job ends NODE_FAIL, the run is requeued, its next attempt waits on
    #    Slurm while the node is down ("queued on Slurm (job N: ...)"), then resumes from the checkpoint.
    (failed_node,) = scene.queue(*LONG, "-o", "epochs=6", "--name", "node-fail")
    scene.start_engine()
    scene.wait(lambda: scene.checkpointed(failed_node), 120, "the first run to checkpoint on Slurm")
    first_job = scene.run(failed_node)["job_id"]
    scene.cluster.scontrol("update", f"nodename={node}", "state=down", "reason=test")
    scene.wait(lambda: scene.run(failed_node)["attempt"] == 2 and scene.run(failed_node)["job_id"], 60,
               "the run to be requeued and submitted again")
    waiting = scene.wait(lambda: (scene.run(failed_node)["phase"] or "").startswith(QUEUED_PHASE)
                         and scene.run(failed_node)["phase"], 30, "its new job to wait on Slurm")
    second_job = scene.run(failed_node)["job_id"]
    assert second_job != first_job and waiting.startswith(f"{QUEUED_PHASE} (job {second_job}: ")
    assert "NODE_FAIL" in scene.run(failed_node)["attempt_note"]
    scene.cluster.scontrol("update", f"nodename={node}", "state=resume")

    # 2. Nineteen more: two long ones first (priority), one to scancel from outside and one to `clfbench cancel`.
    (scancelled,) = scene.queue(*LONG, "-o", "epochs=400", "--priority", "5", "--name", "scancelled")
    (cancelled,) = scene.queue(*LONG, "-o", "epochs=400", "--priority", "4", "--name", "cancelled")
    quick = [run_id for seed in range(17) for run_id in scene.queue(*TFIDF, "--seed", str(seed))]
    scene.wait(lambda: scene.training(scancelled, 1), 120, "the run to scancel to train")
    scene.cluster.command("scancel", scene.run(scancelled)["job_id"])  # a user's own scancel, not clfbench's
    scene.wait(lambda: scene.training(cancelled, 1), 120, "the run to cancel to train")
    assert "cancel requested" in scene.cli.run("cancel", str(cancelled)).stdout

    every = [failed_node, scancelled, cancelled, *quick]
    assert len(every) == 20
    scene.wait(lambda: all(scene.run(run_id)["status"] not in ("queued", "running") for run_id in every), 200,
               "every run to end")
    wall_s = time.monotonic() - started

    runs = {run_id: scene.run(run_id) for run_id in every}
    node_run = runs[failed_node]
    assert (node_run["status"], node_run["attempt"]) == ("succeeded", 2)
    assert f"Slurm job {first_job} ended NODE_FAIL" in node_run["attempt_note"]
    assert "attempt 2 resumed from step" in node_run["attempt_note"]
    assert node_run["host"] == node and node_run["job_id"] == second_job
    assert (runs[scancelled]["status"], runs[scancelled]["attempt"]) == ("cancelled", 1)
    assert runs[scancelled]["error"].startswith("cancelled on Slurm: Slurm job ")
    assert "outside clfbench" in runs[scancelled]["error"]
    assert (runs[cancelled]["status"], runs[cancelled]["error"], runs[cancelled]["attempt"]) == \
        ("cancelled", "cancelled by user", 1)
    for run_id in quick:
        assert (runs[run_id]["status"], runs[run_id]["attempt"], runs[run_id]["error"]) == ("succeeded", 1, None)
        assert runs[run_id]["job_id"]

    # No claim twice: one claim per attempt, one Slurm job per attempt, and each run's jobs are its attempts'.
    with scene.store.read() as connection:
        claims = connection.execute(text("SELECT run_id, message FROM events WHERE kind = 'claimed'")).all()
        launcher = connection.execute(text("SELECT launcher FROM engines")).scalars().all()
    assert sorted(claims) == sorted(set(claims)) and len(claims) == 21
    names = [name for _, name, _ in scene.jobs() if name.startswith("clfbench-")]
    assert sorted(names) == sorted({f"clfbench-{run_id}-{attempt}" for run_id, run in runs.items()
                                    for attempt in range(1, run["attempt"] + 1)})
    assert launcher == ["slurm"]
    # The log of every attempt is in the store, copied by the launcher from the job's output file.
    scene.wait(lambda: queries.log_complete(scene.store, failed_node, 2), 60, "the launcher to store the log's end")
    stored = "".join(chunk["text"] for chunk in queries.log_chunks(scene.store, failed_node))
    assert f"run {failed_node} attempt 1 submitted to Slurm" in stored
    assert f"run {failed_node} attempt 2 submitted to Slurm" in stored and f"run {failed_node} succeeded" in stored
    states = {name: state for _, name, state in scene.jobs()}
    assert states[f"clfbench-{failed_node}-1"] == "NODE_FAIL" and states[f"clfbench-{scancelled}-1"] == "CANCELLED"
    print(f"\n20 runs through Slurm: {wall_s:.1f} s")
    if os.environ.get("CLFBENCH_SLURM_TIMINGS"):
        Path(os.environ["CLFBENCH_SLURM_TIMINGS"]).write_text(f"{wall_s:.1f}\n")
