"""The Slurm launcher: the engine (engine.daemon.Engine) with each attempt submitted as a Slurm job.

`clfbench engine start --launcher slurm` on a login node claims queued runs, up to --max-jobs submitted and
unfinished at once, and submits each attempt with `sbatch --parsable` and a script written into the run's folder
(`slurm-<attempt>.sh`): `srun python -m torch.distributed.run ... -m clfbench.engine.worker RUN_ID`, the worker
and environment of a local launch. Slurm, not this engine, decides where and when: the claim asks for the run's
own GPU count, never this host's. Every tick one `squeue` call asks for the state of all its jobs (`sacct` only
for jobs squeue no longer knows), and `job_outcome` maps each state to the run's (docs/slurm.md has the table).

Rules, and why (docs/ARCHITECTURE.md):
- The worker still writes succeeded/failed itself, fenced by its attempt; the engine writes only what Slurm knows
  and the worker cannot say (pending, preempted, node failure, time limit, cancelled from outside).
- Jobs are submitted with --no-requeue: Slurm's own requeue would rerun an attempt that clfbench already ended
  (a second process with the same attempt, writing beside its successor). clfbench requeues by a new attempt.
- A job is found again by runs.job_id after a restart (adopted, not requeued); a job submitted by an engine that
  died before recording its id, by its name clfbench-<run>-<attempt> and the run's tag in its comment.
- No Slurm client library: the commands' own output formats (`--parsable`, `squeue -O`) are the interface.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from clfbench.engine.daemon import (ATTEMPT_HEADER, Engine, attempt_start, kill_processes, log_tail, rank_exit_code,
                                    run_tag, run_title, say, tagged_processes, worker_env)
from clfbench.engine.daemon import main as daemon_main
from clfbench.engine.types import EXIT_STORE_UNREACHABLE, ClfbenchError
from clfbench.storage import paths, queries, queue
from clfbench.storage.db import StoreError, seconds_from_env
from clfbench.storage.models import RunStatus
from clfbench.storage.paths import run_dir
from clfbench.storage.states import Writer

COMMANDS = ("sbatch", "squeue", "scancel")
QUEUED_PHASE = "queued on Slurm"  # the engine's word on a pending job; the worker's own phases replace it
STARTED_PHASE = "started on Slurm"
# squeue's fields, '|' after each (no width: nothing cut); the reason comes before the node list, which may be long.
SQUEUE_FIELDS = "JobID:|,State:|,Reason:|,exit_code:|,NodeList:|"
# A job squeue does not list twice in a row is gone from the controller (purged after MinJobAge): once is not
# enough, a controller that restarts answers for a moment with a partial list.
MISSING_POLLS = 2


def check_slurm_commands() -> None:
    """The launcher needs Slurm's client commands on this host (a login node); else one line says so."""
    missing = [name for name in COMMANDS if shutil.which(name) is None]
    if missing:
        raise ClfbenchError(f"the Slurm launcher needs {', '.join(missing)} on PATH, and this host has none "
                            "(start it on a Slurm login node)")
    poll_s_from_env()


def poll_s_from_env() -> float:
    """CLFBENCH_SLURM_POLL_S: seconds between the engine's ticks, each one squeue call (default 5: a cluster's
    controller serves every user; the tests use 0.5). A bad value is one line."""
    try:
        return seconds_from_env("CLFBENCH_SLURM_POLL_S", 5.0, zero_allowed=False)
    except StoreError as error:
        raise ClfbenchError(str(error)) from None


# ---- the job script ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class JobRequest:
    """Everything an attempt's sbatch script says, from the run's row and spec (pure data: unit-tested)."""

    run_id: int
    attempt: int
    log_path: str
    comment: str  # the run's tag: how a job is found when its id was never recorded
    python: str = sys.executable
    launch: str = "torchrun"  # "process": an API-only worker, no torchrun
    gpus: int = 0  # per node
    gpu_type: str | None = None
    nproc: int = 1  # processes per node on CPU
    threads: int | None = None  # the spec's `threads:` (CPU runs)
    nodes: int = 1
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    nodelist: str | None = None
    sbatch_args: tuple[str, ...] = ()

    @property
    def job_name(self) -> str:
        return f"clfbench-{self.run_id}-{self.attempt}"


