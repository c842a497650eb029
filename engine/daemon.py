"""The engine: claims queued runs that fit the free GPUs and supervises their worker processes.

One engine per (store, host identity) (an flock on a lock file in /tmp/clfbench-<uid>, not in the clfbench home;
the OS drops it when the process dies, even under SIGKILL). Each run is launched as

    torchrun --standalone --nproc-per-node=N -m clfbench.engine.worker RUN_ID      (methods that train or infer)
    python -m clfbench.engine.worker RUN_ID                                        (API-only methods)

in its own process group (so a cancel reaches every rank, and the run outlives an engine crash),
with CUDA_VISIBLE_DEVICES set to its GPUs and output appended to a per-run log file.

State rules (the table in storage.states): the worker writes succeeded/failed itself; the engine writes
only what a worker cannot say about itself: cancelled (after killing it), interrupted or requeued (it died),
and failed when the launch itself fails. Every statement is storage's; there is no SQL here.

Ownership (docs/ARCHITECTURE.md): a run belongs to the engine that claimed it while that engine's lease, renewed by
`heartbeat` and judged on the database's clock, is live. `reconcile` runs at start and then every third of a lease
(from `heartbeat`): on this host it adopts the runs whose worker still lives (found by the CLFBENCH_RUN_TAG its
processes inherit) and ends those whose worker died; on any host it requeues the runs of engines whose lease ran
out. An engine that finds its own lease taken kills its workers and stops.

No torch here: `clfbench engine --foreground` runs this loop inside the CLI process.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from clfbench.engine.artifacts import delete_mirror
from clfbench.engine.gpus import discover_gpus, gpu_type
from clfbench.engine.runlog import readable
from clfbench.engine.types import EXIT_NOT_OURS, EXIT_STORE_UNREACHABLE, ClfbenchError
from clfbench.storage import paths, queries, queue
from clfbench.storage.db import Store, StoreError, open_store
from clfbench.storage.models import RunStatus
from clfbench.storage.outage import FIRST_DELAY_S, MAX_DELAY_S, first_line, is_outage
from clfbench.storage.paths import engine_log_path, run_dir, store_key
from clfbench.storage.states import Writer



def say(message: str) -> None:
    """One line of the engine's own log, with the time: the detached engine's output is its log file
    (`engine_log_path`), where a user looks for what it claimed, launched, reaped and why."""
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} clfbench engine: {message}", flush=True)


def run_title(run: dict) -> str:
    return f"{run['method']} {run['model']} {run['task']}"


def _lease_s_or_default() -> float:
    try:
        return queue.engine_lease_s()
    except StoreError:
        return queue.DEFAULT_ENGINE_LEASE_S  # run_engine reports the bad value in one line


# The engine's lease (CLFBENCH_ENGINE_LEASE_S, default 60 s): renewed at every heartbeat, four or more per lease,
# so a renewal delayed by a busy store (SQLite's 30 s busy timeout) does not lose it.
LEASE_S = _lease_s_or_default()
HEARTBEAT_S = min(5.0, LEASE_S / 4)


def delete_run(url: str, store: Store, run_id: int) -> tuple[bool, str]:
    """Delete a run that is not running: its rows, then its folder (log, checkpoint, caches) and what was mirrored
    to its artifact URL. Returns whether it was deleted, and a line on anything left behind ("" when nothing).

    The folder and the mirror must go too: SQLite may give a later run the same id, which would otherwise append to
    the old log and resume from the deleted run's checkpoint. The mirror's URL is this process's
    `CLFBENCH_ARTIFACTS`, as the engines' is.
    """
    run = queries.get_run(store, run_id)
    store_id = queries.store_id(store)
    if not queue.delete_run(store, run_id):
        return False, ""
    folders = {run_dir(url, run_id), run_dir(url, run_id, store_id)}
    if run and run["output_dir"]:
        folders.add(Path(run["output_dir"]))
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    mirror = paths.artifact_url(run_id, store_id)
    if mirror:
        try:
            delete_mirror(mirror)
        except Exception as error:  # credentials, the network, a missing backend: the rows are gone regardless
            return True, f"its mirrored checkpoints at {mirror} were not deleted ({first_line(error)})"
    return True, ""


def host_identity() -> str:
    """This host as engines tell hosts apart: the hostname, the machine id and the boot id (a cloned image keeps
    the hostname and maybe the machine id, never the boot id; a reboot is a new host, as no process survives it).
    CLFBENCH_HOST_ID overrides it (tests run two "hosts" on one machine)."""
    override = os.environ.get("CLFBENCH_HOST_ID", "").strip()
    if override:
        return override
    machine = _first_line("/etc/machine-id") or _first_line("/var/lib/dbus/machine-id")
    boot = _first_line("/proc/sys/kernel/random/boot_id")
    return f"{socket.gethostname()}:{hashlib.sha256(f'{machine}:{boot}'.encode()).hexdigest()[:12]}"


def host_label() -> str:
    """The host's name as runs and engines show it: CLFBENCH_HOST_ID when set, else the hostname."""
    return os.environ.get("CLFBENCH_HOST_ID", "").strip() or socket.gethostname()


