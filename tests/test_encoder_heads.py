"""encoder-finetune heads: token (BIO slot filling), joint sequence+token and sequence+sequence on one shared
encoder, the paper preset, and a joint MASSIVE run through the real CLI. Tiny random BERT, synthetic tasks."""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from clfbench.engine import heads, training  # noqa: E402
from clfbench.engine.codec import IGNORE_INDEX, Codec, Row, align_labels, align_rows, word_tags  # noqa: E402
from clfbench.engine.dev_split import split_dev, split_dev_rows  # noqa: E402
from clfbench.engine.methods import encoder_finetune as ef  # noqa: E402
from clfbench.engine.methods.catalog import METHODS, EncoderFinetuneOptions  # noqa: E402
from clfbench.engine.metrics import slot_scores  # noqa: E402
from clfbench.engine.context import RunContext  # noqa: E402
from clfbench.engine.types import ClfbenchError, Example, TaskData  # noqa: E402
from tests.conftest import SAMPLES, run_method  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FILLER = "the a weather music alarm play set tomorrow lights email news train pizza please morning kitchen jazz".split()
KEYS = ["alpha", "beta", "gamma", "delta"]
CITIES = ["boston", "london", "paris", "zanzibarqx"]  # zanzibarqx: several sub-words in tiny-bert
SLOT_TAGS = ["O", "B-city", "I-city", "B-time", "I-time"]


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    yield


# The same tiny model and in-memory recorder as the sequence-head tests.
from tests.test_encoder_finetune import Recorder as SequenceTestRecorder  # noqa: E402


class Recorder(SequenceTestRecorder):
    def names(self) -> set[str]:
        return {n for _, n, _ in self.metrics}


# ------------------------------------------------------------------------------------- synthetic tasks


def _utterance(rng: random.Random, long: bool = False) -> tuple[str, list[str], list[str]]:
    """(key word, words, BIO tags): filler words, one key word, a city (1 or 2 words) and maybe a time."""
    key = rng.choice(KEYS)
    units: list[tuple[list[str], list[str]]] = [([w], ["O"]) for w in rng.sample(FILLER, 12 if long else 4)]
    units.append(([key], ["O"]))
    city = rng.choice(CITIES + ["new york"]).split()
    units.append((city, ["B-city"] + ["I-city"] * (len(city) - 1)))
    if rng.random() < 0.6:
        units.append(([rng.choice(["seven", "six", "noon"]), rng.choice(["am", "pm"])], ["B-time", "I-time"]))
    rng.shuffle(units)
    words = [w for unit, _ in units for w in unit]
    tags = [t for _, unit_tags in units for t in unit_tags]
    return key, words, tags


def synthetic_tasks(n_train: int = 200, n_test: int = 60, n_dev: int = 0, seed: int = 1, long_test: bool = False
                    ) -> dict[str, TaskData]:
    """Three tasks over the same utterances (same ids): `syn-intent` (the key word, 4 labels), `syn-coarse`
    (alpha/beta -> ab, gamma/delta -> gd) and `syn-slots` (BIO city/time spans)."""
    rng = random.Random(seed)
    splits: dict[str, list] = {}
    for split, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        splits[split] = [(f"{split}-{i}", *_utterance(rng, long=long_test and split == "test")) for i in range(n)]

    def sequence(name: str, labels: list[str], label_of) -> TaskData:
        made = {split: [Example(id=i, text=" ".join(words), label=label_of(key)) for i, key, words, _ in rows]
                for split, rows in splits.items()}
        return TaskData(name=name, kind="sequence", labels=labels, **made)

    slots = {split: [Example(id=i, text=" ".join(words), tokens=tuple(words), tags=tuple(tags))
                     for i, _, words, tags in rows] for split, rows in splits.items()}
    return {
        "syn-intent": sequence("syn-intent", KEYS, lambda key: key),
        "syn-coarse": sequence("syn-coarse", ["ab", "gd"], lambda key: "ab" if key in ("alpha", "beta") else "gd"),
        "syn-slots": TaskData(name="syn-slots", kind="token", labels=SLOT_TAGS, **slots),
    }


