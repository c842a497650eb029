"""The command line: bad input gets one line that names the problem, and nothing half-written."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SAMPLES

BASE = ["--method", "encoder-finetune", "--model", "tiny-bert", "--data-dir", str(SAMPLES)]


def assert_one_line_error(result, *words: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in result.stderr + result.stdout


def write_spec(tmp_path: Path, text: str, name: str = "spec.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("spec_text, words", [
    ("method: encoder-finetune\nmodel: tiny-bert\ntask: massive-intent\nepochs: 3\n", ["epochs", "unknown key"]),
    ("method: encoder-finetune\nmodel: no-such-model\ntask: massive-intent\n", ["no-such-model"]),
    ("method: encoder-finetune\nmodel: tiny-bert\ntask: massive-intnt\n", ["unknown task", "massive-intnt"]),
    ("method: nope\nmodel: tiny-bert\ntask: massive-intent\n", ["unknown method", "nope"]),
    ("method: encoder-finetune\nmodel: tiny-bert\ntask: massive-intent\noptions: {lr: -1}\n", ["lr"]),
    ("method: encoder-finetune\nmodel: tiny-bert\ntask: massive-intent\noptions: {lrate: 1}\n", ["lrate", "unknown key"]),
    ("method: prompt\nmodel: tiny-llama\ntask: massive-slots\noptions: {decision: score}\n", ["score", "token"]),
    ("method: encoder-finetune\nmodel: tiny-bert\ntask: massive-intent+massive-slots+massive-scenario\n",
     ["at most 2 task"]),
    ("method: encoder-finetune\nmodel: tiny-bert\ntask: massive-intent\nseed: []\n", ["seed", "empty list"]),
    ("- just\n- a list\n", ["mapping"]),
    ("method: [unclosed\n", ["not valid YAML"]),
])
def test_bad_specs_are_refused_at_queue_time(cli, tmp_path, spec_text, words):
    result = cli.run("queue", write_spec(tmp_path, spec_text), "--data-dir", str(SAMPLES), check=False)
    assert_one_line_error(result, *words)
    assert cli.json("ls") == []


@pytest.mark.parametrize("option, words", [
    ("lr=inf", ["lr", "finite"]), ("lr=nan", ["lr", "finite"]), ("lr=1e30", ["lr", "less than or equal to 10"]),
    ("epochs=1e12", ["epochs", "1000"]), ("batch_size=1000000000", ["batch_size", "65536"]),
])
def test_non_finite_and_absurd_option_values_are_refused_at_queue_time(cli, option, words):
    result = cli.run("queue", *BASE, "--task", "massive-intent", "-o", option, check=False)
    assert_one_line_error(result, *words)
    assert cli.json("ls") == []


def test_non_utf8_spec_and_missing_files(cli, tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("method: encoder-finetune\nmodel: caf\xe9\n".encode("latin-1"))
    assert_one_line_error(cli.run("queue", str(path), check=False), "not UTF-8")
    assert_one_line_error(cli.run("queue", str(tmp_path / "nope.yaml"), check=False), "does not exist")
    assert_one_line_error(cli.run("queue", *BASE[:4], "--task", "massive-intent", "--data-dir",
                                  str(tmp_path / "no-data"), check=False), "no-data")


def test_missing_store_directory(cli, tmp_path):
    result = cli.run("--db", f"sqlite:///{tmp_path}/absent/x.db", "ls", check=False)
    assert_one_line_error(result, "store directory", "does not exist")
    assert not (tmp_path / "absent").exists()


def test_user_task_with_an_unknown_column_and_an_empty_split(cli, tmp_path):
    (tmp_path / "train.csv").write_text("utterance,label\nwake me up,alarm_set\n")
    (tmp_path / "test.csv").write_text("utterance,label\n")
    (tmp_path / "task.yaml").write_text(
        "name: my-task\nkind: sequence\nfiles: {train: train.csv, test: test.csv}\n"
        "text_column: text\nlabel_column: label\n"
    )
    result = cli.run("queue", *BASE, "--task", str(tmp_path / "task.yaml"), check=False)
    assert_one_line_error(result, "text")
    (tmp_path / "task.yaml").write_text(
        "name: my-task\nkind: sequence\nfiles: {train: train.csv, test: test.csv}\n"
        "text_column: utterance\nlabel_column: label\n"
    )
    assert_one_line_error(cli.run("queue", *BASE, "--task", str(tmp_path / "task.yaml"), check=False), "empty")
    assert cli.json("ls") == []


def test_a_label_outside_the_declared_label_set(cli, tmp_path):
    data = tmp_path / "massive_en"
    data.mkdir()
    rows = [json.loads(line) for line in (SAMPLES / "massive_en" / "train.jsonl").read_text().splitlines()[:20]]
    for split in ("train", "dev"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "test.jsonl").write_text(json.dumps(dict(rows[0], intent="order_pizza")) + "\n")
    result = cli.run("queue", *BASE[:4], "--task", "massive-intent", "--data-dir", str(tmp_path), check=False)
    assert_one_line_error(result, "order_pizza")


def test_a_sweep_expands_and_is_queued_whole_or_not_at_all(cli, tmp_path):
    spec = write_spec(tmp_path, "method: encoder-finetune\nmodel: tiny-bert\ntask: [massive-intent, 20ng-7class]\n"
                                "seed: [0, 1, 2]\noptions: {lr: [1.0e-4, 5.0e-5]}\n")
    dry = cli.json("queue", spec, "--data-dir", str(SAMPLES), "--dry-run")
    assert len(dry) == 12 and {d["seed"] for d in dry} == {0, 1, 2}
    assert {d["options"]["lr"] for d in dry} == {1e-4, 5e-5}
    assert dry[0]["options"]["epochs"] == 3.0  # defaults are filled into the stored spec
    assert cli.json("ls") == []  # dry run queued nothing
    bad = write_spec(tmp_path, "method: encoder-finetune\nmodel: tiny-bert\ntask: [massive-intent, 20ng-7class+20ng-20class+massive-intent]\n",
                     "bad.yaml")
    assert_one_line_error(cli.run("queue", bad, "--data-dir", str(SAMPLES), check=False), "sweep item 2")
    assert cli.json("ls") == []
    queued = cli.json("queue", spec, "--data-dir", str(SAMPLES))
    assert len(queued) == 12 and len(cli.json("ls")) == 12


def test_cancel_retry_show_and_rm(cli):
    (run,) = cli.json("queue", *BASE, "--task", "massive-intent")
    assert "cancelled" in cli.run("cancel", str(run["id"])).stdout
    assert cli.json("show", str(run["id"]))["status"] == "cancelled"
    assert "queued again" in cli.run("retry", str(run["id"])).stdout
    assert cli.json("show", str(run["id"]))["status"] == "queued"
    assert_one_line_error(cli.run("show", "999", check=False), "no run 999")
    from clfbench.storage.paths import run_dir
    from clfbench.storage.db import open_store

    folder = run_dir(open_store().url, run["id"])  # as if it had run: a log and a checkpoint
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "log.txt").write_text("old log\n")
    assert "deleted" in cli.run("rm", "-y", str(run["id"])).stdout
    assert cli.json("ls") == []
    # SQLite may hand the same id to the next run: it must not find the deleted run's log or checkpoint.
    assert not folder.exists()


def test_listing_commands(cli):
    tasks = {t["name"] for t in cli.json("tasks")["tasks"]}
    assert {"20ng-20class", "20ng-7class", "massive-intent", "massive-slots"} <= tasks
    models = {m["alias"] for m in cli.json("models")}
    assert {"minilm", "smollm2-135m", "mpnet-base"} <= models
    methods = cli.json("methods")
    assert methods[0]["name"] == "encoder-finetune"
    assert {"epochs", "lr", "batch_size"} <= {o["name"] for o in methods[0]["options"]}
    assert cli.run("results").stdout.startswith("no results yet")
    for fmt in ("md", "csv", "latex", "json"):
        cli.run("results", "--format", fmt)
    assert_one_line_error(cli.run("results", "--format", "xml", check=False), "unknown format")
    status = cli.json("engine", "status")
    assert status["engine_pid_on_this_host"] is None and status["queued"] == 0


def test_piped_ls_keeps_each_run_on_one_line(cli):
    cli.env.pop("COLUMNS", None)
    cli.json("queue", "--method", "encoder-finetune", "--model", "tiny-bert", "--task",
             "massive-intent+massive-slots", "--data-dir", str(SAMPLES))
    rows = [line for line in cli.run("ls").stdout.splitlines() if line.split()[:1] == ["1"]]
    assert len(rows) == 1 and "encoder-finetune" in rows[0] and "massive-intent+massive-slots" in rows[0]


def test_every_command_has_help(cli):
    for command in ("queue", "ls", "show", "logs", "cancel", "retry", "rm", "results", "errors", "tasks",
                    "models", "methods", "demo", "engine", "engine start", "engine stop", "engine status"):
        assert "Usage" in cli.run(*command.split(), "--help").stdout


# ------------------------------------------------------------------------------ queue-time task checks, tasks folder


def _user_sequence_task(folder: Path, name: str) -> str:
    """A copy of the shipped user task (its CSVs beside it) under another name; returns the YAML's path."""
    folder.mkdir(parents=True, exist_ok=True)
    for csv_file in (SAMPLES / "user_task").glob("*.csv"):
        (folder / csv_file.name).write_bytes(csv_file.read_bytes())
    text = (SAMPLES / "user_task" / "massive-subset.yaml").read_text()
    (folder / f"{name}.yaml").write_text(text.replace("name: massive-subset-intent", f"name: {name}"))
    return str(folder / f"{name}.yaml")


