"""The llmembed method (LLMEmbed, seed 001) on the tiny random Llama and BERT: pooling, the feature cache,
the fusion, and runs through the real CLI and engine."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import SAMPLES, build_tiny_model, run_method

torch = pytest.importorskip("torch")

from clfbench.engine.methods import llmembed as lm  # noqa: E402
from clfbench.engine.methods.catalog import LlmEmbedOptions  # noqa: E402
from clfbench.engine.tasks import get_task, load_task  # noqa: E402
from clfbench.engine.context import RunContext  # noqa: E402
from clfbench.engine.types import ClfbenchError  # noqa: E402
from tests.test_encoder_finetune import Recorder  # noqa: E402  (the shared test recorder)


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory) -> dict[str, str]:
    return {alias: build_tiny_model(alias, tmp_path_factory) for alias in ("tiny-llama", "tiny-bert")}



def make_ctx(tiny_paths, task: str = "massive-intent", train_limit: int = 40, test_limit: int = 12,
             **options) -> tuple[RunContext, Recorder]:
    """A context for `lm.run` with the tiny Llama as the run's model; extra models are named by path, so the
    run needs no model cache (the test's CLFBENCH_HOME only holds the feature cache)."""
    options.setdefault("extra_models", tiny_paths["tiny-bert"])
    options.setdefault("epochs", 3)
    options.setdefault("layers", "-2..-1")  # the default, the last 5, is more than the tiny models have
    opts = LlmEmbedOptions(train_limit=train_limit, test_limit=test_limit, **options)
    data = load_task(get_task(task), data_dir=SAMPLES, train_limit=train_limit, test_limit=test_limit, seed=0)
    recorder = Recorder()
    ctx = RunContext(
        run_id=1, attempt=1, spec=SimpleNamespace(seed=0, model="tiny-llama", method="llmembed"), options=opts,
        tasks=[data],
        model_path=tiny_paths["tiny-llama"], output_dir=Path("."), rank=0, world_size=1, local_rank=0,
        device="cpu", log_metric=recorder.log_metric, set_progress=recorder.set_progress)
    return ctx, recorder


# ------------------------------------------------------------------------------------------- pooling


def test_mean_pool_counts_only_real_tokens():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [float("inf"), float("nan")]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(lm.mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))


@pytest.mark.parametrize("alias", ["tiny-llama", "tiny-bert"])
def test_features_are_the_same_with_and_without_padding(tiny_paths, alias):
    extractor = lm.Extractor(tiny_paths[alias], torch.device("cpu"), torch.float32)
    short = "wake me up at seven"
    long = "please add a meeting with john to my calendar on monday at ten and remind me an hour before it starts"
    alone = extractor.extract([short], (-1, 0, 1), max_length=64, batch_size=1)
    padded = extractor.extract([long, short], (-1, 0, 1), max_length=64, batch_size=2)
    # In the batch of two the short text is padded; its features must not change.
    assert padded.shape == (2, 3, 32)
    assert torch.allclose(padded[1], alone[0], atol=1e-5)
    assert not torch.allclose(padded[0], padded[1])


# ------------------------------------------------------------------------------------------- cache


def test_second_run_reads_the_cache_and_predicts_the_same(tiny_paths, home):
    ctx, _ = make_ctx(tiny_paths, layers="-2..-1")
    first = run_method(lm, ctx)
    extra = first.extra_results["massive-intent"]
    # 2 models x 3 splits (MASSIVE has a dev split), all extracted
    assert extra["cached_feature_files"] == 0 and extra["extracted_texts"] == 2 * (40 + 100 + 12)
    files = sorted((home / "cache" / "features").glob("*.pt"))
    assert len(files) == 6 and not list((home / "cache" / "features").glob(".*"))

    ctx, _ = make_ctx(tiny_paths, layers="-2..-1")
    second = run_method(lm, ctx)
    again = second.extra_results["massive-intent"]
    assert again["extracted_texts"] == 0 and again["cached_feature_files"] == 6
    # Test-time throughput only where the forward passes were measured (not from cached features).
    assert extra["test_examples_per_s"] > 0 and "test_examples_per_s" not in again
    assert again["extraction_time_s"] < extra["extraction_time_s"]
    assert [p.predicted for p in second.predictions["massive-intent"]] == \
        [p.predicted for p in first.predictions["massive-intent"]]
    # The fused classifier's softmax probability of each answer, the same from cached features.
    confidences = [p.confidence for p in first.predictions["massive-intent"]]
    assert all(0 < c <= 1 for c in confidences)
    assert [p.confidence for p in second.predictions["massive-intent"]] == pytest.approx(confidences)


def test_cache_is_invalidated_by_other_layers_or_other_texts(tiny_paths, home):
    run_method(lm, make_ctx(tiny_paths, layers="-1", epochs=1)[0])
    # Other layers of the main model: its 3 splits again; the extra model's features are reused.
    other_layers = run_method(lm, make_ctx(tiny_paths, layers="-2", epochs=1)[0]).extra_results["massive-intent"]
    assert other_layers["extracted_texts"] == 40 + 100 + 12 and other_layers["cached_feature_files"] == 3
    # Other training texts: only train is extracted again, by both models.
    other_train = run_method(lm, make_ctx(tiny_paths, layers="-1", epochs=1, train_limit=30)[0]).extra_results["massive-intent"]
    assert other_train["extracted_texts"] == 2 * 30 and other_train["cached_feature_files"] == 4
    # Another max_length changes the features too.
    other_length = run_method(lm, make_ctx(tiny_paths, layers="-1", epochs=1, max_length=8)[0]).extra_results["massive-intent"]
    assert other_length["cached_feature_files"] == 0


