"""The engine: claims queued runs that fit the free GPUs and supervises their worker processes.

One engine per store per host (an flock on a lock file in the clfbench home; the OS drops it when the
process dies, even under SIGKILL). Each run is launched as

    torchrun --standalone --nproc-per-node=N -m clfbench.engine.worker RUN_ID      (methods that train or infer)
    python -m clfbench.engine.worker RUN_ID                                        (API-only methods)

in its own process group (so a cancel reaches every rank, and the run outlives an engine crash),
with CUDA_VISIBLE_DEVICES set to its GPUs and output appended to a per-run log file.

State rules (the table in storage.states): the worker writes succeeded/failed itself; the engine writes
only what a worker cannot say about itself: cancelled (after killing it), interrupted or requeued (it died),
and failed when the launch itself fails. Every statement is storage's; there is no SQL here.
On start the engine reconciles runs left `running` on this host: a worker still alive is adopted
(found by the CLFBENCH_RUN_TAG its processes inherit), a dead one is marked interrupted and requeued
while retries are left.

No torch here: `clfbench engine --foreground` runs this loop inside the CLI process.
"""
from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from clfbench.engine.gpus import discover_gpus
from clfbench.engine.types import ClfbenchError
from clfbench.storage import paths, queries, queue
from clfbench.storage.db import Store, now, open_store
from clfbench.storage.models import RunStatus
from clfbench.storage.paths import engine_log_path, run_dir, store_key
from clfbench.storage.states import Writer

HEARTBEAT_S = 5.0
# A run on another host whose worker has not written a heartbeat for this long is taken as dead.
STALE_AFTER_S = 180.0


def delete_run(url: str, store: Store, run_id: int) -> bool:
    """Delete a run that is not running: its rows, then its folder (log, checkpoint, caches).

    The folder must go too: SQLite may give a later run the same id, which would otherwise append to the old
    log and resume from the deleted run's checkpoint.
    """
    if not queue.delete_run(store, run_id):
        return False
    shutil.rmtree(run_dir(url, run_id), ignore_errors=True)
    return True


def acquire_engine_lock(url: str):
    """Hold an exclusive flock for this store on this host, or raise if another engine holds it."""
    path = paths.engine_lock_path(url)
    handle = paths.open_private(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        handle.close()
        if error.errno in (errno.EAGAIN, errno.EACCES):
            raise ClfbenchError(f"an engine already runs for this store on this host (lock {path})") from None
        raise
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def engine_lock_holder(url: str) -> int | None:
    """The pid of the engine holding this store's lock on this host, or None."""
    path = paths.engine_lock_path(url)
    if not path.exists():
        return None
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            text = handle.read().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(handle, fcntl.LOCK_UN)
        return None


def run_tag(url: str, run_id: int, attempt: int) -> str:
    """Marks every process of one attempt of one run, through an inherited environment variable.

    torchrun starts each rank in a session of its own, so a process group does not reach the ranks, and
    a rank outlives a killed torchrun as an orphan. The tag finds all of them, whoever their parent is.
    """
    return f"{store_key(url)}:{run_id}:{attempt}"


def tagged_processes(tag: str) -> list[int]:
    """Live (non-zombie) processes carrying CLFBENCH_RUN_TAG=tag. Linux /proc; elsewhere an empty list."""
    needle = f"CLFBENCH_RUN_TAG={tag}".encode()
    pids = []
    try:
        entries = os.scandir("/proc")
    except OSError:
        return pids
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as handle:
                environ = handle.read()
        except OSError:
            continue  # gone, or not ours to read
        if needle in environ.split(b"\0"):  # a zombie's environ is empty, so zombies never match
            pids.append(int(entry.name))
    return pids


def process_alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0, ...) would signal our own process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True


def kill_processes(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def log_tail(path: str | None, lines: int = 20) -> str:
    if not path or not Path(path).exists():
        return ""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - 16_000))
        data = handle.read().decode("utf-8", errors="replace")
    return "\n".join(data.splitlines()[-lines:])


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "worker process disappeared"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"worker killed by signal {name}"
    if returncode == 0:
        return "worker exited without reporting a result"
    return f"worker exited with code {returncode}"


# A core whose recent load is at most this much still counts as free: a shell, an editor or the engine's own polling
# must not cost an idle host a core, while a core more than a quarter busy is not free (an OpenMP thread that
# shares a core stalls its whole team at every barrier).
FREE_CORE_SLACK = 0.25


