"""llm-finetune on a tiny random Llama: the answer-only label mask, the shared-prefix loss, learning, length
batches, 2-process DDP through the engine, resume after a SIGKILL, and bf16 on a GPU (skipped without one)."""
from __future__ import annotations

import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import text

from clfbench.storage.db import open_store
from tests.conftest import SAMPLES, run_method
from tests.test_e2e import (_children, attempts_did_not_overlap, events_of, no_process_left, store_run,
                            wait_for)

torch = pytest.importorskip("torch")

from clfbench.engine.methods import llm_finetune as lf  # noqa: E402
from clfbench.engine.methods.catalog import LlmFinetuneOptions  # noqa: E402
from clfbench.engine.decoding import Decoder, load_model  # noqa: E402
from clfbench.engine.prompting.chat import ChatFormat  # noqa: E402
from clfbench.engine.prompting.library import PromptBuilder, load_prompt_set, paired_items  # noqa: E402
from clfbench.engine.tasks import get_task, load_task  # noqa: E402
from clfbench.engine.training import length_grouped_epochs  # noqa: E402
from clfbench.engine.context import RunContext  # noqa: E402
from clfbench.engine.types import ClfbenchError  # noqa: E402
from tests.test_encoder_finetune import Recorder  # noqa: E402  (the shared test recorder)

TINY = ["--method", "llm-finetune", "--model", "tiny-llama", "--data-dir", str(SAMPLES)]


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    return load_model(tiny_llama, "float32", torch.device("cpu"))


def tasks_for(name: str, train: int = 64, test: int = 8):
    return [load_task(get_task(t), data_dir=SAMPLES, train_limit=train, test_limit=test, seed=0)
            for t in name.split("+")]


def setup(loaded, task: str, shots: int = 0):
    tokenizer, model = loaded
    tasks = tasks_for(task)
    chat = ChatFormat(tokenizer, "template", model.generation_config)
    builder = PromptBuilder.create(load_prompt_set().select(tasks, shots), tasks, shots, 0, None, chat.forbidden)
    return chat, builder, Decoder(model, chat, torch.device("cpu"))




def make_ctx(model_path: str, task: str, output_dir: Path, recorder: Recorder, device: str = "cpu", shots: int = 0,
             train: int = 64, test: int = 8, **options) -> RunContext:
    defaults = dict(epochs=3, batch_size=8, lr=2e-3, log_every=2, eval_every=4, checkpoint_every=0, dev_limit=16)
    defaults.update(options)
    torch.manual_seed(0)
    return RunContext(run_id=1, attempt=1, spec=SimpleNamespace(seed=0, shots=shots, method="llm-finetune"),
                      options=LlmFinetuneOptions(**defaults), tasks=tasks_for(task, train, test),
                      model_path=model_path, output_dir=output_dir, rank=0, world_size=1, local_rank=0, device=device,
                      log_metric=recorder.log_metric, set_progress=recorder.set_progress)


# ------------------------------------------------------------------------------------------ label mask


@pytest.mark.parametrize("task, shots", [("massive-intent", 0), ("massive-intent", 5),
                                         ("massive-intent+massive-slots", 0)])
def test_only_the_answer_and_the_stop_token_carry_labels(loaded, task, shots):
    chat, builder, decoder = setup(loaded, task, shots)
    tokenizer = chat.tokenizer
    for item in paired_items(builder.tasks, "train")[:6]:
        encoded = lf.encode_item(decoder, builder, item)
        # The prompt is exactly what the prompt method feeds at test time, and none of it is labelled.
        prompt_ids = chat.encode(chat.text(builder.render(item.text)))
        assert encoded.ids[:len(prompt_ids)] == prompt_ids
        labels = encoded.labels
        assert all(label == lf.IGNORE_INDEX for label in labels[:len(prompt_ids)])
        answer = [label for label in labels if label != lf.IGNORE_INDEX]
        assert len(answer) == len(encoded.ids) - len(prompt_ids)  # every answer token is labelled
        assert answer[-1] == chat.stop_id
        assert tokenizer.decode(answer[:-1]) == builder.target(item)
    if "+" in task:
        assert builder.target(item).startswith('{"task1": "')  # the consolidated JSON answer


