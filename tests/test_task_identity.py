"""A task's identity is its content: runs keep their tasks as queued (definition and data hashes), the results
matrix keeps two tasks that share a name apart, `clfbench errors` finds a YAML-path task's predictions, and the
queue reads each data file once and refuses a joint run whose datasets' ids disagree."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from clfbench.engine.types import ClfbenchError
from conftest import ROOT, SAMPLES

USER_TASK = SAMPLES / "user_task"
MASSIVE = SAMPLES / "massive_en"


def subset_task(folder: Path, name: str = "mytask", label: str = "intent_name") -> Path:
    """A copy of the shipped user task (MASSIVE subset CSVs) in `folder`, named `name`, labelled by `label`."""
    folder.mkdir(parents=True, exist_ok=True)
    for csv in ("massive_subset_train.csv", "massive_subset_test.csv"):
        shutil.copy(USER_TASK / csv, folder / csv)
    path = folder / "task.yaml"
    path.write_text(f"name: {name}\nkind: sequence\nfiles:\n  train: massive_subset_train.csv\n"
                    f"  test: massive_subset_test.csv\n  columns: {{id: uid, text: utterance, label: {label}}}\n"
                    "text_column: text\nlabel_column: label\n")
    return path


def massive_task(folder: Path, name: str = "mytask") -> Path:
    """A task on the shipped MASSIVE sample (other data than the subset), named `name`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "task.yaml"
    path.write_text(f"name: {name}\nkind: sequence\nfiles:\n  train: {MASSIVE / 'train.jsonl'}\n"
                    f"  test: {MASSIVE / 'test.jsonl'}\ntext_column: text\nlabel_column: intent\n")
    return path


def queue_tfidf(cli, task: str) -> int:
    (run,) = cli.json("queue", "--method", "tfidf", "--model", "tfidf", "--task", task)
    return run["id"]


def run_engine(cli) -> None:
    cli.env["OMP_NUM_THREADS"] = "1"
    assert cli.run("engine", "--until-idle").returncode == 0


def test_two_tasks_sharing_a_name_stay_apart_and_errors_finds_a_yaml_task(cli, tmp_path):
    first_yaml = subset_task(tmp_path / "a")
    second_yaml = massive_task(tmp_path / "b")
    typed = os.path.relpath(first_yaml, ROOT)  # the CLI runs in ROOT: the path as a user there types it
    first = queue_tfidf(cli, typed)
    second = queue_tfidf(cli, str(second_yaml))
    run_engine(cli)
    shown = {run: cli.json("show", str(run)) for run in (first, second)}
    assert [shown[run]["status"] for run in (first, second)] == ["succeeded", "succeeded"], shown
    accuracy = {run: shown[run]["results"]["mytask"]["accuracy"] for run in (first, second)}
    assert accuracy[first] != accuracy[second]

    table = cli.run("results")
    assert "mytask (2)" in table.stdout
    assert (f"warning: task 'mytask' names 2 different task definitions/data: runs {first} vs {second}; shown as "
            f"mytask and mytask (2)") in " ".join(table.stdout.split())
    matrix = json.loads(cli.run("results", "--format", "json").stdout)
    assert matrix["columns"] == ["mytask", "mytask (2)"]
    (row,) = matrix["rows"]
    assert {column: (cell["n"], cell["runs"], cell["mean"]) for column, cell in row["cells"].items()} == {
        "mytask": (1, [first], accuracy[first]), "mytask (2)": (1, [second], accuracy[second])}
    assert len(matrix["warnings"]) == 1
    csv = cli.run("results", "--format", "csv")
    assert "warning" not in csv.stdout and "names 2 different task definitions" in csv.stderr

    # `errors`: by default the run's task, by its name, by the path as typed and as the absolute path.
    default = cli.run("errors", str(first)).stdout
    assert f"run {first} · mytask · accuracy" in default and "alarm_query" in default
    for given in ("mytask", typed, str(first_yaml)):
        assert cli.json("errors", str(first), "--task", given) == cli.json("errors", str(first))
    # A run queued before tasks were frozen maps its YAML path through the YAML's name.
    with sqlite3.connect(cli.home / "clfbench.db") as connection:
        connection.execute("UPDATE runs SET tasks_json = NULL WHERE id = ?", (first,))
    assert "alarm_query" in cli.run("errors", str(first), "--task", typed).stdout
    assert cli.json("errors", str(first))["accuracy"] == accuracy[first]


