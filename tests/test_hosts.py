"""Several hosts on one store (issue 12 items 1-3): pins, the hosts an engine status lists, logs readable from any
host, and checkpoints in a place every host reaches, so that a dead host's runs resume elsewhere.

The process tests run real engines as hosts (CLFBENCH_HOST_ID and the home differ) on a real PostgreSQL server
(tests/pg_server.py) or SQLite, with tiny CPU runs.
"""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from clfbench.engine import artifacts
from clfbench.storage import queries, queue
from clfbench.storage.db import open_store
from tests.conftest import SAMPLES
from tests.test_two_hosts import Hosts, _signal

TFIDF = ["--method", "tfidf", "--model", "tfidf", "--task", "massive-intent", "--data-dir", str(SAMPLES)]
TINY_BERT = ["--method", "encoder-finetune", "--model", "tiny-bert", "--task", "massive-intent", "--data-dir",
             str(SAMPLES), "-o", "batch_size=8", "-o", "train_limit=80", "-o", "test_limit=20", "-o", "eval_every=0",
             "-o", "checkpoint_every=4"]


def _database(postgres, tmp_path) -> str:
    return postgres.create_database(f"hosts_{tmp_path.name.lower().replace('-', '_')[-40:]}")


# ---- pins and the hosts list -------------------------------------------------------------------------------------

def test_the_cli_queues_pins_that_leave_unpinned_specs_as_they_were(cli):
    (pinned,) = cli.json("queue", *TFIDF, "--host", "box-7", "--gpu-type", "H100", "--dry-run")
    assert (pinned["host"], pinned["gpu_type"]) == ("box-7", "H100")
    (plain,) = cli.json("queue", *TFIDF, "--dry-run")
    assert "host" not in plain and "gpu_type" not in plain  # the stored spec and its hash as before pins existed
    refused = cli.run("queue", *TFIDF, "--host", "", check=False)
    assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1 and "host" in refused.stderr
    (queued,) = cli.json("queue", *TFIDF, "--host", "box-7")
    run = queries.get_run(open_store(f"sqlite:///{cli.home / 'clfbench.db'}"), queued["id"])
    assert (run["pin_host"], run["pin_gpu_type"]) == ("box-7", None)


def test_engine_status_lists_every_host_with_its_gpus_and_share(cli, tmp_path):
    store = open_store(f"sqlite:///{cli.home / 'clfbench.db'}")
    box = queue.register_engine(store, "box-a", 11, [0, 1, 2, 3], host_id="box-a", gpu_type="NVIDIA A100-SXM4-80GB")
    queue.register_engine(store, "box-b", 12, [], host_id="box-b")
    queue.enqueue(store, [queue.NewRun(method="tfidf", model="tfidf", task="massive-intent", shots=0, seed=seed,
                                       spec_json="{}", spec_hash=str(seed), launch="torchrun", gpus_requested=2,
                                       nproc=1) for seed in range(3)])
    for _ in range(2):
        queue.claim(store, host="box-a", engine_id=box, default_gpus=1, free_gpus=0, cpu_free=True, api_free=True,
                    host_id="box-a", gpu_ids=[0, 1, 2, 3])
    status = cli.json("engine", "status")
    hosts = {host["host"]: host for host in status["hosts"]}
    assert hosts["box-a"]["gpus"] == [0, 1, 2, 3] and hosts["box-a"]["busy"] == [0, 1, 2, 3]
    assert hosts["box-a"]["running"] == 2 and hosts["box-a"]["share"] == 1.0
    assert hosts["box-b"]["gpus"] == [] and hosts["box-b"]["share"] == 0.0
    shown = cli.run("engine", "status").stdout
    assert "box-a" in shown and "NVIDIA A100-SXM4-80GB" in shown and "100%" in shown and "box-b" in shown


# ---- logs from any host ------------------------------------------------------------------------------------------