@pytest.mark.parametrize("method, model", [("prompt", "tiny-llama"), ("llm-finetune", "tiny-llama"),
                                           ("openai", "some-model")])
def test_a_prompt_run_on_a_task_pair_without_a_prompt_is_refused_at_queue_time(cli, tmp_path, method, model):
    first = _user_sequence_task(tmp_path, "first")
    second = _user_sequence_task(tmp_path, "second")
    base = ["queue", "--method", method, "--model", model, "--data-dir", str(SAMPLES)]
    assert_one_line_error(cli.run(*base, "--task", f"{first}+{second}", check=False),
                          "prompt set 'paper' has no zero-shot prompt for first+second")
    assert_one_line_error(cli.run(*base, "--task", "massive-intent+20ng-7class", "--shots", "5", check=False),
                          "no five-shot prompt for massive-intent+20ng-7class")
    assert cli.json("ls") == []
    # the message is the one the worker gives when the run starts (the prompt set's own selection)
    from clfbench.engine.prompting.library import load_prompt_set
    from clfbench.engine.types import ClfbenchError, TaskData

    with pytest.raises(ClfbenchError) as worker_error:
        load_prompt_set("paper").select([TaskData("first", "sequence", ["a"], [], []),
                                         TaskData("second", "sequence", ["a"], [], [])], 0)
    queue_error = cli.run(*base, "--task", f"{first}+{second}", check=False).stderr.strip()
    assert queue_error == f"error: {worker_error.value}"
    # a single user task has the generic prompt; a pair with its own prompt is queued
    cli.run(*base, "--task", first)
    cli.run(*base, "--task", "massive-intent+massive-slots")
    assert len(cli.json("ls")) == 2


