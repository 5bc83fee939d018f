#!/usr/bin/env bash
# The offline demo, end to end: set up, prepare Fashion-MNIST, train the demo ViT, test it,
# print a results table. Usage: bash scripts/demo.sh [train config] (default train_configs/vit_demo.json)
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-train_configs/vit_demo.json}
idx_dir=/usr/share/datasets/fashion-mnist
results=demo_results
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
timed prepare "$py" prepare_fashion_mnist.py --idx-dir "$idx_dir" --out data/fashion-mnist
echo "== train ($config)"
timed train "$py" train.py -c "$config"
run_dir=$(sed -n 's/^run directory: //p' "$results/train.log" | head -n 1)
echo "== test ($run_dir/last.pt)"
timed test "$py" test.py -c "$config" --checkpoint "$run_dir/last.pt" --json "$results/test.json"

"$py" - "$results" "$run_dir" <<'PY'
import json, sys
from pathlib import Path
results, run_dir = Path(sys.argv[1]), sys.argv[2]
seconds = {s: int((results / f"{s}.seconds").read_text()) for s in ("prepare", "train", "test")}
test = json.loads((results / "test.json").read_text())
print("\n| step | result | time |\n|---|---|---|")
print(f"| prepare Fashion-MNIST | 55000 train / 5000 val / 10000 test images | {seconds['prepare']} s |")
print(f"| train demo ViT | checkpoints in {run_dir} | {seconds['train']} s |")
print(f"| test demo ViT | top-1 {test['top1']:.2f}%, top-5 {test['top5']:.2f}% on {test['num_images']} images | {seconds['test']} s |")
print(f"| total | | {sum(seconds.values())} s |")
PY