def _logs(cli, tmp_path, host: str, *args: str) -> subprocess.CompletedProcess:
    """`clfbench logs` as run on `host` (its own host name and home)."""
    env = dict(cli.env, CLFBENCH_HOST_ID=host, CLFBENCH_HOME=str(tmp_path / f"home-{host}"))
    return subprocess.run([sys.executable, "-m", "clfbench.app.cli", "logs", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_a_runs_log_is_read_from_another_host_out_of_the_store_bounded_with_its_tail_whole(tmp_path, cli):
    hosts = Hosts(tmp_path, cli, env={"CLFBENCH_LOG_KEEP_BYTES": "1200"})
    try:
        (small,) = cli.json("queue", *TFIDF)
        (long,) = cli.json("queue", *TINY_BERT, "-o", "epochs=4", "-o", "log_every=1")
        hosts.start("host-a", offset_s=0)
        hosts.wait(lambda: all(hosts.run(r["id"])["status"] == "succeeded" and
                               queries.log_complete(hosts.store, r["id"], 1) for r in (small, long)), 240,
                   "host a to run both runs and store their logs")
    finally:
        hosts.close()
    file_text = Path(hosts.run(small["id"])["log_path"]).read_text()
    assert len(file_text) < 1200  # all of it is in the store
    shown = _logs(cli, tmp_path, "host-b", str(small["id"]), "--raw")
    assert shown.returncode == 0 and shown.stdout == file_text
    assert f"run {small['id']} succeeded" in _logs(cli, tmp_path, "host-b", str(small["id"])).stdout
    # A log over CLFBENCH_LOG_KEEP_BYTES keeps its newest lines whole and says that older ones went; host a, which
    # has the file, shows every line.
    whole = Path(hosts.run(long["id"])["log_path"]).read_text()
    stored = _logs(cli, tmp_path, "host-b", str(long["id"]), "--raw").stdout
    assert len(whole) > 2400 and stored.startswith(queue.LOG_DROPPED_NOTE)
    kept = stored.removeprefix(queue.LOG_DROPPED_NOTE)
    assert 500 < len(kept) < len(whole) and whole.endswith(kept)  # pieces whole: the newest one at least
    assert f"run {long['id']} succeeded" in kept.splitlines()[-1]
    assert _logs(cli, tmp_path, "host-a", str(long["id"]), "--raw").stdout == whole
    missing = _logs(cli, tmp_path, "host-b", "999")
    assert missing.returncode != 0 and len(missing.stderr.strip().splitlines()) == 1


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        return open_store(f"sqlite:///{tmp_path / 'store.db'}")
    return open_store(_database(request.getfixturevalue("postgres"), tmp_path))


def test_the_stored_log_keeps_the_newest_pieces_whole_and_a_piece_bigger_than_the_bound(store, monkeypatch):
    monkeypatch.setenv("CLFBENCH_LOG_KEEP_BYTES", "1000")
    (run_id,) = queue.enqueue(store, [queue.NewRun(method="tfidf", model="tfidf", task="t", shots=0, seed=0,
                                                   spec_json="{}", spec_hash="x", launch="torchrun",
                                                   gpus_requested=0, nproc=1)])
    pieces = [f"line {i}: " + "x" * 291 + "\n" for i in range(6)]  # 300 characters each
    end = 0
    for piece in pieces:
        end += len(piece)
        queue.append_log(store, run_id, 1, piece, end)
    stored = "".join(chunk["text"] for chunk in queries.log_chunks(store, run_id))
    assert stored == queue.LOG_DROPPED_NOTE + "".join(pieces[3:])  # the newest 900 of 1000 characters, whole
    assert queries.log_shipped_end(store, run_id, 1) == 1800 and not queries.log_complete(store, run_id, 1)
    queue.append_log(store, run_id, 1, "y" * 1500 + "\n", 3301)  # one piece over the bound: kept, alone
    queue.append_log(store, run_id, 1, "", 3301)  # the engine's end of the attempt's log
    assert [chunk["text"] for chunk in queries.log_chunks(store, run_id)] == [
        queue.LOG_DROPPED_NOTE + "y" * 1500 + "\n", ""]
    assert queries.log_complete(store, run_id, 1) and not queries.log_complete(store, run_id, 2)
    monkeypatch.setenv("CLFBENCH_LOG_KEEP_BYTES", "lots")
    with pytest.raises(Exception, match="CLFBENCH_LOG_KEEP_BYTES must be a whole number of bytes"):
        queue.append_log(store, run_id, 1, "z\n", 3303)



def test_a_log_that_grew_past_twice_the_bound_between_two_pieces_is_stored_as_one_unbroken_tail(store, tmp_path,
                                                                                                 monkeypatch):
    """A busy engine ships a worker's log late: when more than twice what the store keeps arrived since the last
    piece, it skips to the newest lines. The stored log must then say lines went (the note, first), start at a
    line's start and be one unbroken tail of the file; it was a headless piece, cut mid-line, after the old ones,
    with no note when nothing else was trimmed."""
    from clfbench.engine.daemon import Child, Engine, EngineConfig

    monkeypatch.setenv("CLFBENCH_LOG_KEEP_BYTES", "1000")
    (run_id,) = queue.enqueue(store, [queue.NewRun(method="tfidf", model="tfidf", task="t", shots=0, seed=0,
                                                   spec_json="{}", spec_hash="x", launch="torchrun",
                                                   gpus_requested=0, nproc=1)])
    engine_id = queue.register_engine(store, "host-a", 101, [], host_id="host-a")
    engine = Engine(config=EngineConfig(url=store.url, gpus=[]), store=store, engine_id=engine_id, host="host-a",
                    host_id="host-a")
    log = tmp_path / "log.txt"
    child = Child(run_id=run_id, attempt=1, pid=0, gpus=[], launch="torchrun", log_path=str(log))
    log.write_text("loading the model\n")
    engine.ship_log(child, final=False)
    with log.open("a") as handle:  # 3,330 characters before the next piece: 47-character lines
        handle.writelines(f"step {step:4d} train_loss {1 / step:.6f} " + "." * 16 + "\n" for step in range(1, 91))
    engine.ship_log(child, final=True)
    stored = "".join(chunk["text"] for chunk in queries.log_chunks(store, run_id))
    assert stored.startswith(queue.LOG_DROPPED_NOTE) and queries.stored_log_state(store, run_id) == "trimmed"
    tail = stored.removeprefix(queue.LOG_DROPPED_NOTE)
    assert tail.startswith("step ") and log.read_text().endswith(tail) and 900 < len(tail) <= 1000
    assert tail.splitlines()[-1].startswith("step   90") and queries.log_complete(store, run_id, 1)
    # A run whose whole log arrives in its last piece (the engine never shipped while it ran): the note too.
    (quick,) = queue.enqueue(store, [queue.NewRun(method="tfidf", model="tfidf", task="t", shots=1, seed=0,
                                                  spec_json="{}", spec_hash="y", launch="torchrun",
                                                  gpus_requested=0, nproc=1)])
    engine.ship_log(Child(run_id=quick, attempt=1, pid=0, gpus=[], launch="torchrun", log_path=str(log)), final=True)
    assert "".join(chunk["text"] for chunk in queries.log_chunks(store, quick)) == stored

# ---- checkpoints every host reaches -----------------------------------------------------------------------------

def test_a_checkpoint_mirrored_to_a_url_is_fetched_whole_on_a_host_without_it(tmp_path, monkeypatch):
    """An fsspec URL (file://, the same code as s3://): each save goes to a new prefix, LATEST names the newest, older
    ones go; a host without the checkpoint fetches the one LATEST names, and a host with one keeps its own."""
    monkeypatch.setenv(artifacts.URL_ENV, f"file://{tmp_path / 'bucket' / 'runs' / 'store' / '7'}")
    saved = tmp_path / "host-a" / "checkpoint"
    for step in (4, 8):
        (saved / "shards").mkdir(parents=True, exist_ok=True)
        (saved / "state.pt").write_bytes(f"state at {step}".encode())
        (saved / "shards" / "rank0.distcp").write_bytes(b"shard" * step)
        artifacts.mirror_checkpoint(saved, step)
    bucket = tmp_path / "bucket" / "runs" / "store" / "7"
    assert sorted(path.name for path in bucket.iterdir()) == ["LATEST", "checkpoint-000000008"]
    elsewhere = tmp_path / "host-b"
    assert artifacts.fetch_checkpoint(elsewhere)
    assert (elsewhere / "checkpoint" / "state.pt").read_bytes() == b"state at 8"
    assert (elsewhere / "checkpoint" / "shards" / "rank0.distcp").read_bytes() == b"shard" * 8
    assert not artifacts.fetch_checkpoint(elsewhere)  # it has one now
    assert not list(elsewhere.glob(".checkpoint.fetch-*"))
    monkeypatch.setenv(artifacts.URL_ENV, f"file://{tmp_path / 'empty'}")
    assert not artifacts.fetch_checkpoint(tmp_path / "host-c")  # nothing mirrored yet: start from scratch
    monkeypatch.setenv(artifacts.URL_ENV, "nosuchprotocol://bucket/x")
    with pytest.raises(Exception, match="CLFBENCH_ARTIFACTS nosuchprotocol://bucket/x"):
        artifacts.fetch_checkpoint(tmp_path / "host-d")


def test_rm_deletes_what_a_run_mirrored_and_says_in_one_line_when_it_cannot(cli, tmp_path, monkeypatch):
    """`clfbench rm` deletes a run's mirrored checkpoints with its rows: SQLite may give a later run the same id,
    and that run must not fetch the deleted one's checkpoint. A mirror it cannot reach leaves the run deleted and
    says where the leftovers are."""
    bucket = tmp_path / "bucket"
    cli.env["CLFBENCH_ARTIFACTS"] = f"file://{bucket}"
    first, second = (cli.json("queue", *TFIDF, "--seed", str(seed))[0]["id"] for seed in (0, 1))
    store_id = queries.store_id(open_store(f"sqlite:///{cli.home / 'clfbench.db'}"))
    saved = tmp_path / "checkpoint"
    saved.mkdir()
    (saved / "state.pt").write_bytes(b"state")
    for run_id in (first, second):
        monkeypatch.setenv(artifacts.URL_ENV, f"file://{bucket}/runs/{store_id}/{run_id}")
        artifacts.mirror_checkpoint(saved, 4)
    removed = cli.run("rm", "-y", str(first))
    assert removed.stdout.strip() == f"run {first}: deleted" and removed.stderr == ""
    assert not (bucket / "runs" / store_id / str(first)).exists()
    assert (bucket / "runs" / store_id / str(second) / "LATEST").exists()  # another run's mirror stays
    cli.env["CLFBENCH_ARTIFACTS"] = "nosuchprotocol://bucket"
    removed = cli.run("rm", "-y", str(second))
    assert removed.stdout.strip() == f"run {second}: deleted" and [row["id"] for row in cli.json("ls")] == []
    warning = removed.stderr.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith(f"warning: run {second}: its mirrored checkpoints at "
                                                       f"nosuchprotocol://bucket/runs/{store_id}/{second} were not "
                                                       "deleted (")


# ---- a dead host's runs resume on another -----------------------------------------------------------------------

def _kill_host(hosts: Hosts, host: str) -> list[int]:
    """SIGKILL a host's engine and every process of its running runs, as a machine that dies; the runs it held."""
    hosts.engines[host].send_signal(signal.SIGKILL)
    hosts.engines[host].wait(timeout=30)
    held = [row for row in hosts.rows() if row["status"] == "running" and hosts.run(row["id"])["host"] == host]
    for row in held:
        for pid in hosts.processes(row["id"], row["attempt"]):
            _signal(pid, signal.SIGKILL)
    return [row["id"] for row in held]


def _checkpointed(folder: Path, run_id: int, place: str) -> bool:
    """Whether a whole checkpoint of the run is where another host finds it. A folder's checkpoint appears by rename,
    whole. A URL's is whole once LATEST names it: `checkpoint-<step>/state.pt` can exist mid-upload (a CI run killed
    host a there, and host b rightly started from step 0)."""
    if place == "folder":
        return any(folder.glob(f"runs/*/{run_id}/checkpoint/state.pt"))
    return any(folder.glob(f"runs/*/{run_id}/LATEST"))


def _first_step(hosts: Hosts, run_id: int, attempt: int) -> int:
    with hosts.store.read() as connection:
        return connection.execute(text("SELECT MIN(step) FROM metric_points WHERE run_id = :r AND attempt = :a "
                                       "AND name = 'train_loss'"), {"r": run_id, "a": attempt}).scalar()


@pytest.mark.parametrize("place", ["folder", "url"])
def test_a_dead_hosts_runs_are_requeued_once_and_resume_from_the_shared_checkpoint(tmp_path, cli, postgres, place):
    """Two hosts, separate homes, one PostgreSQL store; checkpoints in a folder both mount (CLFBENCH_ARTIFACTS), or
    mirrored to a URL (file://, through fsspec as s3:// would be). Host a dies (its engine and its workers SIGKILLed)
    while it trains a run: host b requeues that run once its lease ends, resumes it from its checkpoint, and runs
    the rest; every run ends succeeded, once, and no attempt ever ran beside another of the same run."""
    shared = tmp_path / "shared"
    place_env = str(shared) if place == "folder" else f"file://{shared}"
    hosts = Hosts(tmp_path, cli, url=_database(postgres, tmp_path), env={"CLFBENCH_ARTIFACTS": place_env})
    try:
        (slow,) = cli.json("queue", *TINY_BERT, "-o", "epochs=12", "--priority", "1")
        quick = [cli.json("queue", *TFIDF, "--seed", str(seed))[0]["id"] for seed in range(3)]
        hosts.start("host-a", offset_s=0)
        hosts.wait(lambda: _checkpointed(shared, slow["id"], place) and hosts.points(slow["id"]).get(1, 0) >= 6, 240,
                   "host a to checkpoint the slow run")
        hosts.start("host-b", offset_s=0)
        assert _kill_host(hosts, "host-a") == [slow["id"]]
        everything = [slow["id"], *quick]
        hosts.wait(lambda: all(hosts.run(r)["status"] == "succeeded" for r in everything), 420,
                   "host b to take the dead host's run and finish every run")
        hosts.wait(lambda: queries.log_complete(hosts.store, slow["id"], 2), 60, "host b to store the log's end")
    finally:
        hosts.close()
    run = hosts.run(slow["id"])
    assert (run["attempt"], run["host"]) == (2, "host-b") and "lost its lease" in run["attempt_note"]
    results = queries.run_results(hosts.store, slow["id"])["massive-intent"]
    assert results["resumed_from_step"] >= 4 and _first_step(hosts, slow["id"], 2) > results["resumed_from_step"]
    for run_id in everything:  # each claimed once per attempt and ended once
        kinds = [kind for kind, _ in hosts.events(run_id)]
        assert kinds.count("claimed") == hosts.run(run_id)["attempt"] and kinds.count("succeeded") == 1
    assert all(hosts.run(r)["attempt"] == 1 for r in quick)
    assert hosts.overlaps == []
    log = _logs(cli, tmp_path, "host-b", str(slow["id"]), "--raw")
    assert log.returncode == 0
    for attempt, host in ((1, "host-a"), (2, "host-b")):  # both attempts, from the store
        assert f"run {slow['id']} attempt {attempt} on {host}" in log.stdout
    assert "resuming from" in log.stdout
    if place == "url":
        assert "fetched checkpoint" in log.stdout and "mirrored to" in log.stdout