def job_request(run: dict, log_path: str, comment: str) -> JobRequest:
    """The request for a claimed run: its GPUs, processes and threads, and the spec's `slurm:` options (validated at
    queue time, engine.slurm_spec) and pins (`host:` → --nodelist, `gpu_type:` → the gres type)."""
    try:
        spec = json.loads(run["spec_json"] or "{}")
    except ValueError:
        spec = {}
    slurm = spec.get("slurm") or {}
    gpus = 0 if run["launch"] == "process" else (run["gpus_requested"] or 0)  # empty: CPU, as on a GPU-less host
    threads = spec.get("threads")
    return JobRequest(
        run_id=run["id"], attempt=run["attempt"], log_path=log_path, launch=run["launch"],
        comment=comment, gpus=gpus, gpu_type=run.get("pin_gpu_type"),
        nproc=run["nproc"] or 1, threads=threads if isinstance(threads, int) else None,
        nodes=int(slurm.get("nodes") or 1), partition=slurm.get("partition"), time=slurm.get("time"),
        account=slurm.get("account"), nodelist=run.get("pin_host"), sbatch_args=tuple(slurm.get("sbatch_args") or ()),
    )


def sbatch_script(request: JobRequest) -> str:
    """The job script of one attempt: #SBATCH lines, then one torchrun per node under srun."""
    q = shlex.quote
    lines = ["#!/bin/bash", f"# clfbench run {request.run_id} attempt {request.attempt}: written by its engine"]
    options = [f"--job-name={request.job_name}", f"--output={request.log_path}", "--open-mode=append",
               f"--comment={request.comment}", "--no-requeue", "--export=ALL",
               f"--nodes={request.nodes}", "--ntasks-per-node=1"]
    if request.gpus:
        options.append(f"--gres=gpu:{request.gpu_type + ':' if request.gpu_type else ''}{request.gpus}")
    elif request.launch != "process":  # a CPU run asks for a core per process, or the threads it names
        options.append(f"--cpus-per-task={max(request.nproc, request.threads or 1)}")
    for option, value in (("--partition", request.partition), ("--time", request.time),
                          ("--account", request.account), ("--nodelist", request.nodelist)):
        if value:
            options.append(f"{option}={value}")
    options += list(request.sbatch_args)
    lines += [f"#SBATCH {q(option)}" for option in options]
    worker = f"-m clfbench.engine.worker {request.run_id}"
    lines.append("set -u")
    if request.launch == "process":
        lines.append(f"exec srun {q(request.python)} {worker}")
        return "\n".join(lines) + "\n"
    if not request.gpus:
        # The worker's CPU threads are the job's cores (the engine's host load says nothing about the node).
        threads = str(request.threads) if request.threads else "${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}"
        lines.append(f"export CLFBENCH_CPU_THREADS={threads}")
    per_node = request.gpus or request.nproc
    torchrun = f"{q(request.python)} -m torch.distributed.run --nnodes=$SLURM_NNODES --nproc-per-node={per_node}"
    if request.nodes == 1:
        lines.append(f"exec srun {torchrun} --standalone {worker}")
    else:
        # The first node of the allocation hosts torchrun's c10d rendezvous; the port is derived from the job id,
        # so two jobs whose first node is the same do not collide.
        lines += ['head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                  "port=$((20000 + SLURM_JOB_ID % 20000))",
                  f"exec srun --kill-on-bad-exit=1 {torchrun} --rdzv-backend=c10d --rdzv-endpoint=$head:$port "
                  f"--rdzv-id=$SLURM_JOB_ID {worker}"]
    return "\n".join(lines) + "\n"


# ---- job states ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class JobState:
    job_id: str
    state: str  # Slurm's, e.g. PENDING, RUNNING, COMPLETED, "CANCELLED by 0" (sacct) is cut to CANCELLED
    reason: str = ""
    exit_code: str = ""
    nodes: str = ""


