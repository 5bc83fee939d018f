#!/usr/bin/env bash
# The GPU checks, in one run of under 8 minutes on one GPU machine (an H200 here):
#   1. the CUDA-only tests (tests/test_cuda.py: no host synchronisation inside the step's micro-batch loop,
#      the batched GPU transforms against torchvision's, train.py learning on CUDA, fp16 with the gradient
#      scaler, pinned memory, the CUDA out-of-memory line, NCCL under torchrun on two GPUs, the per-layer
#      report on the GPU against the CPU's);
#   2. benchmarks/vs_timm.py: ours against timm for ViT-Tiny and ViT-Small at batch 256 in fp32, bf16 and
#      bf16 compiled (timm compiled too), the bf16 utilisation, train.py end to end on generated Resisc45-size
#      JPEGs with the loader included, and the loader alone; it rewrites the GPU table of benchmarks/RESULTS.md.
# Usage, on the GPU machine, from the repository root: bash benchmarks/gpu_check.sh
# It needs python3 with torch, torchvision, timm, tensorboard, pytest and hypothesis; packages missing there
# (qtorch and einops on this project's device machine) are installed from wheels in .whl/ when that folder
# exists:
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl qtorch==0.3.0 einops==0.8.2
# Logs and a copy of RESULTS.md go to $OUT when it is set (the device tool brings that folder back).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
out=${OUT:-benchmarks/gpu_check_logs}
mkdir -p "$out"
if [ -d .whl ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site .whl/*.whl
    export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
"$py" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device: run this on the GPU machine"
print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {torch.cuda.device_count()} GPU(s)")
PY
start=$SECONDS
echo "== CUDA-only tests"
"$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/gpu_tests.log"
echo "== vs_timm.py (about 5 minutes)"
"$py" benchmarks/vs_timm.py --device cuda --models tiny small --batch-size 256 --settings fp32 bf16 bf16+compile \
    --images-per-class 200 --e2e-epochs 3 --warmup 3 --repeats 5 2>&1 | tee "$out/vs_timm.log"
echo "== einops_layouts.py (seconds)"
"$py" benchmarks/einops_layouts.py --device cuda --batch-size 256 --repeats 7 2>&1 | tee "$out/einops.log"
cp benchmarks/RESULTS.md "$out/RESULTS.md"
echo "== done in $((SECONDS - start)) s; the GPU table is in benchmarks/RESULTS.md (and $out)"
