"""A task's identity is its content: the tasks of a run frozen at queue time, and checked again at run time.

`freeze_tasks` turns a run's task names into one entry per task, stored as JSON in ``runs.tasks_json``:

- ``name``, ``source`` ("built-in", or the YAML file it was read from) and ``yaml_sha256`` (of that file's bytes);
- ``definition``: the resolved task definition (``TaskDef.model_dump``; file paths already absolute), and
  ``dataset_definition`` when the task names a user dataset (a ``*.dataset.yaml`` in the tasks folder), so the
  worker rebuilds the task without reading either YAML again (`thaw_task`);
- ``data``: per split, each local file read with its sha256 and size; for a hub source the hub id, config,
  split and revision (nothing is downloaded at queue time, so nothing is hashed);
- ``identity``: a short hash of the definition (file paths left out) and the data hashes. Two tasks that share
  a name but differ in definition or data have different identities, and the results matrix shows them apart;
  the same data copied elsewhere keeps its identity.

Why freeze: a YAML edited (or deleted) after queueing must not change what a queued run trains on, and a result
must say which data it came from (`clfbench show`). A data file edited after queueing is found by its hash
before the run's results can be written (`check_data_unchanged`): the run fails with one line saying so rather
than train on data nobody validated; retrying it fails the same way (it is never silently re-frozen).

Files are read and hashed through engine.tasks.rows' cache, so freezing right after the queue-time check reads
nothing again. No torch here (the CLI and the TUI queue runs).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import PrivateAttr, ValidationError

from clfbench.engine.tasks.definitions import DatasetDef, TaskDef, get_task
from clfbench.engine.tasks.loading import data_files
from clfbench.engine.tasks.rows import file_digest
from clfbench.engine.types import ClfbenchError

BUILT_IN = "built-in"
IDENTITY_LENGTH = 12  # hex digits: short enough to read, long enough never to collide in one store


class FrozenTaskDef(TaskDef):
    """A task rebuilt from its frozen entry: its dataset is the frozen one, not looked up by name again."""

    _frozen_dataset: DatasetDef | None = PrivateAttr(default=None)

    def dataset_def(self, home: Path | str | None = None) -> DatasetDef:
        if self._frozen_dataset is not None:
            return self._frozen_dataset
        return super().dataset_def(home)


def _data_entry(task: TaskDef, data_dir: str | None) -> dict[str, list[dict[str, Any]]]:
    """Per split, the files the task reads with their sha256 and size; or the hub dataset it downloads."""
    files = data_files(task, data_dir)
    if files is None:
        hub = task.dataset_def().hub
        assert hub is not None
        return {split: [{"hub": hub.id, "config": hub.config, "split": getattr(hub, split),
                         "revision": hub.revision}] for split in hub.split_names()}
    data: dict[str, list[dict[str, Any]]] = {}
    for split, paths in files.items():
        data[split] = []
        for path in paths:
            sha256, size = file_digest(path)
            data[split].append({"path": str(Path(path).resolve()), "sha256": sha256, "bytes": size})
    return data


def _without_paths(definition: dict | None) -> dict | None:
    """A definition with its split file paths left out (the data hashes stand for the files' content)."""
    if not definition or not definition.get("files"):
        return definition
    return {**definition, "files": {k: v for k, v in definition["files"].items() if k not in ("train", "dev", "test")}}


def identity_of(entry: dict) -> str:
    """The short hash of a frozen task's content: definition and dataset definition without file paths, and
    per split the sha256 of each file (or the hub source)."""
    data = {split: [item.get("sha256") or item for item in items] for split, items in entry["data"].items()}
    content = {"definition": _without_paths(entry["definition"]),
               "dataset_definition": _without_paths(entry.get("dataset_definition")), "data": data}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode("utf-8")).hexdigest()[:IDENTITY_LENGTH]


def freeze_task(name: str, data_dir: str | None) -> dict:
    """One task's frozen entry (see the module docstring). Reads through the file cache: after the queue-time
    check of the task, nothing is read again."""
    task = get_task(name)
    source = task.origin
    entry: dict[str, Any] = {
        "name": task.name, "source": source,
        "yaml_sha256": None if source == BUILT_IN else file_digest(source)[0],
        "definition": task.model_dump(mode="json"),
    }
    inline = task.files is not None or task.hub is not None
    dataset = None if inline else task.dataset_def()
    if dataset is not None and dataset.origin != BUILT_IN:  # a user dataset: freeze it too
        entry["dataset_definition"] = dataset.model_dump(mode="json")
        entry["dataset_source"] = dataset.origin
    entry["data"] = _data_entry(task, data_dir)
    entry["identity"] = identity_of(entry)
    return entry


def freeze_tasks(task_names: list[str], data_dir: str | None) -> list[dict]:
    return [freeze_task(name, data_dir) for name in task_names]


def frozen_tasks(tasks_json: str | None) -> list[dict]:
    """A run's frozen entries; [] for a run queued before they were recorded (or without any)."""
    if not tasks_json:
        return []
    entries = json.loads(tasks_json)
    return entries if isinstance(entries, list) else []


def _not_loadable(entry: dict, error: ValidationError) -> ClfbenchError:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return ClfbenchError(f"task {entry['name']}: its definition frozen at queue time does not load in this "
                         f"clfbench ({where}: {first['msg']}); queue the run again")


def thaw_task(entry: dict) -> TaskDef:
    """The task definition frozen in `entry`, without reading its YAML (which may have changed since)."""
    definition = dict(entry["definition"])
    if definition.get("files") is not None or definition.get("hub") is not None:
        definition.pop("dataset", None)  # an inline source: the schema fills in the task's name again
    try:
        task = FrozenTaskDef.model_validate(definition)
        dataset = DatasetDef.model_validate(entry["dataset_definition"]) if entry.get("dataset_definition") else None
    except ValidationError as error:
        raise _not_loadable(entry, error) from None
    task._origin = entry["source"]
    if dataset is not None:
        dataset._origin = entry.get("dataset_source", entry["source"])
        task._frozen_dataset = dataset
    return task


def check_data_unchanged(entry: dict) -> None:
    """Every local data file of a frozen task still has the sha256 it had at queue time; else one line."""
    for items in entry["data"].values():
        for item in items:
            if "path" not in item:
                continue
            try:
                sha256, _size = file_digest(item["path"])
            except OSError:
                raise ClfbenchError(f"task {entry['name']}: data file {item['path']} is gone since the run was "
                                    "queued; restore it or queue the run again") from None
            if sha256 != item["sha256"]:
                raise ClfbenchError(f"task {entry['name']}: data file {item['path']} changed after the run was "
                                    f"queued (sha256 {item['sha256'][:8]}.. now {sha256[:8]}..); queue it again")


def task_for_user(entries: list[dict], spec_tasks: list[str], given: str | None) -> str:
    """The stored task name a user means: `given` as a task name, the YAML path they typed, or its absolute
    path; the run's first task when `given` is None. Runs without frozen entries map a YAML path through the
    YAML's current ``name:``. A name that matches nothing is returned as given (the caller says it has no
    predictions)."""
    if given is None:
        if entries:
            return entries[0]["name"]
        given = spec_tasks[0]
    if any(entry["name"] == given for entry in entries):
        return given
    if not given.endswith((".yaml", ".yml")):
        return given
    path = str(Path(given).expanduser().resolve())
    for entry in entries:
        if entry["source"] == path:
            return entry["name"]
    try:
        return get_task(path).name
    except ClfbenchError:
        return given
