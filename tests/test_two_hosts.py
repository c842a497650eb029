"""Ownership across hosts (issue 16 items 2, 3): a run belongs to the engine whose lease on the database's clock is
live; only when that lease runs out may another engine take the run, and then the old attempt writes nothing more.

The store-level tests judge leases with a lease of a fraction of a second; the process tests run two real engines
as two hosts (CLFBENCH_HOST_ID differs) on one SQLite store, with tiny CPU runs, 3-second leases and clocks skewed
by 10 minutes either way (CLFBENCH_CLOCK_OFFSET_S), and sample the processes and the store all along.
"""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from clfbench.storage import queries, queue
from clfbench.storage.db import open_store
from tests.conftest import ROOT, SAMPLES
from tests.test_e2e import wait_for

TINY = ["--method", "encoder-finetune", "--model", "tiny-bert", "--data-dir", str(SAMPLES)]


def _new_run(**overrides) -> queue.NewRun:
    fields = dict(method="encoder-finetune", model="tiny-bert", task="massive-intent", shots=0, seed=0,
                  spec_json="{}", spec_hash="lease", launch="torchrun", gpus_requested=None, nproc=1)
    return queue.NewRun(**{**fields, **overrides})


def _claim(store, engine_id: int, host_id: str = "host-a", gpu_ids=None):
    return queue.claim(store, host=host_id, engine_id=engine_id, default_gpus=1 if gpu_ids else 0, free_gpus=0,
                       cpu_free=True, api_free=True, host_id=host_id, gpu_ids=gpu_ids)


def _run(store, run_id: int) -> dict:
    with store.read() as connection:
        return dict(connection.execute(text("SELECT * FROM runs WHERE id = :r"), {"r": run_id}).mappings().one())


# Short leases keep these tests quick; one second, not less: the test's own queries on a loaded 2-core CI box must
# not outlast a lease it means to keep live.
SHORT_LEASE_S = 1.0
PAST_THE_LEASE_S = 1.4


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path, monkeypatch):
    """A store with one-second engine leases, on SQLite and on a real PostgreSQL server (the SQL of the database's
    clock, the claim's row and advisory locks differ)."""
    monkeypatch.setenv("CLFBENCH_ENGINE_LEASE_S", str(SHORT_LEASE_S))
    if request.param == "sqlite":
        return open_store(f"sqlite:///{tmp_path / 'store.db'}")
    server = request.getfixturevalue("postgres")
    return open_store(server.create_database(f"leases_{tmp_path.name.lower().replace('-', '_')[-40:]}"))


def test_a_live_lease_keeps_the_run_whatever_its_heartbeat_and_an_expired_one_loses_it(store):
    a = queue.register_engine(store, "host-a", 101, [], host_id="host-a")
    b = queue.register_engine(store, "host-b", 202, [], host_id="host-b")
    run_id = queue.enqueue(store, [_new_run()])[0]
    attempt = _claim(store, a)["attempt"]
    with store.write() as connection:  # its worker never wrote a heartbeat, and its host's clock is an hour behind
        connection.execute(text("UPDATE runs SET heartbeat_at = heartbeat_at - 3600 WHERE id = :r"), {"r": run_id})
    deadline = time.monotonic() + 4 * SHORT_LEASE_S
    while time.monotonic() < deadline:  # four leases long, renewed by engine a: never b's to take
        assert queue.engine_heartbeat(store, a) and queue.engine_heartbeat(store, b)
        assert queue.reclaim_expired(store, b) == []
        time.sleep(0.1)
    time.sleep(PAST_THE_LEASE_S)  # a stops renewing: its lease runs out on the database's clock
    assert queue.engine_heartbeat(store, b)
    assert queue.reclaim_expired(store, b) == [(run_id, "queued")]
    run = _run(store, run_id)
    assert run["status"] == "queued" and "engine host-a pid 101 lost its lease" in run["error"]
    assert "lost its lease" in run["attempt_note"]
    # Engine a comes back: its renewal is refused (it must kill its workers), it claims nothing, its old attempt
    # writes nothing.
    assert queue.engine_heartbeat(store, a) is False
    assert _claim(store, a) is None
    assert queue.heartbeat(store, run_id, attempt) is False
    assert queue.add_metric_points(store, run_id, attempt, [(1, "train_loss", 0.5, time.time())]) is False
    assert _claim(store, b)["attempt"] == attempt + 1


