"""LS-LLaMA / LS-unLLaMA on a tiny random Llama: padding never leaks into a text's logits, the unmasked variant
really attends both ways, only LoRA and the head train, a retried run resumes, and both methods run end to end
through the real CLI."""
from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import SAMPLES, build_tiny_model, run_method

torch = pytest.importorskip("torch")

from clfbench.engine.heads import Head  # noqa: E402
from clfbench.engine.methods import ls_llama  # noqa: E402
from clfbench.engine.methods.catalog import METHODS, LsLlamaOptions, LsUnllamaOptions  # noqa: E402
from clfbench.engine.metrics import slot_scores  # noqa: E402
from clfbench.engine.training import make_optimizer  # noqa: E402
from clfbench.engine.context import RunContext  # noqa: E402
from clfbench.engine.types import ClfbenchError  # noqa: E402
from tests.test_encoder_finetune import Recorder  # noqa: E402
from tests.test_encoder_heads import SLOT_TAGS, synthetic_tasks  # noqa: E402

OPTIONS = {"ls-llama": LsLlamaOptions, "ls-unllama": LsUnllamaOptions}
TEXTS = ["set an alarm for seven am please", "play jazz", "what is the weather like in boston tomorrow morning"]
WORDS = [text.split() for text in TEXTS]


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    yield


def build(path: str, method: str, kind: str = "sequence", **options):
    """Tokenizer and model in eval mode, with the LoRA B matrices made non-zero (peft starts them at zero, which
    would leave the adapters out of every comparison)."""
    labels = SLOT_TAGS if kind == "token" else ["a", "b", "c"]
    torch.manual_seed(0)
    tokenizer, model = ls_llama.load_model(path, Head("t", kind, labels), OPTIONS[method](**options),
                                           bidirectional=ls_llama.BIDIRECTIONAL[method], device=torch.device("cpu"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    return tokenizer, model.eval()


def logits_per_text(tokenizer, model, inputs: list, padding_side: str, batched: bool) -> list[torch.Tensor]:
    """Each text's logits: [labels] for a sequence head, [real tokens, labels] for a token head (padding
    positions dropped)."""
    words = isinstance(inputs[0], list)
    tokenizer.padding_side = padding_side
    groups = [inputs] if batched else [[one] for one in inputs]
    out = []
    for group in groups:
        encoding = tokenizer(group, is_split_into_words=words, padding=True, return_tensors="pt")
        with torch.no_grad():
            (logits,) = model(input_ids=encoding["input_ids"], attention_mask=encoding["attention_mask"])
        for b in range(len(group)):
            real = encoding["attention_mask"][b].bool()
            out.append(logits[b][real] if logits.dim() == 3 else logits[b])
    return out


def assert_same_logits(first: list[torch.Tensor], second: list[torch.Tensor]) -> None:
    for a, b in zip(first, second, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------ padding never leaks


@pytest.mark.parametrize("method", ["ls-llama", "ls-unllama"])
@pytest.mark.parametrize("pooling", ["last", "mean", "max"])
def test_sequence_logits_do_not_depend_on_padding(tiny_llama, method, pooling):
    tokenizer, model = build(tiny_llama, method, pooling=pooling)
    alone = logits_per_text(tokenizer, model, TEXTS, "right", batched=False)
    lengths = [len(tokenizer(text)["input_ids"]) for text in TEXTS]
    assert len(set(lengths)) == len(TEXTS)  # so the batch really pads two of the three texts
    assert_same_logits(logits_per_text(tokenizer, model, TEXTS, "left", batched=True), alone)
    assert_same_logits(logits_per_text(tokenizer, model, TEXTS, "right", batched=True), alone)
    # The texts are told apart (the comparison above is not between constants).
    assert (alone[0] - alone[1]).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["ls-llama", "ls-unllama"])
def test_token_logits_do_not_depend_on_padding(tiny_llama, method):
    tokenizer, model = build(tiny_llama, method, kind="token")
    alone = logits_per_text(tokenizer, model, WORDS, "right", batched=False)
    assert_same_logits(logits_per_text(tokenizer, model, WORDS, "left", batched=True), alone)
    assert_same_logits(logits_per_text(tokenizer, model, WORDS, "right", batched=True), alone)


def test_masked_pooling_ignores_padding_states_even_when_they_are_not_finite(tiny_llama):
    _, model = build(tiny_llama, "ls-unllama", pooling="mean")
    states = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [float("nan"), float("inf")]]])
    mask = torch.tensor([[1, 1, 0]])
    for pooling, expected in (("mean", [2.0, 4.0]), ("max", [3.0, 6.0]), ("last", [3.0, 6.0])):
        model.pooling = pooling
        assert model._pool(states, mask).tolist() == [expected], pooling
    left = torch.tensor([[[float("nan"), float("inf")], [1.0, 2.0], [3.0, 6.0]]])
    model.pooling = "last"
    assert model._pool(left, torch.tensor([[0, 1, 1]])).tolist() == [[3.0, 6.0]]


