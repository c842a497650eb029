"""A real single-node Slurm cluster for tests: munged with a generated key, slurmctld and slurmd on localhost.

    from tests.slurm_cluster import slurm_cluster  # noqa: F401  (the fixture; or yield from running_slurm_cluster())

    def test_something(slurm_cluster):
        env = slurm_cluster.env()            # os.environ plus SLURM_CONF: sbatch/squeue/scancel find this cluster
        slurm_cluster.node                   # the node's name (this host's short hostname)
        slurm_cluster.scontrol("update", f"nodename={slurm_cluster.node}", "state=down", "reason=test")

Debian's `slurm-wlm` (22.05) and `munge`: every file of the cluster (key, sockets, state, spool, logs, slurm.conf)
lives in one temp folder, removed at the end; the daemons run as root in the foreground-less daemon mode with their
pid files there. No cgroups (ProctrackType=proctrack/linuxproc, TaskPlugin=task/none: a container has no cgroup
delegation), select/cons_tres, the node's real CPUs and memory (`slurmd -C`). Where the binaries are absent, or
the tests do not run as root (slurmd must, to start jobs as their user), the test is skipped and says why.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")


def missing_binaries() -> list[str]:
    """The Slurm and munge programs not found on PATH (nor in /usr/sbin, where Debian puts the daemons)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [name for name in BINARIES if shutil.which(name, path=search) is None]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _program(name: str) -> str:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])) or name


def node_hardware() -> tuple[int, int]:
    """(CPUs, real memory in MB) as slurmd itself measures this host: slurm.conf must not promise more."""
    text = subprocess.run([_program("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout
    cpus = re.search(r"CPUs=(\d+)", text)
    memory = re.search(r"RealMemory=(\d+)", text)
    return (int(cpus.group(1)) if cpus else os.cpu_count() or 1), (int(memory.group(1)) if memory else 1000)


@dataclass
class SlurmCluster:
    folder: Path
    node: str
    cpus: int
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.folder / "slurm.conf"

    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def command(self, *args: str, timeout: float = 30) -> str:
        result = subprocess.run([_program(args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout,
                                env=self.env())
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def scontrol(self, *args: str) -> str:
        return self.command("scontrol", *args)

    def node_state(self) -> str:
        text = self.scontrol("show", "node", self.node)
        found = re.search(r"State=(\S+)", text)
        return found.group(1) if found else ""

    def log_tails(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = self.folder / name
            if path.exists():
                parts.append(f"--- {name} ---\n" + path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def stop(self) -> None:
        for pid_file in ("slurmd.pid", "slurmctld.pid", "munged.pid"):
            path = self.folder / pid_file
            try:
                os.kill(int(path.read_text().split()[0]), signal.SIGTERM)
            except (OSError, ValueError, IndexError):
                pass
        deadline = time.monotonic() + 15
        for pid_file in ("slurmd.pid", "slurmctld.pid", "munged.pid"):
            path = self.folder / pid_file
            while path.exists() and time.monotonic() < deadline:
                try:
                    os.kill(int(path.read_text().split()[0]), 0)
                except (OSError, ValueError, IndexError):
                    break
                time.sleep(0.1)


SLURM_CONF = """\
ClusterName=clfbench-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={folder}/munge.socket
CredType=cred/munge
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
LaunchParameters=use_interactive_step
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# Ended jobs stay visible to squeue for an hour (there is no accounting database for sacct to ask).
MinJobAge=3600
KillWait=5
InactiveLimit=0
# 1: a node an admin (or a test) set DOWN stays down until `scontrol update ... state=resume`.
ReturnToService=1
SlurmdTimeout=30
MessageTimeout=10
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def start_slurm_cluster() -> SlurmCluster:
    """munged + slurmctld + slurmd in a new temp folder; waits until the node is idle. Skips where Slurm is absent."""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"no Slurm on this machine (missing {', '.join(missing)}; apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        pytest.skip("the test Slurm runs slurmd, which must run as root, and these tests do not")
    folder = Path(tempfile.mkdtemp(prefix="clfbench-slurm-"))
    os.chmod(folder, 0o755)
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    node = socket.gethostname().split(".")[0]
    cpus, memory = node_hardware()
    (folder / "slurm.conf").write_text(SLURM_CONF.format(
        node=node, folder=folder, cpus=cpus, memory=memory, ctld_port=free_port(), slurmd_port=free_port()))
    cluster = SlurmCluster(folder=folder, node=node, cpus=cpus)
    env = cluster.env()
    try:
        # --force: munged refuses to run as root otherwise; everything else of it lives in the folder.
        _start([_program("munged"), "--force", f"--socket={folder}/munge.socket", f"--key-file={key}",
                f"--pid-file={folder}/munged.pid", f"--log-file={folder}/munged.log",
                f"--seed-file={folder}/munged.seed"], env)
        _start([_program("slurmctld"), "-i"], env)  # -i: ignore any state a previous test left (there is none)
        _start([_program("slurmd"), "-N", node], env)
        _wait_until_idle(cluster)
    except Exception:
        tails = cluster.log_tails()
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"the test Slurm did not start:\n{tails}") from None
    return cluster


def _start(command: list[str], env: dict) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")


def _wait_until_idle(cluster: SlurmCluster, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        try:
            state = cluster.node_state()
        except (RuntimeError, subprocess.TimeoutExpired):
            state = "(slurmctld not answering yet)"
        if state.startswith("IDLE"):
            return
        time.sleep(0.3)
    raise RuntimeError(f"the node stayed {state}")


def running_slurm_cluster():
    """A generator for a fixture: the cluster, then its teardown (jobs cancelled, daemons stopped, folder removed)."""
    cluster = start_slurm_cluster()
    yield cluster
    try:
        jobs = cluster.command("squeue", "--noheader", "--format=%i").split()
        if jobs:  # ended before slurmd stops: a job step whose slurmd is gone would outlive the test
            cluster.command("scancel", *jobs)
            deadline = time.monotonic() + 20
            while cluster.command("squeue", "--noheader", "--format=%i").split() and time.monotonic() < deadline:
                time.sleep(0.2)
    except (RuntimeError, subprocess.TimeoutExpired):
        pass
    cluster.stop()
    shutil.rmtree(cluster.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm_cluster():
    yield from running_slurm_cluster()