def test_the_loss_reads_only_answer_positions(loaded):
    """The batched loss equals a per-example reference over the answer tokens; changing a prompt token's label
    in the reference (as a mask that leaked would) gives a different number."""
    chat, builder, decoder = setup(loaded, "massive-intent")
    _, model = loaded
    rows = [lf.encode_item(decoder, builder, item) for item in paired_items(builder.tasks, "train")[:4]]
    loss = lf.AnswerLoss(model, decoder)
    with torch.no_grad():
        batched = float(loss(**lf._inputs(lf.collate(rows, [], decoder.pad_id), torch.device("cpu"))))
        reference = leaked = 0.0
        for row in rows:
            logits = model(input_ids=torch.tensor([row.ids])).logits[0, :-1].float()
            targets = torch.tensor(row.ids[1:])
            per_token = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
            reference += float(per_token[row.n_prompt - 1:].sum())
            leaked += float(per_token[row.n_prompt - 2:].sum())  # one prompt token too many
    assert batched == pytest.approx(reference, rel=1e-5)
    assert abs(leaked - reference) > 1e-3


@pytest.mark.parametrize("task", ["massive-intent", "massive-intent+massive-slots"])
def test_shared_prefix_gives_the_same_loss_and_gradients(loaded, task):
    chat, builder, decoder = setup(loaded, task)
    _, model = loaded
    rows = [lf.encode_item(decoder, builder, item) for item in paired_items(builder.tasks, "train")[:5]]
    prefix = lf.shared_prefix_ids(chat, builder)
    assert len(prefix) > 0.8 * min(len(r.ids) for r in rows)  # the label list is most of the prompt
    loss = lf.AnswerLoss(model, decoder)
    results = []
    for shared in (prefix, []):
        model.zero_grad()
        batch = lf.collate(rows, shared, decoder.pad_id)
        assert (batch.prefix is not None) == bool(shared)
        value = loss(**lf._inputs(batch, torch.device("cpu")))
        value.backward()
        results.append((float(value.detach()), model.model.embed_tokens.weight.grad.clone()))
    model.zero_grad()
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5)


# ---------------------------------------------------------------------------------------------- batches


def test_length_batches_are_seeded_and_dealt_evenly():
    lengths = [10 + (i * 37) % 90 for i in range(101)]
    key = f"{lf.SHUFFLE_KEY}:3"  # seed 3
    ranks = [length_grouped_epochs(lengths, 4, 2, rank, key, lf.SORT_WINDOW) for rank in (0, 1)]
    epoch0 = [batches_of(0) for batches_of in ranks]
    assert len(epoch0[0]) == len(epoch0[1])  # the same number of micro-batches on every rank
    seen = sorted(i for batches in epoch0 for batch in batches for i in batch)
    assert set(seen) == set(range(101)) and len(seen) == 102  # one row repeated to fill the last global batch
    again = length_grouped_epochs(lengths, 4, 2, 0, key, lf.SORT_WINDOW)
    assert again(0) == epoch0[0] and again(1) != epoch0[0]
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in epoch0[0]]
    assert sum(spread) / len(spread) < 10  # similar lengths together (random batches would spread ~60)


# ----------------------------------------------------------------------------------------- runs in-process


def test_training_lowers_the_loss_and_predicts_every_example(tiny_llama, tmp_path):
    recorder = Recorder()
    output = run_method(lf, make_ctx(tiny_llama, "massive-intent", tmp_path, recorder, epochs=4, lr=5e-3))
    losses, evals = recorder.values("train_loss"), recorder.values("eval_loss")
    assert losses[-1] < 0.75 * losses[0] and evals[-1] < 0.9 * evals[0]
    predictions = output.predictions["massive-intent"]
    assert len(predictions) == 8 and all(p.parse_status == "ok" for p in predictions)  # constrained: always parses
    extra = output.extra_results["massive-intent"]
    assert extra["train_steps"] == 4 * 64 / 8  # the samples have a dev split: all 64 rows train
    assert extra["train_tokens_per_s"] > 0 and extra["resumed_from_step"] == 0