def _first_line(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def engine_lock_path(url: str, host_id: str | None = None) -> Path:
    """The lock of one engine per (store, host): in CLFBENCH_LOCK_DIR, else /tmp/clfbench-<uid> (never under the
    clfbench home, which two engines of one host may not share; not under $TMPDIR or $XDG_RUNTIME_DIR, which
    differ between a login shell, a batch job and cron on the same host)."""
    folder = Path(os.environ.get("CLFBENCH_LOCK_DIR") or f"/tmp/clfbench-{os.getuid()}")
    key = hashlib.sha256(f"{url}\0{host_id or host_identity()}".encode()).hexdigest()[:16]
    return folder / f"engine-{key}.lock"


def _open_lock(path: Path):
    """Open the lock file (0600, its folder 0700), refusing a folder that another user owns (/tmp is shared)."""
    handle = paths.open_private(path, "a+")
    owner = os.fstat(handle.fileno()).st_uid
    if owner != os.getuid():
        handle.close()
        raise ClfbenchError(f"the engine lock {path} belongs to another user (uid {owner})")
    return handle


# How long a starting engine retries a lock it found taken: a probe (engine_lock_holder) holds it for microseconds.
LOCK_RETRY_S = 2.0


def acquire_engine_lock(url: str, identity: str, host_id: str | None = None) -> tuple[object, str | None]:
    """Hold this store's engine lock on this host (an exclusive flock), or raise if another engine holds it.

    Returns (the open lock file, the identity of the engine that held it last, or None). The OS drops a flock only
    when its process dies, so that engine is dead: the caller takes its runs over (queue.take_over_engine) without
    waiting for its lease to run out. The file then names this engine: "pid identity".
    """
    path = engine_lock_path(url, host_id)
    handle = _open_lock(path)
    deadline = time.monotonic() + LOCK_RETRY_S
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                handle.close()
                raise
            if time.monotonic() > deadline:
                handle.close()
                raise ClfbenchError(f"an engine already runs for this store on this host (lock {path})") from None
            time.sleep(0.02)
    handle.seek(0)
    previous = handle.read().split()
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()} {identity}\n")
    handle.flush()
    return handle, previous[1] if len(previous) == 2 else None


def engine_lock_holder(url: str) -> int | None:
    """The pid of the engine holding this store's lock on this host, or None.

    A probe takes a SHARED lock for a moment: probes never exclude each other, and a starting engine retries its
    exclusive lock for LOCK_RETRY_S, so `engine status` or the TUI polling can never make an engine refuse to start.
    """
    path = engine_lock_path(url)
    try:
        handle = open(path)
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            text = handle.read().split()
            return int(text[0]) if text and text[0].isdigit() else -1
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


def log_tail(path: str | None, lines: int = 20, raw: bool = False) -> str:
    """The last `lines` lines of a run's log, without torchrun's own traceback unless `raw` (engine.runlog)."""
    if not path or not Path(path).exists():
        return ""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - 16_000))
        data = handle.read().decode("utf-8", errors="replace")
    return "\n".join((data if raw else readable(data)).splitlines()[-lines:])