def parse_squeue(text: str) -> dict[str, JobState]:
    """squeue -O SQUEUE_FIELDS output: one job per line, fields ended by '|'."""
    jobs = {}
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) < 5 or not fields[0].strip():
            continue
        job_id, state, reason, exit_code, nodes = (part.strip() for part in fields[:5])
        jobs[job_id] = JobState(job_id, state.split()[0] if state else "", reason, exit_code, nodes)
    return jobs


def parse_sacct(text: str) -> dict[str, JobState]:
    """sacct -X -n -P -o JobID,State,Reason,ExitCode,NodeList output ('|' between fields)."""
    jobs = {}
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) >= 5 and fields[0].strip():
            jobs[fields[0].strip()] = JobState(fields[0].strip(), (fields[1].split() or [""])[0], fields[2].strip(),
                                               fields[3].strip().split(":")[0], fields[4].strip())
    return jobs


WAITING = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED",
           "STOPPED"}
ACTIVE = {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING"}
RETRIED = {"PREEMPTED", "NODE_FAIL", "BOOT_FAIL"}  # not the run's fault: a new attempt, resumed from its checkpoint
TIMED_OUT = {"TIMEOUT", "DEADLINE"}
FAILED = {"FAILED", "OUT_OF_MEMORY", "SPECIAL_EXIT", "REVOKED"}


@dataclass(frozen=True)
class Outcome:
    """What a job's state means for its run. action: wait (pending: the phase says why), run (the worker reports),
    result (ended: whatever the worker wrote, else ended without a result), requeue (ended without a result:
    requeued while retries are left), interrupted, cancelled, failed."""

    action: str
    reason: str = ""


def job_outcome(job: JobState, cancel_sent: bool, rank_code: int | None = None) -> Outcome:
    """The state of `job` as the run's: the table of docs/slurm.md. `cancel_sent`: this engine scancelled it (a
    user's `clfbench cancel`); `rank_code`: the failed rank's exit code from torchrun's summary in the log."""
    state, name = job.state, f"Slurm job {job.job_id}"
    if state in WAITING:
        why = job.reason if job.reason and job.reason != "None" else state.lower()
        return Outcome("wait", f"{QUEUED_PHASE} (job {job.job_id}: {why})")
    if state in ACTIVE:
        return Outcome("run")
    if state == "COMPLETED":
        return Outcome("result", f"{name} completed but its worker wrote no result")
    if state in RETRIED:
        return Outcome("requeue", f"{name} ended {state}" + (f" ({job.reason})" if _says(job.reason) else ""))
    if state in TIMED_OUT:
        return Outcome("interrupted", f"{name} hit its time limit ({state}); `clfbench retry` resumes it from its "
                                      "last checkpoint")
    if state == "CANCELLED":
        if cancel_sent:
            return Outcome("cancelled", "cancelled by user")
        return Outcome("cancelled", f"cancelled on Slurm: {name} was cancelled outside clfbench (scancel or an "
                                    "admin)")
    if state in FAILED:
        code = rank_code if rank_code is not None else _exit_code(job.exit_code)
        if state == "FAILED" and code == EXIT_STORE_UNREACHABLE:  # the worker's own "resume me later"
            return Outcome("requeue", f"{name} ended: its worker stopped, the store was unreachable")
        what = "ran out of memory (OUT_OF_MEMORY)" if state == "OUT_OF_MEMORY" else f"ended {state}"
        return Outcome("failed", f"{name} {what}" + (f", exit code {code}" if code is not None else ""))
    return Outcome("result", f"{name} ended {state or 'in a state squeue did not give'} without a result")


def _says(reason: str) -> bool:
    return bool(reason) and reason not in ("None", "(null)")


def _exit_code(text: str) -> int | None:
    head = text.split(":")[0].strip()
    return int(head) if head.lstrip("-").isdigit() else None


# ---- the engine --------------------------------------------------------------------------------------------------

@dataclass
class SlurmJob:
    """A run this engine follows: one Slurm job of one attempt (Engine.children holds these)."""

    run_id: int
    attempt: int
    job_id: str
    log_path: str
    launch: str = "torchrun"
    gpus: list[int] = field(default_factory=list)  # never this host's GPUs
    threads: int = 0
    phase: str | None = None  # the phase this engine last wrote
    started: bool = False
    cancel_sent_at: float | None = None
    missing: int = 0  # polls in a row that squeue did not list it
    submitted_at: float = field(default_factory=time.monotonic)
    shipped: int = 0  # how far its log file is copied into the store, and when (Engine.ship_logs)
    shipped_at: float = 0.0


@dataclass
class SlurmEngine(Engine):
    def __post_init__(self) -> None:
        self.config.poll_s = poll_s_from_env()  # each tick is one squeue call: paced for the controller

    def capacity(self) -> str:
        return f"launcher slurm, up to {self.config.max_jobs} job(s) submitted at once"

    def slots_left(self) -> bool:
        return len(self.children) < self.config.max_jobs

    def claim_and_launch(self) -> bool:
        """Claim the best queued run, whatever GPUs it asks for (Slurm places it), while fewer than max_jobs of this
        engine's jobs are unfinished."""
        if not self.slots_left():
            return False
        run = queue.claim(self.store, host=self.host, engine_id=self.engine_id, default_gpus=0, free_gpus=1 << 30,
                          cpu_free=True, api_free=True, host_id=self.host_id, honour_pins=False)  # pins go to sbatch
        if run is None:
            return False
        self.launch(run)
        return True

    def launch(self, run: dict) -> None:
        """Write the attempt's script and submit it; a refusal by sbatch fails the run with sbatch's words."""
        folder = paths.private_dir(run_dir(self.config.url, run["id"], self.store_id))
        log_path = folder / "log.txt"
        request = job_request(run, str(log_path), job_comment(self.config.url, run["id"], run["attempt"]))
        script = folder / f"slurm-{run['attempt']}.sh"
        with paths.open_private(script, "ab") as handle:
            handle.truncate(0)
            handle.write(sbatch_script(request).encode())
        env = worker_env(self.config.url, run, folder, self.store_id)
        # Slurm's variables of a job the engine itself may run in would leak into the new job's srun.
        env = {key: value for key, value in env.items() if not key.startswith("SLURM_") or key == "SLURM_CONF"}
        with paths.open_private(log_path) as log:
            shipped = log.seek(0, os.SEEK_END)  # the store gets this attempt's log from its header on
            log.write(f"\n{ATTEMPT_HEADER} {run['id']} attempt {run['attempt']} submitted to Slurm by {self.host} at "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')} =====\n$ sbatch --parsable {script}\n".encode())
        try:
            submitted = subprocess.run(["sbatch", "--parsable", str(script)], cwd=folder, env=env,
                                       capture_output=True, text=True, timeout=120)
            error = submitted.stderr.strip().splitlines()[-1] if submitted.returncode else ""
        except (OSError, subprocess.TimeoutExpired) as problem:
            submitted, error = None, f"sbatch did not answer: {problem}"
        job_id = submitted.stdout.strip().split(";")[0] if submitted is not None and not error else ""
        if not job_id:
            self.submit_failed(run, error or "sbatch printed no job id")
            return
        say(f"run {run['id']} attempt {run['attempt']}: submitted {run_title(run)} as Slurm job {job_id}; "
            f"log {log_path}")
        self.children[run["id"]] = SlurmJob(run_id=run["id"], attempt=run["attempt"], job_id=job_id,
                                            log_path=str(log_path), launch=run["launch"], shipped=shipped)
        queue.set_launched(self.store, run["id"], run["attempt"], pid=None, gpus_assigned="",
                           log_path=str(log_path), output_dir=str(folder), job_id=job_id)

    def submit_failed(self, run: dict, error: str) -> None:
        """sbatch refused the job (a partition that does not exist, a time over the limit: the spec's fault, so the
        run fails) or could not reach the controller (not the run's fault: it ends without a result, requeued)."""
        unreachable = any(sign in error for sign in ("Unable to contact", "timed out", "did not answer",
                                                     "Connection refused"))
        if unreachable:
            status = queue.mark_ended_without_result(self.store, run["id"], run["attempt"],
                                                     f"could not submit to Slurm: {error}")
        else:
            queue.finish_failed(self.store, run["id"], run["attempt"], f"sbatch refused the job: {error}",
                                writer=Writer.engine)
            status = "failed"
        say(f"run {run['id']} attempt {run['attempt']}: sbatch: {error}; run {status}")

    # ---- following the jobs ----------------------------------------------------------------------------------------
    def job_states(self) -> dict[str, JobState] | None:
        """The state of every job this engine follows: one squeue call (sacct for those squeue no longer lists),
        or None when the controller did not answer (nothing is concluded from silence)."""
        ids = [job.job_id for job in self.children.values()]
        if not ids:
            return {}
        try:
            listed = subprocess.run(["squeue", "--noheader", "--states=all", f"--jobs={','.join(ids)}",
                                     "-O", SQUEUE_FIELDS], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if listed.returncode != 0 and "Invalid job id" not in listed.stderr:
            return None  # "Invalid job id": none of them is listed any more, an answer; anything else is not
        states = parse_squeue(listed.stdout if listed.returncode == 0 else "")
        unknown = [job_id for job_id in ids if job_id not in states]
        if unknown and shutil.which("sacct"):
            try:
                accounted = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(unknown),
                                            "-o", "JobID,State,Reason,ExitCode,NodeList"],
                                           capture_output=True, text=True, timeout=60)
                if accounted.returncode == 0:
                    states.update(parse_sacct(accounted.stdout))
            except (OSError, subprocess.TimeoutExpired):
                pass
        return states

    def reap(self) -> None:
        """One squeue call for all jobs; each job's state moves its run (job_outcome)."""
        states = self.job_states()
        if states is None:
            return
        for run_id, job in list(self.children.items()):
            state = states.get(job.job_id)
            if state is None:
                job.missing += 1
                if job.missing < MISSING_POLLS:
                    continue
                state = JobState(job.job_id, "", "no longer known to Slurm")
            else:
                job.missing = 0
            self.follow(job, state)

    def follow(self, job: SlurmJob, state: JobState) -> None:
        rank_code = None
        if state.state == "FAILED":
            rank_code = rank_exit_code(log_tail(job.log_path, lines=80, raw=True))
        outcome = job_outcome(state, job.cancel_sent_at is not None, rank_code)
        if outcome.action == "wait":
            if outcome.reason != job.phase:
                queue.set_scheduler_phase(self.store, job.run_id, job.attempt, outcome.reason, replaces=QUEUED_PHASE)
                job.phase = outcome.reason
            return
        if outcome.action == "run":
            if not job.started:
                job.started = True
                phase = f"{STARTED_PHASE} (job {job.job_id} on {state.nodes})"
                queue.set_scheduler_phase(self.store, job.run_id, job.attempt, phase, replaces=QUEUED_PHASE,
                                          host=state.nodes or None)
                say(f"run {job.run_id} attempt {job.attempt}: Slurm job {job.job_id} running on {state.nodes}")
            return
        del self.children[job.run_id]
        self.ship_log(job, final=True)  # the whole log is in the store before the run shows as ended
        if outcome.action in ("result", "requeue"):
            new_status = queue.mark_ended_without_result(self.store, job.run_id, job.attempt, outcome.reason)
        else:
            new_status = queue.mark_ended(self.store, job.run_id, job.attempt, RunStatus(outcome.action),
                                          outcome.reason)
        if new_status is None:  # the worker wrote the run's end itself (or the run is no longer this attempt's)
            ended = queries.get_run(self.store, job.run_id)
            say(f"run {job.run_id} attempt {job.attempt}: Slurm job {job.job_id} {state.state or 'gone'}; run "
                f"{ended['status'] if ended else 'deleted'}")
        else:
            say(f"run {job.run_id} attempt {job.attempt}: {outcome.reason}; run {new_status}")
        if new_status != RunStatus.cancelled.value:
            tail = log_tail(job.log_path)
            if tail:  # only lands on a failed/interrupted/requeued run of this attempt
                queue.append_error_detail(self.store, job.run_id, job.attempt, f"--- log tail ---\n{tail}")

    def handle_cancels(self) -> None:
        """`clfbench cancel` of a run with a job: scancel (one call for all), again after the grace if it lingers;
        the job then ends CANCELLED and its run `cancelled by user`."""
        if not self.children:
            return
        now = time.monotonic()
        due = [self.children[run_id] for run_id in queries.cancel_requests(self.store, list(self.children))
               if self.children[run_id].cancel_sent_at is None
               or now - self.children[run_id].cancel_sent_at > self.config.cancel_grace_s]
        if not due:
            return
        for job in due:
            say(f"run {job.run_id} attempt {job.attempt}: cancel requested; scancel of Slurm job {job.job_id}")
            job.cancel_sent_at = now
        scancel([job.job_id for job in due])

    def lose_lease(self) -> None:
        """Another engine declared this one lost and requeued its runs: their jobs are no longer this engine's to
        follow, and must not train beside the next attempts. scancel them all, stop."""
        say(f"{self.host} pid {os.getpid()} lost its lease and its runs were taken by another engine; "
            f"scancel of its {len(self.children)} job(s), stopping")
        scancel([job.job_id for job in self.children.values()])
        self.children.clear()
        self.stopping = True

    def adopt_or_end(self, run: dict) -> None:
        """A running run of this host's engines that this one does not follow (it restarted): follow its job, found
        by runs.job_id (or by name and tag when the id was never recorded); without a job, end it (requeued)."""
        tag = run_tag(self.config.url, run["id"], run["attempt"])
        job_id = run["job_id"] or find_job(f"clfbench-{run['id']}-{run['attempt']}",
                                           job_comment(self.config.url, run["id"], run["attempt"]))
        if not job_id:
            kill_processes(tagged_processes(tag), signal.SIGKILL)  # a local engine's worker, if one ran it here
            reason = "no Slurm job was submitted for it (its engine stopped between the claim and sbatch)"
            status = queue.mark_ended_without_result(self.store, run["id"], run["attempt"], reason)
            say(f"run {run['id']} attempt {run['attempt']}: {reason}; run {status or 'already ended'}")
            return
        if run["engine_id"] != self.engine_id and not queue.adopt_run(self.store, run["id"], run["attempt"],
                                                                      run["engine_id"], self.engine_id):
            return  # it moved on meanwhile
        log_path = run["log_path"] or str(run_dir(self.config.url, run["id"], self.store_id) / "log.txt")
        if not run["job_id"]:
            queue.set_launched(self.store, run["id"], run["attempt"], pid=None, gpus_assigned="", log_path=log_path,
                               output_dir=str(Path(log_path).parent), job_id=job_id)
        say(f"run {run['id']} attempt {run['attempt']}: adopted its Slurm job {job_id}")
        shipped = queries.log_shipped_end(self.store, run["id"], run["attempt"])
        self.children[run["id"]] = SlurmJob(run_id=run["id"], attempt=run["attempt"], job_id=job_id,
                                            log_path=log_path, launch=run["launch"], phase=run["phase"],
                                            shipped=attempt_start(log_path, run["id"], run["attempt"])
                                            if shipped is None else shipped)


def find_job(name: str, comment: str) -> str | None:
    """The id of a job called `name` whose comment is `comment` (this store's run and attempt), or None."""
    try:
        listed = subprocess.run(["squeue", "--noheader", "--states=all", f"--name={name}", "-O", "JobID:|,Comment:|"],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in listed.stdout.splitlines():
        fields = line.split("|")
        if len(fields) >= 2 and fields[1].strip() == comment:
            return fields[0].strip()
    return None


def scancel(job_ids: list[str]) -> None:
    """One scancel for all `job_ids`; a job that already ended is no error (its state says how it ended)."""
    if not job_ids:
        return
    try:
        subprocess.run(["scancel", *job_ids], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        say(f"scancel {' '.join(job_ids)} did not run: {error}; a cancel is tried again after its grace")


def job_comment(url: str, run_id: int, attempt: int) -> str:
    """The comment of an attempt's job: its run's tag (store, run, attempt), which a job name cannot hold whole."""
    return f"clfbench:{run_tag(url, run_id, attempt)}"


def main(argv: list[str] | None = None) -> int:
    """The detached Slurm engine (`clfbench engine start --launcher slurm` runs this module)."""
    try:
        check_slurm_commands()
    except ClfbenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return daemon_main(argv, engine_class=SlurmEngine, launcher="slurm")


if __name__ == "__main__":
    sys.exit(main())