def test_a_task_named_twice_in_one_run_is_refused_at_queue_time(cli, tmp_path):
    base = ["queue", "--method", "encoder-finetune", "--model", "tiny-bert", "--data-dir", str(SAMPLES)]
    assert_one_line_error(cli.run(*base, "--task", "massive-intent+massive-intent", check=False),
                          "task 'massive-intent' is named twice", "'massive-intent' is given twice")
    same_name = _user_sequence_task(tmp_path, "massive-intent")
    assert_one_line_error(cli.run(*base, "--task", f"massive-intent+{same_name}", check=False),
                          "task 'massive-intent' is named twice", same_name, "both define it")
    assert cli.json("ls") == []


def test_a_broken_file_in_the_tasks_folder_does_not_block_the_others(cli, tmp_path):
    folder = cli.home / "tasks"
    _user_sequence_task(folder, "good-task")
    (folder / "typo.yaml").write_text("name: typo\nkind: [unclosed\n")
    (folder / "ner.yaml").write_text("name: my-ner\nkind: token\ndataset: massive_en\ntags_column: slots\n"
                                     "labels: [O, PER, LOC]\n")
    listing = cli.run("tasks")
    assert listing.returncode == 0
    assert "good-task" in listing.stdout and "massive-intent" in listing.stdout
    skipped = listing.stderr.strip().splitlines()
    assert len(skipped) == 2 and all(line.startswith("skipped (broken): ") for line in skipped)
    assert "ner.yaml: labels: a token task lists slot types (PER, LOC) or full BIO tags; 'O' is not a slot type" \
        in skipped[0] and "typo.yaml" in skipped[1] and "invalid YAML" in skipped[1]
    as_json = cli.json("tasks")
    assert "good-task" in {t["name"] for t in as_json["tasks"]}
    assert [(b["name"], Path(b["path"]).name) for b in as_json["broken"]] == [("my-ner", "ner.yaml"),
                                                                             ("typo", "typo.yaml")]
    base = ["queue", "--method", "encoder-finetune", "--model", "tiny-bert", "--data-dir", str(SAMPLES)]
    cli.run(*base, "--task", "good-task")
    assert_one_line_error(cli.run(*base, "--task", "my-ner", check=False), "ner.yaml", "'O' is not a slot type")
    assert_one_line_error(cli.run(*base, "--task", "typo", check=False), "invalid YAML", "typo.yaml")
    assert [run["task"] for run in cli.json("ls")] == ["good-task"]


