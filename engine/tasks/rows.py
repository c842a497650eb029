"""Reading a split's rows: local JSONL/CSV/TSV with the standard library, Parquet with pyarrow and hub datasets
with ``datasets`` (both imported only when a task needs them), then the source's column mapping and derived
columns. Every row keeps where it came from (file and line, or hub split and row) for error messages.

Each local file is read from disk and hashed (sha256) once per process and file version: parsed tables and
digests are cached by (resolved path, size, mtime_ns). Queueing a sweep of 20 runs over one task checks the
task 20 times and freezes its data hashes (engine.tasks.identity) without reading a file twice; an edited file
has another size or mtime and is read again. Tables are handed out as copies (the column mapping adds keys to
rows), and the cache keeps at most TABLE_CACHE_BYTES of files (by file size; least recently used out first),
so a long-lived process (the TUI) does not grow without bound."""
from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from clfbench.engine.tasks.definitions import (
    DatasetDef,
    Derive,
    FilesSource,
    HubSource,
    LocalSource,
    Source,
    TaskDef,
    as_list,
    one_line_error,
)
from clfbench.engine.tasks.functions import DERIVE_FUNCTIONS


@dataclass
class Table:
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
        raise one_line_error(f"cannot tell the format of {path} from its extension: "
                             "set format: jsonl, csv, tsv or parquet")
    return fmt


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise one_line_error(f"{path} line {line}: not valid UTF-8 "
                             f"(byte 0x{data[e.start]:02x} at column {col})") from None


def _read_jsonl(path: Path, data: bytes) -> Table:
    text = _decode(path, data)
    rows, lines, columns = [], [], {}
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise one_line_error(f"invalid JSON in {path} at line {e.lineno}: {e.msg}") from None
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
                raise one_line_error(f"invalid JSON at line {n} of {path}: {e.msg}") from None
        unit = "line"
    for n, obj in numbered:
        if not isinstance(obj, dict):
            raise one_line_error(f"{unit} {n} of {path}: expected a JSON object, got {type(obj).__name__}")
        rows.append(obj)
        lines.append(n)
        for k in obj:
            columns.setdefault(k, None)
    return Table(str(path), rows, list(columns), lines, unit)


def _read_csv(path: Path, data: bytes, delimiter: str) -> Table:
    text = _decode(path, data)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            return Table(str(path), [], [], [])
        header = [h.strip() for h in header]
        dup = sorted({h for h in header if header.count(h) > 1})
        if dup:
            raise one_line_error(f"{path}: duplicate column name(s) in the header: {', '.join(dup)}")
        rows, lines = [], []
        start = reader.line_num + 1
        for record in reader:
            n, start = start, reader.line_num + 1
            if not record or all(not f.strip() for f in record):
                continue
            if len(record) > len(header):
                raise one_line_error(f"line {n} of {path} has {len(record)} fields but the header has {len(header)}")
            rows.append(dict(zip(header, record)))
            lines.append(n)
    except csv.Error as e:
        raise one_line_error(f"invalid CSV in {path} at line {reader.line_num}: {e}") from None
    return Table(str(path), rows, header, lines)