def make_ctx(model_path: str, output_dir: Path, recorder: Recorder, tasks: list[TaskData], seed: int = 0,
             **options) -> RunContext:
    defaults = dict(epochs=6, batch_size=16, lr=1e-2, eval_every=10, checkpoint_every=0, log_every=1)
    defaults.update(options)
    torch.manual_seed(seed)  # the worker seeds every RNG before the method runs
    random.seed(seed)
    return RunContext(
        run_id=1, attempt=1, spec=SimpleNamespace(seed=seed, method="encoder-finetune"),
        options=EncoderFinetuneOptions(**defaults).resolved([task.name for task in tasks]),  # as the worker does
        tasks=tasks, model_path=model_path, output_dir=output_dir, rank=0, world_size=1, local_rank=0,
        device="cpu", log_metric=recorder.log_metric, set_progress=recorder.set_progress,
    )


def accuracy(predictions) -> float:
    return sum(p.predicted == p.gold for p in predictions) / len(predictions)


def slot_f1(predictions) -> float:
    return slot_scores([p.gold for p in predictions], [p.predicted for p in predictions])["slot_f1"]


# ------------------------------------------------------------------------------ first sub-word labels


def test_only_the_first_sub_word_of_each_word_carries_its_tag(tiny_bert):
    tokenizer, _ = heads.load_encoder(tiny_bert, [heads.Head("s", "token", SLOT_TAGS)], words=True)
    codec = Codec(tokenizer, words=True, max_length=64)
    words = ["fly", "to", "zanzibarqx", "at", "seven", "am"]
    tags = ["O", "O", "B-city", "O", "B-time", "I-time"]
    label2id = {tag: i for i, tag in enumerate(SLOT_TAGS)}
    encoding = codec.encode([tuple(words), ("paris",)])
    pieces = tokenizer.convert_ids_to_tokens(encoding["input_ids"][0].tolist())
    word_ids = encoding.word_ids(0)
    labels = align_labels(word_ids, tags, label2id)

    city_pieces = [p for p, w in zip(pieces, word_ids) if w == 2]
    assert len(city_pieces) >= 2 and city_pieces[1].startswith("##")  # really split into sub-words
    starts = [i for i, w in enumerate(word_ids) if w is not None and (i == 0 or word_ids[i - 1] != w)]
    assert len(starts) == len(words)
    for position, (piece, word, label) in enumerate(zip(pieces, word_ids, labels)):
        if position in starts:
            assert label == label2id[tags[word]], (piece, word)
        else:  # [CLS], [SEP], later sub-words: ignored by the loss
            assert label == IGNORE_INDEX, (piece, word)
    assert [labels[i] for i in starts] == [label2id[t] for t in tags]

    # In a padded batch the padding is ignored too; one labelled position per word.
    rows = [Row("a", tuple(words), (Example("a", " ".join(words), tokens=tuple(words), tags=tuple(tags)),)),
            Row("b", ("paris",), (Example("b", "paris", tokens=("paris",), tags=("B-city",)),))]
    (targets,) = heads.batch_targets([heads.Head("s", "token", SLOT_TAGS)], rows, encoding, torch.device("cpu"))
    assert targets.shape == encoding["input_ids"].shape
    assert targets[0].tolist() == labels
    assert targets[1].tolist() == [-100, label2id["B-city"]] + [-100] * (targets.shape[1] - 2)
    assert (targets != -100).sum(-1).tolist() == [len(words), 1]

    # Reading predictions back: one tag per word, from its first sub-word.
    position_tags = [f"tag{i}" for i in range(len(word_ids))]
    assert word_tags(word_ids, len(words), position_tags) == [f"tag{i}" for i in starts]


