"""Datasets and tasks as data (YAML), and loading a task into `TaskData`.

A *dataset* definition (``engine/task_defs/<name>.dataset.yaml``) says where rows come from:

- ``local:`` a folder under the data dir (``dir``) and a file per split (``train``/``dev``/``test``), used when a
  data dir is given (``--data-dir`` / ``CLFBENCH_DATA``);
- ``files:`` file paths per split (absolute, or relative to the YAML file's folder), always used when present;
- ``hub:`` a Hugging Face dataset id (optional ``config``, ``revision``, ``data_dir``) and its split names, used
  when there is no data dir.

Each source may rename columns (``columns: {our_name: their_name}``) and derive columns with a *named* function
of this module (``derive: [{function: massive_annot_to_bio, inputs: [annot_utt], outputs: [tokens, slots]}]``).
Hub ``ClassLabel`` integers are turned into their names from the dataset features.

A *task* definition (``engine/task_defs/<name>.yaml``) names a dataset (or carries its own ``files:``/``hub:``),
its kind (``sequence``: one label per text; ``token``: one BIO tag per whitespace token), the columns, an optional
label transform by name (``root``), an optional declared ``labels:`` list and a ``description`` of the label.

User tasks use the same schema: ``$CLFBENCH_HOME/tasks/*.yaml`` (``CLFBENCH_HOME`` defaults to ``~/.clfbench``;
``*.dataset.yaml`` files there are dataset definitions), or a path passed as the task name (``.yaml``/``.yml``).

Import rule: no torch, transformers or datasets at import time (the CLI uses this module at queue time).
Local JSONL/CSV/TSV files are read with the standard library, Parquet with pyarrow (imported when needed),
hub datasets with ``datasets`` (imported inside the hub loader only). Loading writes nothing.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from clfbench.engine.types import ClfbenchError, Example, TaskData, TaskKind
from clfbench.storage import paths

__all__ = [
    "DERIVE_FUNCTIONS",
    "LABEL_TRANSFORMS",
    "DatasetDef",
    "FilesSource",
    "HubSource",
    "LocalSource",
    "TaskDef",
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

SPLITS: tuple[str, ...] = ("train", "dev", "test")
BUILTIN_DIR = Path(__file__).resolve().parent / "task_defs"
SAMPLE_DATA_DIR = Path(__file__).resolve().parent / "sample_data"  # package data: the demo runs on it
DATASET_SUFFIXES = (".dataset.yaml", ".dataset.yml")
TEST_SUBSET_SEED = 0  # test_limit always takes the same subset, whatever the run's seed


# --------------------------------------------------------------------------------------------------------------
# Named functions that YAML files refer to
# --------------------------------------------------------------------------------------------------------------

_SPAN = re.compile(r"\[\s*([^\[\]:\s]+)\s*:([^\[\]]*)\]")


def massive_annot_to_bio(annot_utt: str) -> tuple[list[str], list[str]]:
    """Turn a MASSIVE annotated utterance into whitespace tokens and BIO tags.

    ``"wake me up at [time : five am]"`` -> ``(["wake", "me", "up", "at", "five", "am"],
    ["O", "O", "O", "O", "B-time", "I-time"])``. Raises ValueError on a malformed annotation.
    """
    if not isinstance(annot_utt, str):
        raise ValueError(f"annotation is not a string: {annot_utt!r}")
    tokens: list[str] = []
    tags: list[str] = []

    def plain(chunk: str) -> None:
        if "[" in chunk or "]" in chunk:
            raise ValueError(f"unbalanced brackets in annotation {annot_utt!r}")
        for word in chunk.split():
            tokens.append(word)
            tags.append("O")

    pos = 0
    for m in _SPAN.finditer(annot_utt):
        plain(annot_utt[pos : m.start()])
        words = m.group(2).split()
        if not words:
            raise ValueError(f"empty slot span [{m.group(1)} : ] in annotation {annot_utt!r}")
        for i, word in enumerate(words):
            tokens.append(word)
            tags.append(("B-" if i == 0 else "I-") + m.group(1))
        pos = m.end()
    plain(annot_utt[pos:])
    return tokens, tags


def label_root(label: str) -> str:
    """``talk.religion.misc`` -> ``talk`` (the 20 Newsgroups 7-class task)."""
    return label.split(".", 1)[0]


# name -> function(*input values) -> tuple of output values (one per output column)
DERIVE_FUNCTIONS: dict[str, Callable[..., tuple[Any, ...]]] = {"massive_annot_to_bio": massive_annot_to_bio}
# name -> function(label) -> label (sequence tasks)
LABEL_TRANSFORMS: dict[str, Callable[[str], str]] = {"root": label_root}


# --------------------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Derive(_Strict):
    """Columns computed from other columns by a named function of this module."""

    function: str
    inputs: list[str] = Field(min_length=1)
    outputs: list[str] = Field(min_length=1)

    @field_validator("function")
    @classmethod
    def _known_function(cls, v: str) -> str:
        if v not in DERIVE_FUNCTIONS:
            raise ValueError(f"unknown function '{v}' (known: {', '.join(sorted(DERIVE_FUNCTIONS))})")
        return v


FileFormat = Literal["jsonl", "csv", "tsv", "parquet"]
FileList = str | list[str]


class _SourceBase(_Strict):
    columns: dict[str, str] = Field(default_factory=dict, description="our column name -> the source's column name")
    derive: list[Derive] = Field(default_factory=list)

    def split_names(self) -> list[str]:
        return [s for s in SPLITS if getattr(self, s) is not None]

    @model_validator(mode="after")
    def _has_test(self):
        if getattr(self, "test") is None:
            raise ValueError("a 'test' split is required")
        return self


class LocalSource(_SourceBase):
    """Files under ``<data dir>/<dir>/``, used when a data dir is given."""

    dir: str
    format: FileFormat | None = None  # default: from each file's extension
    train: FileList | None = None
    dev: FileList | None = None
    test: FileList | None = None


class FilesSource(_SourceBase):
    """File paths per split: absolute, or relative to the folder of the YAML file that names them."""

    format: FileFormat | None = None
    train: FileList | None = None
    dev: FileList | None = None
    test: FileList | None = None

    @field_validator("train", "dev", "test")
    @classmethod
    def _resolve(cls, v: FileList | None, info: ValidationInfo) -> FileList | None:
        base = (info.context or {}).get("base_dir")
        if v is None or base is None:
            return v

        def one(p: str) -> str:
            path = Path(p).expanduser()
            return str(path if path.is_absolute() else Path(base) / path)

        return one(v) if isinstance(v, str) else [one(p) for p in v]


class HubSource(_SourceBase):
    """A Hugging Face hub dataset; ``train``/``dev``/``test`` give the hub's split names."""

    id: str
    config: str | None = None
    revision: str | None = None
    data_dir: str | None = None
    train: str | None = None
    dev: str | None = None
    test: str | None = None


