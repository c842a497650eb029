"""Metric ingest under load: points/s with 1, 4 and 8 writer processes while a reader polls like the TUI, and
`clfbench ls` latency on an idle store vs one that 8 writers are filling (issue 16, item 6).

    python bench/ingest.py [--seconds 6] [--batch 200] [--writers 1,4,8]

Each writer is one process that writes one running run's metric points the way a worker's Recorder does:
`storage.queue.add_metric_points` with batches of `--batch` points (one write transaction each). The reader, one
more process, polls every 0.5 s what the TUI's screens read: the runs list, counts by status, live engines and the
newest metric points of a run (`metric_series(after_id=...)`). `clfbench ls` is the real command line in a
subprocess (start-up included; the same command on an idle store is printed beside it).

SQLite runs in a fresh temporary home; PostgreSQL when `--start-pg` starts a throwaway server (tests/pg_server.py)
or CLFBENCH_BENCH_PG_URL names a reachable one (a scratch database: the bench creates its tables and its runs
there, and leaves them), else it prints "skipped".
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clfbench.storage import queries, queue  # noqa: E402
from clfbench.storage.db import StoreError, open_store  # noqa: E402

GOAL_POINTS_PER_S = 50_000  # with 4 writers and a reader
GOAL_LS_S = 1.0


def new_run() -> queue.NewRun:
    return queue.NewRun(method="encoder-finetune", model="tiny-bert", task="massive-intent", shots=0, seed=0,
                        spec_json="{}", spec_hash="bench", launch="torchrun", gpus_requested=None, nproc=1)


def running_runs(url: str, count: int) -> list[tuple[int, int]]:
    """`count` runs moved to running, as an engine would: (run id, attempt)."""
    store = open_store(url)
    queue.enqueue(store, [new_run() for _ in range(count)])
    claimed = []
    for _ in range(count):
        run = queue.claim(store, host="bench", engine_id=1, default_gpus=0, free_gpus=0, cpu_free=True,
                          api_free=True)
        claimed.append((run["id"], run["attempt"]))
    store.engine.dispose()
    return claimed


def writer(url: str, run_id: int, attempt: int, batch: int, start: float, stop: float, out) -> None:
    store = open_store(url)
    written = errors = 0
    step = 0
    while time.time() < start:
        time.sleep(0.001)
    while time.time() < stop:
        now = time.time()
        points = [(step + i, "train_loss", 1.0 / (step + i + 1), now) for i in range(batch)]
        try:
            queue.add_metric_points(store, run_id, attempt, points)
            written += batch
        except Exception:  # counted, not hidden: the bench reports every error
            errors += 1
        step += batch
    out.put(("writer", written, errors))


def reader(url: str, run_id: int, start: float, stop: float, out) -> None:
    store = open_store(url)
    latencies, errors, after = [], 0, 0
    while time.time() < start:
        time.sleep(0.001)
    while time.time() < stop:
        began = time.perf_counter()
        try:
            queries.list_runs(store)
            queries.count_by_status(store)
            queries.live_engines(store, stale_after_s=30, now=time.time())
            points = queries.metric_series(store, run_id, after_id=after)
            after = points[-1]["id"] if points else after
        except Exception:
            errors += 1
        latencies.append(time.perf_counter() - began)
        time.sleep(0.5)
    out.put(("reader", latencies, errors))


def cli_ls_seconds(url: str, home: str) -> float:
    env = dict(os.environ, CLFBENCH_HOME=home)
    began = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "clfbench.app.cli", "--db", url, "ls", "--limit", "20"],
                            env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - began
    if result.returncode != 0:
        raise RuntimeError(f"clfbench ls failed: {result.stderr.strip()}")
    return elapsed


def ingest(url: str, writers: int, seconds: float, batch: int, home: str, time_ls: bool = False) -> dict:
    """One measurement: `writers` processes for `seconds`, a reader polling; optionally `clfbench ls` meanwhile."""
    runs = running_runs(url, writers)
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    start = time.time() + 3.0  # every process has opened its store before the clock starts
    stop = start + seconds
    processes = [context.Process(target=writer, args=(url, run_id, attempt, batch, start, stop, out))
                 for run_id, attempt in runs]
    processes.append(context.Process(target=reader, args=(url, runs[0][0], start, stop, out)))
    for process in processes:
        process.start()
    ls_during = []
    if time_ls:
        while time.time() < start + 1.0:
            time.sleep(0.05)
        while time.time() < stop - 2.0 and len(ls_during) < 3:
            ls_during.append(cli_ls_seconds(url, home))
    reports = [out.get(timeout=seconds + 120) for _ in processes]
    for process in processes:
        process.join()
    written = sum(r[1] for r in reports if r[0] == "writer")
    write_errors = sum(r[2] for r in reports if r[0] == "writer")
    (_, latencies, read_errors), = [r for r in reports if r[0] == "reader"]
    return {"writers": writers, "points_per_s": written / seconds, "write_errors": write_errors,
            "read_errors": read_errors, "poll_median_s": statistics.median(latencies) if latencies else None,
            "poll_max_s": max(latencies) if latencies else None, "ls_during_s": ls_during}


def bench_backend(name: str, url: str, args, home: str) -> list[dict]:
    rows = []
    for count in args.writers:
        rows.append(ingest(url, count, args.seconds, args.batch, home, time_ls=count == max(args.writers)))
        print(f"  {name}: {count} writer(s) done", file=sys.stderr, flush=True)
    return rows


def print_table(results: dict[str, list[dict] | str], ls_idle: dict[str, list[float]]) -> None:
    print(f"{'backend':<11}{'writers':>8}{'points/s':>11}{'errors w/r':>12}{'poll median':>13}{'poll max':>10}")
    for name, rows in results.items():
        if isinstance(rows, str):
            print(f"{name:<11}{rows}")
            continue
        for row in rows:
            # A reader that finished no poll in the whole window was starved: say so rather than print a number.
            polls = (f"{row['poll_median_s'] * 1000:>10.1f} ms{row['poll_max_s'] * 1000:>7.0f} ms"
                     if row["poll_median_s"] is not None else f"{'no poll finished':>23}")
            print(f"{name:<11}{row['writers']:>8}{row['points_per_s']:>11,.0f}"
                  f"{row['write_errors']:>6}/{row['read_errors']:<5}{polls}")
    print(f"\n`clfbench ls` wall time, start-up included (goal: < {GOAL_LS_S:.0f} s beyond start-up while 8 "
          f"writers ingest); points/s goal with 4 writers: {GOAL_POINTS_PER_S:,}")
    for name, rows in results.items():
        if isinstance(rows, str):
            continue
        during = rows[-1]["ls_during_s"]
        print(f"{name:<11}idle {', '.join(f'{s:.2f}' for s in ls_idle[name])} s; while {rows[-1]['writers']} "
              f"writers ingest {', '.join(f'{s:.2f}' for s in during)} s")
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per writer count")
    parser.add_argument("--batch", type=int, default=200, help="points per write (the Recorder's flush_every)")
    parser.add_argument("--writers", default="1,4,8", help="writer counts, e.g. 1,4,8")
    parser.add_argument("--start-pg", action="store_true",
                        help="start a throwaway PostgreSQL server (Debian's postgresql, as the tests do) and measure it")
    args = parser.parse_args()
    server = None
    if args.start_pg:
        from tests.pg_server import start_pg_server

        server = start_pg_server(Path(tempfile.mkdtemp(prefix="clfbench-ingest-pg-")))
        os.environ["CLFBENCH_BENCH_PG_URL"] = server.create_database("ingest")
    args.writers = [int(w) for w in args.writers.split(",")]
    with tempfile.TemporaryDirectory(prefix="clfbench-ingest-") as home:
        os.environ["CLFBENCH_HOME"] = home
        targets = {"sqlite": f"sqlite:///{home}/clfbench.db"}
        results: dict[str, list[dict] | str] = {}
        pg_url = os.environ.get("CLFBENCH_BENCH_PG_URL")
        if pg_url:
            try:
                open_store(pg_url).engine.dispose()
                targets["postgresql"] = pg_url
            except StoreError as error:
                results["postgresql"] = f"skipped: {error}"
        else:
            results["postgresql"] = "skipped (set CLFBENCH_BENCH_PG_URL to a scratch database to measure it)"
        ls_idle = {}
        for name, url in targets.items():
            open_store(url).engine.dispose()
            ls_idle[name] = [cli_ls_seconds(url, home) for _ in range(3)]
            results[name] = bench_backend(name, url, args, home)
        print_table(dict(sorted(results.items(), key=lambda item: item[0] != "sqlite")), ls_idle)
    if server is not None:
        server.ctl("stop", "-m", "immediate")


if __name__ == "__main__":
    main()