def test_truncated_words_are_tagged_o_and_counted(tiny_bert):
    tokenizer, _ = heads.load_encoder(tiny_bert, [heads.Head("s", "token", SLOT_TAGS)], words=True)
    codec = Codec(tokenizer, words=True, max_length=8)
    words = ("fly", "to", "zanzibarqx", "at", "seven", "am", "please", "now")
    encoding = codec.encode([words])
    word_ids = encoding.word_ids(0)
    assert len(word_ids) == 8 and word_ids[-1] is None  # cut, and still ends with [SEP]
    kept = {w for w in word_ids if w is not None}
    assert kept == set(range(max(kept) + 1)) and max(kept) < len(words) - 1
    predicted = word_tags(word_ids, len(words), ["B-time"] * len(word_ids))
    assert len(predicted) == len(words)
    assert predicted == ["B-time"] * len(kept) + ["O"] * (len(words) - len(kept))
    rows = [Row("a", words, ()), Row("b", ("short",), ())]
    assert codec.truncated_words(rows) == [len(words) - len(kept), 0]
    # The loss ignores cut-off words: only kept words carry labels.
    labels = align_labels(word_ids, ["O"] * len(words), {"O": 0})
    assert sum(label != -100 for label in labels) == len(kept)


# ------------------------------------------------------------------------------------------- runs


def test_token_head_learns_slot_filling(tiny_bert, tmp_path):
    tasks = synthetic_tasks()
    recorder = Recorder()
    output = run_method(ef, make_ctx(tiny_bert, tmp_path, recorder, [tasks["syn-slots"]], log_every=5))
    predictions = output.predictions["syn-slots"]
    test = tasks["syn-slots"].test
    assert [p.example_id for p in predictions] == [ex.id for ex in test]
    assert all(len(p.predicted) == len(p.gold) == len(ex.tokens) for p, ex in zip(predictions, test))
    assert all(set(p.predicted) <= set(SLOT_TAGS) for p in predictions)
    assert slot_f1(predictions) >= 0.9
    assert {"train_loss", "lr", "eval_loss", "eval_slot_f1"} <= recorder.names()
    assert "eval_accuracy" not in recorder.names()
    assert recorder.values("eval_slot_f1")[-1] >= 0.9
    losses = recorder.values("train_loss")
    assert losses[-1] < losses[0] / 2 and all(math.isfinite(v) for v in losses)
    extra = output.extra_results["syn-slots"]
    assert extra["truncated_words"] == 0 and extra["train_steps"] == recorder.progress[-1][1]


def test_token_head_with_cut_off_test_words(tiny_bert, tmp_path):
    tasks = synthetic_tasks(n_train=64, n_test=12, long_test=True)
    task = tasks["syn-slots"]
    output = run_method(ef, make_ctx(tiny_bert, tmp_path, Recorder(), [task], epochs=1, max_length=12, eval_every=0))
    predictions = output.predictions["syn-slots"]
    # Independently: how many words of each test utterance keep a sub-word within 12 tokens.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    expected_cut = 0
    for prediction, ex in zip(predictions, task.test):
        word_ids = tokenizer(list(ex.tokens), is_split_into_words=True, truncation=True, max_length=12).word_ids()
        kept = len({w for w in word_ids if w is not None})
        expected_cut += len(ex.tokens) - kept
        assert len(prediction.predicted) == len(ex.tokens)
        assert prediction.predicted[kept:] == ["O"] * (len(ex.tokens) - kept)
    assert expected_cut > 0
    assert output.extra_results["syn-slots"]["truncated_words"] == expected_cut