def test_a_queued_run_keeps_its_task_and_fails_when_its_data_changed(cli, tmp_path):
    edited_yaml = subset_task(tmp_path / "a", name="intents")
    kept = queue_tfidf(cli, str(edited_yaml))
    # After queueing: another label column and name; the run trains on what was queued.
    subset_task(tmp_path / "a", name="scenarios", label="scenario_name")
    changed_yaml = subset_task(tmp_path / "b", name="changing")
    changed = queue_tfidf(cli, str(changed_yaml))
    train = tmp_path / "b" / "massive_subset_train.csv"
    train.write_text(train.read_text() + "massive-99999,wake me up at seven,alarm_set,alarm\n")
    run_engine(cli)

    shown = cli.json("show", str(kept))
    assert shown["status"] == "succeeded", shown
    assert list(shown["results"]) == ["intents"]
    labels = cli.json("errors", str(kept))["per_label"]
    assert "alarm_query" in labels and "alarm" not in labels  # intents, not the scenarios the YAML says now
    (task,) = shown["tasks"]
    assert task["source"] == str(edited_yaml) and task["definition"]["files"]["columns"]["label"] == "intent_name"

    failed = cli.json("show", str(changed))
    assert failed["status"] == "failed"
    first_line = failed["error"].splitlines()[0]  # the engine appends the log's tail below it
    assert first_line.startswith(f"task changing: data file {train} changed after the run was queued (sha256 ")
    assert first_line.endswith(f".. now {hashlib.sha256(train.read_bytes()).hexdigest()[:8]}..); queue it again")
    assert cli.run("retry", str(changed)).returncode == 0  # retried, not re-frozen: fails the same way
    run_engine(cli)
    again = cli.json("show", str(changed))
    assert again["status"] == "failed" and again["error"].splitlines()[0] == first_line

    text = cli.run("show", str(kept)).stdout
    assert f"intents · {edited_yaml} (sha256 " in text
    assert f"{tmp_path / 'a' / 'massive_subset_train.csv'}  sha256 {task['data']['train'][0]['sha256'][:12]}  7.1 kB" \
        in text


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def joint_pair(folder: Path, token_test_ids: list[str]) -> str:
    """An intent task and a slot task as two YAML files over their own JSONL files; the slot task's test ids
    are `token_test_ids` (the intent task's are 1, 2, 3)."""
    folder.mkdir(parents=True, exist_ok=True)
    words = ["wake me up", "play some jazz", "turn the lights off"]
    intents = ["alarm_set", "play_music", "iot_off"]
    for split, ids in (("train", ["10", "11", "12"]), ("test", ["1", "2", "3"])):
        _jsonl(folder / f"intent_{split}.jsonl",
               [{"id": i, "text": t, "intent": label} for i, t, label in zip(ids, words, intents)])
    for split, ids in (("train", ["10", "11", "12"]), ("test", token_test_ids)):
        _jsonl(folder / f"slots_{split}.jsonl",
               [{"id": i, "text": t, "tags": " ".join("B-x" if n == 0 else "O" for n, _ in enumerate(t.split()))}
                for i, t in zip(ids, words)])
    (folder / "intent.yaml").write_text("name: pair-intent\nkind: sequence\nfiles: {train: intent_train.jsonl, "
                                        "test: intent_test.jsonl}\nlabel_column: intent\n")
    (folder / "slots.yaml").write_text("name: pair-slots\nkind: token\nfiles: {train: slots_train.jsonl, "
                                       "test: slots_test.jsonl}\ntags_column: tags\n")
    return f"{folder / 'intent.yaml'}+{folder / 'slots.yaml'}"


def test_a_joint_run_whose_ids_disagree_is_refused_at_queue_time(cli, tmp_path):
    ok = joint_pair(tmp_path / "same", ["1", "2", "3"])
    assert cli.run("queue", "--method", "encoder-finetune", "--model", "tiny-bert", "--task", ok,
                   "--dry-run").returncode == 0
    bad = joint_pair(tmp_path / "other", ["1", "2", "7"])
    refused = cli.run("queue", "--method", "encoder-finetune", "--model", "tiny-bert", "--task", bad, check=False)
    assert refused.returncode == 1
    assert refused.stderr.strip().count("\n") == 0
    assert ("joint tasks pair-intent and pair-slots must have the same examples: their test splits hold 3 and 3 "
            "ids, 2 shared (2 in one only, e.g. '3' only in pair-intent)") in refused.stderr
    assert cli.json("ls") == []