def cpu_threads_rule(cores: int, load: float, own_threads: int, slots: int) -> int:
    """Threads for a CPU run about to start: the cores left free, at most its fair share of the slots, at least 1.

    busy = max(load, own_threads): the load average already counts the threads of this engine's running CPU runs,
    so they are not counted twice; but it trails by about a minute, so runs launched moments ago count at least
    their threads. free = cores - busy, rounded down after FREE_CORE_SLACK. The clamp: never more than
    cores // slots (each of the engine's CPU slots must find its share), never 0 (one thread on a saturated host
    still progresses; two oversubscribed threads were measured not to finish a step where one did 10 ex/s).
    """
    fair_share = max(1, cores // max(1, slots))
    busy = max(load, float(own_threads))
    free = math.floor(cores - busy + FREE_CORE_SLACK)
    return min(fair_share, max(1, free))


def host_cpu_load() -> tuple[int, float]:
    """(the cores this process may run on, the recent load on them).

    The cores are the CPU affinity set where the OS has one (a job pinned by a batch scheduler or `taskset` must
    not count CPUs it cannot use); the load is the one-minute load average, which the kernel gives for the whole
    machine, scaled to that set's share of it. Unknown load counts as 0: the rule then gives the fair share.
    """
    machine = os.cpu_count() or 1
    try:
        cores = len(os.sched_getaffinity(0)) or machine
    except (AttributeError, OSError):
        cores = machine
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return cores, load * min(1.0, cores / machine)


def spec_threads(spec_json: str) -> int | None:
    """The `threads:` a run's stored spec asks for, or None (left to the engine; also for specs stored before
    the field existed). The spec was validated at queue time (an integer >= 1)."""
    try:
        threads = json.loads(spec_json).get("threads")
    except (ValueError, AttributeError):
        return None
    return threads if isinstance(threads, int) and threads >= 1 else None


@dataclass
class Child:
    """A run this engine supervises: launched by it (popen) or adopted from a previous engine (pid only)."""

    run_id: int
    attempt: int
    pid: int
    gpus: list[int]
    launch: str
    log_path: str
    tag: str = ""
    threads: int = 0  # CPU threads its ranks use together (0: a GPU or API run, or adopted: already in the load)
    popen: subprocess.Popen | None = None
    log_handle: object = None
    term_sent_at: float | None = None

    def poll(self) -> tuple[bool, int | None]:
        """(exited, returncode); the return code is unknown (None) for adopted processes."""
        if self.popen is not None:
            code = self.popen.poll()
            return code is not None, code
        return not tagged_processes(self.tag), None

    def processes(self) -> list[int]:
        """Every live process of this attempt: the launcher and all ranks, orphaned or not."""
        pids = set(tagged_processes(self.tag))
        if process_alive(self.pid):
            pids.add(self.pid)
        return sorted(pids)


@dataclass
class EngineConfig:
    url: str
    gpus: list[int]
    until_idle: bool = False
    max_cpu_runs: int = 1
    max_api_runs: int = 4
    poll_s: float = 0.5
    cancel_grace_s: float = 10.0
    # Called once per loop tick (a foreground CLI shows progress from it); it must be quick and only read.
    on_tick: Callable[[], None] | None = None


@dataclass
class Engine:
    config: EngineConfig
    store: Store
    engine_id: int
    host: str = field(default_factory=socket.gethostname)
    children: dict[int, Child] = field(default_factory=dict)
    stopping: bool = False

    # ---- capacity ---------------------------------------------------------------------------
    def busy_gpus(self) -> set[int]:
        return {gpu for child in self.children.values() for gpu in child.gpus}

    def free_gpus(self) -> list[int]:
        busy = self.busy_gpus()
        return [gpu for gpu in self.config.gpus if gpu not in busy]

    def cpu_runs(self) -> int:
        return sum(1 for c in self.children.values() if c.launch == "torchrun" and not c.gpus)

    def api_runs(self) -> int:
        return sum(1 for c in self.children.values() if c.launch == "process")

    def cpu_threads(self, run: dict) -> tuple[int, str]:
        """Threads for a CPU run about to launch (its spec's `threads:`, else cpu_threads_rule), and why."""
        asked = spec_threads(run["spec_json"])
        if asked is not None:
            return asked, f"threads: {asked} from the spec"
        cores, load = host_cpu_load()
        own = sum(child.threads for child in self.children.values())
        slots = self.config.max_cpu_runs
        threads = cpu_threads_rule(cores, load, own, slots)
        return threads, (f"load {load:.1f} of {cores} cores ({own} thread(s) of this engine's runs), "
                         f"{slots} CPU slot(s): {threads} thread(s)")

    def launch_env(self, run: dict, gpus: list[int], folder: Path) -> tuple[dict, int, str]:
        """The worker's environment, the CPU threads its ranks will use together (0: a GPU or API run), and why."""
        env = dict(os.environ)
        env.update(
            CLFBENCH_DB=self.config.url,
            CLFBENCH_RUN_ATTEMPT=str(run["attempt"]),
            CLFBENCH_RUN_TAG=run_tag(self.config.url, run["id"], run["attempt"]),
            CLFBENCH_RUN_DIR=str(folder),
            CLFBENCH_HOME=str(paths.home()),
            CUDA_VISIBLE_DEVICES=",".join(str(g) for g in gpus),  # "" hides every GPU from CPU runs
            PYTHONUNBUFFERED="1",
        )
        if gpus or run["launch"] == "process":  # threads matter only to a run that computes on the CPU
            return env, 0, ""
        # The worker splits these threads between the run's ranks (each gets at least 1). Oversubscribed OpenMP
        # threads spin against each other and were measured to slow training many times over.
        threads, why = self.cpu_threads(run)
        env["CLFBENCH_CPU_THREADS"] = str(threads)
        return env, max(threads, run["nproc"] or 1), why

    # ---- the loop ---------------------------------------------------------------------------
    def claim_and_launch(self) -> bool:
        """Claim one run that fits and launch it. Returns True if one was launched."""
        free = self.free_gpus()
        run = queue.claim(
            self.store,
            host=self.host,
            engine_id=self.engine_id,
            default_gpus=1 if self.config.gpus else 0,
            free_gpus=len(free),
            cpu_free=self.cpu_runs() < self.config.max_cpu_runs,
            api_free=self.api_runs() < self.config.max_api_runs,
        )
        if run is None:
            return False
        self.launch(run, free)
        return True

    def launch(self, run: dict, free: list[int]) -> None:
        need = run["gpus_requested"]
        if need is None:
            need = 1 if self.config.gpus else 0
        if run["launch"] == "process":
            need = 0
        gpus = free[:need]
        folder = paths.private_dir(run_dir(self.config.url, run["id"]))
        log_path = folder / "log.txt"
        if run["launch"] == "process":
            command = [sys.executable, "-m", "clfbench.engine.worker", str(run["id"])]
        else:
            nproc = len(gpus) if gpus else run["nproc"]
            command = torchrun_command(nproc) + ["-m", "clfbench.engine.worker", str(run["id"])]
        env, threads, why = self.launch_env(run, gpus, folder)
        if why:
            queue.log_event_standalone(self.store, "threads", why, run["id"])
        log_handle = paths.open_private(log_path)
        header = (f"\n===== clfbench: run {run['id']} attempt {run['attempt']} on {self.host} "
                  f"gpus [{','.join(map(str, gpus))}] at {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n")
        if why:
            header += f"clfbench engine: cpu threads: {why}\n"
        log_handle.write(f"{header}$ {' '.join(command)}\n".encode())
        log_handle.flush()
        try:
            popen = subprocess.Popen(
                command, cwd=folder, env=env, stdout=log_handle, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        except OSError as error:
            log_handle.close()
            queue.finish_failed(self.store, run["id"], run["attempt"], f"could not launch the worker: {error}",
                                writer=Writer.engine)
            return
        self.children[run["id"]] = Child(
            run_id=run["id"], attempt=run["attempt"], pid=popen.pid, gpus=gpus, launch=run["launch"],
            log_path=str(log_path), tag=run_tag(self.config.url, run["id"], run["attempt"]), popen=popen,
            log_handle=log_handle, threads=threads,
        )
        queue.set_launched(self.store, run["id"], run["attempt"], pid=popen.pid,
                           gpus_assigned=",".join(map(str, gpus)), log_path=str(log_path),
                           output_dir=str(folder))

    def reap(self) -> None:
        """Finalise children whose process ended."""
        for run_id, child in list(self.children.items()):
            exited, code = child.poll()
            if not exited:
                continue
            del self.children[run_id]
            # A rank left behind by a dead torchrun must not train beside the next attempt.
            kill_processes(child.processes(), signal.SIGKILL)
            if child.log_handle is not None:
                child.log_handle.close()
            reason = describe_exit(code)
            new_status = queue.mark_ended_without_result(self.store, run_id, child.attempt, reason)
            if new_status != RunStatus.cancelled:
                tail = log_tail(child.log_path)
                if tail:  # only lands on a failed/interrupted/requeued run of this attempt
                    queue.append_error_detail(self.store, run_id, child.attempt, f"--- log tail ---\n{tail}")

    def handle_cancels(self) -> None:
        if not self.children:
            return
        for run_id in queries.cancel_requests(self.store, list(self.children)):
            child = self.children[run_id]
            if child.term_sent_at is None:
                signal_group(child.pid, signal.SIGTERM)  # torchrun forwards it to its ranks
                kill_processes(child.processes(), signal.SIGTERM)
                child.term_sent_at = time.monotonic()
            elif time.monotonic() - child.term_sent_at > self.config.cancel_grace_s:
                kill_processes(child.processes(), signal.SIGKILL)

    def heartbeat(self) -> None:
        queue.engine_heartbeat(self.store, self.engine_id)

    def reconcile(self) -> None:
        """Runs left `running` by a dead engine or worker: adopt the live, mark the dead.

        A run is alive while any process carrying its attempt's tag lives (the launcher or any rank).
        """
        for run in queries.running_runs(self.store):
            if run["host"] == self.host:
                tag = run_tag(self.config.url, run["id"], run["attempt"])
                if tagged_processes(tag):
                    gpus = [int(g) for g in (run["gpus_assigned"] or "").split(",") if g]
                    self.children[run["id"]] = Child(
                        run_id=run["id"], attempt=run["attempt"], pid=run["pid"] or 0, gpus=gpus,
                        launch=run["launch"], log_path=run["log_path"] or "", tag=tag,
                    )
                    queue.log_event_standalone(self.store, "adopted", f"pid {run['pid']}", run["id"])
                    continue
                reason = "its worker was gone when the engine started (engine or worker died)"
            else:
                age = now() - (run["heartbeat_at"] or 0)
                if age < STALE_AFTER_S:
                    continue  # another host's live run
                reason = f"no heartbeat from host {run['host']} for {age:.0f} s"
            queue.mark_ended_without_result(self.store, run["id"], run["attempt"], reason)

    def idle(self) -> bool:
        return not self.children

    def loop(self) -> None:
        self.reconcile()
        last_heartbeat = 0.0
        while not self.stopping:
            if time.monotonic() - last_heartbeat > HEARTBEAT_S:
                self.heartbeat()
                last_heartbeat = time.monotonic()
            self.reap()
            self.handle_cancels()
            launched = False
            while not self.stopping and self.claim_and_launch():
                launched = True
            if self.config.on_tick is not None:
                self.config.on_tick()
            if self.config.until_idle and self.idle() and not launched:
                break
            time.sleep(self.config.poll_s)


def torchrun_command(nproc: int) -> list[str]:
    """`torchrun` next to this Python if present, else the same entry point through `python -m`."""
    torchrun = Path(sys.executable).with_name("torchrun")
    base = [str(torchrun)] if torchrun.exists() else (
        [shutil.which("torchrun")] if shutil.which("torchrun") else [sys.executable, "-m", "torch.distributed.run"]
    )
    return base + ["--standalone", f"--nproc-per-node={nproc}"]


def signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)


def run_engine(config: EngineConfig) -> None:
    """Run the engine loop in this process until stopped (SIGTERM/SIGINT) or, with until_idle, idle.

    Workers are left running when the engine stops: they finish and record their own result, and the
    next engine adopts them.
    """
    store = open_store(config.url)
    lock = acquire_engine_lock(config.url)
    host = socket.gethostname()
    engine_id = queue.register_engine(store, host, os.getpid(), config.gpus)
    engine = Engine(config=config, store=store, engine_id=engine_id, host=host)

    def _stop(_signum, _frame):
        engine.stopping = True

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        engine.loop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        queue.unregister_engine(store, engine.engine_id, os.getpid())
        lock.close()


def start_detached(url: str, gpus: str | None, max_cpu_runs: int) -> int:
    """Start the engine as a daemon (own session, output to the engine log). Returns its pid."""
    holder = engine_lock_holder(url)
    if holder:
        raise ClfbenchError(f"an engine already runs for this store on this host (pid {holder})")
    log = engine_log_path(url)
    command = [sys.executable, "-m", "clfbench.engine.daemon", "--db", url, "--max-cpu-runs", str(max_cpu_runs)]
    if gpus is not None:
        command += ["--gpus", gpus]
    env = dict(os.environ)
    with paths.open_private(log) as handle:
        popen = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, env=env, cwd=str(paths.home()))
    # Wait until it holds the lock (or died) so `start` reports the truth.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise ClfbenchError(f"the engine exited at start (code {popen.returncode}); see {log}")
        if engine_lock_holder(url) == popen.pid:
            return popen.pid
        time.sleep(0.1)
    return popen.pid


def stop_engine(url: str, timeout_s: float = 30) -> int | None:
    """SIGTERM the engine of this store on this host and wait for it to let go. Returns its pid."""
    pid = engine_lock_holder(url)
    if not pid or pid < 0:
        return None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and engine_lock_holder(url):
        time.sleep(0.1)
    return pid


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m clfbench.engine.daemon", description="clfbench engine (detached)")
    parser.add_argument("--db", required=True)
    parser.add_argument("--gpus", default=None)
    parser.add_argument("--max-cpu-runs", type=int, default=1)
    parser.add_argument("--until-idle", action="store_true")
    args = parser.parse_args(argv)
    try:
        gpus = discover_gpus(args.gpus)
        run_engine(EngineConfig(url=args.db, gpus=gpus, until_idle=args.until_idle,
                                max_cpu_runs=args.max_cpu_runs))
    except ClfbenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