def _read_parquet(path: Path, data: bytes) -> Table:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise one_line_error(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as e:  # pyarrow raises several types for a broken file
        raise one_line_error(f"cannot read Parquet file {path}: {e}") from None
    rows = table.to_pylist()
    return Table(str(path), rows, list(table.column_names), list(range(1, len(rows) + 1)), "row")


TABLE_CACHE_BYTES = 128 * 2**20  # parsed tables kept, counted by the size of their files
FileKey = tuple[str, int, int]  # (resolved path, size, mtime_ns): one version of a file
_DIGESTS: dict[FileKey, str] = {}  # sha256 of every file version read or hashed in this process
_TABLES: OrderedDict[tuple[FileKey, str], tuple[Table, int]] = OrderedDict()  # (key, format) -> (table, size)
file_reads: Counter[str] = Counter()  # resolved path -> times read from disk (tests count them)


def _file_key(path: Path) -> FileKey:
    resolved = path.resolve()
    stat = resolved.stat()
    return str(resolved), stat.st_size, stat.st_mtime_ns


def _read_bytes(key: FileKey) -> bytes:
    """A file's bytes from disk, its digest recorded under this version's key."""
    data = Path(key[0]).read_bytes()
    file_reads[key[0]] += 1
    # Recorded under the version read: a file edited since the stat gets its own key at the next look.
    _DIGESTS[key] = hashlib.sha256(data).hexdigest()
    return data


def file_digest(path: Path | str) -> tuple[str, int]:
    """(sha256, size in bytes) of a file, read only when this version of it was neither read nor hashed yet."""
    key = _file_key(Path(path))
    if key not in _DIGESTS:
        _read_bytes(key)
    return _DIGESTS[key], key[1]


def _parse(path: Path, data: bytes, fmt: str) -> Table:
    if fmt == "jsonl":
        return _read_jsonl(path, data)
    if fmt in ("csv", "tsv"):
        return _read_csv(path, data, "," if fmt == "csv" else "\t")
    return _read_parquet(path, data)


def _cached_table(path: Path, fmt: str) -> Table:
    """The parsed file, from the cache when this version was parsed before; always a copy (callers add keys)."""
    key = (_file_key(path), fmt)
    if key in _TABLES:
        _TABLES.move_to_end(key)
        table = _TABLES[key][0]
    else:
        table = _parse(path, _read_bytes(key[0]), fmt)
        _TABLES[key] = (table, key[0][1])
        while len(_TABLES) > 1 and sum(size for _, size in _TABLES.values()) > TABLE_CACHE_BYTES:
            _TABLES.popitem(last=False)
    return Table(str(path), [dict(row) for row in table.rows], list(table.columns), table.lines, table.unit)


def _read_file(path: Path, fmt: str | None, split: str, task: TaskDef) -> Table:
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise one_line_error(f"file {what}: {path} (task {task.name}, split {split})")
    return _cached_table(path, _format_of(path, fmt))


def split_paths(ds: DatasetDef, splits: list[str], data_dir: Path | None
                ) -> tuple[LocalSource | FilesSource, dict[str, list[Path]]]:
    """The source and the files of each split: the dataset's own files, else its folder under ``data_dir``."""
    if ds.files is not None:
        src: LocalSource | FilesSource = ds.files
        base = None
    else:
        assert ds.local is not None and data_dir is not None
        src = ds.local
        if not data_dir.is_dir():
            raise one_line_error(f"data dir not found: {data_dir} "
                                 f"(set CLFBENCH_DATA or --data-dir to a folder with {src.dir}/)")
        base = data_dir / src.dir
        if not base.is_dir():
            raise one_line_error(f"data folder not found: {base} "
                                 f"(dataset {ds.name} expects {src.dir}/ in data dir {data_dir})")
    return src, {split: [Path(p) if base is None else base / p for p in as_list(getattr(src, split))]
                 for split in splits}


def file_tables(task: TaskDef, ds: DatasetDef, splits: list[str], data_dir: Path | None
                ) -> dict[str, list[Table]]:
    """The tables of each split from the dataset's own files, else from its folder under ``data_dir``."""
    src, paths = split_paths(ds, splits, data_dir)
    return {split: [_read_file(path, src.format, split, task) for path in split_files]
            for split, split_files in paths.items()}


def hub_tables(task: TaskDef, hub: HubSource, splits: list[str]) -> dict[str, list[Table]]:
    """The table of each split from the hub, with ClassLabel integers turned into their names."""
    try:
        import datasets  # heavy: imported only here
    except ImportError:
        raise one_line_error(f"task {task.name}: loading {hub.id} from the Hugging Face hub needs the 'datasets' "
                             "package; or set CLFBENCH_DATA / --data-dir to a local data folder") from None
    tables: dict[str, list[Table]] = {}
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
            raise one_line_error(f"could not load {where} from the Hugging Face hub ({type(e).__name__}: {first}); "
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
        tables[split] = [Table(where, rows, list(ds.column_names), list(range(1, len(rows) + 1)), "row")]
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


def _map_columns(table: Table, columns: dict[str, str]) -> None:
    """Copy each source column to our name for it (``columns: {ours: theirs}``)."""
    for ours, theirs in columns.items():
        if theirs not in table.columns:
            raise one_line_error(f"unknown column '{theirs}' (mapped to '{ours}') in {table.where} "
                                 f"(columns: {', '.join(table.columns)})")
    if columns:
        for row in table.rows:
            for ours, theirs in columns.items():
                row[ours] = row.get(theirs)
        table.columns = table.columns + [c for c in columns if c not in table.columns]


def _derive_columns(table: Table, d: Derive) -> None:
    """Add the outputs of one named function of the inputs to every row."""
    for c in d.inputs:
        if c not in table.columns:
            raise one_line_error(f"unknown column '{c}' (input of {d.function}) in {table.where} "
                                 f"(columns: {', '.join(table.columns)})")
    fn = DERIVE_FUNCTIONS[d.function]
    for i, row in enumerate(table.rows):
        try:
            out = fn(*(row.get(c) for c in d.inputs))
        except (ValueError, TypeError) as e:
            raise one_line_error(f"{d.function} failed at {table.at(i)}: {e}") from None
        if len(d.outputs) == 1:
            out = (out,)
        if len(out) != len(d.outputs):
            raise one_line_error(f"{d.function} returns {len(out)} values "
                                 f"but derive lists {len(d.outputs)} outputs")
        row.update(zip(d.outputs, out))
    table.columns = table.columns + [c for c in d.outputs if c not in table.columns]


def apply_columns(table: Table, src: Source) -> None:
    """Rename (copy) mapped columns and compute derived ones, in place."""
    _map_columns(table, src.columns)
    for d in src.derive:
        _derive_columns(table, d)
