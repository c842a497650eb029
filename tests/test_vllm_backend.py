"""The prompt method's vLLM backend (`backend: vllm`, engine/decoding/vllm_backend.py).

Everywhere (fast, no vLLM): the option and its `auto` resolution, the one-line refusal when vLLM is missing (at
queue time, through the real CLI), the structured-output constraint as plain values, and the score requests checked
against the hf scorer's numbers on a tiny model. Where vLLM is installed (its own environment, see docs/vllm.md;
skipped in CI): the whole method on vLLM against the hf path on the same tiny model.
"""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from clfbench.engine.methods import catalog
from clfbench.engine.methods.catalog import VLLM_MISSING, PromptOptions
from clfbench.engine.types import ClfbenchError
from tests.conftest import ROOT, SAMPLES, run_method
from tests.test_cli import assert_one_line_error

VLLM_INSTALLED = importlib.util.find_spec("vllm") is not None


# ------------------------------------------------------------------------------------ the option (no vLLM)


@pytest.mark.parametrize("installed, device, backend, expected", [
    (True, "cuda:0", "auto", "vllm"), (True, "cpu", "auto", "hf"), (False, "cuda:0", "auto", "hf"),
    (False, "cpu", "auto", "hf"), (True, "cuda:0", "hf", "hf"), (True, "cpu", "vllm", "vllm")])
def test_auto_is_vllm_only_on_a_gpu_where_vllm_is_installed(monkeypatch, installed, device, backend, expected):
    monkeypatch.setattr(catalog, "vllm_installed", lambda: installed)
    assert PromptOptions(backend=backend).backend_for(device) == expected


def test_the_default_backend_is_auto_and_a_wrong_one_is_named():
    assert PromptOptions().backend == "auto"
    with pytest.raises(ValidationError, match="backend"):
        PromptOptions(backend="tgi")


def test_asking_for_vllm_without_it_is_one_line_with_the_install_command(monkeypatch):
    monkeypatch.setattr(catalog, "vllm_installed", lambda: False)
    options = PromptOptions(backend="vllm")
    with pytest.raises(ValueError, match=re.escape('pip install "clfbench[vllm]"')):
        options.check_task_kinds(["sequence"])
    with pytest.raises(ClfbenchError, match="backend=vllm needs vLLM"):
        options.backend_for("cuda:0")
    assert "\n" not in VLLM_MISSING
    PromptOptions(backend="hf").check_task_kinds(["sequence"])  # hf never needs it


@pytest.mark.skipif(VLLM_INSTALLED, reason="vLLM is installed here: the queue accepts backend=vllm")
def test_the_queue_refuses_backend_vllm_without_vllm_and_stores_nothing(cli):
    result = cli.run("queue", "--method", "prompt", "--model", "tiny-llama", "--task", "massive-intent",
                     "--data-dir", str(SAMPLES), "-o", "backend=vllm", check=False)
    assert_one_line_error(result, "backend=vllm needs vLLM", 'pip install "clfbench[vllm]"')
    assert cli.json("ls") == []