def test_multi_task_trains_on_the_json_answer(tiny_llama, tmp_path):
    recorder = Recorder()
    output = run_method(lf, make_ctx(tiny_llama, "massive-intent+massive-slots", tmp_path, recorder, epochs=1, train=24,
                             test=4, decision="generate", max_new_tokens=8, max_length=2048))
    assert set(output.predictions) == {"massive-intent", "massive-slots"}
    assert all(len(v) == 4 for v in output.predictions.values())
    assert recorder.values("train_loss")


def test_resume_from_a_checkpoint_continues_where_it_stopped(tiny_llama, tmp_path, capsys):
    full = Recorder()
    run_method(lf, make_ctx(tiny_llama, "massive-intent", tmp_path / "full", full, epochs=2, checkpoint_every=4))

    class Crash(Exception):
        pass

    crashing = Recorder()
    original = crashing.log_metric

    def log_metric(step, name, value):
        if step > 8:
            raise Crash()
        original(step, name, value)

    crashing.log_metric = log_metric
    with pytest.raises(Crash):
        run_method(lf, make_ctx(tiny_llama, "massive-intent", tmp_path / "resumed", crashing, epochs=2, checkpoint_every=4))
    resumed = Recorder()
    output = run_method(lf, make_ctx(tiny_llama, "massive-intent", tmp_path / "resumed", resumed, epochs=2,
                             checkpoint_every=4))
    assert "resuming from" in capsys.readouterr().out
    assert output.extra_results["massive-intent"]["resumed_from_step"] == 8
    after = [(s, v) for s, n, v in full.metrics if n == "train_loss" and s > 8]
    assert [(s, pytest.approx(v, rel=1e-4)) for s, v in after] == \
        [(s, v) for s, n, v in resumed.metrics if n == "train_loss"]


def test_long_prompts_are_refused_or_cut(tiny_llama, tmp_path, capsys):
    with pytest.raises(ClfbenchError, match="longer than max_length=850"):
        run_method(lf, make_ctx(tiny_llama, "massive-intent", tmp_path, Recorder(), max_length=850, epochs=1))
    output = run_method(lf, make_ctx(tiny_llama, "massive-intent", tmp_path / "cut", Recorder(), max_length=850, epochs=1,
                             cut_long=True, train=16))
    assert "cut the documents of" in capsys.readouterr().out
    assert len(output.predictions["massive-intent"]) == 8
    with pytest.raises(ClfbenchError, match="the prompt alone"):
        run_method(lf, make_ctx(tiny_llama, "massive-intent", tmp_path, Recorder(), max_length=100, cut_long=True))


def test_paper_preset_sets_section_5_5_and_steps_by_model_size(tiny_llama, tmp_path):
    opts = LlmFinetuneOptions(preset="paper", lr=3e-4).resolved(["massive-intent"])
    assert (opts.lr, opts.batch_size, opts.global_batch, opts.max_length) == (1e-6, 1, 8, 16384)
    assert opts.cut_long and opts.gradient_checkpointing
    on_eight = SimpleNamespace(options=opts, world_size=8, is_main=False)
    assert lf.step_settings(on_eight, 8_030_261_248) == (1, 4000)  # Llama-3-8B: 8 processes x 1 = the batch of 8
    on_two = SimpleNamespace(options=opts, world_size=2, is_main=False)
    assert lf.step_settings(on_two, 70_553_706_496) == (4, 8000)  # 70B; 2 x 1 x 4 accumulated = 8
    mine = SimpleNamespace(options=LlmFinetuneOptions(max_steps=5, epochs=1), world_size=1, is_main=False)
    assert lf.step_settings(mine, 10**6) == (1, 5)
    with pytest.raises(ValueError, match="offload=true needs strategy=fsdp"):
        LlmFinetuneOptions(offload=True).check_task_kinds(["sequence"])


def _losses(store, run_id: int, name: str) -> list[tuple[int, float]]:
    with store.read() as connection:
        return [tuple(row) for row in connection.execute(text(
            "SELECT step, value FROM metric_points WHERE run_id = :run AND name = :name ORDER BY step"),
            {"run": run_id, "name": name})]