def test_a_lease_that_ran_out_unnoticed_is_renewed(store):
    """A pause that nobody acted on (the only engine of the store, a laptop asleep) costs nothing."""
    a = queue.register_engine(store, "host-a", 101, [], host_id="host-a")
    run_id = queue.enqueue(store, [_new_run()])[0]
    _claim(store, a)
    time.sleep(PAST_THE_LEASE_S)
    assert queue.engine_heartbeat(store, a) is True
    assert queue.reclaim_expired(store, a) == [] and _run(store, run_id)["status"] == "running"


def test_lists_call_an_engine_alive_while_its_lease_lasts_whatever_the_readers_clock(store):
    """`engine status`, `ls` and the TUI judge engines by the same lease as ownership: a reader whose clock is ten
    minutes off neither calls a renewing engine dead nor a lapsed one alive."""
    a = queue.register_engine(store, "host-a", 101, [], host_id="host-a")
    for skew in (-600, 0, 600):
        assert [e["id"] for e in queries.live_engines(store, stale_after_s=30, now=time.time() + skew)] == [a]
    time.sleep(PAST_THE_LEASE_S)  # the lease ends on the database's clock
    for skew in (-600, 0, 600):
        assert queries.live_engines(store, stale_after_s=30, now=time.time() + skew) == []
    assert queue.engine_heartbeat(store, a)
    assert [e["id"] for e in queries.live_engines(store, stale_after_s=30, now=time.time())] == [a]


def test_an_engine_whose_lease_was_taken_kills_its_workers_and_stops(store):
    from clfbench.engine.daemon import Child, Engine, EngineConfig

    a = queue.register_engine(store, "host-a", os.getpid(), [], host_id="host-a")
    engine = Engine(config=EngineConfig(url=store.url, gpus=[]), store=store, engine_id=a, host="host-a",
                    host_id="host-a", lease_s=SHORT_LEASE_S)
    run_id = queue.enqueue(store, [_new_run()])[0]
    attempt = _claim(store, a)["attempt"]
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    engine.children[run_id] = Child(run_id=run_id, attempt=attempt, pid=worker.pid, gpus=[], launch="torchrun",
                                    log_path="", tag="no-such-tag", popen=worker)
    engine.heartbeat()
    assert not engine.stopping and worker.poll() is None
    time.sleep(PAST_THE_LEASE_S)  # engine a misses its renewals (paused); engine b takes its run
    # b registers only now: registered earlier, a slow box could let b's own short lease run out before
    # engine a's first heartbeat, whose reconcile would then declare b lost (a CI run failed so).
    b = queue.register_engine(store, "host-b", 202, [], host_id="host-b")
    assert queue.engine_heartbeat(store, b) and queue.reclaim_expired(store, b) == [(run_id, "queued")]
    engine.heartbeat()
    assert engine.stopping and engine.children == {}
    assert worker.wait(timeout=10) == -signal.SIGKILL
    assert _claim(store, a) is None


def test_two_engines_of_one_host_never_hand_out_one_gpu_twice(store):
    a = queue.register_engine(store, "box", 1, [0, 1], host_id="box")
    b = queue.register_engine(store, "box", 2, [0, 1], host_id="box")
    elsewhere = queue.register_engine(store, "other", 3, [0, 1], host_id="other")
    ids = queue.enqueue(store, [_new_run(spec_hash=str(i)) for i in range(4)])
    assert _claim(store, a, "box", [0, 1])["gpus_assigned"] == "0"
    assert _claim(store, b, "box", [0, 1])["gpus_assigned"] == "1"  # b's own children hold nothing: the store does
    assert _claim(store, b, "box", [0, 1]) is None
    assert _claim(store, elsewhere, "other", [0, 1])["gpus_assigned"] == "0"  # another host's GPU 0
    assert _run(store, ids[3])["status"] == "queued"


