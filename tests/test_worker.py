"""The worker's side of the run contract, checked once for every method: the tasks fit the method's catalog entry
before any model loads, a method's answers are joined with the gold labels and texts (none missing, none extra),
and joint metrics are the ones the task definitions declare."""
from __future__ import annotations

import os
import sys

import pytest

from clfbench.engine.spec import parse_spec
from clfbench.engine.tasks import get_task, load_task
from clfbench.engine.types import ClfbenchError, Example, MethodOutput, Predicted, TaskData
from clfbench.engine.worker import check_tasks, join_predictions, result_rows
from tests.conftest import SAMPLES


def task(name: str, kind: str = "sequence", labels=("a", "b"), train: int = 3, test: int = 2) -> TaskData:
    def example(split: str, i: int) -> Example:
        if kind == "token":
            return Example(id=f"{split}-{i}", text="x y", tokens=("x", "y"), tags=("O", "B-t"))
        return Example(id=f"{split}-{i}", text=f"text {i}", label=labels[i % len(labels)])

    return TaskData(name=name, kind=kind, labels=list(labels),
                    train=[example("train", i) for i in range(train)], test=[example("test", i) for i in range(test)])


def spec(method: str, tasks: list[TaskData], **options):
    return parse_spec({"method": method, "model": "tiny-bert", "task": "+".join(t.name for t in tasks),
                       "options": options})


@pytest.mark.parametrize("method, tasks, message", [
    ("encoder-finetune", [task("a"), task("b"), task("c")], "takes at most 2 task(s), got 'a+b+c'"),
    ("ls-llama", [task("a"), task("b", "token", ("O", "B-t", "I-t"))], "takes at most 1 task(s)"),
    ("llmembed", [task("s", "token", ("O", "B-t", "I-t"))], "handles sequence tasks; s is a token task"),
    ("encoder-finetune", [task("a"), task("a")], "a task is named twice"),
    ("encoder-finetune", [task("one", labels=("a",))], "task one has fewer than two labels"),
    ("llm-finetune", [task("empty", train=0)], "llm-finetune: task empty has no training examples"),
    ("prompt", [task("s", "token", ("O", "B-t", "I-t"))], "decision=score is not defined for token"),
])
def test_tasks_that_do_not_fit_the_method_fail_with_one_line(method, tasks, message):
    options = {"decision": "score"} if method == "prompt" else {}
    with pytest.raises(ClfbenchError) as error:
        check_tasks(spec(method, tasks, **options), tasks)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_prompting_needs_no_training_data():
    check_tasks(spec("prompt", [task("empty", train=0)]), [task("empty", train=0)])


def test_answers_are_joined_with_gold_and_text_in_test_order():
    intent, slots = task("intent"), task("slots", "token", ("O", "B-t", "I-t"))
    output = MethodOutput(predictions={
        "intent": {"test-1": Predicted("a", raw_output="A", parse_status="ok"), "test-0": Predicted(None, "?", "empty")},
        "slots": {"test-0": Predicted(["O", "O"]), "test-1": Predicted(["O", "B-t"])},
    })
    joined = join_predictions([intent, slots], output)
    assert [(p.example_id, p.gold, p.predicted, p.parse_status) for p in joined["intent"]] == [
        ("test-0", "a", None, "empty"), ("test-1", "b", "a", "ok")]
    assert joined["intent"][0].text == "text 0" and joined["intent"][0].raw_output == "?"
    assert [p.gold for p in joined["slots"]] == [["O", "B-t"], ["O", "B-t"]]


@pytest.mark.parametrize("answers, message", [
    ({"test-0": Predicted("a")}, "no prediction for 1 of 2 test examples (first: test-1) of task t"),
    ({"test-0": Predicted("a"), "test-1": Predicted("b"), "zz": Predicted("a")}, "1 ids not in the test set"),
])
def test_a_missing_or_unknown_answer_fails_the_run(answers, message):
    with pytest.raises(RuntimeError) as error:
        join_predictions([task("t")], MethodOutput(predictions={"t": answers}))
    assert message in str(error.value)