class DatasetDef(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    licence: str = ""
    local: LocalSource | None = None
    files: FilesSource | None = None
    hub: HubSource | None = None

    _origin: str = PrivateAttr(default="built-in")

    @property
    def origin(self) -> str:
        """"built-in", or the YAML file it was read from."""
        return self._origin

    @model_validator(mode="after")
    def _has_source(self):
        if self.local is None and self.files is None and self.hub is None:
            raise ValueError("a dataset needs at least one of 'local', 'files' or 'hub'")
        return self

    def summary(self) -> str:
        parts = []
        if self.files is not None:
            paths = [p for s in self.files.split_names() for p in _as_list(getattr(self.files, s))]
            parts.append(f"files {paths[0]}" + (f" (+{len(paths) - 1} more)" if len(paths) > 1 else ""))
        if self.local is not None:
            names = [p for s in self.local.split_names() for p in _as_list(getattr(self.local, s))]
            parts.append(f"local {self.local.dir}/{{{','.join(names)}}}")
        if self.hub is not None:
            h = self.hub
            config = (f" ({h.config})" if h.config else "") + (f" [{h.data_dir}]" if h.data_dir else "")
            parts.append(f"hub {h.id}{config}")
        return f"{self.name}: " + " | ".join(parts)


class TaskDef(_Strict):
    """One task. ``dataset`` names a dataset definition, or the task carries its own ``files:`` / ``hub:``
    (then ``dataset`` is the task's name)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    kind: TaskKind
    description: str = Field("label", description="what the label is, for prompts: 'news category', 'intent', 'slot'")
    dataset: str
    files: FilesSource | None = None
    hub: HubSource | None = None
    text_column: str | None = "text"  # token tasks may set null: the text is then the tokens joined by spaces
    label_column: str | None = None  # sequence tasks
    tokens_column: str | None = None  # token tasks; null: the text split on whitespace
    tags_column: str | None = None  # token tasks
    label_transform: str | None = None
    labels: list[str] | None = None  # declared label set; token tasks may list slot types or full BIO tags
    # Metrics over this task and the other task of a joint run (a sequence task with a token task), e.g.
    # exact_match: the label and every tag of the same text right (MASSIVE's official exact match).
    joint_metrics: list[Literal["exact_match"]] = Field(default_factory=list)

    _origin: str = PrivateAttr(default="built-in")

    @property
    def origin(self) -> str:
        """"built-in", or the YAML file it was read from."""
        return self._origin

    @model_validator(mode="before")
    @classmethod
    def _dataset_or_inline(cls, data: Any) -> Any:
        if isinstance(data, dict):
            inline = data.get("files") is not None or data.get("hub") is not None
            if inline and data.get("dataset") is not None:
                raise ValueError("give either 'dataset' (a dataset name) or 'files'/'hub', not both")
            if not inline and data.get("dataset") is None:
                raise ValueError("a task needs 'dataset' (a dataset name) or its own 'files' or 'hub'")
            if inline:
                data = {**data, "dataset": data.get("name")}
        return data

    @field_validator("label_transform")
    @classmethod
    def _known_transform(cls, v: str | None) -> str | None:
        if v is not None and v not in LABEL_TRANSFORMS:
            raise ValueError(f"unknown label_transform '{v}' (known: {', '.join(sorted(LABEL_TRANSFORMS))})")
        return v

    @field_validator("labels")
    @classmethod
    def _normalise_labels(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if v is None:
            return None
        if not v:
            raise ValueError("labels must not be empty")
        if len(set(v)) != len(v):
            dup = sorted({x for x in v if v.count(x) > 1})
            raise ValueError(f"duplicate labels: {', '.join(dup)}")
        if info.data.get("kind") == "token":
            if all(x == "O" or x.startswith(("B-", "I-")) for x in v):
                if "O" not in v:
                    raise ValueError("BIO labels must include 'O'")
                return ["O"] + [x for x in v if x != "O"]
            return _bio_labels(v)
        return list(v)

    @model_validator(mode="after")
    def _columns_fit_kind(self):
        if self.kind == "sequence":
            if not self.label_column:
                raise ValueError("a sequence task needs 'label_column'")
            if not self.text_column:
                raise ValueError("a sequence task needs 'text_column'")
            for k in ("tokens_column", "tags_column"):
                if getattr(self, k) is not None:
                    raise ValueError(f"'{k}' is for token tasks (this task has kind: sequence)")
        else:
            if not self.tags_column:
                raise ValueError("a token task needs 'tags_column'")
            if not self.text_column and not self.tokens_column:
                raise ValueError("a token task needs 'text_column' or 'tokens_column'")
            if self.label_column is not None:
                raise ValueError("'label_column' is for sequence tasks (this task has kind: token; use tags_column)")
            if self.label_transform is not None:
                raise ValueError("'label_transform' is for sequence tasks")
        return self

    # -- helpers ---------------------------------------------------------------------------------------------

    def dataset_def(self, home: Path | str | None = None) -> DatasetDef:
        """The dataset definition: the task's own ``files``/``hub``, else the named (built-in or user) dataset."""
        if self.files is not None or self.hub is not None:
            d = DatasetDef(name=self.dataset, files=self.files, hub=self.hub)
            d._origin = self._origin
            return d
        return get_dataset(self.dataset, home=home)

    def source_summary(self) -> str:
        """One line for ``clfbench tasks``: where the rows come from."""
        try:
            return self.dataset_def().summary()
        except ClfbenchError:
            return f"{self.dataset}: (unknown dataset)"


# --------------------------------------------------------------------------------------------------------------
# Registry: built-in definitions and user definitions from the home
# --------------------------------------------------------------------------------------------------------------


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def _err(msg: str) -> ClfbenchError:
    return ClfbenchError(_one_line(msg))


def _as_list(v: FileList | None) -> list[str]:
    return [] if v is None else [v] if isinstance(v, str) else list(v)


def _is_dataset_file(path: Path) -> bool:
    return path.name.endswith(DATASET_SUFFIXES)


def _validation_error(e: ValidationError, path: Path, is_dataset: bool) -> ClfbenchError:
    errors = e.errors()
    first = errors[0]
    loc = [str(p) for p in first["loc"]]
    if first["type"] == "extra_forbidden":
        key = loc[-1]
        where = f" under '{'.'.join(loc[:-1])}'" if len(loc) > 1 else ""
        msg = f"unknown key '{key}'{where}"
        if not is_dataset and len(loc) == 1 and key in ("local", "columns", "derive", "train", "test", "dev"):
            msg += " (a task names a 'dataset' or has its own 'files:'/'hub:'; dataset files are named *.dataset.yaml)"
    elif first["type"] == "missing":
        msg = f"missing key '{'.'.join(loc)}'"
    else:
        text = first["msg"].removeprefix("Value error, ")
        msg = f"{'.'.join(loc)}: {text}" if loc else text
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return _err(f"{path}: {msg}{more}")


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _err(f"task file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise _err(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise _err(f"cannot read {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise _err(f"invalid YAML in {path}{at}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise _err(f"{path}: expected a mapping of keys (name:, kind:, ...), got {type(data).__name__}")
    return data


def _load_def(path: Path) -> DatasetDef | TaskDef:
    path = Path(path).expanduser().resolve()
    data = _read_yaml(path)
    is_dataset = _is_dataset_file(path)
    if "name" not in data:
        stem = path.name
        for suffix in (*DATASET_SUFFIXES, ".yaml", ".yml"):
            stem = stem.removesuffix(suffix)
        data = {"name": stem, **data}
    model = DatasetDef if is_dataset else TaskDef
    try:
        obj = model.model_validate(data, context={"base_dir": path.parent})
    except ValidationError as e:
        raise _validation_error(e, path, is_dataset) from None
    obj._origin = str(path)
    return obj


def load_task_file(path: Path | str) -> TaskDef:
    """Read one task YAML file (relative paths inside it resolve against its folder)."""
    path = Path(path).expanduser()
    if _is_dataset_file(path):
        raise _err(f"{path} is a dataset definition, not a task")
    obj = _load_def(path)
    assert isinstance(obj, TaskDef)
    return obj


def _scan(folder: Path) -> tuple[dict[str, DatasetDef], dict[str, TaskDef]]:
    datasets: dict[str, DatasetDef] = {}
    tasks: dict[str, TaskDef] = {}
    if not folder.is_dir():
        return datasets, tasks
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml"))
    for path in files:
        obj = _load_def(path)
        table: dict = datasets if isinstance(obj, DatasetDef) else tasks
        if obj.name in table:
            what = "dataset" if isinstance(obj, DatasetDef) else "task"
            raise _err(f"{path}: {what} '{obj.name}' is also defined in {table[obj.name].origin}")
        table[obj.name] = obj
    return datasets, tasks


@lru_cache(maxsize=1)
def _builtins() -> tuple[dict[str, DatasetDef], dict[str, TaskDef]]:
    datasets, tasks = _scan(BUILTIN_DIR)
    for d in datasets.values():
        d._origin = "built-in"
    for t in tasks.values():
        t._origin = "built-in"
    return datasets, tasks


def _user(home: Path | str | None) -> tuple[dict[str, DatasetDef], dict[str, TaskDef]]:
    datasets, tasks = _scan(Path(home).expanduser() / "tasks" if home is not None else paths.user_tasks_dir())
    b_datasets, b_tasks = _builtins()
    for name, d in datasets.items():
        if name in b_datasets:
            raise _err(f"{d.origin}: dataset '{name}' clashes with a built-in dataset; rename it")
    for name, t in tasks.items():
        if name in b_tasks:
            raise _err(f"{t.origin}: task '{name}' clashes with a built-in task; rename it")
    return datasets, tasks


def list_tasks(home: Path | str | None = None) -> list[TaskDef]:
    """Built-in tasks (sorted by name), then the user's tasks from ``<home>/tasks/*.yaml`` (sorted by name)."""
    _, b_tasks = _builtins()
    _, u_tasks = _user(home)
    return [b_tasks[n] for n in sorted(b_tasks)] + [u_tasks[n] for n in sorted(u_tasks)]


def list_datasets(home: Path | str | None = None) -> list[DatasetDef]:
    b, _ = _builtins()
    u, _ = _user(home)
    return [b[n] for n in sorted(b)] + [u[n] for n in sorted(u)]


def get_task(name: str, home: Path | str | None = None) -> TaskDef:
    """A task by name, or by path when the name ends in .yaml/.yml (relative to the current folder)."""
    if name.endswith((".yaml", ".yml")):
        return load_task_file(name)
    _, b_tasks = _builtins()
    if name in b_tasks:
        return b_tasks[name]
    tasks = {t.name: t for t in list_tasks(home)}
    if name not in tasks:
        raise _err(f"unknown task '{name}' (known: {', '.join(tasks)})")
    return tasks[name]


def get_dataset(name: str, home: Path | str | None = None) -> DatasetDef:
    b, _ = _builtins()
    if name in b:
        return b[name]
    datasets = {d.name: d for d in list_datasets(home)}
    if name not in datasets:
        raise _err(f"unknown dataset '{name}' (known: {', '.join(datasets)})")
    return datasets[name]


def resolve_data_dir(explicit: str | Path | None = None) -> Path | None:
    """The local data dir: ``explicit``, else ``$CLFBENCH_DATA``, else None (meaning: use the hub)."""
    if explicit is not None and str(explicit) != "":
        return Path(explicit).expanduser()
    env = os.environ.get("CLFBENCH_DATA")
    return Path(env).expanduser() if env else None


def sample_data_dir() -> Path:
    """The small real samples shipped in the package (``engine/sample_data``), laid out like the real data dir."""
    return SAMPLE_DATA_DIR


# --------------------------------------------------------------------------------------------------------------
# Reading rows
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Table:
    """The rows of one file (or one hub split), with where each row came from, for error messages."""

    where: str  # file path or hub address
    rows: list[dict]
    columns: list[str]
    lines: list[int]  # line (text files) or row number (parquet, hub), 1-based
    unit: str = "line"

    def at(self, i: int) -> str:
        return f"{self.unit} {self.lines[i]} of {self.where}"


_EXT_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv",
                ".parquet": "parquet", ".pq": "parquet"}


def _format_of(path: Path, declared: str | None) -> str:
    if declared:
        return declared
    fmt = _EXT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise _err(f"cannot tell the format of {path} from its extension: set format: jsonl, csv, tsv or parquet")
    return fmt


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise _err(f"{path} line {line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {col})") from None


def _read_jsonl(path: Path) -> _Table:
    text = _decode(path)
    rows, lines, columns = [], [], {}
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise _err(f"invalid JSON in {path} at line {e.lineno}: {e.msg}") from None
        numbered = list(enumerate(items, 1))
        unit = "item"
    else:
        numbered = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise _err(f"invalid JSON at line {n} of {path}: {e.msg}") from None
        unit = "line"
    for n, obj in numbered:
        if not isinstance(obj, dict):
            raise _err(f"{unit} {n} of {path}: expected a JSON object, got {type(obj).__name__}")
        rows.append(obj)
        lines.append(n)
        for k in obj:
            columns.setdefault(k, None)
    return _Table(str(path), rows, list(columns), lines, unit)


def _read_csv(path: Path, delimiter: str) -> _Table:
    text = _decode(path)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            return _Table(str(path), [], [], [])
        header = [h.strip() for h in header]
        dup = sorted({h for h in header if header.count(h) > 1})
        if dup:
            raise _err(f"{path}: duplicate column name(s) in the header: {', '.join(dup)}")
        rows, lines = [], []
        start = reader.line_num + 1
        for record in reader:
            n, start = start, reader.line_num + 1
            if not record or all(not f.strip() for f in record):
                continue
            if len(record) > len(header):
                raise _err(f"line {n} of {path} has {len(record)} fields but the header has {len(header)}")
            rows.append(dict(zip(header, record)))
            lines.append(n)
    except csv.Error as e:
        raise _err(f"invalid CSV in {path} at line {reader.line_num}: {e}") from None
    return _Table(str(path), rows, header, lines)


def _read_parquet(path: Path) -> _Table:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise _err(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise _err(f"cannot read Parquet file {path}: {e}") from None
    rows = table.to_pylist()
    return _Table(str(path), rows, list(table.column_names), list(range(1, len(rows) + 1)), "row")


def _read_file(path: Path, fmt: str | None, split: str, task: TaskDef) -> _Table:
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise _err(f"file {what}: {path} (task {task.name}, split {split})")
    fmt = _format_of(path, fmt)
    if fmt == "jsonl":
        return _read_jsonl(path)
    if fmt in ("csv", "tsv"):
        return _read_csv(path, "," if fmt == "csv" else "\t")
    return _read_parquet(path)


def _file_tables(task: TaskDef, ds: DatasetDef, splits: list[str], data_dir: Path | None
                 ) -> tuple[dict[str, list[_Table]], LocalSource | FilesSource]:
    if ds.files is not None:
        src: LocalSource | FilesSource = ds.files
        base = None
    else:
        assert ds.local is not None and data_dir is not None
        src = ds.local
        if not data_dir.is_dir():
            raise _err(f"data dir not found: {data_dir} (set CLFBENCH_DATA or --data-dir to a folder with {src.dir}/)")
        base = data_dir / src.dir
        if not base.is_dir():
            raise _err(f"data folder not found: {base} (dataset {ds.name} expects {src.dir}/ in data dir {data_dir})")
    tables: dict[str, list[_Table]] = {}
    for split in splits:
        paths = _as_list(getattr(src, split))
        tables[split] = [_read_file(Path(p) if base is None else base / p, src.format, split, task) for p in paths]
    return tables, src


def _hub_tables(task: TaskDef, hub: HubSource, splits: list[str]) -> dict[str, list[_Table]]:
    try:
        import datasets  # heavy: imported only here
    except ImportError:
        raise _err(f"task {task.name}: loading {hub.id} from the Hugging Face hub needs the 'datasets' package; "
                   "or set CLFBENCH_DATA / --data-dir to a local data folder") from None
    tables: dict[str, list[_Table]] = {}
    for split in splits:
        hub_split = getattr(hub, split)
        where = f"hub:{hub.id}" + (f"/{hub.config}" if hub.config else "") + f"[{hub_split}]"
        kwargs: dict[str, Any] = {"split": hub_split}
        if hub.revision:
            kwargs["revision"] = hub.revision
        if hub.data_dir:
            kwargs["data_dir"] = hub.data_dir
        try:
            ds = datasets.load_dataset(hub.id, hub.config, **kwargs)
        except Exception as e:  # network, missing dataset, bad split: all become one clear line
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise _err(f"could not load {where} from the Hugging Face hub ({type(e).__name__}: {first}); "
                       "set CLFBENCH_DATA or --data-dir to use local files") from None
        converters: dict[str, Callable[[Any], Any]] = {}
        for col, feat in ds.features.items():
            conv = _classlabel_converter(feat, datasets)
            if conv is not None:
                converters[col] = conv
        rows = ds.to_list()
        for row in rows:
            for col, conv in converters.items():
                row[col] = conv(row[col])
        tables[split] = [_Table(where, rows, list(ds.column_names), list(range(1, len(rows) + 1)), "row")]
    return tables


def _classlabel_converter(feat: Any, datasets: Any) -> Callable[[Any], Any] | None:
    """ClassLabel ints -> names; also for a sequence of ClassLabel (token tags)."""
    ClassLabel = datasets.ClassLabel

    def name_of(cl: Any) -> Callable[[Any], Any]:
        return lambda v: cl.int2str(v) if isinstance(v, int) and v >= 0 else v

    if isinstance(feat, ClassLabel):
        return name_of(feat)
    inner = feat[0] if isinstance(feat, list) and len(feat) == 1 else getattr(feat, "feature", None)
    if isinstance(inner, ClassLabel):
        one = name_of(inner)
        return lambda vs: [one(v) for v in vs] if isinstance(vs, list) else vs
    return None


def _apply_columns(table: _Table, src: LocalSource | FilesSource | HubSource) -> None:
    """Rename (copy) mapped columns and compute derived ones, in place."""
    for ours, theirs in src.columns.items():
        if theirs not in table.columns:
            raise _err(f"unknown column '{theirs}' (mapped to '{ours}') in {table.where} "
                       f"(columns: {', '.join(table.columns)})")
    if src.columns:
        for row in table.rows:
            for ours, theirs in src.columns.items():
                row[ours] = row.get(theirs)
        table.columns = table.columns + [c for c in src.columns if c not in table.columns]
    for d in src.derive:
        for c in d.inputs:
            if c not in table.columns:
                raise _err(f"unknown column '{c}' (input of {d.function}) in {table.where} "
                           f"(columns: {', '.join(table.columns)})")
        fn = DERIVE_FUNCTIONS[d.function]
        for i, row in enumerate(table.rows):
            try:
                out = fn(*(row.get(c) for c in d.inputs))
            except (ValueError, TypeError) as e:
                raise _err(f"{d.function} failed at {table.at(i)}: {e}") from None
            if len(d.outputs) == 1:
                out = (out,)
            if len(out) != len(d.outputs):
                raise _err(f"{d.function} returns {len(out)} values but derive lists {len(d.outputs)} outputs")
            row.update(zip(d.outputs, out))
        table.columns = table.columns + [c for c in d.outputs if c not in table.columns]


# --------------------------------------------------------------------------------------------------------------
# Rows -> examples
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Gold:
    """One example plus where it came from (for error messages about its labels)."""

    example: Example
    at: str


def _need_column(table: _Table, col: str, role: str) -> None:
    if col not in table.columns:
        raise _err(f"unknown column '{col}' ({role}) in {table.where} (columns: {', '.join(table.columns) or 'none'})")


def _scalar(value: Any, col: str, table: _Table, i: int) -> str:
    if value is None:
        raise _err(f"missing value for column '{col}' at {table.at(i)}")
    if isinstance(value, (list, dict, tuple)):
        raise _err(f"column '{col}' at {table.at(i)} holds a {type(value).__name__}, expected text")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise _err(f"{table.where} {table.unit} {table.lines[i]}: column '{col}' is not valid UTF-8") from None
    return value if isinstance(value, str) else str(value)


def _sequence(value: Any, col: str, table: _Table, i: int) -> list[str]:
    if value is None:
        raise _err(f"missing value for column '{col}' at {table.at(i)}")
    if isinstance(value, str):
        return value.split()
    if isinstance(value, (list, tuple)):
        return [_scalar(v, col, table, i) for v in value]
    raise _err(f"column '{col}' at {table.at(i)} holds a {type(value).__name__}, expected a list or a string")


def _examples(task: TaskDef, split: str, tables: list[_Table], start: int = 0) -> list[_Gold]:
    out: list[_Gold] = []
    seen: dict[str, str] = {}
    transform = LABEL_TRANSFORMS[task.label_transform] if task.label_transform else None
    n = start
    for table in tables:
        if not table.rows:
            continue
        if task.kind == "sequence":
            _need_column(table, task.text_column, "text_column")
            _need_column(table, task.label_column, "label_column")
        else:
            if task.text_column:
                _need_column(table, task.text_column, "text_column")
            if task.tokens_column:
                _need_column(table, task.tokens_column, "tokens_column")
            _need_column(table, task.tags_column, "tags_column")
        has_id = "id" in table.columns
        for i, row in enumerate(table.rows):
            n += 1
            ex_id = _scalar(row.get("id"), "id", table, i) if has_id else f"{split}-{n}"
            if ex_id in seen:
                raise _err(f"duplicate id '{ex_id}' at {table.at(i)} (also at {seen[ex_id]})")
            seen[ex_id] = table.at(i)
            if task.kind == "sequence":
                text = _scalar(row.get(task.text_column), task.text_column, table, i)
                label = _scalar(row.get(task.label_column), task.label_column, table, i).strip()
                if not label:
                    raise _err(f"empty label in column '{task.label_column}' at {table.at(i)}")
                if transform is not None:
                    label = transform(label)
                ex = Example(id=ex_id, text=text, label=label)
            else:
                text = _scalar(row.get(task.text_column), task.text_column, table, i) if task.text_column else None
                if task.tokens_column:
                    tokens = _sequence(row.get(task.tokens_column), task.tokens_column, table, i)
                else:
                    tokens = text.split()
                tags = _sequence(row.get(task.tags_column), task.tags_column, table, i)
                if len(tokens) != len(tags):
                    raise _err(f"tokens/tags length mismatch at {table.at(i)}: {len(tokens)} tokens, {len(tags)} tags")
                if text is None:
                    text = " ".join(tokens)
                elif task.tokens_column and text.split() != tokens:
                    raise _err(f"tokens do not match the whitespace split of the text at {table.at(i)} "
                               f"(set text_column: null to use the tokens joined by spaces)")
                for t in tags:
                    if not (t == "O" or (t[:2] in ("B-", "I-") and len(t) > 2)):
                        raise _err(f"tag '{t}' at {table.at(i)} is not a BIO tag (O, B-type, I-type)")
                ex = Example(id=ex_id, text=text, tokens=tuple(tokens), tags=tuple(tags))
            out.append(_Gold(ex, table.at(i)))
    return out


def _bio_labels(types: list[str] | set[str]) -> list[str]:
    return ["O"] + [f"{p}-{t}" for t in sorted(set(types)) for p in ("B", "I")]


def _golds(ex: Example) -> list[str]:
    return [ex.label] if ex.label is not None else list(ex.tags or ())


def _label_set(task: TaskDef, splits: dict[str, list[_Gold]], train_where: str) -> list[str]:
    if task.labels is not None:
        allowed = set(task.labels)
        for split, golds in splits.items():
            for g in golds:
                for lab in _golds(g.example):
                    if lab not in allowed:
                        what = "label" if task.kind == "sequence" else "tag"
                        raise _err(f"{what} '{lab}' at {g.at} is not in the declared labels of task {task.name}")
        return list(task.labels)
    train = splits.get("train") or []
    if task.kind == "sequence":
        labels = sorted({g.example.label for g in train})
        known = set(labels)
        for split in ("dev", "test"):
            for g in splits.get(split, []):
                if g.example.label not in known:
                    raise _err(f"{split} label '{g.example.label}' at {g.at} never occurs in train ({train_where}); "
                               f"declare labels: in the task to allow it")
        return labels
    types = {t[2:] for g in train for t in g.example.tags if t != "O"}
    for split in ("dev", "test"):
        for g in splits.get(split, []):
            for t in g.example.tags:
                if t != "O" and t[2:] not in types:
                    raise _err(f"{split} tag '{t}' at {g.at} has a slot type never seen in train ({train_where}); "
                               f"declare labels: in the task to allow it")
    return _bio_labels(types)


def _shuffled(examples: list[Example], seed: int) -> list[Example]:
    """A seeded shuffle that depends only on the seed and the ids (same on every machine and Python version)."""
    def key(ex: Example) -> bytes:
        return hashlib.sha256(f"{seed}\x00{ex.id}".encode("utf-8")).digest()

    return sorted(examples, key=key)


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise _err(f"{name} must be a whole number >= 0, got {value!r}")


def _choose_source(task: TaskDef, ds: DatasetDef, data_dir: Path | None) -> str:
    if ds.files is not None:
        return "files"
    if data_dir is not None and ds.local is not None:
        return "local"
    if ds.hub is not None:
        return "hub"
    if ds.local is not None:
        raise _err(f"task {task.name}: dataset {ds.name} has no hub source; set CLFBENCH_DATA or --data-dir to a "
                   f"folder with {ds.local.dir}/ (the shipped samples: {SAMPLE_DATA_DIR})")
    raise _err(f"task {task.name}: dataset {ds.name} has no usable source")


def _load(task: TaskDef, data_dir: Path | str | None, need_train: bool, allow_hub: bool
          ) -> tuple[list[str], dict[str, list[Example]]] | None:
    ds = task.dataset_def()
    data_dir = Path(data_dir).expanduser() if data_dir is not None and str(data_dir) != "" else None
    kind = _choose_source(task, ds, data_dir)
    if kind == "hub" and not allow_hub:
        return None
    src = {"files": ds.files, "local": ds.local, "hub": ds.hub}[kind]
    available = src.split_names()
    if "train" not in available and (need_train or task.labels is None):
        why = "this method needs one" if need_train else "declare labels: in the task to run without one"
        raise _err(f"task {task.name}: dataset {ds.name} has no train split ({why})")
    wanted = ["test"]
    if need_train or task.labels is None:
        wanted.append("train")
    if need_train and "dev" in available:
        wanted.append("dev")
    wanted = [s for s in SPLITS if s in wanted]

    if kind == "hub":
        tables = _hub_tables(task, ds.hub, wanted)
    else:
        tables, _ = _file_tables(task, ds, wanted, data_dir)

    golds: dict[str, list[_Gold]] = {}
    for split in wanted:
        for table in tables[split]:
            _apply_columns(table, src)
        golds[split] = _examples(task, split, tables[split])
        if not golds[split]:
            where = ", ".join(t.where for t in tables[split])
            raise _err(f"empty split '{split}': {where} has no rows (task {task.name})")
    train_where = ", ".join(t.where for t in tables.get("train", [])) or "no train split"
    labels = _label_set(task, golds, train_where)
    return labels, {split: [g.example for g in gs] for split, gs in golds.items()}


def load_task(task: TaskDef, data_dir: Path | str | None = None, train_limit: int | None = None,
              test_limit: int | None = None, seed: int = 0, need_train: bool = True) -> TaskData:
    """Load a task's examples.

    Rows come from the task's own files, else ``<data_dir>/<local dir>/`` when ``data_dir`` is given, else the
    hub. ``train_limit``: the first N of a ``seed``-ed shuffle of train. ``test_limit``: the first N of a shuffle
    with the fixed seed 0 (the same subset for every run and method). Without limits the file order is kept.
    The label set is the declared one, else it comes from the full train split (sorted; token tasks: "O", then
    B-x, I-x for each slot type x, sorted). The dev split is loaded when the dataset has one and ``need_train``;
    with ``need_train=False`` train and dev are empty (train is still read for the label set when no labels are
    declared).
    """
    _check_limit("train_limit", train_limit)
    _check_limit("test_limit", test_limit)
    loaded = _load(task, data_dir, need_train, allow_hub=True)
    assert loaded is not None
    labels, splits = loaded
    train = splits.get("train", []) if need_train else []
    test = splits["test"]
    if train_limit is not None:
        train = _shuffled(train, seed)[:train_limit]
    if test_limit is not None:
        test = _shuffled(test, TEST_SUBSET_SEED)[:test_limit]
    return TaskData(name=task.name, kind=task.kind, labels=labels, train=train, test=test,
                    dev=splits.get("dev", []) if need_train else [], description=task.description,
                    joint_metrics=tuple(task.joint_metrics))


def check_task(task: TaskDef, data_dir: Path | str | None = None) -> None:
    """Queue-time check of a task's local or user files: they exist, are UTF-8, have the columns, are not empty,
    and their labels are valid. A no-op for hub sources (nothing is downloaded). Imports no torch/datasets."""
    _load(task, data_dir, need_train=True, allow_hub=False)