def test_fsdp_over_two_cpu_processes_follows_ddp(cli):
    """FSDP2 over gloo and DDP compute the same training: the same loss at every step (float tolerance: the
    reduce-scatter sums in another order, and FSDP feeds whole sequences where DDP shares the prompt prefix),
    with gradients accumulated over two micro-batches."""
    common = [*TINY, "--task", "massive-intent", "--nproc", "2", "-o", "max_steps=4", "-o", "train_limit=32",
              "-o", "test_limit=6", "-o", "batch_size=2", "-o", "grad_accum=2", "-o", "log_every=1",
              "-o", "dev_limit=3", "-o", "eval_every=2", "-o", "lr=1e-3", "-o", "checkpoint_every=0"]
    (ddp,) = cli.json("queue", *common, "-o", "strategy=ddp")
    (fsdp,) = cli.json("queue", *common, "-o", "strategy=fsdp")
    cli.run("engine", "--until-idle")
    for run in (ddp, fsdp):
        shown = cli.json("show", str(run["id"]))
        assert shown["status"] == "succeeded", shown["error"]
    store = open_store()
    for name in ("train_loss", "eval_loss"):
        expected, got = _losses(store, ddp["id"], name), _losses(store, fsdp["id"], name)
        assert [step for step, _ in got] == [step for step, _ in expected] and len(got) >= 2
        assert [value for _, value in got] == pytest.approx([value for _, value in expected], rel=1e-4), name
    train = [value for _, value in _losses(store, fsdp["id"], "train_loss")]
    assert train[-1] < train[0]  # it learns (lr 1e-3 on the tiny model)
    # rank 0 predicts with the gathered weights, not the untrained ones it loaded: the same answers as DDP's model
    expected, got = _answers(store, ddp["id"]), _answers(store, fsdp["id"])
    assert len(got) == 6 and got == expected


def _answers(store, run_id: int) -> list[tuple]:
    with store.read() as connection:
        return [tuple(row) for row in connection.execute(text(
            "SELECT example_id, predicted, raw_output FROM predictions WHERE run_id = :run ORDER BY example_id"),
            {"run": run_id})]


def test_fsdp_frees_its_shards_and_optimizer_before_the_model_that_predicts_is_loaded(tiny_llama, tmp_path,
                                                                                      monkeypatch):
    """At 70B the sharded weights, gradients and Adam state do not fit beside the full model rank 0 predicts
    with (nor does that model fit one GPU: it is placed across the run's GPUs): they must be gone first."""
    import gc
    import weakref

    import torch.distributed as dist
    from clfbench.engine import fsdp

    sharded, optimizers, alive_at_load = [], [], []
    real_shard, real_optimizer, real_load = fsdp.shard, fsdp.make_optimizer, lf.load_model

    def shard(module, model, *args, **kwargs):
        sharded.append(weakref.ref(model))
        return real_shard(module, model, *args, **kwargs)

    def make_optimizer(*args, **kwargs):
        optimizers.append(weakref.ref(optimizer := real_optimizer(*args, **kwargs)))
        return optimizer

    def load_model(*args, **kwargs):
        if sharded:  # the prediction model's load, after training
            alive_at_load.append([ref() is not None for ref in (*sharded, *optimizers)])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(fsdp, "shard", shard)
    monkeypatch.setattr(fsdp, "make_optimizer", make_optimizer)
    monkeypatch.setattr(lf, "load_model", load_model)
    recorder = Recorder()
    try:
        output = run_method(lf, make_ctx(tiny_llama, "massive-intent", tmp_path, recorder, strategy="fsdp",
                                         epochs=1, train=16, test=4))
    finally:
        if dist.is_initialized():  # the one-rank group FSDP made in this process
            dist.destroy_process_group()
    gc.collect()
    assert len(sharded) == len(optimizers) == 1 and alive_at_load == [[False, False]]
    assert len(output.predictions["massive-intent"]) == 4


