#!/usr/bin/env bash
# Every GPU check in one short run, for a lent GPU machine whose image has PyTorch, transformers and accelerate but
# not clfbench's store libraries (a lease is minutes long: one prepared script, run once).
#
#     bash bench/gpu_checks.sh OUTDIR [STEP ...]      # no STEP: every step, in this order
#
# Wheels of what the image lacks (pydantic, sqlalchemy, sqlmodel, seqeval, ...) are read from .whl/ when present
# (see the device notes: `pip download --python-version 3.12 ... -d .whl`). Each step has its own time limit and
# writes its own file under OUTDIR, so one failing step leaves the others' numbers. Steps:
#   pytest       pytest_gpu.txt    the suite's tests marked `gpu`                                          (~150 s)
#   engine       engine_runs.txt   llm-finetune on a tiny random Llama through the real engine on one GPU
#                                  (torchrun): DDP, then strategy=fsdp, each with a checkpoint             (~200 s)
#   throughput   throughput.txt    bench/llm_finetune_throughput.py: tokens/s and MFU of one training step
#                                  on a random ~1.1B Llama in bf16                                         (~150 s)
#   plan         plan_vs_measured.txt  issue 11: the memory plan against torch.cuda.max_memory_allocated,
#                                  llm-finetune's step and prompt decoding on a random ~1B Llama           (~90 s)
#   fsdp1b       fsdp_1b.txt       issue 11: llm-finetune strategy=fsdp (FSDP2, bf16) on that ~1B Llama
#                                  through the engine: tokens/s, MFU, peak memory against the plan         (~200 s)
#   vllm         vllm_vs_hf.txt    issue 11: backend vllm against hf on the ~1B Llama, 200 MASSIVE sample
#                                  utterances (only where the image has vllm)                              (~300 s)
# The ~1B Llama (TinyLlama's shapes: 22 layers, hidden 2048, 32 heads, 4 KV heads; the tiny models' small
# vocabulary) is built once with random weights: nothing is downloaded. One command runs for at most 600 s, so
# split the steps over two calls: `... engine throughput pytest`, then `... plan fsdp1b vllm`.
set -uo pipefail
out=${1:-/tmp/gpu_checks}
shift || true
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(pytest engine throughput plan fsdp1b vllm)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.txt" 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, 'bf16', torch.cuda.is_bf16_supported())" >>"$out/gpu.txt" 2>&1

home=$(mktemp -d)
export CLFBENCH_HOME=$home CLFBENCH_DB="sqlite:///$home/clfbench.db"
cli() { python3 -m clfbench.app.cli "$@"; }
first_id() { python3 -c "import json, sys; print(json.load(sys.stdin)[0]['id'])"; }
llama_1b=$home/llama-1b

build_llama_1b() {
    [ -f "$llama_1b/config.json" ] && return
    python3 - "$llama_1b" <<'EOF'
import sys
from clfbench.engine.tiny_models import build_tiny_llama
build_tiny_llama(sys.argv[1], hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, head_dim=64)
EOF
}

step_pytest() {
    timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_llm_finetune.py >"$out/pytest_gpu.txt" 2>&1
    echo "exit $?" >>"$out/pytest_gpu.txt"
}

step_engine() {
    {
        common=(--method llm-finetune --model tiny-llama --task massive-intent --data-dir engine/sample_data
                --gpus 1 -o epochs=3 -o train_limit=128 -o test_limit=40 -o batch_size=8 -o checkpoint_every=8
                -o log_every=4)
        runs=()
        for strategy in ddp fsdp; do
            runs+=("$(cli queue "${common[@]}" --name "$strategy" -o strategy=$strategy --json | first_id)")
        done
        start=$(date +%s)
        timeout 200 python3 -m clfbench.app.cli engine --until-idle --gpus 0
        echo "engine exit $? after $(( $(date +%s) - start )) s"
        cli ls
        for run in "${runs[@]}"; do
            cli show "$run"
            cli logs "$run" | tail -25
        done
    } >"$out/engine_runs.txt" 2>&1
}

step_throughput() {
    timeout 150 python3 bench/llm_finetune_throughput.py --steps 10 --warmup 3 --peak-tflops 989 >"$out/throughput.txt" 2>&1
    echo "exit $?" >>"$out/throughput.txt"
}

step_plan() {
    { build_llama_1b && timeout 150 python3 bench/plan_vs_measured.py --device cuda --model "$llama_1b"; echo "exit $?"; } \
        >"$out/plan_vs_measured.txt" 2>&1
}

step_fsdp1b() {
    {
        build_llama_1b
        spec=(--method llm-finetune --model "$llama_1b" --task massive-intent --data-dir engine/sample_data --gpus 1
              -o strategy=fsdp -o max_steps=30 -o train_limit=240 -o test_limit=20 -o batch_size=8
              -o max_length=1024 -o log_every=5 -o eval_every=0 -o checkpoint_every=0)
        cli plan "${spec[@]}" --tokens 1024
        run=$(cli queue "${spec[@]}" --name fsdp-1b --json | first_id)
        start=$(date +%s)
        timeout 250 python3 -m clfbench.app.cli engine --until-idle --gpus 0
        echo "engine exit $? after $(( $(date +%s) - start )) s"
        cli show "$run" --json >"$home/fsdp_1b.json"
        cli logs "$run" | tail -30
        # MFU: 6 x parameters FLOPs per trained token (forward + backward), against the H100/H200's 989 TFLOP/s.
        python3 - "$home/fsdp_1b.json" "$llama_1b" <<'EOF'
import json, sys
from clfbench.engine import memory_plan
shown = json.load(open(sys.argv[1]))
config = memory_plan.read_config(memory_plan.model_config(sys.argv[2]))
params = memory_plan.parameter_count(memory_plan.shape_of(config))
results = shown["results"]["massive-intent"]
rate = results["train_tokens_per_s"]
print(f"status {shown['status']}; {params / 1e9:.3f}B parameters; {rate:,.0f} tokens/s; "
      f"MFU {6 * params * rate / 989e12:.1%}; results {json.dumps(results)}")
EOF
    } >"$out/fsdp_1b.txt" 2>&1
}

step_vllm() {
    if ! python3 -c "import vllm" >"$out/vllm_vs_hf.txt" 2>&1; then
        echo "vllm is not importable in this image: not measured" >>"$out/vllm_vs_hf.txt"
        return
    fi
    { build_llama_1b && timeout 300 python3 bench/vllm_vs_hf.py --vllm-python python3 --model "$llama_1b" \
        --data-dir engine/sample_data --n 200 --shots 0,5 --modes constrained,score-calibrated; echo "exit $?"; } \
        >>"$out/vllm_vs_hf.txt" 2>&1
}

for step in "${steps[@]}"; do
    echo "$(date +%T) $step" >>"$out/steps.txt"
    "step_$step"
done
echo "$(date +%T) done" >>"$out/steps.txt"