def test_joint_sequence_and_token_heads_learn_on_one_encoder(tiny_bert, tmp_path):
    tasks = synthetic_tasks()
    recorder = Recorder()
    # 20 epochs: in a 32-wide random model the slot head's gradients dominate early and slow the intent head
    # (intent accuracy 0.3 after 6 epochs, 1.0 after 20 for seeds 0-2; with the slot loss weighted 0 it learns
    # in 6, so this is the joint objective, not the word-split encoding).
    output = run_method(ef, make_ctx(tiny_bert, tmp_path, recorder, [tasks["syn-intent"], tasks["syn-slots"]], epochs=20,
                             eval_every=40))
    ids = [ex.id for ex in tasks["syn-intent"].test]
    intents, slots = output.predictions["syn-intent"], output.predictions["syn-slots"]
    assert [p.example_id for p in intents] == ids == [p.example_id for p in slots]
    assert all(isinstance(p.predicted, str) for p in intents) and all(isinstance(p.predicted, list) for p in slots)
    assert accuracy(intents) >= 0.9 and slot_f1(slots) >= 0.9
    # The sequence head's softmax probability of each answer (calibration); tags carry none.
    labels = len(tasks["syn-intent"].labels)
    assert all(1 / labels <= p.confidence <= 1 for p in intents) and all(p.confidence is None for p in slots)
    assert set(output.extra_results) == {"syn-intent", "syn-slots"}
    assert "truncated_words" in output.extra_results["syn-slots"]
    assert "truncated_words" not in output.extra_results["syn-intent"]

    # One train_loss per step (log_every=1), the sum of the two heads' losses.
    total = recorder.progress[-1][1]
    assert recorder.steps("train_loss") == list(range(1, total + 1))
    summed = [a + b for a, b in zip(recorder.values("train_loss/syn-intent"), recorder.values("train_loss/syn-slots"))]
    assert recorder.values("train_loss") == pytest.approx(summed, rel=1e-5)
    # Dev: each head's metric under its plain name (unambiguous here), the eval loss summed.
    assert recorder.values("eval_accuracy")[-1] >= 0.9 and recorder.values("eval_slot_f1")[-1] >= 0.9
    eval_sum = [a + b for a, b in zip(recorder.values("eval_loss/syn-intent"), recorder.values("eval_loss/syn-slots"))]
    assert recorder.values("eval_loss") == pytest.approx(eval_sum)


def test_joint_two_sequence_heads(tiny_bert, tmp_path):
    tasks = synthetic_tasks()
    recorder = Recorder()
    output = run_method(ef, make_ctx(tiny_bert, tmp_path, recorder, [tasks["syn-intent"], tasks["syn-coarse"]]))
    fine, coarse = output.predictions["syn-intent"], output.predictions["syn-coarse"]
    assert [p.example_id for p in fine] == [p.example_id for p in coarse] == [e.id for e in tasks["syn-intent"].test]
    assert {p.predicted for p in fine} <= set(KEYS) and {p.predicted for p in coarse} <= {"ab", "gd"}
    assert accuracy(fine) >= 0.9 and accuracy(coarse) >= 0.9
    total = recorder.progress[-1][1]
    assert recorder.steps("train_loss") == list(range(1, total + 1))
    # Two heads report accuracy: each under its task's name.
    assert "eval_accuracy" not in recorder.names()
    assert recorder.values("eval_accuracy/syn-intent")[-1] >= 0.9
    assert recorder.values("eval_accuracy/syn-coarse")[-1] >= 0.9


def test_joint_tasks_must_pair_by_id(tiny_bert, tmp_path):
    tasks = synthetic_tasks(n_train=30, n_test=10)
    slots = tasks["syn-slots"]
    renamed = Example(id="train-odd", text=slots.train[3].text, tokens=slots.train[3].tokens, tags=slots.train[3].tags)
    slots.train[3] = renamed
    with pytest.raises(ClfbenchError, match="train example id 'train-3' of syn-intent is not in syn-slots"):
        run_method(ef, make_ctx(tiny_bert, tmp_path, Recorder(), [tasks["syn-intent"], slots]))
    # Ids that pair but in another order are fine: rows follow the first task's order.
    tasks = synthetic_tasks(n_train=30, n_test=10)
    tasks["syn-slots"].train.reverse()
    rows = align_rows([tasks["syn-intent"], tasks["syn-slots"]], "train", word_source=1)
    assert [r.id for r in rows] == [ex.id for ex in tasks["syn-intent"].train]
    assert all(r.examples[0].id == r.examples[1].id and r.inputs == r.examples[1].tokens for r in rows)
    # An id only the second task has is named too.
    tasks["syn-slots"].test.append(Example(id="extra", text="x", tokens=("x",), tags=("O",)))
    with pytest.raises(ClfbenchError, match="test example id 'extra' of syn-slots"):
        align_rows([tasks["syn-intent"], tasks["syn-slots"]], "test", word_source=1)