# Each attempt's part of a run's log starts with this line (written by the engine at launch).
ATTEMPT_HEADER = "===== clfbench: run"
# Logs go into the store (storage.queue.append_log) at most once a second per run, in pieces of whole lines of at
# most LOG_PIECE_BYTES; a file that grew by more than the store keeps is skipped ahead to what it keeps.
LOG_SHIP_S = 1.0
LOG_PIECE_BYTES = 64_000


def new_log_text(path: str, offset: int, final: bool) -> tuple[str, int, bool]:
    """The text the log file at `path` grew by since byte `offset`, as whole lines (all of it when `final`: the
    worker has ended), at most LOG_PIECE_BYTES; the offset it ends at; and whether it skipped text. A log a line
    longer than a piece (a progress bar without newlines) is cut at the piece's size. When the log grew by more
    than twice what the store keeps since the last piece, it skips to the first whole line of the newest
    log_keep_bytes(): the store would drop the rest at once, and the caller must say that lines went missing."""
    skipped = False
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size <= offset:
                return "", min(offset, size), False
            keep = queue.log_keep_bytes()
            if size - offset > 2 * keep:
                offset, skipped = size - keep, True
            handle.seek(offset)
            data = handle.read(min(size - offset, LOG_PIECE_BYTES))
    except OSError:
        return "", offset, False
    if skipped:  # start at a line's start, unless no line ends inside the piece
        line_start = data.find(b"\n") + 1
        if 0 < line_start < len(data):
            offset, data = offset + line_start, data[line_start:]
    if not final and len(data) < LOG_PIECE_BYTES:
        cut = data.rfind(b"\n") + 1
        data = data[:cut]
    return data.decode("utf-8", errors="replace"), offset + len(data), skipped


def attempt_start(path: str, run_id: int, attempt: int, chunk: int = 1 << 20) -> int:
    """The byte offset of an attempt's header in its log file (where its log starts), else the file's end. Read
    backwards a chunk at a time: the header is near the end, and a long run's log can be large."""
    marker = f"{ATTEMPT_HEADER} {run_id} attempt {attempt} ".encode()
    try:
        with open(path, "rb") as handle:
            end = handle.seek(0, os.SEEK_END)
            stop = end
            while stop > 0:
                start = max(0, stop - chunk)
                handle.seek(start)
                data = handle.read(stop - start + len(marker))  # overlaps the next chunk: a marker across the seam
                found = data.rfind(marker)
                if found >= 0:
                    return max(0, start + found - 1)  # from the blank line before the header
                stop = start
    except OSError:
        return 0
    return end


def rank_exit_code(log_text: str) -> int | None:
    """The exit code of the worker rank that failed, from torchrun's summary at the end of the run's log
    ("Root Cause (first observed failure): ... exitcode  : -9 (pid: 123)"), or None when there is none. torchrun
    itself exits 1 whatever its rank's code was, so the rank's own code is what says why an attempt ended."""
    this_attempt = log_text.rsplit(ATTEMPT_HEADER, 1)[-1]  # never an earlier attempt's summary
    codes = re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", this_attempt, flags=re.MULTILINE)
    return int(codes[-1]) if codes else None


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
    if returncode == EXIT_STORE_UNREACHABLE:
        return "worker stopped: the store was unreachable for longer than CLFBENCH_STORE_OUTAGE_S"
    if returncode == EXIT_NOT_OURS:
        return "worker stopped: the store said the run is no longer this attempt's"
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


LOAD_AVERAGE_S = 60.0  # the kernel's one-minute load average follows the run queue with an exp(-t / 60 s) memory


def lingering_load(ended: list[tuple[float, float, int]], now: float) -> float:
    """What this engine's CPU runs that already ended still add to the one-minute load average. `ended`: (ended_at,
    seconds it ran, threads), monotonic times. A run that kept n threads busy for d seconds raised the average by
    n * (1 - exp(-d / 60)), which then decays by exp(-t / 60) over the t seconds since it ended. Without this, each
    run of a sequence found the previous one's load still in the average: on 2 cores the demo's second run (and
    every run after the first of a queue) got 1 thread of 2, and took 1.5x as long."""
    return sum(threads * (1 - math.exp(-ran / LOAD_AVERAGE_S)) * math.exp(-(now - ended_at) / LOAD_AVERAGE_S)
               for ended_at, ran, threads in ended if now >= ended_at)


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


