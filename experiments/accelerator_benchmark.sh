#!/usr/bin/env bash
# The README's accelerator figures in one run, on a machine with one GPU (or TPU):
#   bash experiments/accelerator_benchmark.sh [OUTDIR]
# 1. resnet50, bfloat16, batch 256 (the figure compared with NVIDIA's and MLPerf's);
# 2. the same config relaunched on the persistent compilation cache (compile = cache load);
# 3. benchmark_vs_pytorch.py, bfloat16, resnet50:256 and cifar_resnet56:128, where torch
#    is installed (PyTorch on the same GPU, channels_last, autocast).
# Each step's output is also written to OUTDIR (default: a temp dir), one file per step.
set -uo pipefail
out=${1:-$(mktemp -d)}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$(mktemp -d)}
PY=${PYTHON:-python3}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader | tee "$out/device.txt"
$PY -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
  "optax", optax.__version__, jax.devices())' | tee -a "$out/device.txt" || exit 1
bench=(-m resnet_jax benchmark --model=resnet50 --batch_size=256 --config.model.dtype=bfloat16
       --steps=20 --compilation_cache_dir="$JAX_COMPILATION_CACHE_DIR" --json)
$PY "${bench[@]}" | tee "$out/resnet50_bf16_b256.txt" || exit 1
$PY "${bench[@]}" | tee "$out/resnet50_bf16_b256_relaunch.txt"
if $PY -c 'import torch' 2>/dev/null; then
  $PY experiments/benchmark_vs_pytorch.py --dtype bfloat16 --steps 20 --rounds 1 \
    --nets resnet50:256 cifar_resnet56:128 | tee "$out/vs_pytorch_bf16.txt"
fi