def kill_a_rank_once_checkpointed(cli, run_id: int, rank: int, marker: str = "checkpoint",
                                  inspect=lambda output_dir: None) -> None:
    """Start the engine, SIGKILL the run's worker `rank` (0 or -1: the last) once `output_dir/<marker>` exists
    (after `inspect(output_dir)`), and wait for the engine to finish the run's next attempt; then the run resumed and nothing of attempt 1 is
    left."""
    store = open_store()

    def checkpointed() -> bool:
        row = store_run(store, run_id)
        return bool(row["output_dir"]) and (Path(row["output_dir"]) / marker).exists()

    engine = cli.popen("engine", "--until-idle")
    try:
        wait_for(checkpointed, 180, "the first checkpoint")
        inspect(Path(store_run(store, run_id)["output_dir"]))
        workers = _children(store_run(store, run_id)["pid"])
        assert workers, "torchrun has no worker child"
        os.kill(workers[rank], signal.SIGKILL)
        engine.wait(timeout=600)
    finally:
        engine.kill()
    row = store_run(store, run_id)
    assert row["status"] == "succeeded" and row["attempt"] == 2
    assert no_process_left(store, run_id, attempt=1) and attempts_did_not_overlap(store, run_id)
    assert "requeued" in events_of(store, run_id)
    assert "resuming from" in cli.run("logs", str(run_id)).stdout


def test_fsdp_sigkill_resumes_from_the_sharded_checkpoint(cli):
    """Rank 1 killed: rank 0 sees its peer gone mid-collective and must not call the run failed."""
    (run,) = cli.json("queue", *TINY, "--task", "massive-intent", "--nproc", "2", "-o", "strategy=fsdp",
                      "-o", "max_steps=24", "-o", "train_limit=32", "-o", "test_limit=2", "-o", "batch_size=2",
                      "-o", "checkpoint_every=6", "-o", "eval_every=0", "-o", "log_every=6")

    def one_shard_file_per_rank(output_dir: Path) -> None:  # no rank ever holds the whole state
        assert len(list((output_dir / "checkpoint").glob("*.distcp"))) == 2

    kill_a_rank_once_checkpointed(cli, run["id"], rank=-1, marker="checkpoint/meta.json",
                                  inspect=one_shard_file_per_rank)
    shown = cli.json("show", str(run["id"]))
    assert shown["results"]["massive-intent"]["resumed_from_step"] >= 6
    assert shown["results"]["massive-intent"]["train_steps"] == 24


@pytest.mark.gpu
def test_bf16_on_a_gpu_learns(tiny_llama, tmp_path):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    recorder = Recorder()
    output = run_method(lf, make_ctx(tiny_llama, "massive-intent", tmp_path, recorder, device="cuda:0", epochs=4, lr=5e-3))
    losses = recorder.values("train_loss")
    assert losses[-1] < 0.75 * losses[0]
    assert all(p.parse_status == "ok" for p in output.predictions["massive-intent"])


# -------------------------------------------------------------------------------- through the engine


def test_two_process_run_logs_each_loss_once(cli):
    (run,) = cli.json("queue", *TINY, "--task", "massive-intent", "--nproc", "2", "-o", "epochs=1",
                      "-o", "train_limit=64", "-o", "test_limit=10", "-o", "batch_size=4", "-o", "log_every=2",
                      "-o", "dev_limit=8")
    cli.run("engine", "--until-idle")
    shown = cli.json("show", str(run["id"]))
    assert shown["status"] == "succeeded", shown["error"]
    assert shown["results"]["massive-intent"]["n"] == 10
    log = cli.run("logs", str(run["id"])).stdout
    assert "rank 0/2" in log and "rank 1/2" in log
    store = open_store()
    with store.read() as connection:
        duplicates = connection.execute(text(
            "SELECT step, count(*) FROM metric_points WHERE name = 'train_loss' GROUP BY step HAVING count(*) > 1"
        )).all()
        steps = [row[0] for row in connection.execute(text(
            "SELECT step FROM metric_points WHERE name = 'train_loss' ORDER BY step"))]
    # 64 rows (the samples have a dev split) / (2 ranks x 4 per batch) = 8 steps, a point every 2 steps.
    assert duplicates == [] and steps == [2, 4, 6, 8]


def test_sigkill_of_the_worker_resumes_from_the_checkpoint(cli):
    (run,) = cli.json("queue", *TINY, "--task", "massive-intent", "-o", "epochs=6", "-o", "train_limit=64",
                      "-o", "test_limit=10", "-o", "batch_size=8", "-o", "checkpoint_every=8", "-o", "eval_every=0",
                      "-o", "log_every=2")
    run_id = run["id"]
    kill_a_rank_once_checkpointed(cli, run_id, rank=0)
    shown = cli.json("show", str(run_id))
    assert shown["results"]["massive-intent"]["resumed_from_step"] >= 8