def test_joint_hold_out_is_the_same_rows_for_both_tasks():
    tasks = synthetic_tasks(n_train=100)
    rows = align_rows([tasks["syn-intent"], tasks["syn-coarse"]], "train")
    train, dev = split_dev_rows(rows, [], 0.1, seed=3)
    single_train, single_dev = split_dev(tasks["syn-intent"], 0.1, seed=3)
    assert [r.id for r in dev] == [ex.id for ex in single_dev] and len(dev) == 10
    assert [r.id for r in train] == [ex.id for ex in single_train]
    assert all(r.examples[0].id == r.examples[1].id for r in dev)


def test_joint_resume_after_a_crash_continues_exactly(tiny_bert, tmp_path):
    tasks = synthetic_tasks(n_train=96, n_test=20)
    pair = [tasks["syn-intent"], tasks["syn-slots"]]
    options = dict(epochs=2, checkpoint_every=4, eval_every=0)
    reference = Recorder()
    expected = run_method(ef, make_ctx(tiny_bert, tmp_path / "reference", reference, pair, **options))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_method(ef, make_ctx(tiny_bert, tmp_path / "retried", Recorder(crash_at_step=7), pair, **options))
    retried = Recorder()
    output = run_method(ef, make_ctx(tiny_bert, tmp_path / "retried", retried, pair, **options))
    assert output.extra_results["syn-slots"]["resumed_from_step"] == 4
    assert retried.steps("train_loss")[0] == 5
    assert retried.values("train_loss") == pytest.approx(reference.values("train_loss")[4:], rel=1e-5)
    for name in ("syn-intent", "syn-slots"):
        assert [p.predicted for p in output.predictions[name]] == [p.predicted for p in expected.predictions[name]]


DDP_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch, torch.distributed as dist
    sys.path.insert(0, {root!r})
    from tests.test_encoder_heads import make_ctx, Recorder, synthetic_tasks, slot_f1
    from tests.conftest import run_method
    from clfbench.engine.methods import encoder_finetune

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tasks = synthetic_tasks(n_train=120, n_test=30, n_dev=21)
    recorder = Recorder()
    ctx = make_ctx({model!r}, Path({out!r}), recorder, [tasks["syn-intent"], tasks["syn-slots"]], batch_size=8,
                   eval_every=0, log_every=5)
    ctx.rank, ctx.world_size, ctx.local_rank = rank, 2, rank
    output = run_method(encoder_finetune, ctx)
    result = {{"rank": rank, "metrics": recorder.metrics, "output": output is not None}}
    if output is not None:
        result["n"] = [len(output.predictions[k]) for k in ("syn-intent", "syn-slots")]
        result["slot_f1"] = slot_f1(output.predictions["syn-slots"])
    Path({out!r}, f"rank{{rank}}.json").write_text(json.dumps(result))
    dist.barrier()  # neither rank tears gloo down while the other still uses it
    dist.destroy_process_group()