def worker_env(url: str, run: dict, folder: Path, store_id: str = "") -> dict:
    """The environment every launcher gives a run's worker: this engine's own, plus the store, the attempt (the fence
    of every write), the run's tag, folder and home, and where its checkpoints are mirrored (engine.artifacts)."""
    env = dict(os.environ)
    env.update(
        CLFBENCH_DB=url,
        CLFBENCH_RUN_ATTEMPT=str(run["attempt"]),
        CLFBENCH_RUN_TAG=run_tag(url, run["id"], run["attempt"]),
        CLFBENCH_RUN_DIR=str(folder),
        CLFBENCH_HOME=str(paths.home()),
        CLFBENCH_ARTIFACT_URL=paths.artifact_url(run["id"], store_id) or "",
        PYTHONUNBUFFERED="1",
    )
    return env


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
    kill_sent: bool = False
    # How far its log file has been copied into the store (a byte offset), and when (monotonic): ship_logs.
    shipped: int = 0
    shipped_at: float = 0.0
    started_at: float = field(default_factory=time.monotonic)  # when this engine launched or adopted it

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
    # "local": this engine runs each worker itself; "slurm": it submits each attempt as a Slurm job (engine.slurm),
    # at most max_jobs submitted and unfinished at once.
    launcher: str = "local"
    max_jobs: int = 16


