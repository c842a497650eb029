"""Datasets and tasks as data (YAML), and loading a task into `TaskData`.

A *dataset* definition (``engine/task_defs/<name>.dataset.yaml``) says where rows come from:

- ``local:`` a folder under the data dir (``dir``) and a file per split (``train``/``dev``/``test``), used when a
  data dir is given (``--data-dir`` / ``CLFBENCH_DATA``);
- ``files:`` file paths per split (absolute, or relative to the YAML file's folder), always used when present;
- ``hub:`` a Hugging Face dataset id (optional ``config``, ``revision``, ``data_dir``) and its split names, used
  when there is no data dir.

Each source may rename columns (``columns: {our_name: their_name}``) and derive columns with a *named* function
of ``engine.tasks.functions`` (``derive: [{function: massive_annot_to_bio, inputs: [annot_utt], outputs: [tokens,
slots]}]``). Hub ``ClassLabel`` integers are turned into their names from the dataset features.

A *task* definition (``engine/task_defs/<name>.yaml``) names a dataset (or carries its own ``files:``/``hub:``),
its kind (``sequence``: one label per text; ``token``: one BIO tag per whitespace token), the columns, an optional
label transform by name (``root``), an optional declared ``labels:`` list (a token task lists slot types or full
BIO tags), a ``description`` of the label and ``label_descriptions`` (what each label means; both for the generic
prompts).

User tasks use the same schema: ``$CLFBENCH_HOME/tasks/*.yaml`` (``CLFBENCH_HOME`` defaults to ``~/.clfbench``;
``*.dataset.yaml`` files there are dataset definitions), or a path passed as the task name (``.yaml``/``.yml``).

The modules, each importing only those above it:

- `functions`: the named functions YAML files refer to (derived columns, label transforms);
- `definitions`: the schema (pydantic models) and the registry (built-in and user definitions, lookup);
- `rows`: reading rows (JSONL/CSV/TSV/Parquet files, hub datasets), column mapping and derived columns;
- `examples`: rows -> examples, and the label set;
- `loading`: `load_task` and the queue-time `check_task`.

Import rule: no torch, transformers or datasets at import time (the CLI uses this package at queue time).
Local JSONL/CSV/TSV files are read with the standard library, Parquet with pyarrow (imported when needed),
hub datasets with ``datasets`` (imported inside the hub loader only). Loading writes nothing.
"""
from clfbench.engine.tasks.definitions import (
    BUILTIN_DIR,
    DATASET_SUFFIXES,
    BrokenDef,
    SAMPLE_DATA_DIR,
    SPLITS,
    DatasetDef,
    FilesSource,
    HubSource,
    LocalSource,
    TaskDef,
    broken_definitions,
    get_dataset,
    get_task,
    list_datasets,
    list_tasks,
    load_task_file,
    resolve_data_dir,
    sample_data_dir,
)
from clfbench.engine.tasks.functions import DERIVE_FUNCTIONS, LABEL_TRANSFORMS, label_root, massive_annot_to_bio
from clfbench.engine.tasks.loading import TEST_SUBSET_SEED, check_task, load_task

__all__ = [
    "BUILTIN_DIR",
    "DATASET_SUFFIXES",
    "SAMPLE_DATA_DIR",
    "SPLITS",
    "TEST_SUBSET_SEED",
    "DERIVE_FUNCTIONS",
    "LABEL_TRANSFORMS",
    "DatasetDef",
    "FilesSource",
    "HubSource",
    "LocalSource",
    "BrokenDef",
    "TaskDef",
    "broken_definitions",
    "check_task",
    "get_dataset",
    "get_task",
    "label_root",
    "list_datasets",
    "list_tasks",
    "load_task",
    "load_task_file",
    "massive_annot_to_bio",
    "resolve_data_dir",
    "sample_data_dir",
]