def test_a_pinned_run_goes_only_to_its_host_or_gpu_type_and_a_scheduler_launcher_takes_any(store):
    def claim(engine_id, host, gpu_type="", gpus=(0,), honour_pins=True):
        return queue.claim(store, host=host, engine_id=engine_id, default_gpus=1 if gpus else 0, free_gpus=0,
                           cpu_free=True, api_free=True, host_id=host, gpu_ids=list(gpus), gpu_type=gpu_type,
                           honour_pins=honour_pins)

    a100 = queue.register_engine(store, "box-a", 1, [0], host_id="box-a", gpu_type="NVIDIA A100-SXM4-80GB")
    h100 = queue.register_engine(store, "box-h", 2, [0], host_id="box-h", gpu_type="NVIDIA H100 80GB HBM3")
    cpu = queue.register_engine(store, "laptop", 3, [], host_id="laptop")
    on_h, any_h100, on_laptop = queue.enqueue(store, [
        _new_run(spec_hash="1", pin_host="box-h"), _new_run(spec_hash="2", pin_gpu_type="h100"),
        _new_run(spec_hash="3", pin_host="laptop", gpus_requested=0)])
    assert claim(a100, "box-a") is None  # nothing here for an A100 on box-a
    assert claim(cpu, "laptop", gpus=())["id"] == on_laptop  # a CPU run pinned to the laptop
    assert claim(cpu, "laptop", gpus=()) is None  # a CPU engine never takes a GPU-type pin
    assert claim(h100, "box-h")["id"] == on_h
    assert claim(h100, "box-h") is None  # its one GPU is busy now
    (slurm,) = [queue.register_engine(store, "login", 4, [], host_id="login", launcher="slurm")]
    assert claim(slurm, "login", gpus=(0, 1), honour_pins=False)["id"] == any_h100  # pins go on to sbatch
    with store.read() as connection:
        kinds = dict(connection.execute(text("SELECT host, gpu_type FROM engines")).all())
        launchers = dict(connection.execute(text("SELECT host, launcher FROM engines")).all())
    assert kinds["box-h"] == "NVIDIA H100 80GB HBM3" and launchers == {
        "box-a": "local", "box-h": "local", "laptop": "local", "login": "slurm"}


