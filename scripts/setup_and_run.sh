#!/usr/bin/env bash
# Main job, end to end on a fresh machine: set up the virtual environment if needed, import
# Fashion-MNIST (Debian's dataset-fashion-mnist) as PNG folders, train the CPU recipe
# configs/fashion_mnist.yaml, evaluate the best weights on the test split and predict one image.
#   SWINKIT_VENV   the environment (default .venv)
#   RUN_DIR        the run folder (default runs/fashion_mnist; an existing run is resumed)
#   DATA_DIR       where the images go (default data/fashion-mnist)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
venv="${SWINKIT_VENV:-.venv}"
run_dir="${RUN_DIR:-runs/fashion_mnist}"
data_dir="${DATA_DIR:-data/fashion-mnist}"
ensure_venv "$venv"
swinkit="$venv/bin/swinkit"

if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
fi
"$swinkit" info swin_tiny_patch4_window7_224
"$swinkit" data fashion-mnist --out "$data_dir"

resume=()
[ -f "$run_dir/last.ckpt" ] && resume=(--resume)
"$swinkit" train --config configs/fashion_mnist.yaml --data "$data_dir" --output "$run_dir" "${resume[@]}"

"$swinkit" eval --weights "$run_dir/best.safetensors" --data "$data_dir"
sample="$(find "$data_dir/val" -name '*.png' | sort | sed -n 1p)"  # sed reads all: no SIGPIPE under pipefail
"$swinkit" predict --weights "$run_dir/best.safetensors" "$sample" --topk 3
