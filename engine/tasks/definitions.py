"""Dataset and task definitions: their YAML schema (pydantic models), and the registry that finds them — the
built-in ones in ``engine/task_defs/`` and the user's in ``$CLFBENCH_HOME/tasks/``, or a task YAML path.

The schema and the registry share one module because each needs the other: a task finds the dataset it names
through the registry (``TaskDef.dataset_def``, ``TaskDef.source_summary``), and the registry reads files into
these models. Split in two, they would import each other.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

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

from clfbench.engine.tasks.functions import DERIVE_FUNCTIONS, LABEL_TRANSFORMS
from clfbench.engine.types import ClfbenchError, TaskKind, check_known
from clfbench.storage import paths

SPLITS: tuple[str, ...] = ("train", "dev", "test")
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # engine/: the task definitions and samples are its data
BUILTIN_DIR = PACKAGE_DIR / "task_defs"
SAMPLE_DATA_DIR = PACKAGE_DIR / "sample_data"  # package data: the demo runs on it
DATASET_SUFFIXES = (".dataset.yaml", ".dataset.yml")


def one_line_error(msg: str) -> ClfbenchError:
    """A user-facing error with every run of white space made one space: messages quote files and exceptions."""
    return ClfbenchError(" ".join(str(msg).split()))


def as_list(v: str | list[str] | None) -> list[str]:
    """A split's file list: none, one path, or several."""
    return [] if v is None else [v] if isinstance(v, str) else list(v)


def bio_labels(types: list[str] | set[str]) -> list[str]:
    """The BIO tag set of slot types: "O", then B-x, I-x for each type x, sorted."""
    return ["O"] + [f"{p}-{t}" for t in sorted(set(types)) for p in ("B", "I")]


# --------------------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Derive(_Strict):
    """Columns computed from other columns by a named function of ``engine.tasks.functions``."""

    function: str
    inputs: list[str] = Field(min_length=1)
    outputs: list[str] = Field(min_length=1)

    @field_validator("function")
    @classmethod
    def _known_function(cls, v: str) -> str:
        return check_known(v, DERIVE_FUNCTIONS, "function")


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


Source = LocalSource | FilesSource | HubSource


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
            paths = [p for s in self.files.split_names() for p in as_list(getattr(self.files, s))]
            parts.append(f"files {paths[0]}" + (f" (+{len(paths) - 1} more)" if len(paths) > 1 else ""))
        if self.local is not None:
            names = [p for s in self.local.split_names() for p in as_list(getattr(self.local, s))]
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
    # How slot F1 and exact match count spans (token tasks; see engine.metrics.SLOT_METRICS): "massive" (MASSIVE's
    # official rule: per-word slot types, BIO rebuilt), "conlleval" (seqeval's default mode on the tags as
    # predicted; the CoNLL/ATIS standard, where gold has adjacent same-type spans) or "strict" (seqeval IOB2
    # strict). A property of the task, not of the method: every run on a task is scored the same way.
    slot_metric: Literal["massive", "conlleval", "strict"] | None = None

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
        return None if v is None else check_known(v, LABEL_TRANSFORMS, "label_transform")

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
            return bio_labels(v)
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
        if self.kind == "sequence" and self.slot_metric is not None:
            raise ValueError("'slot_metric' is for token tasks (this task has kind: sequence)")
        return self

    @property
    def slot_rule(self) -> str | None:
        """The rule slot F1 is computed under: the declared one, else "conlleval" for a token task (the standard
        for user NER/slot data); None for a sequence task."""
        if self.kind != "token":
            return None
        return self.slot_metric or "conlleval"

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
    return one_line_error(f"{path}: {msg}{more}")


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise one_line_error(f"task file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise one_line_error(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise one_line_error(f"cannot read {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise one_line_error(f"invalid YAML in {path}{at}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise one_line_error(f"{path}: expected a mapping of keys (name:, kind:, ...), got {type(data).__name__}")
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
        raise one_line_error(f"{path} is a dataset definition, not a task")
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
            raise one_line_error(f"{path}: {what} '{obj.name}' is also defined in {table[obj.name].origin}")
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
            raise one_line_error(f"{d.origin}: dataset '{name}' clashes with a built-in dataset; rename it")
    for name, t in tasks.items():
        if name in b_tasks:
            raise one_line_error(f"{t.origin}: task '{name}' clashes with a built-in task; rename it")
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


_Def = TypeVar("_Def", DatasetDef, TaskDef)


def _by_name(name: str, what: str, builtin: dict[str, _Def], every: Callable[[], list[_Def]]) -> _Def:
    """A built-in definition by name, found without reading the user's folder (where a broken file would stop
    even a built-in lookup); else any definition, or an error that names every known one."""
    if name in builtin:
        return builtin[name]
    known = {d.name: d for d in every()}
    if name not in known:
        raise one_line_error(f"unknown {what} '{name}' (known: {', '.join(known)})")
    return known[name]


def get_task(name: str, home: Path | str | None = None) -> TaskDef:
    """A task by name, or by path when the name ends in .yaml/.yml (relative to the current folder)."""
    if name.endswith((".yaml", ".yml")):
        return load_task_file(name)
    return _by_name(name, "task", _builtins()[1], lambda: list_tasks(home))


def get_dataset(name: str, home: Path | str | None = None) -> DatasetDef:
    """A dataset by name: built-in, else from ``<home>/tasks/*.dataset.yaml``."""
    return _by_name(name, "dataset", _builtins()[0], lambda: list_datasets(home))


def resolve_data_dir(explicit: str | Path | None = None) -> Path | None:
    """The local data dir: ``explicit``, else ``$CLFBENCH_DATA``, else None (meaning: use the hub)."""
    if explicit is not None and str(explicit) != "":
        return Path(explicit).expanduser()
    env = os.environ.get("CLFBENCH_DATA")
    return Path(env).expanduser() if env else None


def sample_data_dir() -> Path:
    """The small real samples shipped in the package (``engine/sample_data``), laid out like the real data dir."""
    return SAMPLE_DATA_DIR