@dataclass
class Engine:
    config: EngineConfig
    store: Store
    engine_id: int
    host: str = field(default_factory=host_label)
    host_id: str = field(default_factory=host_identity)
    gpu_type: str = ""  # its GPUs' name (engine.gpus.gpu_type): runs pinned to a GPU type match against it
    store_id: str = ""  # the store's own id: names run folders in a shared CLFBENCH_ARTIFACTS place
    children: dict[int, Child] = field(default_factory=dict)
    stopping: bool = False
    lease_s: float = LEASE_S
    # Monotonic times (never compared across hosts; they only pace this engine): the last renewal of its lease, the
    # start of its current run of renewals without a gap longer than a lease, and the last reconcile.
    renewed_at: float = field(default_factory=time.monotonic)
    renewed_since: float = field(default_factory=time.monotonic)
    reconciled_at: float | None = None
    # (ended_at, seconds it ran, threads) of this engine's CPU runs that ended in the last few minutes, whose load
    # the load average still holds (lingering_load).
    ended_cpu_runs: list[tuple[float, float, int]] = field(default_factory=list)

    # ---- capacity ---------------------------------------------------------------------------
    def capacity(self) -> str:
        """What this engine runs at once, for its start line."""
        return f"gpus [{','.join(map(str, self.config.gpus))}], up to {self.config.max_cpu_runs} CPU run(s)"

    def busy_gpus(self) -> set[int]:
        return {gpu for child in self.children.values() for gpu in child.gpus}

    def free_gpus(self) -> list[int]:
        """This engine's GPUs that its own children do not use. The claim also subtracts, in the store, the GPUs of
        every running run of this host (another engine's too): the store, not this process, is the ledger."""
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
        now = time.monotonic()
        self.ended_cpu_runs = [entry for entry in self.ended_cpu_runs if now - entry[0] < 5 * LOAD_AVERAGE_S]
        lingering = min(load, lingering_load(self.ended_cpu_runs, now))
        own = sum(child.threads for child in self.children.values())
        slots = self.config.max_cpu_runs
        threads = cpu_threads_rule(cores, load - lingering, own, slots)
        return threads, (f"load {load:.1f} of {cores} cores ({lingering:.1f} of it from this engine's runs that "
                         f"ended, {own} thread(s) of its running ones), {slots} CPU slot(s): {threads} thread(s)")

    def launch_env(self, run: dict, gpus: list[int], folder: Path) -> tuple[dict, int, str]:
        """The worker's environment, the CPU threads its ranks will use together (0: a GPU or API run), and why."""
        env = worker_env(self.config.url, run, folder, self.store_id)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)  # "" hides every GPU from CPU runs
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
            host_id=self.host_id,
            gpu_ids=free,
            gpu_type=self.gpu_type,
        )
        if run is None:
            return False
        self.launch(run)
        return True

    def launch(self, run: dict) -> None:
        """Start the worker of a run just claimed, on the GPUs the claim assigned it in the store."""
        gpus = [int(gpu) for gpu in (run["gpus_assigned"] or "").split(",") if gpu.strip()]
        # In a shared CLFBENCH_ARTIFACTS folder, the same folder as the run's earlier attempts on any host.
        folder = paths.private_dir(run_dir(self.config.url, run["id"], self.store_id))
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
        shipped = log_handle.seek(0, os.SEEK_END)  # the store gets this attempt's log from its header on
        header = (f"\n{ATTEMPT_HEADER} {run['id']} attempt {run['attempt']} on {self.host} "
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
            say(f"run {run['id']} attempt {run['attempt']}: could not launch the worker: {error}; run failed")
            queue.finish_failed(self.store, run["id"], run["attempt"], f"could not launch the worker: {error}",
                                writer=Writer.engine)
            return
        where = f"gpus [{','.join(map(str, gpus))}]" if gpus else \
            (f"cpu, {threads} thread(s)" if threads else "no local device")
        say(f"run {run['id']} attempt {run['attempt']}: launched {run_title(run)} on {where}, pid {popen.pid}; "
            f"log {log_path}")
        self.children[run["id"]] = Child(
            run_id=run["id"], attempt=run["attempt"], pid=popen.pid, gpus=gpus, launch=run["launch"],
            log_path=str(log_path), tag=run_tag(self.config.url, run["id"], run["attempt"]), popen=popen,
            log_handle=log_handle, threads=threads, shipped=shipped,
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
            self.ship_log(child, final=True)  # the whole log is in the store before the run shows as ended
            if child.launch == "torchrun" and code is not None and code > 0:
                code = rank_exit_code(log_tail(child.log_path, lines=80, raw=True)) or code
            reason = describe_exit(code)
            new_status = queue.mark_ended_without_result(self.store, run_id, child.attempt, reason)
            if new_status is None:  # the worker wrote the run's end itself (or the run is no longer this attempt's)
                ended = queries.get_run(self.store, run_id)
                say(f"run {run_id} attempt {child.attempt}: worker exited with code {code}; run "
                    f"{ended['status'] if ended else 'deleted'}")
            else:
                say(f"run {run_id} attempt {child.attempt}: {reason}; run {new_status}")
            if new_status != RunStatus.cancelled:
                tail = log_tail(child.log_path)
                if tail:  # only lands on a failed/interrupted/requeued run of this attempt
                    queue.append_error_detail(self.store, run_id, child.attempt, f"--- log tail ---\n{tail}")
            if child.threads:  # last: a reap that an outage cut short is redone whole, and must not count it twice
                now = time.monotonic()
                self.ended_cpu_runs.append((now, now - child.started_at, child.threads))

    def ship_logs(self) -> None:
        """Copy what each worker's log file grew by into the store (at most once a second per run), so `clfbench
        logs` and the TUI show it from any host."""
        moment = time.monotonic()
        for child in list(self.children.values()):
            if child.log_path and moment - child.shipped_at >= LOG_SHIP_S:
                self.ship_log(child, final=False)

    def ship_log(self, child: Child, final: bool) -> None:
        """Copy the next piece of the child's log into the store; `final` (its worker ended): all of the rest, then
        an empty piece that tells readers the attempt's log is whole (the worker may record the run's end before
        its engine has copied the last lines)."""
        while child.log_path:
            text, end, skipped = new_log_text(child.log_path, child.shipped, final)
            child.shipped_at = time.monotonic()
            if not text:
                break
            queue.append_log(self.store, child.run_id, child.attempt, text, end, after_a_gap=skipped)
            child.shipped = end
            if not final:
                return
        if final:
            queue.append_log(self.store, child.run_id, child.attempt, "", child.shipped)

    def handle_cancels(self) -> None:
        if not self.children:
            return
        for run_id in queries.cancel_requests(self.store, list(self.children)):
            child = self.children[run_id]
            if child.term_sent_at is None:
                say(f"run {run_id} attempt {child.attempt}: cancel requested; SIGTERM to its worker")
                signal_group(child.pid, signal.SIGTERM)  # torchrun forwards it to its ranks
                kill_processes(child.processes(), signal.SIGTERM)
                child.term_sent_at = time.monotonic()
            elif time.monotonic() - child.term_sent_at > self.config.cancel_grace_s:
                if not child.kill_sent:
                    say(f"run {run_id} attempt {child.attempt}: still running {self.config.cancel_grace_s:g} s "
                        "after SIGTERM; SIGKILL")
                    child.kill_sent = True
                kill_processes(child.processes(), signal.SIGKILL)

    def heartbeat(self) -> None:
        """Renew this engine's lease, and reconcile when due (every third of a lease). The engine loop calls it every
        HEARTBEAT_S. A renewal refused means another engine declared this one lost and took its runs: lose_lease."""
        if not queue.engine_heartbeat(self.store, self.engine_id):
            self.lose_lease()
            return
        moment = time.monotonic()
        if moment - self.renewed_at > self.lease_s:
            self.renewed_since = moment  # a gap (a pause, an outage): the lease may have lapsed meanwhile
        self.renewed_at = moment
        touch_lock(self.config.url, self.host_id)
        if self.reconcile_due():
            self.reconcile()

    def reconcile_due(self) -> bool:
        return self.reconciled_at is None or time.monotonic() - self.reconciled_at >= self.lease_s / 3

    def lose_lease(self) -> None:
        """Another engine declared this one lost (its lease ran out: it was paused, or cut off from the store) and
        requeued its runs: their workers are no longer this engine's. Kill them, claim nothing more, stop."""
        say(f"{self.host} pid {os.getpid()} lost its lease (no renewal for over {self.lease_s:g} s) "
            f"and its runs were taken by another engine; killing its {len(self.children)} worker(s) and stopping")
        for child in self.children.values():
            signal_group(child.pid, signal.SIGKILL)
            kill_processes(child.processes(), signal.SIGKILL)
            if child.log_handle is not None:
                child.log_handle.close()
        self.children.clear()
        self.stopping = True

    def reconcile(self) -> None:
        """Runs left `running` by a dead engine or worker.

        On this host (engine/worker processes are visible here): runs this engine owns but does not supervise (taken
        over from the previous engine of this host) and runs of this host's engines whose lease ran out: adopted
        while a process carrying their attempt's tag lives (the launcher or any rank), else ended (requeued or
        interrupted). On any host: runs whose engine's lease ran out on the database's clock (queue.reclaim_expired),
        once this engine has itself renewed its lease without a gap for a whole lease, so that after an outage of
        the store every engine had the time to renew its own before any is judged.
        """
        self.reconciled_at = time.monotonic()
        for run in queue.runs_to_check_on_host(self.store, self.engine_id, self.host_id):
            if run["id"] not in self.children:
                self.adopt_or_end(run)
        if time.monotonic() - self.renewed_since < self.lease_s:
            return
        for run_id, status in queue.reclaim_expired(self.store, self.engine_id):
            say(f"run {run_id}: its engine's lease ran out; {status}")

    def adopt_or_end(self, run: dict) -> None:
        """A running run of this host that no engine supervises: supervise it if its worker lives, else end it."""
        tag = run_tag(self.config.url, run["id"], run["attempt"])
        if not tagged_processes(tag):
            reason = "its worker was gone when this host's engine took it over (the engine or the worker died)"
            status = queue.mark_ended_without_result(self.store, run["id"], run["attempt"], reason)
            say(f"run {run['id']} attempt {run['attempt']}: {reason}; run {status or 'already ended'}")
            return
        if run["engine_id"] == self.engine_id:
            queue.log_event_standalone(self.store, "adopted", f"pid {run['pid']}", run["id"])
        elif not queue.adopt_run(self.store, run["id"], run["attempt"], run["engine_id"], self.engine_id):
            return  # it moved on meanwhile (finished, or reclaimed)
        say(f"run {run['id']} attempt {run['attempt']}: adopted its running worker (pid {run['pid']})")
        gpus = [int(g) for g in (run["gpus_assigned"] or "").split(",") if g]
        shipped = queries.log_shipped_end(self.store, run["id"], run["attempt"])
        if shipped is None and run["log_path"]:
            shipped = attempt_start(run["log_path"], run["id"], run["attempt"])
        self.children[run["id"]] = Child(
            run_id=run["id"], attempt=run["attempt"], pid=run["pid"] or 0, gpus=gpus,
            launch=run["launch"], log_path=run["log_path"] or "", tag=tag, shipped=shipped or 0,
        )

    def idle(self) -> bool:
        return not self.children

    def loop(self) -> None:
        """Tick every poll_s: heartbeat, reap, cancels, claims, the tick hook. Every step that touches the store
        goes through `StoreSteps.ride_out`, so a store outage (a PostgreSQL restart, a full disk) skips steps
        until the store answers instead of killing the engine, whose workers ride it out themselves."""
        steps = StoreSteps()
        reconciled, last_heartbeat = False, 0.0
        while not self.stopping:
            reconciled = reconciled or steps.ride_out(self.reconcile, "reconciling runs")
            if time.monotonic() - last_heartbeat > HEARTBEAT_S and steps.ride_out(self.heartbeat, "heartbeat"):
                last_heartbeat = time.monotonic()
            before = list(self.children.items())
            if not steps.ride_out(self.reap, "reaping ended runs"):
                # reap drops a child before it writes the run's end: put back the one whose write failed, so
                # the next tick writes it with its exit code (an end already written is refused by its guard).
                # A run whose claim or launch an outage cut off is found by reconcile (owned, not supervised).
                dropped = [(run_id, child) for run_id, child in before if run_id not in self.children]
                if dropped:
                    self.children[dropped[-1][0]] = dropped[-1][1]
            steps.ride_out(self.ship_logs, "storing logs")
            steps.ride_out(self.handle_cancels, "handling cancels")
            launched = False
            while not self.stopping:
                claimed: list[bool] = []
                if not steps.ride_out(lambda: claimed.append(self.claim_and_launch()), "claiming runs") \
                        or not claimed[0]:
                    break
                launched = True
            if self.config.on_tick is not None:
                steps.ride_out(self.config.on_tick, "showing progress")
            # An outage is no proof of an empty queue: --until-idle stops only on a store that answered.
            if self.config.until_idle and self.idle() and not launched and reconciled and not steps.down:
                break
            time.sleep(self.config.poll_s)


class StoreSteps:
    """The engine loop's steps through a store outage (the rule: storage.outage). A step that fails because the
    store is unreachable is skipped, and every store step waits out a backoff (0.2 s doubling to 5 s) before
    the next try; one line when the outage starts and one when the store answers again. An engine has no
    window: it keeps supervising its workers, which ride out the outage on their own (engine.recorder), for as
    long as it lasts. Any other error is raised, as before."""

    def __init__(self) -> None:
        self.since: float | None = None  # monotonic time of the outage's first failure
        self.delay = FIRST_DELAY_S
        self.next_try = 0.0

    @property
    def down(self) -> bool:
        return self.since is not None

    def ride_out(self, step: Callable[[], object], what: str) -> bool:
        """step(), unless the store is down and the backoff has not passed; whether it ran without an outage."""
        now = time.monotonic()
        if self.since is not None and now < self.next_try:
            return False
        try:
            step()
        except Exception as error:
            if not is_outage(error):
                raise
            if self.since is None:
                self.since, self.delay = now, FIRST_DELAY_S
                say(f"store unreachable while {what} ({first_line(error)}); retrying with backoff, workers go on")
            else:
                self.delay = min(self.delay * 2, MAX_DELAY_S)
            self.next_try = now + self.delay
            return False
        if self.since is not None:
            say(f"store reachable again after {now - self.since:.1f} s")
            self.since = None
        return True


def touch_lock(url: str, host_id: str) -> None:
    """Keep the lock file's times fresh: a cleaner of old files in /tmp must never delete a lock that is held."""
    try:
        os.utime(engine_lock_path(url, host_id))
    except OSError:
        pass


def torchrun_command(nproc: int) -> list[str]:
    """torchrun's entry point through this very Python (`python -m torch.distributed.run` is what `torchrun` runs).
    Never a `torchrun` found on PATH: in a venv made with --system-site-packages, or beside a second Python, it
    belongs to another interpreter, whose workers import another clfbench (seen: a v4 engine's workers were a v5
    clfbench that migrated the store under it)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]


def signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)


def run_engine(config: EngineConfig, engine_class: type[Engine] | None = None) -> None:
    """Run the engine loop in this process until stopped (SIGTERM/SIGINT) or, with until_idle, idle. `engine_class`:
    the launcher's (engine.slurm.SlurmEngine for config.launcher "slurm"); default Engine.

    Workers are left running when the engine stops: they finish and record their own result, and the
    next engine adopts them.
    """
    try:
        lease_s = queue.engine_lease_s()
    except StoreError as error:
        raise ClfbenchError(str(error)) from None
    engine_class = engine_class or Engine
    store = open_store(config.url)
    host, host_id, identity = host_label(), host_identity(), str(uuid.uuid4())
    lock, previous = acquire_engine_lock(config.url, identity, host_id)
    kind = gpu_type(config.gpus)
    engine_id = queue.register_engine(store, host, os.getpid(), config.gpus, host_id=host_id, identity=identity,
                                      gpu_type=kind, launcher=config.launcher)
    if previous:
        queue.take_over_engine(store, previous, engine_id)
    engine = engine_class(config=config, store=store, engine_id=engine_id, host=host, host_id=host_id,
                          lease_s=lease_s, gpu_type=kind, store_id=queries.store_id(store))
    say(f"started on {host}, pid {os.getpid()}, engine {engine_id}: {engine.capacity()}, store {store.describe()}"
        + ("; took over from this host's previous engine" if previous else ""))

    def _stop(_signum, _frame):
        engine.stopping = True

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        engine.loop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            queue.unregister_engine(store, engine.engine_id, os.getpid())
        except Exception as error:  # stopped during an outage: the lease running out says the same, later
            if not is_outage(error):
                raise
            say(f"stopped, but its stop could not be recorded ({first_line(error)}); its lease ends "
                f"within {lease_s:.0f} s")
        else:
            say(f"stopped ({len(engine.children)} worker(s) left running; the next engine adopts them)"
                if engine.children else "stopped")
        finally:
            lock.close()


# The launchers and the module each one's detached engine runs (engine.slurm imports this module, not the reverse).
LAUNCHER_MODULES = {"local": "clfbench.engine.daemon", "slurm": "clfbench.engine.slurm"}


def start_detached(url: str, gpus: str | None, max_cpu_runs: int, launcher: str = "local",
                   max_jobs: int = 16) -> int:
    """Start the engine as a daemon (own session, output to the engine log). Returns its pid."""
    holder = engine_lock_holder(url)
    if holder:
        raise ClfbenchError(f"an engine already runs for this store on this host (pid {holder})")
    log = engine_log_path(url)
    command = [sys.executable, "-m", LAUNCHER_MODULES[launcher], "--db", url]
    command += ["--max-jobs", str(max_jobs)] if launcher == "slurm" else ["--max-cpu-runs", str(max_cpu_runs)]
    if gpus is not None and launcher == "local":
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
    # -1: an engine has just taken the lock and not yet written its pid there (a stop pressed right after a start).
    settle_deadline = time.monotonic() + 5
    while pid is not None and pid < 0 and time.monotonic() < settle_deadline:
        time.sleep(0.05)
        pid = engine_lock_holder(url)
    if not pid or pid < 0:
        return None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and engine_lock_holder(url):
        time.sleep(0.1)
    return pid


def main(argv: list[str] | None = None, engine_class: type[Engine] | None = None, launcher: str = "local") -> int:
    """The detached engine: `python -m clfbench.engine.daemon` (local), or engine.slurm's main (its class)."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m {LAUNCHER_MODULES[launcher]}",
                                     description=f"clfbench engine (detached, launcher {launcher})")
    parser.add_argument("--db", required=True)
    parser.add_argument("--gpus", default=None)
    parser.add_argument("--max-cpu-runs", type=int, default=1)
    parser.add_argument("--max-jobs", type=int, default=16)
    parser.add_argument("--until-idle", action="store_true")
    args = parser.parse_args(argv)
    try:
        gpus = discover_gpus(args.gpus) if launcher == "local" else []  # a batch scheduler's GPUs are its own
        run_engine(EngineConfig(url=args.db, gpus=gpus, until_idle=args.until_idle, max_cpu_runs=args.max_cpu_runs,
                                launcher=launcher, max_jobs=args.max_jobs), engine_class)
    except ClfbenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
