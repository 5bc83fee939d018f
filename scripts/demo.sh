#!/usr/bin/env bash
# The offline demo, end to end: set up; prepare Fashion-MNIST with a small labelled training set
# (200 images per class) and the other 56,000 training images set aside; pretrain a CNN teacher on
# those (standing in for ImageNet weights, which cannot be downloaded here) and finetune it on the
# 2,000; train the demo ViT without a teacher and the demo DeiT with it (same budget) on the 2,000;
# test all three; test the ViT and the DeiT again in the accelerator's FP16_32 arithmetic and in the
# earlier release's INT8; print a results table.
# Usage: bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
idx_dir=/usr/share/datasets/fashion-mnist
results=demo_results
teacher=runs/teacher_demo/resnet18_fashion_mnist.pth  # where train_configs/deit_demo.json looks for it
pretrained=runs/teacher_demo/resnet18_pretrained.pth
mkdir -p "$results"

echo "== setup: .venv and requirements"
bash scripts/setup.sh
if [ ! -e "$idx_dir/train-images-idx3-ubyte.gz" ] && [ ! -e "$idx_dir/train-images-idx3-ubyte" ]; then
    echo "== setup: installing the Debian package dataset-fashion-mnist"
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get install -y dataset-fashion-mnist || { $sudo apt-get update && $sudo apt-get install -y dataset-fashion-mnist; }
fi
py=.venv/bin/python

timed() {  # timed NAME command...: run, keep its output in $results/NAME.log, record seconds
    local name=$1; shift
    local start=$SECONDS
    "$@" 2>&1 | tee "$results/$name.log"
    echo $((SECONDS - start)) > "$results/$name.seconds"
}

echo "== prepare data"
timed prepare "$py" prepare_fashion_mnist.py --idx-dir "$idx_dir" --out data/fashion-mnist \
    --train-per-class 200 --val-per-class 200
echo "== pretrain the teacher (ResNet-18) on the 56,000 extra images, which the students never see"
timed teacher_pretrain "$py" finetune_teacher.py --data-config data_configs/fashion_mnist_extra.json \
    --model resnet18 --weights none --epochs 2 --batch-size 128 --optimizer adamw --lr 2e-3 --weight-decay 0.05 \
    --warmup-epochs 0.2 --num-workers 1 --output-path "$pretrained"
echo "== finetune the teacher on the 2,000 training images"
timed teacher "$py" finetune_teacher.py --data-config data_configs/fashion_mnist.json --model resnet18 \
    --weights "$pretrained" --epochs 2 --batch-size 128 --optimizer adamw --lr 1e-4 --weight-decay 0.05 \
    --num-workers 1 --output-path "$teacher"
for model in vit deit; do
    echo "== train the demo ${model^^} (train_configs/${model}_demo.json)"
    timed "train_$model" "$py" train.py -c "train_configs/${model}_demo.json"
    run_dir=$(sed -n 's/^run directory: //p' "$results/train_$model.log" | head -n 1)
    echo "== test $run_dir/last.pt"
    timed "test_$model" "$py" test.py -c "train_configs/${model}_demo.json" --checkpoint "$run_dir/last.pt" \
        --json "$results/test_$model.json"
    echo "== test $run_dir/last.pt in FP16_32, the accelerator's arithmetic"
    timed "quantize_$model" "$py" test_quantize.py -c "train_configs/${model}_demo.json" --checkpoint "$run_dir/last.pt" \
        --q_format FP16_32 --json "$results/quantize_$model.json"
    echo "== test $run_dir/last.pt in INT8 (PyTorchINT8, the earlier release's post-training quantization)"
    timed "int8_$model" "$py" test_quantize.py -c "train_configs/${model}_demo.json" --checkpoint "$run_dir/last.pt" \
        --q_format PyTorchINT8 --json "$results/int8_$model.json"
done

"$py" - "$results" "$teacher" <<'PY'
import json, sys
from pathlib import Path
results, teacher = Path(sys.argv[1]), Path(sys.argv[2])
steps = ("prepare", "teacher_pretrain", "teacher", "train_vit", "test_vit", "quantize_vit", "int8_vit", "train_deit",
         "test_deit", "quantize_deit", "int8_deit")
seconds = {s: int((results / f"{s}.seconds").read_text()) for s in steps}
t = json.loads(teacher.with_suffix(".json").read_text())
vit, deit = (json.loads((results / f"test_{m}.json").read_text()) for m in ("vit", "deit"))
qvit, qdeit = (json.loads((results / f"quantize_{m}.json").read_text()) for m in ("vit", "deit"))
ivit, ideit = (json.loads((results / f"int8_{m}.json").read_text()) for m in ("vit", "deit"))
print("\n| model | test top-1 | test top-5 | time (train + test) |\n|---|---|---|---|")
print(f"| teacher: ResNet-18, pretrained on the extra images, finetuned | {t['test_top1']:.2f}% | {t['test_top5']:.2f}% "
      f"| {seconds['teacher_pretrain']} + {seconds['teacher']} s |")
print(f"| ViT, no teacher | {vit['top1']:.2f}% | {vit['top5']:.2f}% | {seconds['train_vit']} + {seconds['test_vit']} s |")
print(f"| ViT in FP16_32 (test_quantize.py) | {qvit['quantized']['top1']:.2f}% | {qvit['quantized']['top5']:.2f}% "
      f"| {seconds['quantize_vit']} s |")
print(f"| ViT in INT8 (test_quantize.py, PyTorchINT8) | {ivit['quantized']['top1']:.2f}% | {ivit['quantized']['top5']:.2f}% "
      f"| {seconds['int8_vit']} s |")
print(f"| DeiT, class head (deployed) | {deit['top1']:.2f}% | {deit['top5']:.2f}% | {seconds['train_deit']} + {seconds['test_deit']} s |")
avg = deit["average_heads"]
print(f"| DeiT, average of both heads | {avg['top1']:.2f}% | {avg['top5']:.2f}% | |")
print(f"| DeiT class head in FP16_32 (test_quantize.py) | {qdeit['quantized']['top1']:.2f}% "
      f"| {qdeit['quantized']['top5']:.2f}% | {seconds['quantize_deit']} s |")
print(f"| DeiT class head in INT8 (test_quantize.py, PyTorchINT8) | {ideit['quantized']['top1']:.2f}% "
      f"| {ideit['quantized']['top5']:.2f}% | {seconds['int8_deit']} s |")
print(f"\nDeiT class head minus ViT: {deit['top1'] - vit['top1']:+.2f} points on {vit['num_images']} test images")
for name, q in (("ViT", qvit), ("DeiT", qdeit), ("ViT", ivit), ("DeiT", ideit)):
    print(f"{name} in {'INT8' if q['q_format'] == 'PyTorchINT8' else q['q_format']}: top-1 "
          f"{q['quantized']['top1'] - q['fp32']['top1']:+.2f} points against FP32, "
          f"{q['unchanged_predictions']:.2f}% of predictions unchanged, largest logit difference {q['max_logit_diff']:.4g}")
sys.path.insert(0, "benchmarks")
import torch  # noqa: E402
from _common import machine, matmul_rate  # noqa: E402
rate = matmul_rate(torch.device("cpu"), 3) / 1e9
print(f"total {sum(seconds.values())} s, of which preparing the data {seconds['prepare']} s, on {machine(torch.device('cpu'))} "
      f"(fp32 matrix products: {rate:.0f} GFLOP/s; the time scales about inversely with it)")
PY