# ------------------------------------------------------------------------------------ attention direction


def _hidden_states(model, tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer.padding_side = "right"
    encoding = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = model.encoder(input_ids=encoding["input_ids"], attention_mask=encoding["attention_mask"]
                               ).last_hidden_state
    return states, encoding["input_ids"]


@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "padded-batch"])
def test_only_the_unmasked_variant_lets_a_later_token_change_an_earlier_state(tiny_llama, padded):
    # Same length, differing only in the last word; with padded=True a longer third text pads both, which
    # takes the other code path (an explicit mask instead of none).
    texts = ["play some jazz music now", "play some jazz music later"]
    if padded:
        texts.append("what is the weather like in boston tomorrow morning please")
    changes = {}
    for method in ("ls-llama", "ls-unllama"):
        tokenizer, model = build(tiny_llama, method)
        states, ids = _hidden_states(model, tokenizer, texts)
        differs = (ids[0] != ids[1]).nonzero().flatten().tolist()
        first_change = differs[0]
        assert first_change >= 2
        changes[method] = (states[0, :first_change] - states[1, :first_change]).abs().max().item()
    assert changes["ls-llama"] < 1e-6  # causal: earlier positions cannot see the changed word
    assert changes["ls-unllama"] > 1e-3  # bidirectional: they can


def test_the_causal_variant_leaves_the_model_causal_and_the_flag_is_per_model(tiny_llama):
    _, causal = build(tiny_llama, "ls-llama")
    _, unmasked = build(tiny_llama, "ls-unllama")
    assert getattr(causal.encoder.config, "is_causal", True) is True
    assert unmasked.encoder.config.is_causal is False


# ------------------------------------------------------------------------------------ what trains


def test_only_lora_and_head_parameters_train(tiny_llama):
    tokenizer, model = build(tiny_llama, "ls-unllama", kind="token", lora_target_modules="q_proj+k_proj+v_proj")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n or n.startswith("heads.") for n in trainable)
    assert {n.split(".")[-4] for n in trainable if "lora_" in n} == {"q_proj", "k_proj", "v_proj"}
    assert {"heads.0.weight", "heads.0.bias"} <= set(trainable)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    model.train()
    optimizer = make_optimizer(model, 1e-2, 0.01, torch.device("cpu"))
    encoding = tokenizer(WORDS, is_split_into_words=True, padding=True, return_tensors="pt")
    (logits,) = model(input_ids=encoding["input_ids"], attention_mask=encoding["attention_mask"])
    logits.float().logsumexp(-1).mean().backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == set(trainable)


def test_unknown_lora_target_and_encoder_models_are_one_line_errors(tiny_llama, tmp_path_factory):
    with pytest.raises(ClfbenchError, match="lora_target_modules=nope_proj"):
        build(tiny_llama, "ls-llama", lora_target_modules="nope_proj")
    tiny_bert = build_tiny_model("tiny-bert", tmp_path_factory)
    with pytest.raises(ClfbenchError, match="needs a decoder LLM"):
        build(tiny_bert, "ls-llama")


# ------------------------------------------------------------------------------------ runs


def make_ctx(path: str, method: str, task, output_dir: Path, recorder: Recorder, **options) -> RunContext:
    defaults = dict(epochs=4, batch_size=16, lr=1e-2, eval_every=5, checkpoint_every=0, log_every=1)
    defaults.update(options)
    torch.manual_seed(0)  # the worker seeds every RNG before the method runs
    random.seed(0)
    return RunContext(run_id=1, attempt=1, spec=SimpleNamespace(seed=0, method=method),
                      options=OPTIONS[method](**defaults), tasks=[task], model_path=path, output_dir=output_dir,
                      rank=0, world_size=1, local_rank=0, device="cpu", log_metric=recorder.log_metric,
                      set_progress=recorder.set_progress)


