"""Tests for engine.tasks: built-in task definitions on the shipped samples, user tasks, limits, errors."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from clfbench.engine.tasks import (
    check_task,
    get_task,
    list_tasks,
    load_task,
    load_task_file,
    massive_annot_to_bio,
    resolve_data_dir,
    sample_data_dir,
)
from clfbench.engine.types import ClfbenchError
from tests.conftest import REAL_DATA

REPO = Path(__file__).resolve().parents[1]
SAMPLES = sample_data_dir()
USER_TASK = SAMPLES / "user_task" / "massive-subset.yaml"
ROOTS = ["alt", "comp", "misc", "rec", "sci", "soc", "talk"]


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """No test sees the developer's ~/.clfbench or CLFBENCH_DATA."""
    monkeypatch.setenv("CLFBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CLFBENCH_DATA", raising=False)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _user_task(folder: Path, body: str, name: str = "t.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(body, encoding="utf-8")
    return path


def _seq_task(folder: Path, train: list[dict], test: list[dict], extra: str = "") -> Path:
    _write_jsonl(folder / "train.jsonl", train)
    _write_jsonl(folder / "test.jsonl", test)
    return _user_task(folder, f"""
name: tiny
kind: sequence
files: {{train: train.jsonl, test: test.jsonl}}
label_column: label
{extra}""")


def _raises(fn, *words: str) -> str:
    with pytest.raises(ClfbenchError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


# ---------------------------------------------------------------------------------------------------------------
# Built-in tasks on the shipped samples
# ---------------------------------------------------------------------------------------------------------------


def test_builtin_tasks_are_listed_with_kinds_and_sources():
    by_name = {t.name: t for t in list_tasks()}
    assert {"20ng-20class", "20ng-7class", "massive-intent", "massive-slots", "massive-scenario"} <= set(by_name)
    assert by_name["massive-slots"].kind == "token"
    assert by_name["massive-intent"].kind == "sequence"
    assert by_name["massive-intent"].description == "intent"
    assert by_name["20ng-7class"].dataset == "20ng"
    for t in by_name.values():
        line = t.source_summary()
        assert "\n" not in line and line.startswith(t.dataset)
    assert "SetFit/20_newsgroups" in by_name["20ng-20class"].source_summary()
    assert "AmazonScience/massive" in by_name["massive-slots"].source_summary()


def test_20ng_7class_maps_to_exactly_the_seven_roots():
    seven = load_task(get_task("20ng-7class"), SAMPLES)
    twenty = load_task(get_task("20ng-20class"), SAMPLES)
    assert seven.labels == ROOTS
    assert {e.label for e in seven.train} == set(ROOTS)
    assert {e.label for e in seven.test} == set(ROOTS)
    assert len(twenty.labels) == 20 and len({e.label for e in twenty.train}) == 20
    full = {e.id: e.label for e in twenty.train}
    for e in seven.train:
        assert e.label == full[e.id].split(".")[0]
    assert seven.description == "news category"
    assert (len(twenty.train), len(twenty.test), twenty.dev) == (400, 100, [])


def test_massive_intent_sample_has_60_labels_and_a_dev_split():
    td = load_task(get_task("massive-intent"), SAMPLES)
    assert len(td.labels) == 60 and td.labels == sorted(td.labels)
    assert {e.label for e in td.train} == set(td.labels)  # the sample's train covers every intent
    assert (len(td.train), len(td.dev), len(td.test)) == (600, 100, 200)
    assert td.kind == "sequence" and td.description == "intent"
    scen = load_task(get_task("massive-scenario"), SAMPLES)
    assert len(scen.labels) == 18 and {e.label for e in scen.train} == set(scen.labels)


def test_massive_slots_tags_align_with_tokens():
    td = load_task(get_task("massive-slots"), SAMPLES)
    assert td.kind == "token" and td.labels[0] == "O"
    assert len(td.labels) == 1 + 2 * 55
    assert td.labels[1:3] == ["B-alarm_type", "I-alarm_type"]
    allowed = set(td.labels)
    for e in td.train + td.dev + td.test:
        assert e.label is None
        assert len(e.tokens) == len(e.tags) and list(e.tokens) == e.text.split()
        assert set(e.tags) <= allowed
    raw = {r["id"]: r for r in _rows(SAMPLES / "massive_en" / "test.jsonl")}
    for e in td.test:
        assert list(e.tags) == raw[e.id]["slots"]


def test_annot_to_bio_matches_every_row_of_the_massive_sample():
    n = 0
    for split in ("train", "dev", "test"):
        for r in _rows(SAMPLES / "massive_en" / f"{split}.jsonl"):
            assert massive_annot_to_bio(r["annot_utt"]) == (r["tokens"], r["slots"]), r["id"]
            n += 1
    assert n == 900
    assert massive_annot_to_bio("wake me up at [time : five am]") == (
        ["wake", "me", "up", "at", "five", "am"], ["O", "O", "O", "O", "B-time", "I-time"])
    assert massive_annot_to_bio("[date : today] at [time : 5:30 pm]") == (
        ["today", "at", "5:30", "pm"], ["B-date", "O", "B-time", "I-time"])
    for bad in ("wake me [time : five am", "wake ] me", "at [time : ]"):
        with pytest.raises(ValueError):
            massive_annot_to_bio(bad)


# ---------------------------------------------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------------------------------------------


def test_train_limit_is_a_seeded_deterministic_subset():
    task = get_task("massive-intent")
    ids = lambda td: [e.id for e in td.train]  # noqa: E731
    a = load_task(task, SAMPLES, train_limit=50, seed=1)
    b = load_task(task, SAMPLES, train_limit=50, seed=1)
    c = load_task(task, SAMPLES, train_limit=50, seed=2)
    full = load_task(task, SAMPLES)
    assert ids(a) == ids(b) and len(ids(a)) == 50
    assert ids(a) != ids(c)
    assert set(ids(a)) <= set(ids(full))
    assert a.labels == full.labels  # the label set comes from the full train split
    assert len(load_task(task, SAMPLES, train_limit=10_000).train) == 600


def test_test_limit_is_the_same_subset_whatever_the_run_seed():
    task = get_task("20ng-20class")
    subsets = [[e.id for e in load_task(task, SAMPLES, test_limit=30, seed=s).test] for s in (0, 1, 42)]
    assert subsets[0] == subsets[1] == subsets[2] and len(subsets[0]) == 30
    ten = [e.id for e in load_task(task, SAMPLES, test_limit=10, seed=7).test]
    assert ten == subsets[0][:10]  # a smaller limit is a prefix of a larger one
    assert len({i.split("/")[0] for i in subsets[0]}) > 5  # a shuffle, not the first groups of the file
    with pytest.raises(ClfbenchError, match="test_limit"):
        load_task(task, SAMPLES, test_limit=-1)


def test_need_train_false_returns_only_test():
    td = load_task(get_task("massive-slots"), SAMPLES, need_train=False, test_limit=20)
    assert td.train == [] and td.dev == [] and len(td.test) == 20 and td.labels[0] == "O"


# ---------------------------------------------------------------------------------------------------------------
# User tasks
# ---------------------------------------------------------------------------------------------------------------


def test_shipped_user_task_yaml_loads_from_csv():
    task = get_task(str(USER_TASK))
    assert task.name == "massive-subset-intent" and task.dataset == "massive-subset-intent"
    assert task.origin == str(USER_TASK.resolve())
    td = load_task(task)
    with (SAMPLES / "user_task" / "massive_subset_train.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(td.train) == len(rows) > 50
    assert td.train[0].id == rows[0]["uid"] and td.train[0].text == rows[0]["utterance"]
    assert td.labels == sorted({r["intent_name"] for r in rows})
    assert set(td.labels) <= {"alarm_query", "alarm_remove", "alarm_set", "calendar_query", "calendar_remove",
                              "calendar_set", "weather_query"}
    assert len(td.test) > 20
    check_task(task)


def _home_with_the_user_task(home: Path, monkeypatch) -> Path:
    """CLFBENCH_HOME at `home`, with the shipped user task (YAML and CSVs) in its tasks folder; returns the folder."""
    tdir = home / "tasks"
    tdir.mkdir(parents=True)
    for f in (SAMPLES / "user_task").iterdir():
        shutil.copy(f, tdir / f.name)
    monkeypatch.setenv("CLFBENCH_HOME", str(home))
    return tdir


def test_user_tasks_are_found_in_the_home(tmp_path, monkeypatch):
    _home_with_the_user_task(tmp_path / "myhome", monkeypatch)
    names = [t.name for t in list_tasks()]
    assert names[-1] == "massive-subset-intent" and "20ng-20class" in names
    assert len(load_task(get_task("massive-subset-intent")).train) > 50
    _raises(lambda: get_task("nope"), "unknown task 'nope'", "known:", "20ng-20class", "massive-subset-intent")


def test_user_task_on_a_named_user_dataset_with_tsv_and_parquet(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    home = tmp_path / "home"
    tdir = home / "tasks"
    tdir.mkdir(parents=True)
    src = _rows(SAMPLES / "massive_en" / "train.jsonl")
    pq.write_table(pa.Table.from_pylist([{"tok": r["tokens"], "bio": r["slots"]} for r in src[:80]]),
                   tmp_path / "train.parquet")
    with (tmp_path / "test.tsv").open("w", encoding="utf-8") as f:
        f.write("words\ttags\n")
        for r in src[:10]:
            f.write(" ".join(r["tokens"]) + "\t" + " ".join(r["slots"]) + "\n")
    (tdir / "myslots.dataset.yaml").write_text(
        f"files: {{train: {tmp_path / 'train.parquet'}, test: {tmp_path / 'test.tsv'}}}\n", encoding="utf-8")
    (tdir / "my-slots.yaml").write_text(
        "kind: token\ndataset: myslots\ntext_column: null\ntokens_column: tok\ntags_column: bio\n", encoding="utf-8")
    monkeypatch.setenv("CLFBENCH_HOME", str(home))
    task = get_task("my-slots")
    assert task.description == "label"
    _raises(lambda: load_task(task), "unknown column 'tok'", "test.tsv", "columns: words, tags")
    (tmp_path / "test.tsv").write_text((tmp_path / "test.tsv").read_text().replace("words\ttags", "tok\tbio"))
    td = load_task(get_task("my-slots"))
    assert len(td.train) == 80 and len(td.test) == 10 and td.labels[0] == "O"
    assert td.train[0].text == " ".join(src[0]["tokens"]) and td.train[0].id == "train-1"


# ---------------------------------------------------------------------------------------------------------------
# Errors: one line, naming the problem and the file
# ---------------------------------------------------------------------------------------------------------------


def test_unknown_yaml_key_names_the_key_and_the_file(tmp_path):
    path = _user_task(tmp_path, "name: x\nkind: sequence\ndataset: 20ng\nlabel_column: label\nlabel_colum: y\n")
    _raises(lambda: get_task(str(path)), "unknown key 'label_colum'", str(path))
    path = _user_task(tmp_path, "kind: sequence\nfiles: {test: a.csv, bogus: 1}\nlabel_column: l\n")
    _raises(lambda: load_task_file(path), "unknown key 'bogus'", "files", str(path))
    path = _user_task(tmp_path, "kind: sequence\ndataset: 20ng\nlabel_column: label\nlabel_transform: leaf\n")
    _raises(lambda: load_task_file(path), "unknown label_transform 'leaf'", "root")
    path = _user_task(tmp_path, "kind: token\ndataset: 20ng\nlabel_column: label\n")
    _raises(lambda: load_task_file(path), "tags_column", str(path))
    path = _user_task(tmp_path, "kind: [unclosed\n")
    _raises(lambda: load_task_file(path), "invalid YAML", str(path))
    _raises(lambda: get_task(str(tmp_path / "missing.yaml")), "not found", "missing.yaml")


def test_data_folder_and_file_missing(tmp_path):
    task = get_task("massive-intent")
    _raises(lambda: load_task(task, tmp_path / "nowhere"), "data dir not found", "nowhere")
    _raises(lambda: check_task(task, tmp_path), "data folder not found", str(tmp_path / "massive_en"))
    (tmp_path / "massive_en").mkdir()
    shutil.copy(SAMPLES / "massive_en" / "test.jsonl", tmp_path / "massive_en" / "test.jsonl")
    _raises(lambda: load_task(task, tmp_path), "file not found", str(tmp_path / "massive_en" / "train.jsonl"))


def test_unknown_column_is_named_with_the_columns_present(tmp_path):
    path = _seq_task(tmp_path, [{"id": "1", "txt": "a", "label": "x"}], [{"id": "2", "txt": "b", "label": "x"}])
    _raises(lambda: check_task(load_task_file(path)), "unknown column 'text'", "train.jsonl", "columns: id, txt, label")
    path = _user_task(tmp_path, "kind: sequence\nfiles: {train: train.jsonl, test: test.jsonl, columns: {text: body}}\n"
                                "label_column: label\n", "m.yaml")
    _raises(lambda: load_task(load_task_file(path)), "unknown column 'body'", "columns: id, txt, label")


def test_empty_split(tmp_path):
    path = _seq_task(tmp_path, [{"text": "a", "label": "x"}], [])
    _raises(lambda: load_task(load_task_file(path)), "empty split 'test'", "test.jsonl")
    (tmp_path / "train.jsonl").write_text("", encoding="utf-8")
    _raises(lambda: check_task(load_task_file(path)), "empty split 'train'", "train.jsonl")


def test_gold_label_outside_declared_labels(tmp_path):
    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]
    path = _seq_task(tmp_path, rows, [{"text": "c", "label": "z"}], extra="labels: [x, y, z]\n")
    assert load_task(load_task_file(path)).labels == ["x", "y", "z"]
    path = _seq_task(tmp_path, rows, [{"text": "c", "label": "w"}], extra="labels: [x, y, z]\n")
    _raises(lambda: check_task(load_task_file(path)), "label 'w'", "line 1", "test.jsonl", "declared labels")


def test_test_label_unseen_in_train(tmp_path):
    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]
    path = _seq_task(tmp_path, rows, [{"text": "c", "label": "x"}, {"text": "d", "label": "q"}])
    _raises(lambda: load_task(load_task_file(path)), "test label 'q'", "line 2", "test.jsonl", "never occurs in train")


def test_token_length_mismatch_and_bad_tags(tmp_path):
    good = {"id": "1", "text": "wake me up", "tokens": ["wake", "me", "up"], "slots": ["O", "O", "B-t"]}
    _write_jsonl(tmp_path / "train.jsonl", [good])
    _write_jsonl(tmp_path / "test.jsonl", [good, {**good, "id": "2", "slots": ["O", "B-t"]}])
    path = _user_task(tmp_path, "kind: token\nfiles: {train: train.jsonl, test: test.jsonl}\n"
                                "tokens_column: tokens\ntags_column: slots\n")
    _raises(lambda: load_task(load_task_file(path)), "tokens/tags length mismatch", "line 2", "test.jsonl",
            "3 tokens, 2 tags")
    _write_jsonl(tmp_path / "test.jsonl", [{**good, "slots": ["O", "O", "time"]}])
    _raises(lambda: check_task(load_task_file(path)), "tag 'time'", "not a BIO tag")
    _write_jsonl(tmp_path / "test.jsonl", [{**good, "slots": ["O", "O", "B-date"]}])
    _raises(lambda: check_task(load_task_file(path)), "test tag 'B-date'", "never seen in train")
    _write_jsonl(tmp_path / "test.jsonl", [{**good, "slots": ["O", "O", "I-t"]}])
    td = load_task(load_task_file(path))
    assert td.labels == ["O", "B-t", "I-t"] and td.test[0].tags == ("O", "O", "I-t")


def test_non_utf8_text_names_file_and_line(tmp_path):
    path = _seq_task(tmp_path, [{"text": "a", "label": "x"}], [{"text": "b", "label": "x"}])
    data = (tmp_path / "test.jsonl").read_bytes()
    (tmp_path / "test.jsonl").write_bytes(data + b'{"text": "caf\xe9", "label": "x"}\n')
    _raises(lambda: check_task(load_task_file(path)), str(tmp_path / "test.jsonl"), "line 2", "not valid UTF-8")
    (tmp_path / "tr.csv").write_bytes(b"text,label\nok,x\nna\xefve,x\n")
    (tmp_path / "te.csv").write_bytes(b"text,label\nok,x\n")
    csv_task = _user_task(tmp_path, "kind: sequence\nfiles: {train: tr.csv, test: te.csv}\nlabel_column: label\n",
                          "c.yaml")
    _raises(lambda: load_task(load_task_file(csv_task)), "tr.csv", "line 3", "not valid UTF-8")


def test_loading_writes_nothing(tmp_path):
    path = _seq_task(tmp_path, [{"text": "a", "label": "x"}], [{"text": "b", "label": "x"}])
    before = sorted(p.name for p in tmp_path.rglob("*"))
    load_task(load_task_file(path))
    check_task(load_task_file(path))
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


# ---------------------------------------------------------------------------------------------------------------
# Data dir, hub, import boundary
# ---------------------------------------------------------------------------------------------------------------


def test_resolve_data_dir(monkeypatch, tmp_path):
    assert resolve_data_dir() is None
    monkeypatch.setenv("CLFBENCH_DATA", str(tmp_path))
    assert resolve_data_dir() == tmp_path
    assert resolve_data_dir("/x/y") == Path("/x/y")
    assert (SAMPLES / "20ng" / "train.jsonl").is_file() and (SAMPLES / "massive_en" / "dev.jsonl").is_file()


def test_hub_source_with_a_fake_datasets_module(monkeypatch):
    """The hub path (column mapping, ClassLabel names, derived BIO) without the network: a stand-in `datasets`."""
    sample = {s: _rows(SAMPLES / "massive_en" / f"{s}.jsonl") for s in ("train", "dev", "test")}
    intents = sorted({r["intent"] for r in sample["train"]})
    calls = []

    class ClassLabel:
        def __init__(self, names):
            self.names = names

        def int2str(self, i):
            return self.names[i]

    class FakeSplit:
        def __init__(self, rows):
            self._rows = rows
            self.features = {"id": object(), "utt": object(), "annot_utt": object(), "intent": ClassLabel(intents)}
            self.column_names = list(self.features)

        def to_list(self):
            return [dict(r) for r in self._rows]

    def load_dataset(path, name=None, split=None, revision=None, data_dir=None):
        calls.append((path, name, split, revision, data_dir))
        ours = {"train": "train", "validation": "dev", "test": "test"}[split]
        return FakeSplit([{"id": r["id"], "utt": r["text"], "annot_utt": r["annot_utt"],
                           "intent": intents.index(r["intent"])} for r in sample[ours]])

    fake = types.SimpleNamespace(load_dataset=load_dataset, ClassLabel=ClassLabel)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    check_task(get_task("massive-intent"))  # a hub source: check_task is a no-op
    assert calls == []
    intent = load_task(get_task("massive-intent"), test_limit=50)
    local = load_task(get_task("massive-intent"), SAMPLES, test_limit=50)
    assert [(e.id, e.text, e.label) for e in intent.test] == [(e.id, e.text, e.label) for e in local.test]
    assert len(intent.dev) == 100
    assert calls[0] == ("AmazonScience/massive", None, "train", "refs/convert/parquet", "en-US")
    slots = load_task(get_task("massive-slots"), need_train=False)
    local_slots = load_task(get_task("massive-slots"), SAMPLES, need_train=False)
    assert slots.test == local_slots.test and slots.labels == local_slots.labels

    def failing(*a, **k):
        raise ConnectionError("Couldn't reach 'AmazonScience/massive' on the Hub\n(LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=failing, ClassLabel=ClassLabel))
    _raises(lambda: load_task(get_task("massive-intent")), "could not load hub:AmazonScience/massive",
            "ConnectionError", "CLFBENCH_DATA")


def test_importing_tasks_does_not_import_heavy_packages():
    code = ("import sys, clfbench.engine.tasks as t; t.list_tasks(); "
            "t.check_task(t.get_task('massive-slots'), t.sample_data_dir()); "
            "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real data not present at {REAL_DATA} (set CLFBENCH_DATA)")
def test_full_real_data_counts_and_declared_labels():
    intent = load_task(get_task("massive-intent"), REAL_DATA)
    assert (len(intent.train), len(intent.dev), len(intent.test)) == (11_514, 2_033, 2_974)
    ng = load_task(get_task("20ng-20class"), REAL_DATA)
    assert (len(ng.train), len(ng.test)) == (11_314, 7_532)
    # the declared label sets of the built-in YAML files are exactly what the full train splits give
    for name in ("20ng-20class", "20ng-7class", "massive-intent", "massive-scenario", "massive-slots"):
        task = get_task(name)
        derived = load_task(task.model_copy(update={"labels": None}), REAL_DATA, need_train=False).labels
        assert derived == task.labels, name


# ---------------------------------------------------------------------------------------------------------------
# Token labels, label descriptions, dev_limit (issue 14)
# ---------------------------------------------------------------------------------------------------------------


def _token_task(folder: Path, labels: str, extra: str = "") -> Path:
    _write_jsonl(folder / "train.jsonl", [{"text": "Ann in Rome", "tags": ["B-PER", "O", "B-LOC"]}])
    _write_jsonl(folder / "test.jsonl", [{"text": "Bob", "tags": ["B-PER"]}])
    return _user_task(folder, f"name: ner\nkind: token\nfiles: {{train: train.jsonl, test: test.jsonl}}\n"
                              f"tags_column: tags\nlabels: {labels}\n{extra}", "ner.yaml")


def test_token_labels_take_slot_types_or_full_bio_tags_never_a_mix(tmp_path):
    bio = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert load_task_file(_token_task(tmp_path, "[PER, LOC]")).labels == bio
    assert load_task_file(_token_task(tmp_path, "[B-PER, I-PER, O, B-LOC, I-LOC]")).labels == ["O", *bio[3:], *bio[1:3]]
    # "O" among slot types used to become the tags B-O and I-O without a word
    msg = _raises(lambda: load_task_file(_token_task(tmp_path, "[O, PER, LOC]")), "ner.yaml")
    assert msg.endswith("labels: a token task lists slot types (PER, LOC) or full BIO tags; 'O' is not a slot type")
    _raises(lambda: load_task_file(_token_task(tmp_path, "[Other, PER]")), "slot types (PER)", "'Other' is not a slot type")
    _raises(lambda: load_task_file(_token_task(tmp_path, "[O, B-PER, I-PER, LOC]")), "not both", "'B-PER'", "'LOC'")


def test_description_and_label_descriptions_reach_the_loaded_task(tmp_path):
    rows = [{"text": "great", "label": "pos"}, {"text": "awful", "label": "neg"}]
    path = _seq_task(tmp_path, rows, rows, extra="description: sentiment\n"
                                                 "label_descriptions: {pos: the writer likes it}\n")
    td = load_task(load_task_file(path))
    assert td.description == "sentiment" and td.label_descriptions == {"pos": "the writer likes it"}
    plain = load_task(load_task_file(_seq_task(tmp_path, rows, rows)))
    assert plain.description == "label" and plain.label_descriptions == {}
    ner = load_task(load_task_file(_token_task(tmp_path, "[PER, LOC]", "label_descriptions: {LOC: a place}\n")))
    assert ner.label_descriptions == {"LOC": "a place"}


def test_a_label_description_must_name_a_label_of_the_task(tmp_path):
    rows = [{"text": "great", "label": "pos"}, {"text": "awful", "label": "neg"}]
    # declared labels: the schema refuses it when the file is read
    path = _seq_task(tmp_path, rows, rows, extra="labels: [neg, pos]\nlabel_descriptions: {positive: liked}\n")
    _raises(lambda: load_task_file(path), str(path), "label_descriptions: 'positive' is not a label of the task",
            "neg, pos")
    # labels read from train: refused when the data is checked (at queue time) and loaded
    path = _seq_task(tmp_path, rows, rows, extra="label_descriptions: {positive: liked}\n")
    task = load_task_file(path)
    _raises(lambda: check_task(task), str(path), "'positive' is not a label of the task")
    _raises(lambda: load_task(task), "'positive' is not a label")
    # a token task's keys are slot types, not tags
    _raises(lambda: load_task_file(_token_task(tmp_path, "[PER, LOC]", "label_descriptions: {B-PER: a person}\n")),
            "'B-PER' is not a slot type of the task (its slot types: LOC, PER)")


def test_dev_limit_is_a_fixed_subset_of_the_dev_split_whatever_the_seed():
    task = get_task("massive-intent")
    full = load_task(task, SAMPLES)
    limited = [load_task(task, SAMPLES, dev_limit=5, seed=seed) for seed in (0, 1, 7)]
    assert len(full.dev) == 100 and all(len(td.dev) == 5 for td in limited)
    assert limited[0].dev == limited[1].dev == limited[2].dev
    assert {e.id for e in limited[0].dev} <= {e.id for e in full.dev}
    assert [e.id for e in limited[0].dev] != [e.id for e in full.dev[:5]]  # a shuffled subset, not the file's head
    assert limited[0].train == full.train and limited[0].test == full.test
    _raises(lambda: load_task(task, SAMPLES, dev_limit=-1), "dev_limit must be a whole number")


def test_a_run_with_dev_limit_evaluates_that_many_dev_examples(capsys):
    """Through the worker's task loading and a real method (tfidf scores its dev split)."""
    from clfbench.engine.methods import tfidf
    from clfbench.engine.methods.catalog import METHODS
    from clfbench.engine.spec import parse_spec
    from clfbench.engine.worker import load_tasks
    from tests.conftest import method_context, run_method

    with_dev = [name for name, m in METHODS.items() if "dev_limit" in m.options.model_fields]
    assert sorted(with_dev) == ["encoder-finetune", "llm-finetune", "llmembed", "ls-llama", "ls-unllama", "tfidf"]
    spec = parse_spec({"method": "tfidf", "model": "tfidf", "task": "massive-intent", "data_dir": str(SAMPLES),
                       "options": {"dev_limit": 5}})
    tasks = load_tasks(spec)
    assert len(tasks[0].dev) == 5
    points = []
    ctx = method_context("tfidf", "tfidf", tasks, log_metric=lambda *a: points.append(a), dev_limit=5)
    run_method(tfidf, ctx)
    assert "dev accuracy" in capsys.readouterr().out.split("(5 examples)")[0]
    (_, name, value), = points
    assert name == "eval_accuracy" and value * 5 == pytest.approx(round(value * 5))  # k right out of 5


# ---------------------------------------------------------------------------------------------------------------
# A broken file in the tasks folder
# ---------------------------------------------------------------------------------------------------------------


def test_a_broken_file_is_skipped_and_reported_not_fatal(tmp_path, monkeypatch):
    from clfbench.engine.tasks import broken_definitions

    tdir = _home_with_the_user_task(tmp_path / "home", monkeypatch)
    (tdir / "typo.yaml").write_text("name: typo\nkind: [unclosed\n")
    (tdir / "ner.yaml").write_text("name: my-ner\nkind: token\ndataset: massive_en\ntags_column: slots\n"
                                   "labels: [O, PER]\n")
    (tdir / "a.yaml").write_text("name: twice\nkind: sequence\ndataset: 20ng\nlabel_column: label\n")
    (tdir / "b.yaml").write_text("name: twice\nkind: sequence\ndataset: 20ng\nlabel_column: label\n")
    (tdir / "clash.yaml").write_text("name: massive-intent\nkind: sequence\ndataset: 20ng\nlabel_column: label\n")
    names = [t.name for t in list_tasks()]
    assert names[-1] == "massive-subset-intent" and "twice" not in names and "my-ner" not in names
    broken = {b.path.name: b for b in broken_definitions()}
    assert sorted(broken) == ["a.yaml", "b.yaml", "clash.yaml", "ner.yaml", "typo.yaml"]
    assert broken["ner.yaml"].name == "my-ner" and "'O' is not a slot type" in broken["ner.yaml"].error
    assert broken["typo.yaml"].name == "typo" and "invalid YAML" in broken["typo.yaml"].error
    assert all("\n" not in b.error for b in broken.values())
    # a good user task and every built-in are found while other files are broken
    assert len(load_task(get_task("massive-subset-intent")).train) > 50
    assert get_task("massive-intent").origin == "built-in"
    # the broken task's own name gives its error, not "unknown task"
    _raises(lambda: get_task("my-ner"), "ner.yaml", "'O' is not a slot type")
    _raises(lambda: get_task("typo"), "invalid YAML", "typo.yaml")
    _raises(lambda: get_task("twice"), "task 'twice' is also defined in", "a.yaml", "b.yaml")
    _raises(lambda: get_task("nope"), "unknown task 'nope'", "massive-subset-intent")
