"""Two engines as two hosts on one PostgreSQL store, N tiny runs, one host killed in the middle (issue 12).

    python bench/two_hosts.py                 # 200 runs: 180 tfidf + 20 checkpointing tiny-bert fine-tunes
    python bench/two_hosts.py --runs 40 --slow-every 10

A real PostgreSQL server is started in a temp folder (Debian's postgresql: tests/pg_server.py). The hosts are
two `clfbench engine --foreground` processes with their own home and host name (CLFBENCH_HOST_ID) and one shared
CLFBENCH_ARTIFACTS folder; both start at once. Once a quarter of the runs have ended and host a is training a
fine-tune that has saved a checkpoint and has a third of its steps left (or once 90% of the runs have ended), host a
dies: every process of its running runs, then its engine, get SIGKILL. Host b goes on alone. Printed at the end:
the wall time and runs per minute, how each run ended, duplicate claims (a run claimed again without a requeue
between), lost runs (not succeeded), host a's runs that host b requeued and the step each resumed from, and
whether `clfbench logs` of one of host a's runs works from host b. `clfbench engine status` is printed while both
hosts run.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402

from clfbench.storage import queries  # noqa: E402
from clfbench.storage.db import open_store  # noqa: E402
from tests.pg_server import start_pg_server  # noqa: E402

SAMPLES = ROOT / "engine" / "sample_data"
TFIDF = ["--method", "tfidf", "--model", "tfidf", "--task", "massive-intent", "--data-dir", str(SAMPLES)]
TINY_BERT = ["--method", "encoder-finetune", "--model", "tiny-bert", "--task", "massive-intent", "--data-dir",
             str(SAMPLES), "-o", "batch_size=8", "-o", "train_limit=80", "-o", "test_limit=20", "-o", "eval_every=0",
             "-o", "checkpoint_every=4", "-o", "epochs=30"]
LEASE_S = 5


def cli(env: dict, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "clfbench.app.cli", *args], env=env, cwd=ROOT, check=True,
                          capture_output=True, text=True, timeout=600).stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--slow-every", type=int, default=10, help="every Nth run is a checkpointing fine-tune")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="clfbench-two-hosts-"))
    server = start_pg_server(work)
    try:
        return run(args, work, server.create_database("two_hosts"))
    finally:
        server.ctl("stop", "-m", "immediate")
        shutil.rmtree(work, ignore_errors=True)
        if server.user:
            shutil.rmtree(server.folder, ignore_errors=True)


def host_env(work: Path, url: str, host: str) -> dict:
    return dict(os.environ, CLFBENCH_DB=url, CLFBENCH_HOST_ID=host, CLFBENCH_HOME=str(work / f"home-{host}"),
                CLFBENCH_ARTIFACTS=str(work / "shared"), CLFBENCH_ENGINE_LEASE_S=str(LEASE_S),
                CLFBENCH_LOCK_DIR=str(work / "locks"), CLFBENCH_MODEL_CACHE=str(work / "models"))


def run(args, work: Path, url: str) -> int:
    env_a, env_b = host_env(work, url, "host-a"), host_env(work, url, "host-b")
    store = open_store(url)
    slow = []
    for index in range(args.runs):
        if args.slow_every and index % args.slow_every == args.slow_every // 2:
            slow.append(int(cli(env_a, "queue", *TINY_BERT, "--seed", str(index)).split(": ")[1]))
        else:
            cli(env_a, "queue", *TFIDF, "--seed", str(index))
    print(f"queued {args.runs} runs ({len(slow)} checkpointing fine-tunes) on {store.describe()}", flush=True)
    started = time.monotonic()
    engines = {host: subprocess.Popen([sys.executable, "-m", "clfbench.app.cli", "engine", "--foreground"],
                                      env=env, cwd=ROOT, stdout=open(work / f"engine-{host}.log", "wb"),
                                      stderr=subprocess.STDOUT)
               for host, env in (("host-a", env_a), ("host-b", env_b))}
    killed_runs: list[int] = []
    status_shown = False
    while True:
        rows = runs(store)
        ended = sum(row["status"] in ("succeeded", "failed", "cancelled", "interrupted") for row in rows)
        if not status_shown and ended >= args.runs // 10:
            print(cli(env_a, "engine", "status"), flush=True)
            status_shown = True
        due = ended >= 9 * args.runs // 10 or (ended >= args.runs // 4 and training_with_checkpoint(rows, slow, work))
        if not killed_runs and engines["host-a"].poll() is None and due:
            killed_runs = kill_host(store, engines["host-a"], "host-a", url)
            print(f"{time.monotonic() - started:.0f} s: host a killed ({ended} runs ended) while it ran "
                  f"{killed_runs}", flush=True)
        if ended == args.runs:
            break
        if time.monotonic() - started > 3600:
            print("gave up after an hour", flush=True)
            break
        time.sleep(1)
    wall = time.monotonic() - started
    engines["host-b"].send_signal(signal.SIGTERM)
    engines["host-b"].wait(timeout=60)
    report(store, env_b, killed_runs, slow, wall, args.runs)
    return 0


def runs(store) -> list[dict]:
    with store.read() as connection:
        return [dict(row) for row in connection.execute(text(
            "SELECT id, status, attempt, host, progress_step, progress_total FROM runs ORDER BY id")).mappings()]


def training_with_checkpoint(rows: list[dict], slow: list[int], work: Path) -> bool:
    """Host a trains a fine-tune that has saved a checkpoint and has at least a third of its steps left."""
    return any(row["status"] == "running" and row["host"] == "host-a" and row["id"] in slow and
               row["progress_total"] and (row["progress_step"] or 0) < 2 * row["progress_total"] / 3  # step 0: a beat
               and any((work / "shared").glob(f"runs/*/{row['id']}/checkpoint/state.pt")) for row in rows)


def kill_host(store, engine: subprocess.Popen, host: str, url: str) -> list[int]:
    """The machine dies: every process of its running runs, then its engine, SIGKILLed at once (workers first,
    so none finishes between the engine's death and theirs)."""
    from clfbench.engine.daemon import run_tag, tagged_processes

    held = [row for row in runs(store) if row["status"] == "running" and row["host"] == host]
    pids = [pid for row in held for pid in tagged_processes(run_tag(url, row["id"], row["attempt"]))]
    for pid in [*pids, engine.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    engine.wait(timeout=30)
    return [row["id"] for row in held]


def report(store, env_b: dict, killed_runs: list[int], slow: list[int], wall: float, total: int) -> None:
    rows = runs(store)
    statuses: dict[str, int] = {}
    for row in rows:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    with store.read() as connection:
        events = connection.execute(text("SELECT run_id, kind FROM events WHERE run_id IS NOT NULL ORDER BY id")).all()
    duplicates, claimed = 0, set()
    for run_id, kind in events:
        if kind == "claimed":
            duplicates += run_id in claimed
            claimed.add(run_id)
        elif kind in ("requeued", "queued"):
            claimed.discard(run_id)
    succeeded_twice = sum(1 for row in rows if sum(1 for r, k in events if r == row["id"] and k == "succeeded") > 1)
    print(f"\n{total} runs in {wall:.0f} s ({60 * total / wall:.1f} runs/min) on 2 hosts, one killed midway")
    print(f"ended: {statuses}")
    print(f"duplicate claims: {duplicates}; runs that succeeded twice: {succeeded_twice}; "
          f"lost (not succeeded): {total - statuses.get('succeeded', 0)}")
    by_host: dict[str, int] = {}
    for row in rows:
        by_host[row["host"]] = by_host.get(row["host"], 0) + 1
    print(f"last attempt ran on: {by_host}")
    for run_id in killed_runs:
        run = queries.get_run(store, run_id)
        results = queries.run_results(store, run_id).get("massive-intent", {})
        resumed = results.get("resumed_from_step")
        print(f"host a's run {run_id} ({'fine-tune' if run_id in slow else 'tfidf'}): {run['status']} on "
              f"{run['host']}, attempt {run['attempt']}, resumed from step "
              f"{'-' if resumed is None else int(resumed)}; note: {run['attempt_note']}")
    done_on_a = next((row["id"] for row in rows if row["host"] == "host-a" and row["status"] == "succeeded"), None)
    if done_on_a is not None:
        log = subprocess.run([sys.executable, "-m", "clfbench.app.cli", "logs", str(done_on_a)], env=env_b, cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        print(f"`clfbench logs {done_on_a}` (a run of host a) on host b: exit {log.returncode}, "
              f"{len(log.stdout.splitlines())} lines, ends: {log.stdout.strip().splitlines()[-1][:100]!r}")


if __name__ == "__main__":
    sys.exit(main())
