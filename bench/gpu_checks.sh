#!/usr/bin/env bash
# Every GPU check in one short run, for a lent GPU machine whose image has PyTorch, transformers and accelerate but
# not clfbench's store libraries (a lease is minutes long: one prepared script, run once).
#
#     bash bench/gpu_checks.sh OUTDIR
#
# Wheels of what the image lacks (pydantic, sqlalchemy, sqlmodel, seqeval, ...) are read from .whl/ when present
# (see the device notes: `pip download --python-version 3.12 ... -d .whl`). Each step has its own time limit and
# writes its own file under OUTDIR, so one failing step leaves the others' numbers.
#   gpu.txt           the GPU's name and memory
#   pytest_gpu.txt    the suite's tests marked `gpu`
#   engine_runs.txt   llm-finetune on a tiny random Llama through the real engine on one GPU (torchrun): DDP, then
#                     strategy=fsdp, each with a checkpoint; status, results and the log tails
#   throughput.txt    bench/llm_finetune_throughput.py: tokens/s and MFU on a random ~1.1B Llama in bf16
set -uo pipefail
out=${1:-/tmp/gpu_checks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.txt" 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, 'bf16', torch.cuda.is_bf16_supported())" >>"$out/gpu.txt" 2>&1

timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_llm_finetune.py >"$out/pytest_gpu.txt" 2>&1
echo "exit $?" >>"$out/pytest_gpu.txt"

home=$(mktemp -d)
export CLFBENCH_HOME=$home CLFBENCH_DB="sqlite:///$home/clfbench.db"
{
    common=(--method llm-finetune --model tiny-llama --task massive-intent --data-dir engine/sample_data --gpus 1
            -o epochs=3 -o train_limit=128 -o test_limit=40 -o batch_size=8 -o checkpoint_every=8 -o log_every=4)
    python3 -m clfbench.app.cli queue "${common[@]}" --name ddp -o strategy=ddp
    python3 -m clfbench.app.cli queue "${common[@]}" --name fsdp -o strategy=fsdp
    start=$(date +%s)
    timeout 200 python3 -m clfbench.app.cli engine --until-idle --gpus 0
    echo "engine exit $? after $(( $(date +%s) - start )) s"
    python3 -m clfbench.app.cli ls
    for run in 1 2; do
        python3 -m clfbench.app.cli show "$run"
        python3 -m clfbench.app.cli logs "$run" | tail -25
    done
} >"$out/engine_runs.txt" 2>&1

timeout 150 python3 bench/llm_finetune_throughput.py --steps 10 --warmup 3 --peak-tflops 989 >"$out/throughput.txt" 2>&1
echo "exit $?" >>"$out/throughput.txt"