def test_sequence_run_learns_logs_and_checkpoints_only_trainable_weights(tiny_llama, tmp_path):
    task = synthetic_tasks(n_train=160, n_test=40)["syn-intent"]
    recorder = Recorder()
    output = run_method(ls_llama, make_ctx(tiny_llama, "ls-llama", task, tmp_path, recorder, checkpoint_every=10))
    predictions = output.predictions["syn-intent"]
    assert [p.example_id for p in predictions] == [ex.id for ex in task.test]
    accuracy = sum(p.predicted == p.gold for p in predictions) / len(predictions)
    assert accuracy >= 0.8  # 4 classes: chance is 0.25
    assert all(0.25 <= p.confidence <= 1 for p in predictions)  # the label head's softmax, for calibration
    assert {"train_loss", "lr", "train_examples_per_s", "eval_loss", "eval_accuracy"} <= {n for _, n, _ in
                                                                                        recorder.metrics}
    losses = recorder.values("train_loss")
    assert losses[-1] < losses[0] / 2
    total = recorder.progress[-1][1]
    assert recorder.progress[-1] == (total, total) and recorder.steps("eval_accuracy")[-1] == total
    extra = output.extra_results["syn-intent"]
    assert extra["train_steps"] == total and extra["trainable_params"] > 0

    state = torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=True)
    assert set(state["model"]) and all("lora_" in n or n.startswith("heads.") for n in state["model"])
    assert sum(t.numel() for t in state["model"].values()) == extra["trainable_params"]


def test_token_run_learns_slots_with_the_unmasked_model(tiny_llama, tmp_path):
    task = synthetic_tasks(n_train=200, n_test=40)["syn-slots"]
    recorder = Recorder()
    output = run_method(ls_llama, make_ctx(tiny_llama, "ls-unllama", task, tmp_path, recorder, epochs=6))
    predictions = output.predictions["syn-slots"]
    assert all(len(p.predicted) == len(p.gold) for p in predictions)
    f1 = slot_scores([p.gold for p in predictions], [p.predicted for p in predictions])["slot_f1"]
    assert f1 >= 0.7
    assert recorder.values("eval_slot_f1")[-1] >= 0.7
    assert output.extra_results["syn-slots"]["truncated_words"] == 0


def test_a_retried_run_resumes_from_its_checkpoint(tiny_llama, tmp_path, capsys):
    task = synthetic_tasks(n_train=96, n_test=20)["syn-intent"]
    options = dict(epochs=2, checkpoint_every=4, eval_every=0)
    reference = Recorder()
    expected = run_method(ls_llama, make_ctx(tiny_llama, "ls-llama", task, tmp_path / "reference", reference, **options))

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_method(ls_llama, make_ctx(tiny_llama, "ls-llama", task, tmp_path / "retried", Recorder(crash_at_step=6),
                              **options))
    capsys.readouterr()
    retried = Recorder()
    output = run_method(ls_llama, make_ctx(tiny_llama, "ls-llama", task, tmp_path / "retried", retried, **options))
    assert "resuming at step 4" in capsys.readouterr().out
    assert retried.steps("train_loss")[0] == 5
    assert retried.values("train_loss") == pytest.approx(reference.values("train_loss")[4:], rel=1e-4)
    assert [p.predicted for p in output.predictions["syn-intent"]] == \
        [p.predicted for p in expected.predictions["syn-intent"]]


def test_catalog_entries_and_defaults():
    assert METHODS["ls-llama"].module == METHODS["ls-unllama"].module == "clfbench.engine.methods.ls_llama"
    assert LsLlamaOptions().pooling == "last" and LsUnllamaOptions().pooling == "max"
    reference = LsLlamaOptions()
    assert (reference.lora_r, reference.lora_alpha, reference.lora_dropout, reference.lora_target_modules) == \
        (12, 32.0, 0.1, "q_proj+v_proj")


@pytest.mark.parametrize("method,task,metric", [("ls-llama", "massive-intent", "accuracy"),
                                                ("ls-unllama", "massive-slots", "slot_f1")])
def test_queue_and_run_through_the_cli(cli, method, task, metric):
    cli.env["OMP_NUM_THREADS"] = "1"
    (run,) = cli.json("queue", "--method", method, "--model", "tiny-llama", "--task", task, "-o", "epochs=1",
                      "-o", "train_limit=48", "-o", "test_limit=12", "-o", "dev_limit=8", "-o", "checkpoint_every=2",
                      "--data-dir", str(SAMPLES))
    assert cli.run("engine", "--until-idle").returncode == 0
    shown = cli.json("show", str(run["id"]))
    assert shown["status"] == "succeeded", shown
    results = shown["results"][task]
    assert results["n"] == 12 and 0.0 <= results[metric] <= 1.0
    assert results["train_steps"] == 6 and results["trainable_params"] > 0
    log = cli.run("logs", str(run["id"])).stdout
    assert ("bidirectional attention" if method == "ls-unllama" else "causal attention") in log