def test_retry_and_rm_of_a_running_run_refuse_and_exit_non_zero(cli):
    from clfbench.storage import queue
    from clfbench.storage.db import open_store

    first, second = (run["id"] for run in cli.json("queue", *BASE, "--task", "massive-intent", "--seed", "0",
                                                   "--seed", "1"))
    claimed = queue.claim(open_store(), host="h", engine_id=1, default_gpus=0, free_gpus=0, cpu_free=True,
                          api_free=True)
    assert claimed["id"] == first
    cli.run("cancel", str(second))
    retried = cli.run("retry", str(first), str(second), check=False)
    assert retried.returncode == 1
    assert f"run {first}: not retried (status running)" in retried.stdout
    assert f"run {second}: queued again" in retried.stdout  # the others are still done
    removed = cli.run("rm", "-y", str(first), check=False)
    assert removed.returncode == 1 and "not deleted (running)" in removed.stdout
    assert cli.json("show", str(first))["status"] == "running"


def test_ls_with_an_unknown_status_names_the_valid_ones(cli):
    assert_one_line_error(cli.run("ls", "--status", "bogus", check=False), "bogus", "queued", "running", "failed")
    assert cli.json("ls", "--status", "queued") == []


@pytest.mark.parametrize("url, words", [
    ("postgresql+nosuchdriver://user@localhost/db", ["no database driver", "postgresql+nosuchdriver"]),
    ("mysql://user@localhost/db", ["driver for mysql", "not installed", "MySQLdb"]),
])
def test_a_missing_database_driver_is_one_line(cli, url, words):
    assert_one_line_error(cli.run("--db", url, "ls", check=False), *words)


def test_ctrl_c_at_start_up_is_one_line_and_a_non_zero_exit(cli):
    import signal
    import time

    # Before the interpreter has imported clfbench.app, no program can catch Ctrl-C (it is Python's own start-up):
    # the first signal goes just after that, measured on this box as it is now (seconds on a loaded one).
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "import clfbench.app"], check=True, env=cli.env)
    interpreter = time.monotonic() - started
    # The three moments: during the command line's imports, the store's opening, the engine's start.
    for delay in (max(0.1, 1.5 * interpreter), 0.4 + interpreter, 1.0 + interpreter):
        engine = cli.popen("engine", "--foreground")
        time.sleep(delay)
        engine.send_signal(signal.SIGINT)
        output, _ = engine.communicate(timeout=60)
        assert engine.returncode != 0 or "engine: store" in output, (delay, output)
        assert "Traceback" not in output, (delay, output)
        if engine.returncode != 0:
            assert output.strip().splitlines()[-1] == "error: interrupted", (delay, output)


def test_run_folders_logs_and_locks_are_private_with_the_store_elsewhere(cli, tmp_path):
    import stat

    elsewhere = tmp_path / "stores"
    elsewhere.mkdir()
    url = f"sqlite:///{elsewhere}/other.db"
    cli.run("--db", url, "queue", "--method", "tfidf", "--model", "none", "--task", "massive-intent",
            "--data-dir", str(SAMPLES), "-o", "train_limit=40", "-o", "test_limit=10")
    assert not cli.home.exists()  # the store is elsewhere: the home is made by the engine, below
    cli.run("--db", url, "engine", "--until-idle")
    assert cli.json("--db", url, "ls")[0]["status"] == "succeeded"
    from clfbench.engine.daemon import engine_lock_path

    lock = engine_lock_path(url)  # per (store, host), outside the home (issue 16 item 3)
    made = [cli.home, *cli.home.rglob("*"), lock, lock.parent]
    assert any(path.name == "log.txt" for path in made) and lock.exists()
    for path in made:
        if path.parent.name in ("models", "features"):  # caches of public models: not run data
            continue
        wanted = 0o700 if path.is_dir() else 0o600
        assert stat.S_IMODE(path.stat().st_mode) == wanted, path


def test_ls_answers_at_once_while_another_process_holds_the_write_lock(cli):
    """A writer (an ingest batch, a long migration elsewhere) holds SQLite's write lock; `clfbench ls`, `show` and
    `results` neither wait for it (the busy timeout is 30 s) nor fail with "database is locked"."""
    import sqlite3
    import time

    (run,) = cli.json("queue", *BASE, "--task", "massive-intent")
    started = time.monotonic()
    cli.run("ls")
    idle = time.monotonic() - started
    holder = sqlite3.connect(cli.home / "clfbench.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        listed = cli.json("ls")
        held = time.monotonic() - started
        assert [r["id"] for r in listed] == [run["id"]]
        assert held < idle + 1.0, (held, idle)
        assert cli.json("show", str(run["id"]))["status"] == "queued"
        cli.run("results")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
