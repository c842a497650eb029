"""CPU threads per run: chosen at launch from the cores actually free, or the spec's `threads:`."""
from __future__ import annotations

import json
import os
import socket
import time

import pytest
from sqlalchemy import text

from clfbench.engine.daemon import Engine, EngineConfig, cpu_threads_rule, host_cpu_load, lingering_load
from clfbench.engine.spec import parse_spec
from clfbench.engine.types import ClfbenchError
from clfbench.storage import queue
from clfbench.storage.db import open_store
from conftest import SAMPLES

TFIDF = ["--method", "tfidf", "--model", "tfidf", "--task", "massive-intent", "--data-dir", str(SAMPLES)]


def test_an_idle_host_gives_each_cpu_slot_its_fair_share():
    assert cpu_threads_rule(cores=4, load=0.0, own_threads=0, slots=1) == 4
    assert cpu_threads_rule(cores=4, load=0.0, own_threads=0, slots=2) == 2
    # A shell or the engine's own polling does not cost an idle host a core.
    assert cpu_threads_rule(cores=8, load=0.2, own_threads=0, slots=1) == 8
    # More slots than cores: still one thread each.
    assert cpu_threads_rule(cores=2, load=0.0, own_threads=0, slots=4) == 1


def test_a_busy_host_gives_fewer_threads_but_never_none():
    assert cpu_threads_rule(cores=4, load=3.2, own_threads=0, slots=1) == 1  # 0.8 of a core free
    assert cpu_threads_rule(cores=4, load=2.0, own_threads=0, slots=1) == 2
    assert cpu_threads_rule(cores=4, load=1.5, own_threads=0, slots=1) == 2  # a core half busy is not free
    assert cpu_threads_rule(cores=2, load=7.5, own_threads=0, slots=1) == 1
    assert cpu_threads_rule(cores=4, load=4.0, own_threads=0, slots=2) == 1


def test_the_engines_own_runs_count_once():
    # One own run of 2 threads has been training a while: the load of 2.0 is that run, so the second slot of a
    # 4-core host still gets the other 2 cores (a sum would count the run twice and give 1).
    assert cpu_threads_rule(cores=4, load=2.0, own_threads=2, slots=2) == 2
    # Launched a moment ago, before the load average caught up: its threads count anyway.
    assert cpu_threads_rule(cores=4, load=0.0, own_threads=3, slots=1) == 1
    # Other users' load beyond the own runs still counts.
    assert cpu_threads_rule(cores=8, load=7.0, own_threads=2, slots=2) == 1


def test_a_run_that_just_ended_leaves_its_threads_to_the_next():
    # A run that kept 1 thread busy for 150 s ended a second ago: of its load, about 0.9 still lingers.
    now = 1000.0
    lingering = lingering_load([(now - 1, 150.0, 1)], now)
    assert 0.88 < lingering < 0.92
    # Decayed after five minutes; a run of 6 s had barely raised the average.
    assert lingering_load([(now - 300, 150.0, 1)], now) < 0.01
    assert lingering_load([(now - 1, 6.0, 1)], now) < 0.1


def test_the_engine_gives_the_second_run_of_a_sequence_the_whole_idle_box(cli, monkeypatch):
    """The demo's case: two CPU runs one after the other on an idle 2-core box. The load average (1.0) is the first
    run's, which has ended: the second run must get 2 threads, not 1."""
    store = open_store()
    engine_id = queue.register_engine(store, socket.gethostname(), os.getpid(), [])
    engine = Engine(config=EngineConfig(url=store.url, gpus=[], max_cpu_runs=1), store=store, engine_id=engine_id)
    monkeypatch.setattr("clfbench.engine.daemon.host_cpu_load", lambda: (2, 1.0))
    spec = json.dumps({"method": "tfidf"})
    assert engine.cpu_threads({"spec_json": spec})[0] == 1  # someone else's load: 1 core left
    engine.ended_cpu_runs.append((time.monotonic() - 2, 170.0, 1))  # this engine's run, ended 2 s ago
    threads, why = engine.cpu_threads({"spec_json": spec})
    assert threads == 2, why
    assert "0.9 of it from this engine's runs that ended" in why


def test_this_hosts_cores_and_load_are_measured():
    cores, load = host_cpu_load()
    assert 1 <= cores <= (os.cpu_count() or 1)
    assert load >= 0.0


def test_threads_in_a_spec_is_validated_in_one_line():
    assert parse_spec({"method": "tfidf", "model": "tfidf", "task": "massive-intent", "threads": 2}).threads == 2
    for bad in (0, -1, "many"):
        with pytest.raises(ClfbenchError) as error:
            parse_spec({"method": "tfidf", "model": "tfidf", "task": "massive-intent", "threads": bad})
        assert str(error.value).startswith("invalid spec: threads:") and "\n" not in str(error.value)


