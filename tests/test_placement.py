"""A model too large for one GPU placed across the run's GPUs (issue 11, item 2): `engine.decoding.model`.

On CPU: the device map of the paper's Llama-3-70B (built on the meta device: no memory) over a fake inventory of
80-GB GPUs -- every decoder layer placed, no GPU over its budget, one clear error where it cannot fit -- and the
prompt method's predictions from a tiny Llama dispatched by accelerate (its hooks moving every layer's inputs, as
they do across GPUs; here the second half of the layers is offloaded to disk, the one split a CPU allows) equal
to those of the same model in one piece. With two CUDA devices (marker `gpu`), the same comparison with the
layers truly split across GPU and CPU.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from clfbench.engine import memory_plan  # noqa: E402
from clfbench.engine.decoding import model as decoding_model  # noqa: E402
from clfbench.engine.types import ClfbenchError  # noqa: E402

GB = 1e9


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def llama_70b_on_meta():
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = memory_plan.shipped_config("llama-3-70b")
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model, memory_plan.read_config(path)


def device_of(device_map: dict, name: str):
    """Where `name` sits: the entry of its longest prefix in the map."""
    keys = [key for key in device_map if key == "" or name == key or name.startswith(key + ".")]
    return device_map[max(keys, key=len)]


@pytest.mark.parametrize("gpus,batch,tokens", [(2, 1, 512), (4, 8, 4096), (8, 32, 4096)])
def test_llama_3_70b_is_split_over_80_gb_gpus_within_each_budget(llama_70b_on_meta, gpus, batch, tokens):
    from accelerate.utils import compute_module_sizes

    model, config = llama_70b_on_meta
    reserve = decoding_model.inference_reserve(config, torch.bfloat16, gpus, batch, tokens)
    budgets = {gpu: 80 * GB - reserve for gpu in range(gpus)}
    device_map = decoding_model.device_map_for(model, torch.bfloat16, budgets, reserve)
    layers = [f"model.layers.{i}" for i in range(config["num_hidden_layers"])]
    placed = [device_of(device_map, layer) for layer in layers]
    assert set(placed) == set(range(gpus))  # every layer on a GPU, every GPU used
    assert placed == sorted(placed)  # in order: the hidden states go from one GPU to the next once
    assert device_of(device_map, "model.embed_tokens") == 0  # the inputs' GPU
    sizes = compute_module_sizes(model, dtype=torch.bfloat16)
    used = {gpu: sum(sizes[name] for name, where in device_map.items() if where == gpu) for gpu in budgets}
    assert sum(used.values()) == sizes[""]
    assert all(used[gpu] <= budgets[gpu] for gpu in budgets), {g: round(u / GB, 1) for g, u in used.items()}


@pytest.mark.parametrize("gpus,batch", [(1, 1), (2, 8)])
def test_llama_3_70b_on_too_few_80_gb_gpus_is_one_clear_error(llama_70b_on_meta, gpus, batch):
    model, config = llama_70b_on_meta
    reserve = decoding_model.inference_reserve(config, torch.bfloat16, gpus, batch)
    with pytest.raises(ClfbenchError) as error:
        decoding_model.device_map_for(model, torch.bfloat16, {gpu: 80 * GB - reserve for gpu in range(gpus)},
                                      reserve)
    message = str(error.value)
    assert "\n" not in message and "141.1 GB of bfloat16 weights do not fit" in message
    assert f"{gpus} GPU(s)" in message and "more GPUs" in message


def test_one_gpu_or_cpu_loads_the_model_whole_on_its_device(tiny_llama):
    _, model = decoding_model.load_model(tiny_llama, "float32", torch.device("cpu"), gpus=[0])
    assert getattr(model, "hf_device_map", None) is None
    assert {p.device.type for p in model.parameters()} == {"cpu"}


# ------------------------------------------------------------------------ predictions through the hooks


def prompt_predictions(tiny_llama, model, decision: str) -> dict:
    """The prompt method's answers with `model` in place of the one it would load."""
    from clfbench.engine.methods import prompt as pm
    from clfbench.engine.methods.catalog import PromptOptions
    from clfbench.engine.context import RunContext
    from clfbench.engine.tasks import get_task, load_task
    from tests.conftest import SAMPLES

    tokenizer, _ = decoding_model.load_model(tiny_llama, "float32", torch.device("cpu"))
    tasks = [load_task(get_task("massive-intent"), data_dir=SAMPLES, test_limit=6, seed=0)]
    ctx = RunContext(run_id=1, attempt=1, spec=SimpleNamespace(seed=0, shots=1, method="prompt"),
                     options=PromptOptions(decision=decision, batch_size=4), tasks=tasks, model_path=tiny_llama,
                     output_dir=Path("."), rank=0, world_size=1, local_rank=0, device="cpu",
                     log_metric=lambda *a: None, set_progress=lambda *a: None)
    original = pm.load_model
    pm.load_model = lambda *args, **kwargs: (tokenizer, model)
    try:
        output = pm.run(ctx)
    finally:
        pm.load_model = original
    return {key: (p.value, round(p.confidence or 0.0, 4)) for key, p in output.predictions["massive-intent"].items()}


def split_map(model, first, second) -> dict:
    layers = len(model.model.layers)
    device_map = {"model.embed_tokens": first, "model.rotary_emb": first, "model.norm": second,
                  "lm_head": second}
    device_map.update({f"model.layers.{i}": first if i < layers // 2 else second for i in range(layers)})
    return device_map


@pytest.mark.parametrize("decision", ["constrained", "score"])
def test_prompt_predictions_are_the_same_through_accelerates_placement_hooks(tiny_llama, tmp_path, decision):
    from accelerate import dispatch_model

    _, whole = decoding_model.load_model(tiny_llama, "float32", torch.device("cpu"))
    expected = prompt_predictions(tiny_llama, whole, decision)
    _, model = decoding_model.load_model(tiny_llama, "float32", torch.device("cpu"))
    dispatched = dispatch_model(model, split_map(model, "cpu", "disk"), main_device="cpu",
                                offload_dir=str(tmp_path), force_hooks=True)
    assert dispatched.model.layers[-1].mlp.down_proj.weight.device.type == "meta"  # offloaded: only hooks load it
    assert prompt_predictions(tiny_llama, dispatched, decision) == expected


@pytest.mark.gpu
@pytest.mark.parametrize("decision", ["constrained", "score"])
def test_prompt_predictions_are_the_same_with_layers_on_a_gpu_and_the_cpu(tiny_llama, decision):
    from accelerate import dispatch_model

    _, whole = decoding_model.load_model(tiny_llama, "float32", torch.device("cpu"))
    expected = prompt_predictions(tiny_llama, whole, decision)
    _, model = decoding_model.load_model(tiny_llama, "float32", torch.device("cpu"))
    # main_device="cpu": the CPU entries compute on the CPU, the GPU entries on the GPU -- a true two-device split
    dispatched = dispatch_model(model, split_map(model, "cpu", 0), main_device="cpu")
    got = prompt_predictions(tiny_llama, dispatched, decision)
    assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in expected.items()}