""")


def test_joint_heads_under_two_process_ddp(tiny_bert, tmp_path):
    script = tmp_path / "ddp_joint.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT), model=tiny_bert, out=str(tmp_path)))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["output"] and not rank1["output"] and rank0["n"] == [30, 30]
    assert rank0["slot_f1"] >= 0.8
    # Dev slot F1 is computed over both ranks' shares (gathered): identical on both ranks.
    f1 = [[v for _, n, v in r["metrics"] if n == "eval_slot_f1"] for r in (rank0, rank1)]
    assert len(f1[0]) == 1 and f1[0] == pytest.approx(f1[1])
    assert [m[:2] for m in rank0["metrics"]] == [m[:2] for m in rank1["metrics"]]


# -------------------------------------------------------------------------------------- paper preset


def test_paper_preset_sets_the_documented_values():
    given = EncoderFinetuneOptions(preset="paper", epochs=1, batch_size=4, lr=0.5, optimizer="adamw",
                                   weight_decay=0.3, max_length=64, warmup_ratio=0.1)
    for names, epochs in ((["20ng-20class"], 10), (["20ng-20class", "20ng-7class"], 10),
                          (["massive-intent"], 20), (["massive-intent", "massive-slots"], 20)):
        options = given.resolved(names)
        assert (options.batch_size, options.lr, options.optimizer, options.weight_decay, options.epochs) == \
            (32, 1e-5, "adam", 0.0, epochs)
        assert (options.max_length, options.warmup_ratio) == (64, 0.1)  # not the preset's business
    plain = EncoderFinetuneOptions(lr=0.5)
    assert plain.preset == "none" and plain.resolved(["massive-intent"]) is plain
    with pytest.raises(ValueError, match="not 'my-task'"):
        given.resolved(["my-task"])
    with pytest.raises(ValueError, match="mix 20NG and MASSIVE"):
        given.resolved(["20ng-7class", "massive-intent"])
    with pytest.raises(Exception, match="preset"):
        EncoderFinetuneOptions(preset="papers")
    info = METHODS["encoder-finetune"]
    assert info.task_kinds == ("sequence", "token") and info.max_tasks == 2
    assert "preset" in info.options.model_fields and "paper" in info.options.model_fields["preset"].description


def test_paper_preset_is_what_the_run_uses(tiny_bert, tmp_path, monkeypatch, capsys):
    tasks = synthetic_tasks(n_train=42, n_test=8)
    intent = tasks["syn-intent"]
    intent.name = "massive-intent"  # the preset reads the task names: MASSIVE -> 20 epochs
    made = []
    real = training.make_optimizer

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(training, "make_optimizer", spy)
    recorder = Recorder()
    output = run_method(ef, make_ctx(tiny_bert, tmp_path, recorder, [intent], preset="paper", epochs=1, batch_size=4,
                             lr=0.5, weight_decay=0.3, warmup_ratio=0.0, eval_every=0, log_every=1))
    assert "preset paper: batch_size=32 lr=1e-05 optimizer=adam weight_decay=0.0 epochs=20" in capsys.readouterr().out
    (optimizer,) = made
    assert type(optimizer) is torch.optim.Adam
    assert all(group["weight_decay"] == 0.0 for group in optimizer.param_groups)
    # 42 train, 2 held out (5%) -> 40 / 32 = 2 steps per epoch, 20 epochs.
    assert output.extra_results["massive-intent"]["train_steps"] == 40
    assert recorder.values("lr")[0] == pytest.approx(1e-5 * 39 / 40)  # linear decay from the preset's peak


# ------------------------------------------------------------------------------- through the real CLI


def test_joint_massive_intent_and_slots_through_the_cli(cli):
    (run,) = cli.json("queue", "--method", "encoder-finetune", "--model", "tiny-bert", "--data-dir", str(SAMPLES),
                      "--task", "massive-intent+massive-slots", "-o", "epochs=1", "-o", "test_limit=40",
                      "-o", "eval_every=0", "-o", "batch_size=32")
    cli.run("engine", "--until-idle")
    shown = cli.json("show", str(run["id"]))
    assert shown["status"] == "succeeded", shown.get("error")
    results = shown["results"]
    assert results["massive-intent"]["n"] == results["massive-slots"]["n"] == 40
    assert 0.0 <= results["massive-intent"]["accuracy"] <= 1.0
    assert 0.0 <= results["massive-slots"]["slot_f1"] <= 1.0
    assert 0.0 <= results["massive-slots"]["exact_match"] <= 1.0
    assert results["massive-slots"]["truncated_words"] == 0
    matrix = json.loads(cli.run("results", "--format", "json").stdout)
    assert matrix["columns"] == ["massive-intent (multi)", "massive-slots (multi)"]
    row = matrix["rows"][0]
    assert row["cells"]["massive-intent (multi)"]["runs"] == [run["id"]]
    assert row["cells"]["massive-slots (multi)"]["mean"] == pytest.approx(results["massive-slots"]["slot_f1"])