def test_resolving_the_backend_imports_neither_vllm_nor_torch():
    code = ("import sys; from clfbench.engine.methods.catalog import PromptOptions; "
            "PromptOptions(backend='auto').backend_for('cuda:0'); "
            "print(sorted(m for m in ('vllm', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ the constraint as plain values (no vLLM)


torch = pytest.importorskip("torch")

from clfbench.engine.decoding import vllm_backend as vb  # noqa: E402
from clfbench.engine.prompting.outputs import output_spec, target_text  # noqa: E402
from clfbench.engine.prompting.parse import parse_answer  # noqa: E402
from clfbench.engine.tasks import get_task, load_task  # noqa: E402


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    """This file's tiny Llama: the suite's one with heads of 32 (its own are 8 wide). vLLM's CPU attention takes
    head sizes from 32 up, and on a CPU with AVX-512 it refuses 8 ("Unsupported CPU attention configuration")."""
    from clfbench.engine.tiny_models import build_tiny_llama

    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-head32"), head_dim=32))


def tasks_for(name: str, n: int = 6):
    return [load_task(get_task(t), data_dir=SAMPLES, test_limit=n, seed=0) for t in name.split("+")]


def examples(tasks):
    return [{t.name: t.test[i] for t in tasks} for i in range(len(tasks[0].test))]


def test_one_label_task_is_a_choice_list_of_its_labels():
    tasks = tasks_for("massive-intent")
    assert vb.structured_constraint(output_spec(tasks), None) == {"choice": list(tasks[0].labels)}


@pytest.mark.parametrize("name", ["massive-intent+massive-slots", "massive-slots"])
def test_the_regex_takes_every_canonical_answer_and_nothing_else(name):
    tasks = tasks_for(name)
    spec = output_spec(tasks, {"task1": "massive-intent", "task2": "massive-slots"} if "+" in name else None)
    for by_task in examples(tasks):
        n_words = len(by_task["massive-slots"].tokens)
        pattern = re.compile(vb.structured_constraint(spec, n_words)["regex"])
        answer = target_text(spec, by_task)
        assert pattern.fullmatch(answer), answer
        parsed = parse_answer(answer, spec, n_words)
        assert all(p.status == "ok" for p in parsed.values())
        schema = vb.answer_schema(spec, n_words)  # the JSON schema the regex stands for takes it too
        value = json.loads(answer)
        slots = value["task2"] if spec.multi else value
        bound = schema["properties"]["task2"] if spec.multi else schema
        assert len(slots) == bound["minItems"] == bound["maxItems"] == n_words
        assert set(slots) <= set(bound["items"]["enum"])
        # what the hf grammar refuses, the regex refuses: one tag too many, another spacing, a made-up tag
        assert not pattern.fullmatch(answer.replace('"]', '", "Other"]'))
        assert not pattern.fullmatch(answer.replace('", "', '","'))
        assert not pattern.fullmatch(answer.replace('"Other"', '"Elsewhere"', 1)) or '"Other"' not in answer


def test_an_option_that_extends_another_still_matches_whole():
    from clfbench.engine.prompting.outputs import Choice, Fixed

    pattern = re.compile(vb.answer_regex([Fixed('["'), Choice(("time", "time_zone")), Fixed('"]')]))
    assert pattern.fullmatch('["time_zone"]') and pattern.fullmatch('["time"]')
    assert not pattern.fullmatch('["time_"]')


# ------------------------------------------------------- score requests against the hf scorer (no vLLM)


class ModelEngine:
    """What the score search asks of a vLLM engine (`next_token_log_probs`), answered by the hf model itself:
    one full forward pass per request, no cache. Counts the requests."""

    def __init__(self, model):
        self.model, self.requests = model, 0

    def next_token_log_probs(self, requests):
        self.requests += len(requests)
        out = []
        for prompt, tokens in requests:
            with torch.no_grad():
                last = self.model(torch.tensor([prompt])).logits[0, -1].float().log_softmax(-1)
            out.append({t: float(last[t]) for t in tokens})
        return out


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    from clfbench.engine.decoding import model as decoding_model
    from clfbench.engine.prompting.chat import ChatFormat
    from clfbench.engine.prompting.library import PromptBuilder, load_prompt_set

    tokenizer, model = decoding_model.load_model(tiny_llama, "float32", torch.device("cpu"))
    chat = ChatFormat(tokenizer, "template", model.generation_config)
    tasks = tasks_for("massive-intent", 3)
    builder = PromptBuilder.create(load_prompt_set().select(tasks, 0), tasks, 0, 0, None, chat.forbidden)
    texts = [chat.text(builder.render(item.text)) for item in builder.items]
    return SimpleNamespace(model=model, chat=chat, texts=texts, labels=tuple(tasks[0].labels))


def trees_of(tiny, options, end):
    splitter = vb.token_splitter(tiny.chat)
    return [vb.answer_tree(splitter, t, tiny.chat.encode(t), options, end, 0) for t in tiny.texts]


@pytest.mark.parametrize("end", [True, False])
def test_the_score_requests_give_the_hf_scorers_numbers(tiny, end):
    """Each request (prompt ids, tokens) answered with the model's next-token log-probs, summed per option, is
    the hf path's `score_batch` on the same answer tree: the requests ask for the right tokens at the right
    places, and one request per distribution that scores something."""
    from clfbench.engine.decoding import decoder as decoder_module, scoring

    trees = trees_of(tiny, tiny.labels[:12], end)[:1]
    engine = ModelEngine(tiny.model)
    ours = vb.score_trees(engine, trees)[0]
    reference = scoring.score_batch(decoder_module.Decoder(tiny.model, tiny.chat, torch.device("cpu")), trees, 0)[0]
    assert [n for _, n in ours] == [n for _, n in reference]
    assert [s for s, _ in ours] == pytest.approx([s for s, _ in reference], abs=1e-4)
    assert engine.requests == len({dist for path in trees[0].paths for dist, _ in path})


@pytest.mark.parametrize("norm", ["sum", "mean", "calibrated"])
def test_the_search_picks_the_argmax_of_scoring_every_option_and_asks_less(tiny, norm):
    labels = tiny.labels[:20]
    trees = trees_of(tiny, labels, True)[:1]
    engine = ModelEngine(tiny.model)
    full = vb.score_trees(engine, trees)
    every = engine.requests
    offsets = [[-0.37 * (i % 5) for i in range(len(labels))] if norm == "calibrated" else [0.0] * len(labels)
               for _ in trees]
    engine.requests = 0
    best, fed = vb.search_trees(engine, trees, offsets, norm)
    for scores, offset, chosen in zip(full, offsets, best):
        values = [total / count if norm == "mean" else total - o for (total, count), o in zip(scores, offset)]
        assert chosen == max(range(len(values)), key=values.__getitem__)
    # mean has no useful bound on a random model's flat distributions: it may have to ask for every node
    assert engine.requests <= every if norm == "mean" else engine.requests < every
    assert 0 < fed <= sum(len(t.nodes) for t in trees)


# ---------------------------------------------------------------------------------- on vLLM (skips in CI)


def make_ctx(model_path: str, task: str, n: int, shots: int = 0, **options):
    from clfbench.engine.context import RunContext

    return RunContext(run_id=1, attempt=1, spec=SimpleNamespace(seed=0, shots=shots, method="prompt"),
                      options=PromptOptions(**options), tasks=tasks_for(task, n), model_path=model_path,
                      output_dir=Path("."), rank=0, world_size=1, local_rank=0, device="cpu",
                      log_metric=lambda *a: None, set_progress=lambda *a: None)


@pytest.fixture(scope="module")
def vllm_engine(tiny_llama):
    pytest.importorskip("vllm")
    # eager: compiling the model would take minutes here, and the numbers are the same
    return vb.VllmEngine.load(tiny_llama, "float32", "template", "cpu", 0, enforce_eager=True)


def test_vllm_gives_the_hf_scorers_log_likelihoods(tiny_llama, vllm_engine):
    from clfbench.engine.decoding import decoder as decoder_module, model as decoding_model, scoring
    from clfbench.engine.prompting.library import PromptBuilder, load_prompt_set

    tokenizer, model = decoding_model.load_model(tiny_llama, "float32", torch.device("cpu"))
    chat = vllm_engine.chat
    tasks = tasks_for("massive-intent", 2)
    builder = PromptBuilder.create(load_prompt_set().select(tasks, 0), tasks, 0, 0, None, chat.forbidden)
    texts = [chat.text(builder.render(item.text)) for item in builder.items]
    trees = [vb.answer_tree(vb.token_splitter(chat), t, chat.encode(t), tuple(tasks[0].labels), True, 0)
             for t in texts]
    vllm_engine.counts = {}
    ours = vb.score_trees(vllm_engine, trees)
    reference = scoring.score_batch(decoder_module.Decoder(model, chat, torch.device("cpu")), trees, 0)
    for a, b in zip(ours, reference):
        assert [s for s, _ in a] == pytest.approx([s for s, _ in b], abs=2e-3)
    counts = vllm_engine.counts  # the prompt is found in the prefix cache, not recomputed for every node
    assert counts["cached"] > counts["prompt"] / 2


@pytest.mark.parametrize("task, options", [
    ("massive-intent", dict(decision="score", score_norm="calibrated")),
    ("massive-intent", dict(decision="constrained")),
    ("massive-intent+massive-slots", dict(decision="constrained")),
    ("massive-intent", dict(decision="generate", max_new_tokens=6)),
])
def test_vllm_runs_each_decision_mode_as_the_hf_path_does(tiny_llama, vllm_engine, monkeypatch, task, options):
    from clfbench.engine.methods import prompt as pm

    monkeypatch.setattr(vb.VllmEngine, "load", classmethod(lambda cls, *a, **k: vllm_engine))
    answers = {}
    for backend in ("hf", "vllm"):
        ctx = make_ctx(tiny_llama, task, 6, shots=2 if "+" in task else 0, backend=backend, batch_size=4, **options)
        output = run_method(pm, ctx)
        answers[backend] = [(p.predicted, p.parse_status) for rows in output.predictions.values() for p in rows]
        extra = output.extra_results[ctx.tasks[0].name]
        assert extra["backend_vllm"] == float(backend == "vllm") and extra["examples_per_s"] > 0
    assert len(answers["vllm"]) == len(answers["hf"])
    if options["decision"] != "generate":  # every constrained or scored answer parses, by construction
        assert all(status == "ok" for _, status in answers["vllm"]), answers["vllm"]
    # the same answers but near-ties (a random model's are many) and, constrained, another tokenisation
    same = sum(a == b for a, b in zip(answers["hf"], answers["vllm"]))
    assert same >= len(answers["hf"]) // 2, answers