def test_a_spec_without_threads_keeps_the_json_and_hash_it_had():
    spec = parse_spec({"method": "tfidf", "model": "tfidf", "task": "massive-intent"})
    assert "threads" not in json.loads(spec.canonical_json())
    pinned = parse_spec({"method": "tfidf", "model": "tfidf", "task": "massive-intent", "threads": 1})
    assert json.loads(pinned.canonical_json())["threads"] == 1 and pinned.spec_hash() != spec.spec_hash()
    stored = pinned.canonical_json()  # what the worker re-validates
    assert parse_spec(json.loads(stored)).threads == 1


def test_the_cli_refuses_threads_zero(cli, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"method: tfidf\nmodel: tfidf\ntask: massive-intent\ndata_dir: {SAMPLES}\nthreads: 0\n")
    refused = cli.run("queue", str(spec), check=False)
    assert refused.returncode != 0
    assert "threads" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert cli.json("ls") == []
    # The same field as a flag.
    flagged = cli.run("queue", *TFIDF, "--threads", "0", check=False)
    assert flagged.returncode != 0 and "threads" in flagged.stderr
    (queued,) = cli.json("queue", *TFIDF, "--threads", "3")
    assert queued["threads"] == 3


def test_the_launch_environment_takes_the_specs_threads_else_the_rule(cli, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"method: tfidf\nmodel: tfidf\ntask: massive-intent\ndata_dir: {SAMPLES}\nthreads: 1\n")
    (pinned,) = cli.json("queue", str(spec))
    (free,) = cli.json("queue", *TFIDF, "--priority", "-1")
    store = open_store()
    engine_id = queue.register_engine(store, socket.gethostname(), os.getpid(), [])
    engine = Engine(config=EngineConfig(url=store.url, gpus=[], max_cpu_runs=1), store=store, engine_id=engine_id)
    claim = dict(host=engine.host, engine_id=engine_id, default_gpus=0, free_gpus=0, cpu_free=True, api_free=True)

    run = queue.claim(store, **claim)
    assert run["id"] == pinned["id"]
    env, threads, why = engine.launch_env(run, [], tmp_path)
    assert env["CLFBENCH_CPU_THREADS"] == "1" and threads == 1 and "from the spec" in why
    assert env["CUDA_VISIBLE_DEVICES"] == ""

    run = queue.claim(store, **claim)
    assert run["id"] == free["id"]
    env, threads, why = engine.launch_env(run, [], tmp_path)
    cores, _load = host_cpu_load()
    assert 1 <= int(env["CLFBENCH_CPU_THREADS"]) <= cores and f"of {cores} cores" in why

    # A GPU run and an API run get no thread choice.
    env, threads, why = engine.launch_env(run, [0], tmp_path)
    assert "CLFBENCH_CPU_THREADS" not in env and env["CUDA_VISIBLE_DEVICES"] == "0" and threads == 0 and why == ""
    env, threads, why = engine.launch_env({**run, "launch": "process"}, [], tmp_path)
    assert "CLFBENCH_CPU_THREADS" not in env and threads == 0 and why == ""


def test_threads_from_the_spec_reach_the_worker(cli, tmp_path):
    cli.env.pop("OMP_NUM_THREADS", None)  # tfidf would take the smaller of the two
    spec = tmp_path / "spec.yaml"
    # With 64 CPU slots the engine's own rule gives 1 thread on any host up to 127 cores: 2 comes from the spec.
    spec.write_text(f"method: tfidf\nmodel: tfidf\ntask: massive-intent\ndata_dir: {SAMPLES}\nthreads: 2\n")
    (run,) = cli.json("queue", str(spec))
    (other,) = cli.json("queue", *TFIDF, "--seed", "1")  # threads left to the engine
    assert cli.run("engine", "--until-idle", "--max-cpu-runs", "64").returncode == 0
    shown = cli.json("show", str(run["id"]))
    assert shown["status"] == "succeeded", shown["error"]
    log = cli.run("logs", str(run["id"])).stdout
    assert "cpu threads: threads: 2 from the spec" in log
    assert "tfidf: cpu, 2 thread(s)" in log
    store = open_store()
    with store.read() as connection:
        events = connection.execute(text("SELECT kind, message FROM events WHERE run_id = :r"),
                                    {"r": run["id"]}).all()
    assert ("threads", "threads: 2 from the spec") in [tuple(event) for event in events]
    # An execution setting: both runs are one experiment in the results matrix (one row, two seeds).
    assert cli.json("show", str(other["id"]))["status"] == "succeeded"
    md = cli.run("results", "--format", "md").stdout
    (row,) = [line for line in md.splitlines() if line.startswith("| tfidf · tfidf |")]
    assert "±" in row, md  # a mean over both runs
