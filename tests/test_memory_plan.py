"""`clfbench plan` and the queue-time memory check (issue 11, item 4): GPU memory per GPU from config.json alone.

The parameter count behind every estimate is checked against transformers' own count of the same configs (built
on the meta device: no memory), including the shipped shapes of the paper's Llama-3-8B and -70B; then what a
user sees: a plan that fits exits 0, one that cannot exits 1 with one line that says what would fit, and the
same refusal at queue time leaves the store empty.
"""
from __future__ import annotations

import pytest

from clfbench.engine import memory_plan

SHIPPED = ["minilm", "smollm2-135m", "llama-3-8b", "llama-3-70b"]


@pytest.mark.parametrize("name", SHIPPED)
def test_the_parameter_count_from_the_shapes_is_transformers_own(name):
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    path = memory_plan.shipped_config(name)
    config = AutoConfig.from_pretrained(path)
    shape = memory_plan.shape_of(memory_plan.read_config(path))
    with torch.device("meta"):  # shapes only: a 70B model costs nothing here
        model = (AutoModelForCausalLM if shape.decoder else AutoModel).from_config(config)
    assert memory_plan.parameter_count(shape) == sum(p.numel() for p in model.parameters())


def test_the_paper_models_have_their_published_sizes():
    sizes = {name: memory_plan.parameter_count(memory_plan.shape_of(memory_plan.read_config(
        memory_plan.shipped_config(name)))) for name in ("llama-3-8b", "llama-3-70b")}
    assert sizes == {"llama-3-8b": 8_030_261_248, "llama-3-70b": 70_553_706_496}


def test_sharding_divides_the_optimizer_state_offload_removes_it_and_checkpointing_shrinks_activations():
    shape = memory_plan.shape_of(memory_plan.read_config(memory_plan.shipped_config("llama-3-8b")))
    work = memory_plan.Workload(batch=8, tokens=1024)
    ddp = memory_plan.finetune_parts(shape, 8, work, "ddp")
    fsdp = memory_plan.finetune_parts(shape, 8, work, "fsdp")
    assert ddp["weights and AdamW moments (fp32)"] == 12 * 8_030_261_248
    assert ddp["DDP gradient buckets (fp32)"] == 4 * 8_030_261_248
    assert fsdp["weights, gradients, AdamW (fp32, sharded)"] == 16 * 8_030_261_248 / 8
    offloaded = memory_plan.finetune_parts(shape, 8, work, "fsdp", offload=True)
    assert "weights, gradients, AdamW (fp32, sharded)" not in offloaded
    checkpointed = memory_plan.finetune_parts(shape, 8, work, "fsdp", checkpointing=True)
    assert checkpointed["activations and logits"] < fsdp["activations and logits"] / 5


def test_a_shared_prefix_counts_once_and_the_cpu_plan_has_no_cuda_context():
    shape = memory_plan.shape_of(memory_plan.read_config(memory_plan.shipped_config("smollm2-135m")))
    whole = memory_plan.Workload(batch=4, tokens=256, answer_tokens=8, precision="float32", on_gpu=False)
    shared = memory_plan.Workload(batch=4, tokens=256, answer_tokens=8, shared_prefix=192, precision="float32",
                                  on_gpu=False)
    assert shared.computed_tokens == 192 + 4 * 64
    ratio = memory_plan.activation_bytes(shape, shared) / memory_plan.activation_bytes(shape, whole)
    assert ratio == pytest.approx(448 / 1024)
    assert memory_plan.CUDA_CONTEXT not in memory_plan.finetune_parts(shape, 1, whole)