def test_a_torn_cache_file_is_extracted_again_not_read(tiny_paths, home):
    run_method(lm, make_ctx(tiny_paths, layers="-1", epochs=1, extra_models="")[0])
    files = sorted((home / "cache" / "features").glob("*.pt"))
    assert len(files) == 3
    for path in files:  # as if a writer without the atomic rename had been killed halfway
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    extra = run_method(lm, make_ctx(tiny_paths, layers="-1", epochs=1, extra_models="")[0]).extra_results["massive-intent"]
    assert extra["extracted_texts"] == 40 + 100 + 12 and extra["cached_feature_files"] == 0


# ------------------------------------------------------------------------------------------- fusion


def test_fusion_shapes():
    groups = [(5, 32), (1, 16)]  # the main model: 5 layers of 32; one extra model: 1 layer of 16
    batch = [torch.randn(4, 5, 32), torch.randn(4, 1, 16)]
    paper = lm.FusionClassifier(groups, 7, fusion="paper", project_dim=8, hidden_size=20, dropout=0.0, sigma=0.05)
    fused = paper.fuse(batch)
    # 6 projected vectors: a 6 x 6 Gram matrix, then the mean of the main model's 5 layers (32)
    assert paper.fused_dim == 36 + 32 and fused.shape == (4, 68)
    assert fused[:, :36].abs().max() < 1  # the power normalisation keeps the Gram part in (-1, 1)
    assert torch.allclose(fused[:, 36:], batch[0].mean(dim=1))
    gram = fused[:, :36].reshape(4, 6, 6)
    assert torch.allclose(gram, gram.transpose(1, 2))
    assert paper(batch).shape == (4, 7)

    concat = lm.FusionClassifier(groups, 7, fusion="concat", project_dim=8, hidden_size=20, dropout=0.0, sigma=0.05)
    assert concat.fused_dim == 5 * 32 + 16 and concat.fuse(batch).shape == (4, 176)
    assert concat(batch).shape == (4, 7)


def test_concat_fusion_learns_the_training_set(tiny_paths, home):
    ctx, recorder = make_ctx(tiny_paths, fusion="concat", epochs=30, patience=0, lr=3e-3, dropout=0.0)
    output = run_method(lm, ctx)
    losses = [value for _, name, value in recorder.metrics if name == "train_loss"]
    assert len(losses) == 30 and losses[-1] < losses[0] / 2
    assert {name for _, name, _ in recorder.metrics} >= {"train_loss", "eval_loss", "eval_accuracy"}
    assert recorder.progress[-1][0] == recorder.progress[-1][1]
    assert len(output.predictions["massive-intent"]) == 12


# ------------------------------------------------------------------------------------------- bad input


def test_layer_out_of_range_fails_before_extraction(tiny_paths, home):
    ctx, _ = make_ctx(tiny_paths, layers="-1+7")
    with pytest.raises(ClfbenchError, match=r"layer 7 is out of range for tiny-llama, which has 2 layers"):
        run_method(lm, ctx)
    assert not (home / "cache" / "features").exists()


def test_options_refuse_bad_layers_and_unknown_extra_models():
    with pytest.raises(ValueError, match="not an index or a range"):
        LlmEmbedOptions(layers="last")
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        LlmEmbedOptions(extra_models="minilm+no-such-model")
    assert LlmEmbedOptions(layers=[-1, -3]).layer_indices == (-1, -3)
    assert LlmEmbedOptions(layers="0..2+-1").layer_indices == (0, 1, 2, -1)


# ------------------------------------------------------------------------------------------- CLI + engine


def test_queue_and_run_through_the_cli(cli):
    cli.env["OMP_NUM_THREADS"] = "1"
    common = ["--method", "llmembed", "--model", "tiny-llama", "--task", "massive-intent", "--data-dir",
              str(SAMPLES), "-o", "extra_models=tiny-bert", "-o", "train_limit=60", "-o", "test_limit=20",
              "-o", "epochs=3", "-o", "layers=-3..-1"]
    (good,) = cli.json("queue", *common)
    (bad,) = cli.json("queue", *common[:-2], "-o", "layers=-1+9")
    assert cli.run("engine", "--until-idle").returncode == 0

    shown = cli.json("show", str(good["id"]))
    assert shown["status"] == "succeeded", shown
    results = shown["results"]["massive-intent"]
    assert results["n"] == 20 and 0 <= results["accuracy"] <= 1
    assert results["extraction_time_s"] > 0 and results["classifier_time_s"] > 0 and results["examples_per_s"] > 0
    assert results["extracted_texts"] == 2 * (60 + 100 + 20)
    assert "llmembed: features ready" in cli.run("logs", str(good["id"])).stdout

    failed = cli.json("show", str(bad["id"]))
    assert failed["status"] == "failed"
    # The worker's one-line error comes first (the engine appends the log tail after it).
    assert failed["error"].splitlines()[0] == ("layer 9 is out of range for tiny-llama, which has 2 layers "
                                               "(use 0..2, or -3..-1 from the end)")


def test_queue_refuses_token_tasks_and_unknown_extra_models(cli):
    slots = cli.run("queue", "--method", "llmembed", "--model", "tiny-llama", "--task", "massive-slots",
                    "--data-dir", str(SAMPLES), check=False)
    assert slots.returncode == 1 and "massive-slots is a token task" in slots.stderr
    unknown = cli.run("queue", "--method", "llmembed", "--model", "tiny-llama", "--task", "massive-intent",
                      "--data-dir", str(SAMPLES), "-o", "extra_models=no-such-model", check=False)
    assert unknown.returncode == 1
    assert unknown.stderr.strip().count("\n") == 0 and "unknown model 'no-such-model'" in unknown.stderr
    assert cli.json("ls") == []