def test_the_engine_lock_is_per_store_and_host_not_per_home_and_a_probe_never_blocks_a_start(tmp_path, monkeypatch):
    from clfbench.engine.daemon import acquire_engine_lock, engine_lock_holder
    from clfbench.engine.types import ClfbenchError

    monkeypatch.setenv("CLFBENCH_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setenv("CLFBENCH_HOST_ID", "host-a")
    url = f"sqlite:///{tmp_path / 'store.db'}"
    stop = threading.Event()

    def probe():
        while not stop.is_set():
            engine_lock_holder(url)

    probers = [threading.Thread(target=probe) for _ in range(2)]
    for thread in probers:
        thread.start()
    try:
        for home in ("home-1", "home-2"):
            monkeypatch.setenv("CLFBENCH_HOME", str(tmp_path / home))
            if home == "home-1":
                held, previous = acquire_engine_lock(url, "engine-1")
                assert previous is None
            else:  # another home, same store, same host: one engine only
                with pytest.raises(ClfbenchError, match="already runs for this store on this host"):
                    acquire_engine_lock(url, "engine-2")
        other_host, _ = acquire_engine_lock(url, "engine-3", host_id="host-b")
        other_store, _ = acquire_engine_lock(url + "-other", "engine-4")
    finally:
        stop.set()
        for thread in probers:
            thread.join()
    assert engine_lock_holder(url) == os.getpid()
    held.close()
    assert engine_lock_holder(url) is None
    again, previous = acquire_engine_lock(url, "engine-5")
    assert previous == "engine-1"  # the lock names the engine it outlived: its runs are taken over at once
    for handle in (again, other_host, other_store):
        handle.close()


# ---- two real engines as two hosts ------------------------------------------------------------------------------

LEASE_S = 3


class Hosts:
    """Two engines, 'host-a' and 'host-b', on one SQLite store, each with its own home and its own clock offset;
    a sampler that records, every 0.1 s, which attempts of which runs have a process that executes (not stopped)."""

    def __init__(self, tmp_path: Path, cli, url: str | None = None, env: dict | None = None):
        self.url = url or f"sqlite:///{tmp_path / 'store.db'}"
        self.extra_env = env or {}  # for both engines (a shared CLFBENCH_ARTIFACTS)
        self.cli = cli
        cli.env["CLFBENCH_DB"] = self.url
        self.store = open_store(self.url)
        self.tmp_path = tmp_path
        self.engines: dict[str, subprocess.Popen] = {}
        self.overlaps: list[tuple[int, set[int]]] = []
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def env(self, host: str, offset_s: int) -> dict:
        env = dict(self.cli.env)
        env.update(CLFBENCH_HOST_ID=host, CLFBENCH_CLOCK_OFFSET_S=str(offset_s), CLFBENCH_ENGINE_LEASE_S=str(LEASE_S),
                   CLFBENCH_HOME=str(self.tmp_path / f"home-{host}"), CLFBENCH_LOCK_DIR=str(self.tmp_path / "locks"),
                   **self.extra_env)
        return env

    def start(self, host: str, offset_s: int) -> None:
        log = open(self.tmp_path / f"engine-{host}.log", "ab")
        self.engines[host] = subprocess.Popen([sys.executable, "-m", "clfbench.app.cli", "engine", "--foreground"],
                                              cwd=ROOT, env=self.env(host, offset_s), stdout=log,
                                              stderr=subprocess.STDOUT)
        log.close()
        if not self._sampler.is_alive():
            self._sampler.start()

    def engine_log(self, host: str) -> str:
        return (self.tmp_path / f"engine-{host}.log").read_text(errors="replace")

    def processes(self, run_id: int, attempt: int) -> list[int]:
        from clfbench.engine.daemon import run_tag, tagged_processes

        return tagged_processes(run_tag(self.url, run_id, attempt))

    def _sample(self) -> None:
        while not self._stop.is_set():
            with self.store.read() as connection:
                runs = connection.execute(text("SELECT id, attempt FROM runs")).all()
            for run_id, attempts in runs:
                executing = {attempt for attempt in range(1, attempts + 1)
                             if any(_executes(pid) for pid in self.processes(run_id, attempt))}
                if len(executing) > 1:
                    self.overlaps.append((run_id, executing))
            time.sleep(0.1)

    def run(self, run_id: int) -> dict:
        return _run(self.store, run_id)

    def wait(self, predicate, timeout: float, what: str):
        try:
            return wait_for(predicate, timeout, what)
        except AssertionError as timed_out:
            logs = "\n".join(f"--- engine {host} ---\n{self.engine_log(host)[-3000:]}" for host in self.engines)
            raise AssertionError(f"{timed_out}; run rows: {self.rows()}\n{logs}") from None

    def rows(self) -> list[dict]:
        with self.store.read() as connection:
            return [dict(row) for row in connection.execute(text(
                "SELECT id, status, attempt, engine_id, error FROM runs")).mappings()]

    def points(self, run_id: int) -> dict[int, int]:
        with self.store.read() as connection:
            return dict(connection.execute(text("SELECT attempt, count(*) FROM metric_points WHERE run_id = :r "
                                                "GROUP BY attempt"), {"r": run_id}).all())

    def events(self, run_id: int) -> list[tuple[str, str]]:
        with self.store.read() as connection:
            return [tuple(row) for row in connection.execute(
                text("SELECT kind, message FROM events WHERE run_id = :r ORDER BY id"), {"r": run_id}).all()]

    def close(self) -> None:
        self._stop.set()
        for engine in self.engines.values():
            if engine.poll() is None:
                engine.send_signal(signal.SIGTERM)
        for engine in self.engines.values():
            try:
                engine.wait(timeout=30)
            except subprocess.TimeoutExpired:
                engine.kill()
        with self.store.read() as connection:
            runs = connection.execute(text("SELECT id, attempt FROM runs")).all()
        for run_id, attempts in runs:  # nothing of the test outlives it, stopped or not
            for attempt in range(1, attempts + 1):
                for pid in self.processes(run_id, attempt):
                    _signal(pid, signal.SIGKILL)
                    _signal(pid, signal.SIGCONT)


def _executes(pid: int) -> bool:
    """Whether a process exists and is not stopped (SIGSTOP: 'T') nor a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("T", "t", "Z", "X")


def _pause(hosts: Hosts, pids: list[int]) -> None:
    """SIGSTOP `pids` at a moment none of them holds SQLite's write lock: a process stopped inside a write
    transaction would stop every writer of the store (a limit of SQLite, not what these tests are about)."""
    database = hosts.url.removeprefix("sqlite:///")
    for _ in range(50):
        for pid in pids:
            _signal(pid, signal.SIGSTOP)
        probe = sqlite3.connect(database, timeout=0.2, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            return
        except sqlite3.OperationalError:
            for pid in pids:
                _signal(pid, signal.SIGCONT)
            time.sleep(0.05)
        finally:
            probe.close()
    raise AssertionError("the processes to pause always held the store's write lock")


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture
def hosts(tmp_path, cli):
    pair = Hosts(tmp_path, cli)
    yield pair
    pair.close()


def _queue_run(hosts: Hosts, epochs: int) -> int:
    (run,) = hosts.cli.json("queue", *TINY, "--task", "massive-intent", "-o", f"epochs={epochs}", "-o", "batch_size=8",
                            "-o", "train_limit=80", "-o", "test_limit=20", "-o", "eval_every=0")
    return run["id"]


def _training_on(hosts: Hosts, run_id: int, attempt: int) -> bool:
    return hosts.run(run_id)["attempt"] == attempt and hosts.points(run_id).get(attempt, 0) >= 2


def test_a_paused_worker_keeps_its_run_while_its_engine_lives_whatever_the_clocks_say(hosts):
    """Host a's clock is 10 minutes behind, host b's 10 minutes ahead: by b's clock, a's worker has not written a
    heartbeat for 20 minutes, and then it is paused for four leases. Its engine's lease is live: b takes nothing."""
    run_id = _queue_run(hosts, epochs=12)
    hosts.start("host-a", offset_s=-600)
    hosts.wait(lambda: _training_on(hosts, run_id, 1), 180, "host a to train the run")
    hosts.start("host-b", offset_s=600)
    (rank,) = _children(hosts.run(run_id)["pid"])  # the worker (rank 0), a child of its torchrun
    _pause(hosts, [rank])
    try:
        time.sleep(4 * LEASE_S)
        run = hosts.run(run_id)
        assert (run["status"], run["attempt"]) == ("running", 1)
    finally:
        _signal(rank, signal.SIGCONT)
    hosts.wait(lambda: hosts.run(run_id)["status"] == "succeeded", 240, "the run to finish on host a")
    run = hosts.run(run_id)
    assert run["attempt"] == 1 and run["host"] == "host-a"
    assert set(hosts.points(run_id)) == {1}
    assert not any(kind in ("requeued", "interrupted") for kind, _ in hosts.events(run_id))
    assert hosts.overlaps == []
    assert "lost its lease" not in hosts.engine_log("host-a") + hosts.engine_log("host-b")


def test_a_dead_hosts_run_moves_after_its_lease_and_its_paused_worker_writes_nothing(hosts):
    """Host a's engine is killed while its worker is paused (a host cut off). After a's lease runs out, b (its clock
    10 minutes ahead) takes the run and trains attempt 2; a's worker, resumed, is refused its first write and exits."""
    run_id = _queue_run(hosts, epochs=30)
    hosts.start("host-a", offset_s=0)
    hosts.wait(lambda: _training_on(hosts, run_id, 1), 180, "host a to train the run")
    hosts.start("host-b", offset_s=600)
    stale = hosts.processes(run_id, 1)
    _pause(hosts, stale)  # torchrun and its worker: the whole attempt stands still
    hosts.engines["host-a"].send_signal(signal.SIGKILL)
    hosts.engines["host-a"].wait(timeout=30)
    written_by_first = hosts.points(run_id)[1]
    hosts.wait(lambda: hosts.run(run_id)["status"] == "succeeded", 300, "host b to take the run and finish it")
    run = hosts.run(run_id)
    assert run["attempt"] == 2 and run["host"] == "host-b"
    assert "engine host-a" in run["attempt_note"] and "lost its lease" in run["attempt_note"]
    hosts.wait(lambda: not hosts.processes(run_id, 2), 60, "attempt 2's processes to exit")
    assert hosts.overlaps == []
    # Host a comes back: its attempt resumes, and its first write is refused.
    for pid in stale:
        _signal(pid, signal.SIGCONT)
    hosts.wait(lambda: not hosts.processes(run_id, 1), 120, "the resumed stale attempt to exit")
    (stale_log,) = (hosts.tmp_path / "home-host-a").glob(f"runs/*/{run_id}/log.txt")
    assert "is no longer ours" in stale_log.read_text(errors="replace")
    assert hosts.points(run_id)[1] == written_by_first  # not one point from the stale attempt
    assert hosts.points(run_id)[2] > 0
    assert [message for kind, message in hosts.events(run_id) if kind == "succeeded"] == ["attempt 2"]
    assert hosts.run(run_id)["status"] == "succeeded" and hosts.run(run_id)["attempt"] == 2
    with hosts.store.read() as connection:
        predictions = connection.execute(text("SELECT count(*) FROM predictions WHERE run_id = :r"),
                                         {"r": run_id}).scalar()
    assert predictions == 20  # the final attempt's, once
