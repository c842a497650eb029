"""Per-run overhead of the Slurm launcher against the local one (issue 12 item 4).

    python bench/slurm_overhead.py [--runs 6]

Queues the same `--runs` tiny tfidf runs (the sample data; ~2 s of work each) into two fresh stores and runs each
queue to the end with one run at a time: `clfbench engine --until-idle` (local, --max-cpu-runs 1) and
`clfbench engine --until-idle --launcher slurm --max-jobs 1` on the real single-node Slurm of the tests
(tests/slurm_cluster.py, started here and torn down at the end; needs root, slurm-wlm and munge). Prints the wall
time of each queue, the difference per run, and how long `sbatch --parsable` itself took (its median). One run at
a time, so the difference is the launch and the following, not the scheduling of several jobs side by side.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.slurm_cluster import start_slurm_cluster  # noqa: E402

SAMPLES = ROOT / "engine" / "sample_data"


def cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clfbench.app.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=True)


def queue_and_drain(env: dict, runs: int, engine_args: list[str]) -> float:
    for seed in range(runs):
        cli(env, "queue", "--method", "tfidf", "--model", "tfidf", "--task", "massive-intent", "--data-dir",
            str(SAMPLES), "--seed", str(seed))
    started = time.monotonic()
    cli(env, "engine", "--until-idle", *engine_args)
    wall = time.monotonic() - started
    statuses = [line.split()[1] for line in cli(env, "ls").stdout.splitlines()[1:] if line.strip()]
    assert statuses == ["succeeded"] * runs, statuses
    return wall


def sbatch_seconds(env: dict, home: Path) -> list[float]:
    """Seconds each of 5 `sbatch --parsable` calls took: a held job (it never runs), cancelled after."""
    script = home / "hold.sh"
    script.write_text("#!/bin/bash\n#SBATCH --hold\ntrue\n")
    times, ids = [], []
    for _ in range(5):
        started = time.monotonic()
        out = subprocess.run(["sbatch", "--parsable", str(script)], env=env, capture_output=True, text=True,
                             check=True).stdout
        times.append(time.monotonic() - started)
        ids.append(out.strip().split(";")[0])
    subprocess.run(["scancel", *ids], env=env, check=True)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6)
    args = parser.parse_args()
    cluster = start_slurm_cluster()
    try:
        results = {}
        for launcher in ("local", "slurm"):
            home = Path(tempfile.mkdtemp(prefix=f"clfbench-bench-{launcher}-"))
            env = cluster.env()
            env.update(CLFBENCH_HOME=str(home), CLFBENCH_SLURM_POLL_S="0.5")
            env.pop("CLFBENCH_DB", None)
            engine_args = ["--max-cpu-runs", "1"] if launcher == "local" else \
                ["--launcher", "slurm", "--max-jobs", "1"]
            results[launcher] = queue_and_drain(env, args.runs, engine_args)
            if launcher == "slurm":
                submit = sbatch_seconds(env, home)
            shutil.rmtree(home, ignore_errors=True)
        local, slurm = results["local"], results["slurm"]
        print(f"{args.runs} tfidf runs, one at a time, {os.cpu_count()} cores")
        print(f"local engine: {local:6.1f} s  ({local / args.runs:.2f} s per run)")
        print(f"slurm engine: {slurm:6.1f} s  ({slurm / args.runs:.2f} s per run; poll 0.5 s)")
        print(f"overhead of the Slurm launch: {(slurm - local) / args.runs:+.2f} s per run")
        print(f"sbatch --parsable alone: median {statistics.median(submit) * 1000:.0f} ms of 5")
        print(subprocess.run(["sbatch", "--version"], capture_output=True, text=True, env=cluster.env()).stdout.strip())
    finally:
        cluster.stop()
        shutil.rmtree(cluster.folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
