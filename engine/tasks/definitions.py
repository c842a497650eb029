"""Dataset and task definitions: their YAML schema (pydantic models), and the registry that finds them — the
built-in ones in ``engine/task_defs/`` and the user's in ``$CLFBENCH_HOME/tasks/``, or a task YAML path.

The schema and the registry share one module because each needs the other: a task finds the dataset it names
through the registry (``TaskDef.dataset_def``, ``TaskDef.source_summary``), and the registry reads files into
these models. Split in two, they would import each other.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

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
from clfbench.engine.types import PLAIN_DESCRIPTION, ClfbenchError, TaskKind, check_known
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


def is_bio_tag(label: str) -> bool:
    """"O", or a tag that starts a span ("B-x") or continues one ("I-x")."""
    return label == "O" or label.startswith(("B-", "I-"))


def token_labels(declared: list[str]) -> list[str]:
    """A token task's declared ``labels:`` as its BIO tag set ("O" first). The list holds slot types (PER, LOC:
    B-/I- tags are made for each) or full BIO tags (O, B-PER, I-PER, ...); anything else is a ValueError, since
    an "O" among slot types would silently become the tags B-O and I-O."""
    others = [x for x in declared if not is_bio_tag(x)]
    if not others:
        if "O" not in declared:
            raise ValueError("BIO labels must include 'O'")
        return ["O"] + [x for x in declared if x != "O"]
    prefixed = [x for x in declared if x.startswith(("B-", "I-"))]
    if prefixed:
        raise ValueError(f"a token task lists slot types or full BIO tags, not both: '{prefixed[0]}' is a BIO tag "
                         f"and '{others[0]}' is not")
    outside = next((x for x in ("O", "Other") if x in declared), None)
    if outside is not None:
        types = ", ".join([x for x in others if x != "Other"][:2]) or "PER, LOC"
        raise ValueError(f"a token task lists slot types ({types}) or full BIO tags; '{outside}' is not a slot type")
    return bio_labels(declared)


def check_label_descriptions(descriptions: dict[str, str], labels: list[str], kind: str) -> None:
    """Every key of ``label_descriptions`` names a label of the task (a slot type for a token task): ValueError
    naming the first that does not."""
    known = list(dict.fromkeys(tag[2:] for tag in labels if tag != "O")) if kind == "token" else labels
    unknown = [key for key in descriptions if key not in known]
    if unknown:
        what = "slot type" if kind == "token" else "label"
        shown = ", ".join(known[:8]) + (", ..." if len(known) > 8 else "")
        raise ValueError(f"label_descriptions: '{unknown[0]}' is not a {what} of the task (its {what}s: {shown})")


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
    # What the label is, for prompts ("news category", "intent", "slot"). The generic prompts of user tasks say
    # "classify its <description>" when it is given (not the default "label": then they say "classify it").
    description: str = Field(PLAIN_DESCRIPTION, description="what the label is, for prompts: 'news category', "
                                                            "'intent', 'slot'")
    dataset: str
    files: FilesSource | None = None
    hub: HubSource | None = None
    text_column: str | None = "text"  # token tasks may set null: the text is then the tokens joined by spaces
    label_column: str | None = None  # sequence tasks
    tokens_column: str | None = None  # token tasks; null: the text split on whitespace
    tags_column: str | None = None  # token tasks
    label_transform: str | None = None
    # The declared label set. A token task lists slot types (PER, LOC; B-/I- tags are made for each) or full
    # BIO tags (O, B-PER, I-PER, ...), never a mix: "O" is not a slot type.
    labels: list[str] | None = None
    # What each label means, for the generic prompts ("- label: meaning" lines): keys are labels (slot types for
    # a token task). Checked against the declared labels here, against the loaded label set when loading.
    label_descriptions: dict[str, str] = Field(default_factory=dict)
    # No longer needed (accepted so that task files written for earlier versions still load): exact match is
    # computed for every run with one sequence and one token task over the same test examples.
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
            return token_labels(v)
        return list(v)

    @model_validator(mode="after")
    def _descriptions_name_labels(self):
        if self.labels is not None:
            check_label_descriptions(self.label_descriptions, self.labels, self.kind)
        return self

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


def _stem(path: Path) -> str:
    """A definition file's name without its suffix: the name of a definition that has no ``name:``."""
    stem = path.name
    for suffix in (*DATASET_SUFFIXES, ".yaml", ".yml"):
        stem = stem.removesuffix(suffix)
    return stem


def _load_def(path: Path) -> DatasetDef | TaskDef:
    path = Path(path).expanduser().resolve()
    data = _read_yaml(path)
    is_dataset = _is_dataset_file(path)
    if "name" not in data:
        data = {"name": _stem(path), **data}
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


@dataclass(frozen=True)
class BrokenDef:
    """A definition file of the user's folder that cannot be used, and why (one line). ``name`` is the name it
    defines (its ``name:`` when the file reads as a mapping, else its file name), so that looking the name up
    gives this error rather than "unknown task"."""

    path: Path
    name: str
    is_dataset: bool
    error: str


@dataclass
class _Folder:
    """One folder's definitions by name, and the files that could not be used."""

    datasets: dict[str, DatasetDef] = field(default_factory=dict)
    tasks: dict[str, TaskDef] = field(default_factory=dict)
    broken: list[BrokenDef] = field(default_factory=list)

    def table(self, is_dataset: bool) -> dict:
        return self.datasets if is_dataset else self.tasks