def test_exact_match_for_any_sequence_and_token_pair_over_the_same_examples():
    intent, slots = (load_task(get_task(name), data_dir=SAMPLES, test_limit=4, seed=0)
                     for name in ("massive-intent", "massive-slots"))
    output = MethodOutput(predictions={
        "massive-intent": {ex.id: Predicted(ex.label) for ex in intent.test},
        "massive-slots": {ex.id: Predicted(list(ex.tags)) if i % 2 else Predicted(["O"] * len(ex.tags))
                          for i, ex in enumerate(slots.test)},
    })
    joined = join_predictions([intent, slots], output)
    rows = {(r["task"], r["metric"]): r for r in result_rows([intent, slots], joined, {}, 1.0)}
    expected = sum(list(ex.tags) == (list(ex.tags) if i % 2 else ["O"] * len(ex.tags))
                   for i, ex in enumerate(slots.test)) / len(slots.test)
    assert rows[("massive-slots", "exact_match")]["value"] == pytest.approx(expected)
    # Slot scores name the task's rule; other rows name none.
    assert rows[("massive-slots", "exact_match")]["rule"] == rows[("massive-slots", "slot_f1")]["rule"] == "massive"
    assert rows[("massive-slots", "token_accuracy")]["rule"] is None
    assert rows[("massive-intent", "accuracy")]["rule"] is None
    # The same pair under other names (a user's copy of the tasks) gets it too, under the user task's rule.
    renamed = {"massive-intent": "my-intents", "massive-slots": "my-slots"}
    intent.name, slots.name, slots.slot_metric = "my-intents", "my-slots", None
    joined = {renamed[name]: predictions for name, predictions in joined.items()}
    rows = {(r["task"], r["metric"]): r for r in result_rows([intent, slots], joined, {}, 1.0)}
    assert rows[("my-slots", "exact_match")]["value"] == pytest.approx(expected)
    assert rows[("my-slots", "exact_match")]["rule"] == "conlleval"
    # Test sets that are not the same examples have no exact match (nothing to pair).
    joined["my-slots"] = joined["my-slots"][1:]
    slots.test = slots.test[1:]
    rows = {(r["task"], r["metric"]) for r in result_rows([intent, slots], joined, {}, 1.0)}
    assert ("my-slots", "exact_match") not in rows


@pytest.mark.parametrize("rank_body, reason", [
    ("import sys; sys.exit(4)", "worker stopped: the store was unreachable for longer than CLFBENCH_STORE_OUTAGE_S"),
    ("import sys; sys.exit(3)", "worker stopped: the store said the run is no longer this attempt's"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "worker killed by signal SIGKILL"),
])
def test_why_an_attempt_ended_is_read_through_torchrun(tmp_path, rank_body, reason):
    """torchrun exits 1 whatever its rank's code was; the engine reads the rank's code from torchrun's summary in
    this attempt's part of the log, so a retry says why (and never reads an earlier attempt's summary)."""
    import subprocess

    from clfbench.engine.daemon import ATTEMPT_HEADER, describe_exit, rank_exit_code, torchrun_command

    script = tmp_path / "rank.py"
    script.write_text(rank_body)
    done = subprocess.run(torchrun_command(1) + [str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1, done.stderr[-2000:]
    earlier = f"{ATTEMPT_HEADER} 1 attempt 1 on h =====\n  exitcode  : 7 (pid: 11)\n"
    log = f"{earlier}{ATTEMPT_HEADER} 1 attempt 2 on h =====\n{done.stdout}{done.stderr}"
    assert describe_exit(rank_exit_code(log)) == reason
    assert rank_exit_code(f"{earlier}{ATTEMPT_HEADER} 1 attempt 2 on h =====\nno summary\n") is None


def test_torchrun_starts_its_ranks_under_the_engines_own_python(tmp_path):
    """Never a `torchrun` from PATH: beside a second Python (a venv with --system-site-packages finds the
    system's), its ranks would import another clfbench than the engine's."""
    import subprocess

    from clfbench.engine.daemon import torchrun_command

    script = tmp_path / "rank.py"
    script.write_text("import sys; print('rank python', sys.executable)")
    decoy = tmp_path / "bin"
    decoy.mkdir()
    (decoy / "torchrun").write_text("#!/bin/sh\necho 'the wrong torchrun'; exit 9\n")
    (decoy / "torchrun").chmod(0o755)
    done = subprocess.run(torchrun_command(1) + [str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{decoy}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stdout[-1000:] + done.stderr[-2000:]
    assert f"rank python {sys.executable}" in done.stdout


def test_an_attempts_log_starts_at_its_header_wherever_the_read_chunks_fall(tmp_path):
    """Adopting a worker finds where its attempt's log starts by reading the log backwards in chunks; a header that
    straddles two chunks, an earlier attempt's header, and a file without the header all come out as a whole read
    would say."""
    from clfbench.engine.daemon import ATTEMPT_HEADER, attempt_start

    log = tmp_path / "run.log"
    body = ("step 1 loss 0.5\n" * 40 + f"\n{ATTEMPT_HEADER} 3 attempt 1 on h =====\n" + "step 2 loss 0.4\n" * 30 +
            f"\n{ATTEMPT_HEADER} 3 attempt 2 on h =====\n" + "step 3 loss 0.3\n" * 25).encode()
    log.write_bytes(body)
    for attempt in (1, 2):
        whole = body.rfind(f"{ATTEMPT_HEADER} 3 attempt {attempt} ".encode()) - 1
        assert body[whole:whole + 1] == b"\n"
        for chunk in (7, 16, 33, 100, 1 << 20):  # seams everywhere, the header's own length included
            assert attempt_start(str(log), 3, attempt, chunk=chunk) == whole
    assert attempt_start(str(log), 3, 4, chunk=16) == len(body)  # no such attempt: the file's end
    assert attempt_start(str(tmp_path / "missing.log"), 3, 1) == 0