def test_plan_exits_0_when_the_run_fits_and_1_with_one_line_saying_what_would(cli):
    fits = cli.run("plan", "--method", "prompt", "--model", "llama-3-70b", "--task", "massive-intent",
                   "--gpus", "4", "--gpu-memory", "80")
    assert "70.55B parameters" in fits.stdout and "weights (bfloat16)" in fits.stdout and " fits" in fits.stdout
    refused = cli.run("plan", "--method", "prompt", "--model", "llama-3-70b", "--task", "massive-intent",
                      "--gpus", "1", "--gpu-memory", "80", check=False)
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert refused.stderr.startswith("error: prompt with llama-3-70b needs") and "4 GPUs of 80 GB" in refused.stderr
    # The paper's 70B full fine-tune on 8 GPUs without offload: refused, even sharded and checkpointed.
    full = cli.run("plan", "--method", "llm-finetune", "--model", "llama-3-70b", "--task", "massive-intent",
                   "--gpus", "8", "--gpu-memory", "80", "-o", "strategy=fsdp", "-o", "gradient_checkpointing=true",
                   check=False)
    assert full.returncode == 1 and "does not fit in 80 GB" in full.stdout
    # The host's share, which no GPU count changes: the fp32 weights rank 0 gathers to predict (4 bytes a
    # parameter), and with offload every rank's shards of weights, gradients and AdamW moments (16 more).
    assert "; 282 GB of host memory: the fp32 weights gathered to predict):" in full.stdout
    offloaded = cli.run("plan", "--method", "llm-finetune", "--model", "llama-3-70b", "--task", "massive-intent",
                        "--gpus", "8", "--gpu-memory", "80", "-o", "strategy=fsdp", "-o", "offload=true",
                        "-o", "gradient_checkpointing=true")
    assert "; 1,411 GB of host memory: the offloaded shards and the fp32 weights gathered to predict):" in \
        offloaded.stdout and " fits" in offloaded.stdout
    unknown = cli.run("plan", "--method", "prompt", "--model", "org/not-here", "--task", "massive-intent",
                      check=False)
    assert unknown.returncode == 1 and "no config.json at hand for 'org/not-here'" in unknown.stderr


def test_plan_takes_a_queue_command_line_as_it_is(cli):
    """A user checks a sweep before queueing it by swapping the command's name: every queue flag is accepted, the
    ones that do not size memory included, and each run of the sweep gets its plan."""
    flags = ["--method", "prompt", "--model", "llama-3-8b", "--model", "llama-3-70b", "--task", "massive-intent",
             "--shots", "0", "--seed", "1", "--data-dir", "engine/sample_data", "--gpus", "4", "--name", "paper",
             "--priority", "3", "--host", "gpu1", "--gpu-type", "H100", "-o", "decision=constrained"]
    planned = cli.run("plan", *flags, "--gpu-memory", "80")
    assert planned.stdout.count("prompt · llama-3-8b") == 1 and planned.stdout.count("prompt · llama-3-70b") == 1
    assert planned.stdout.count(" fits") == 2
    assert cli.json("queue", *flags, "--dry-run")  # the same line is a valid queue command


def test_queue_refuses_a_gpu_run_that_cannot_fit_and_queues_nothing(cli):
    refused = cli.run("queue", "--method", "prompt", "--model", "llama-3-70b", "--task", "massive-intent",
                      "--gpus", "1", "--gpu-memory", "80", check=False)
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert "nothing queued" in refused.stderr
    # The paper's 70B full fine-tune on 8 GPUs (its preset: 16,384 tokens) without offload: refused, and the line
    # names the changes that, together, make it fit.
    paper = cli.run("queue", "--method", "llm-finetune", "--model", "llama-3-70b", "--task", "massive-intent",
                    "--gpus", "8", "--gpu-memory", "80", "-o", "preset=paper", "-o", "strategy=fsdp", check=False)
    assert paper.returncode == 1 and len(paper.stderr.strip().splitlines()) == 1
    assert "16,384 tokens" in paper.stderr and "-o offload=true" in paper.stderr
    assert cli.json("ls") == []
    offloaded = cli.run("queue", "--method", "llm-finetune", "--model", "llama-3-70b", "--task", "massive-intent",
                        "--gpus", "8", "--gpu-memory", "80", "-o", "preset=paper", "-o", "strategy=fsdp",
                        "-o", "offload=true")
    assert "queued 1 run(s)" in offloaded.stdout
    queued = cli.run("queue", "--method", "prompt", "--model", "llama-3-70b", "--task", "massive-intent",
                     "--gpus", "4", "--gpu-memory", "80")
    assert "queued 1 run(s)" in queued.stdout