def test_queueing_a_sweep_reads_and_hashes_each_file_once_and_freezes_the_tasks(home, tmp_path):
    from clfbench.engine.submit import build_specs, new_runs
    from clfbench.engine.tasks import rows
    from clfbench.engine.worker import load_tasks

    task_yaml = subset_task(tmp_path / "a")
    files = [str((tmp_path / "a" / name).resolve())
             for name in ("massive_subset_train.csv", "massive_subset_test.csv")]
    specs = build_specs(None, {"method": "tfidf", "model": "tfidf", "task": str(task_yaml),
                               "seed": list(range(20))}, {})
    runs = new_runs(specs, priority=0)
    assert [rows.file_reads[path] for path in files] == [1, 1]
    frozen = [json.loads(run.tasks_json) for run in runs]
    assert all(entries == frozen[0] for entries in frozen)
    (entry,) = frozen[0]
    assert entry["name"] == "mytask" and entry["source"] == str(task_yaml.resolve())
    assert [item["path"] for split in ("train", "test") for item in entry["data"][split]] == files

    # The worker rebuilds the task from the frozen entry: the YAML may be gone.
    task_yaml.unlink()
    (task,) = load_tasks(specs[0], runs[0].tasks_json)
    assert task.name == "mytask" and len(task.train) == 94 and "alarm_query" in task.labels
    with pytest.raises(ClfbenchError, match="task file not found"):
        load_tasks(specs[0], None)  # a run queued before tasks were frozen looks its YAML up again


def test_a_task_on_a_user_dataset_freezes_the_dataset_too(home, tmp_path):
    from clfbench.engine.tasks import load_task
    from clfbench.engine.tasks.identity import freeze_task, thaw_task

    folder = home / "tasks"
    folder.mkdir(parents=True)
    for csv in ("massive_subset_train.csv", "massive_subset_test.csv"):
        shutil.copy(USER_TASK / csv, folder / csv)
    (folder / "subset.dataset.yaml").write_text(
        "name: subset\nfiles:\n  train: massive_subset_train.csv\n  test: massive_subset_test.csv\n"
        "  columns: {id: uid, text: utterance, label: intent_name}\n")
    (folder / "intents.yaml").write_text("name: intents\nkind: sequence\ndataset: subset\nlabel_column: label\n")
    entry = json.loads(json.dumps(freeze_task("intents", None)))
    assert entry["dataset_source"] == str(folder / "subset.dataset.yaml") and list(entry["data"]) == ["train", "test"]
    (folder / "subset.dataset.yaml").unlink()
    (folder / "intents.yaml").unlink()
    task = load_task(thaw_task(entry))
    assert (task.name, len(task.train), len(task.test)) == ("intents", 94, 38)


def test_the_same_data_elsewhere_keeps_its_identity_and_other_data_does_not(home, tmp_path):
    from clfbench.engine.tasks.identity import freeze_task

    first = freeze_task(str(subset_task(tmp_path / "a")), None)
    copy = freeze_task(str(subset_task(tmp_path / "b")), None)
    relabelled = freeze_task(str(subset_task(tmp_path / "c", label="scenario_name")), None)
    other = freeze_task(str(massive_task(tmp_path / "d")), None)
    assert first["identity"] == copy["identity"]
    assert len({first["identity"], relabelled["identity"], other["identity"]}) == 3


def test_the_results_screen_says_a_name_stands_for_two_tasks_and_opens_the_right_one(home, tmp_path):
    from clfbench.app.tui.errors import ErrorsScreen
    from clfbench.app.tui.matrix_view import MatrixView
    from clfbench.storage import queue
    from clfbench.storage.db import open_store
    from tests.test_tui_results import make_app, open_results, run_app, settle

    store = open_store()
    for identity, predicted in (("aaa", "alarm_set"), ("bbb", "play_music")):
        queue.enqueue(store, [queue.NewRun(method="tfidf", model="tfidf", task="mytask", shots=0, seed=0,
                                           spec_json="{}", spec_hash="h", launch="process", gpus_requested=None,
                                           nproc=1, tasks_json=json.dumps([{"name": "mytask", "identity": identity}]))])
        run = queue.claim(store, host="h", engine_id=1, default_gpus=0, free_gpus=0, cpu_free=True, api_free=True)
        queue.finish_succeeded(store, run["id"], run["attempt"],
                               [dict(task="mytask", example_id="1", text="wake me up", gold="alarm_set",
                                     predicted=predicted)],
                               [dict(task="mytask", metric="accuracy", value=float(predicted == "alarm_set"))])

    async def scenario(pilot):
        screen = await open_results(pilot)
        assert screen.columns == ["mytask", "mytask (2)"]
        notice = str(screen.query_one("#notice").render())
        assert notice == ("warning: task 'mytask' names 2 different task definitions/data: runs 1 vs 2; shown as "
                          "mytask and mytask (2)")
        screen.query_one("#matrix", MatrixView).move_cursor(row=0, column=2)
        await pilot.press("enter")
        await settle(pilot)
        await settle(pilot)
        errors = pilot.app.screen
        assert isinstance(errors, ErrorsScreen)
        assert (errors.run_id, errors.task_name) == (2, "mytask")  # the stored name, not the column's label

    run_app(make_app(store.url), scenario)
