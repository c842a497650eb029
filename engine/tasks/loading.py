"""Loading a task: choosing its source, reading the splits it needs, and the seeded subsets of ``train_limit``,
``dev_limit`` and ``test_limit`` (``load_task``); the same checks at queue time without the hub and without keeping the rows
(``check_task``)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from clfbench.engine.tasks.definitions import (
    SAMPLE_DATA_DIR,
    SPLITS,
    DatasetDef,
    Source,
    TaskDef,
    check_label_descriptions,
    one_line_error,
)
from clfbench.engine.tasks.examples import Gold, examples_of, label_set
from clfbench.engine.tasks.rows import Table, apply_columns, file_tables, hub_tables, split_paths
from clfbench.engine.types import Example, TaskData

TEST_SUBSET_SEED = 0  # test_limit always takes the same subset, whatever the run's seed
DEV_SUBSET_SEED = 0  # and so does dev_limit: dev scores of runs with different seeds compare the same examples


def _shuffled(examples: list[Example], seed: int) -> list[Example]:
    """A seeded shuffle that depends only on the seed and the ids (same on every machine and Python version)."""
    def key(ex: Example) -> bytes:
        return hashlib.sha256(f"{seed}\x00{ex.id}".encode("utf-8")).digest()

    return sorted(examples, key=key)


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise one_line_error(f"{name} must be a whole number >= 0, got {value!r}")


def _choose_source(task: TaskDef, ds: DatasetDef, data_dir: Path | None) -> str:
    """The task's own files, else the local folder when a data dir is given, else the hub."""
    if ds.files is not None:
        return "files"
    if data_dir is not None and ds.local is not None:
        return "local"
    if ds.hub is not None:
        return "hub"
    if ds.local is not None:
        raise one_line_error(f"task {task.name}: dataset {ds.name} has no hub source; set CLFBENCH_DATA or "
                             f"--data-dir to a folder with {ds.local.dir}/ (the shipped samples: {SAMPLE_DATA_DIR})")
    raise one_line_error(f"task {task.name}: dataset {ds.name} has no usable source")


def _wanted_splits(task: TaskDef, ds: DatasetDef, src: Source, need_train: bool) -> list[str]:
    """Test always; train when the method trains or the label set must come from it; dev when the method trains
    and the source has one. In SPLITS order."""
    needs_train_split = need_train or task.labels is None
    if "train" not in src.split_names() and needs_train_split:
        why = "this method needs one" if need_train else "declare labels: in the task to run without one"
        raise one_line_error(f"task {task.name}: dataset {ds.name} has no train split ({why})")
    wanted = {"test"}
    if needs_train_split:
        wanted.add("train")
    if need_train and "dev" in src.split_names():
        wanted.add("dev")
    return [s for s in SPLITS if s in wanted]


def _split_golds(task: TaskDef, src: Source, split: str, tables: list[Table]) -> list[Gold]:
    """The split's examples after the source's column mapping; an empty split is an error."""
    for table in tables:
        apply_columns(table, src)
    golds = examples_of(task, split, tables)
    if not golds:
        where = ", ".join(t.where for t in tables)
        raise one_line_error(f"empty split '{split}': {where} has no rows (task {task.name})")
    return golds


def _load(task: TaskDef, data_dir: Path | str | None, need_train: bool, allow_hub: bool
          ) -> tuple[list[str], dict[str, list[Example]]] | None:
    """The label set and the examples of the wanted splits; None when the source is the hub and ``allow_hub`` is
    false (nothing is downloaded at queue time)."""
    ds = task.dataset_def()
    data_dir = Path(data_dir).expanduser() if data_dir is not None and str(data_dir) != "" else None
    kind = _choose_source(task, ds, data_dir)
    if kind == "hub" and not allow_hub:
        return None
    src = {"files": ds.files, "local": ds.local, "hub": ds.hub}[kind]
    wanted = _wanted_splits(task, ds, src, need_train)
    if kind == "hub":
        tables = hub_tables(task, ds.hub, wanted)
    else:
        tables = file_tables(task, ds, wanted, data_dir)
    golds = {split: _split_golds(task, src, split, tables[split]) for split in wanted}
    train_where = ", ".join(t.where for t in tables.get("train", [])) or "no train split"
    labels = label_set(task, golds, train_where)
    try:  # declared labels were checked with the schema; a label set read from train only now
        check_label_descriptions(task.label_descriptions, labels, task.kind)
    except ValueError as error:
        raise one_line_error(f"{task.origin}: {error}") from None
    return labels, {split: [g.example for g in gs] for split, gs in golds.items()}


def load_task(task: TaskDef, data_dir: Path | str | None = None, train_limit: int | None = None,
              test_limit: int | None = None, seed: int = 0, need_train: bool = True,
              dev_limit: int | None = None) -> TaskData:
    """Load a task's examples.

    Rows come from the task's own files, else ``<data_dir>/<local dir>/`` when ``data_dir`` is given, else the
    hub. ``train_limit``: the first N of a ``seed``-ed shuffle of train. ``test_limit``: the first N of a shuffle
    with the fixed seed 0 (the same subset for every run and method); ``dev_limit`` likewise for the dev split.
    Without limits the file order is kept.
    The label set is the declared one, else it comes from the full train split (sorted; token tasks: "O", then
    B-x, I-x for each slot type x, sorted). The dev split is loaded when the dataset has one and ``need_train``;
    with ``need_train=False`` train and dev are empty (train is still read for the label set when no labels are
    declared).
    """
    _check_limit("train_limit", train_limit)
    _check_limit("test_limit", test_limit)
    _check_limit("dev_limit", dev_limit)
    loaded = _load(task, data_dir, need_train, allow_hub=True)
    assert loaded is not None
    labels, splits = loaded
    train = splits.get("train", []) if need_train else []
    dev = splits.get("dev", []) if need_train else []
    test = splits["test"]
    if train_limit is not None:
        train = _shuffled(train, seed)[:train_limit]
    if test_limit is not None:
        test = _shuffled(test, TEST_SUBSET_SEED)[:test_limit]
    if dev_limit is not None:
        dev = _shuffled(dev, DEV_SUBSET_SEED)[:dev_limit]
    return TaskData(name=task.name, kind=task.kind, labels=labels, train=train, test=test, dev=dev,
                    description=task.description, label_descriptions=dict(task.label_descriptions),
                    slot_metric=task.slot_rule)


def check_task(task: TaskDef, data_dir: Path | str | None = None) -> dict[str, list[str]] | None:
    """Queue-time check of a task's local or user files: they exist, are UTF-8, have the columns, are not empty,
    and their labels are valid. Returns the example ids of each split read (for checks across a run's tasks);
    None, having checked nothing, for hub sources (nothing is downloaded). Imports no torch/datasets."""
    loaded = _load(task, data_dir, need_train=True, allow_hub=False)
    if loaded is None:
        return None
    return {split: [example.id for example in examples] for split, examples in loaded[1].items()}


def data_files(task: TaskDef, data_dir: Path | str | None = None) -> dict[str, list[Path]] | None:
    """The files ``load_task`` reads for the task (train included), per split; None for a hub source."""
    ds = task.dataset_def()
    data_dir = Path(data_dir).expanduser() if data_dir is not None and str(data_dir) != "" else None
    kind = _choose_source(task, ds, data_dir)
    if kind == "hub":
        return None
    src = ds.files if kind == "files" else ds.local
    return split_paths(ds, _wanted_splits(task, ds, src, need_train=True), data_dir)[1]