def _name_in_file(path: Path) -> str:
    """The name a (possibly broken) definition file defines, as far as it can be read."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return _stem(path)
    name = data.get("name") if isinstance(data, dict) else None
    return name if isinstance(name, str) and name else _stem(path)


def _scan(folder: Path) -> _Folder:
    """Every definition of a folder. A file that does not load, and every file of a name defined twice, is
    recorded as broken (with its error) and left out; the others are kept: one bad file must not hide the rest."""
    found = _Folder()
    if not folder.is_dir():
        return found
    by_name: dict[tuple[bool, str], list[DatasetDef | TaskDef]] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml")):
        try:
            obj = _load_def(path)
        except ClfbenchError as error:
            found.broken.append(BrokenDef(path, _name_in_file(path), _is_dataset_file(path), str(error)))
            continue
        by_name.setdefault((isinstance(obj, DatasetDef), obj.name), []).append(obj)
    for (is_dataset, name), same in by_name.items():
        if len(same) == 1:
            found.table(is_dataset)[name] = same[0]
            continue
        what = "dataset" if is_dataset else "task"
        for obj in same:
            others = ", ".join(o.origin for o in same if o is not obj)
            found.broken.append(BrokenDef(Path(obj.origin), name, is_dataset,
                                          str(one_line_error(f"{obj.origin}: {what} '{name}' is also defined in "
                                                             f"{others}"))))
    return found


@lru_cache(maxsize=1)
def _builtins() -> tuple[dict[str, DatasetDef], dict[str, TaskDef]]:
    found = _scan(BUILTIN_DIR)
    if found.broken:  # a packaging mistake, not the user's: every lookup says so
        raise one_line_error(found.broken[0].error)
    for d in found.datasets.values():
        d._origin = "built-in"
    for t in found.tasks.values():
        t._origin = "built-in"
    return found.datasets, found.tasks


def _user(home: Path | str | None) -> _Folder:
    """The user's definitions; one whose name is a built-in one's is broken (a name means one thing)."""
    found = _scan(Path(home).expanduser() / "tasks" if home is not None else paths.user_tasks_dir())
    builtin = _builtins()
    for is_dataset, what in ((True, "dataset"), (False, "task")):
        table = found.table(is_dataset)
        for name in [n for n in table if n in builtin[0 if is_dataset else 1]]:
            origin = table.pop(name).origin
            found.broken.append(BrokenDef(Path(origin), name, is_dataset, str(one_line_error(
                f"{origin}: {what} '{name}' clashes with a built-in {what}; rename it"))))
    found.broken.sort(key=lambda b: str(b.path))
    return found


def list_tasks(home: Path | str | None = None) -> list[TaskDef]:
    """Built-in tasks (sorted by name), then the user's usable tasks from ``<home>/tasks/*.yaml`` (sorted by name;
    see `broken_definitions` for the files left out)."""
    _, b_tasks = _builtins()
    u_tasks = _user(home).tasks
    return [b_tasks[n] for n in sorted(b_tasks)] + [u_tasks[n] for n in sorted(u_tasks)]


def list_datasets(home: Path | str | None = None) -> list[DatasetDef]:
    b, _ = _builtins()
    u = _user(home).datasets
    return [b[n] for n in sorted(b)] + [u[n] for n in sorted(u)]


def broken_definitions(home: Path | str | None = None) -> list[BrokenDef]:
    """The files of ``<home>/tasks/`` that cannot be used (by path), each with its one-line error."""
    return _user(home).broken


def _by_name(name: str, is_dataset: bool, home: Path | str | None) -> DatasetDef | TaskDef:
    """A built-in definition by name, found without reading the user's folder; else the user's, or the error of
    the broken file that defines the name, or an error that names every known one."""
    what = "dataset" if is_dataset else "task"
    builtin = _builtins()[0 if is_dataset else 1]
    if name in builtin:
        return builtin[name]
    user = _user(home)
    if name in user.table(is_dataset):
        return user.table(is_dataset)[name]
    broken = next((b for b in user.broken if b.name == name and b.is_dataset == is_dataset), None)
    if broken is not None:
        raise ClfbenchError(broken.error)
    known = [*sorted(builtin), *sorted(user.table(is_dataset))]
    raise one_line_error(f"unknown {what} '{name}' (known: {', '.join(known)})")


def get_task(name: str, home: Path | str | None = None) -> TaskDef:
    """A task by name, or by path when the name ends in .yaml/.yml (relative to the current folder)."""
    if name.endswith((".yaml", ".yml")):
        return load_task_file(name)
    task = _by_name(name, False, home)
    assert isinstance(task, TaskDef)
    return task


def get_dataset(name: str, home: Path | str | None = None) -> DatasetDef:
    """A dataset by name: built-in, else from ``<home>/tasks/*.dataset.yaml``."""
    dataset = _by_name(name, True, home)
    assert isinstance(dataset, DatasetDef)
    return dataset


def resolve_data_dir(explicit: str | Path | None = None) -> Path | None:
    """The local data dir: ``explicit``, else ``$CLFBENCH_DATA``, else None (meaning: use the hub)."""
    if explicit is not None and str(explicit) != "":
        return Path(explicit).expanduser()
    env = os.environ.get("CLFBENCH_DATA")
    return Path(env).expanduser() if env else None


def sample_data_dir() -> Path:
    """The small real samples shipped in the package (``engine/sample_data``), laid out like the real data dir."""
    return SAMPLE_DATA_DIR

