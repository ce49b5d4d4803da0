#!/usr/bin/env bash
# The README's CPU figures in one run, each step's output kept in OUTDIR:
#   bash experiments/cpu_figures.sh OUTDIR        (PYTHON=... to pick the interpreter)
# 1. the quickstart's default run (python -m resnet_jax.main): test error and wall time;
# 2. the three test protocols on that run;
# 3. depth: cifar_resnet110 and cifar_resnet1202, each launched twice on one persistent
#    compilation cache (the second compile is a cache load);
# 4. experiments/benchmark_vs_pytorch.py (where torch is installed: the bench extra);
# 5. experiments/bench_input_pipeline.py (worker processes, threads, a PIL pipeline).
# Run it on an otherwise idle machine: every figure is a throughput.
set -euo pipefail
out=${1:?usage: bash experiments/cpu_figures.sh OUTDIR}
mkdir -p "$out"
PY=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1

{ date -u '+%Y-%m-%d %H:%M UTC'; lscpu | grep -E '^(Model name|CPU\(s\)):' || true
  $PY -c 'import sys, jax, flax, optax
print("python", sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__,
      "optax", optax.__version__)'; } | tee "$out/machine.txt"

$PY -m resnet_jax.main --workdir="$work/default" | tee "$out/default_run.txt"
cp "$work/default/results.json" "$out/default_results.json"
for protocol in center ten_crop multiscale; do
  $PY -m resnet_jax evaluate --workdir="$work/default" --protocol=$protocol \
    | tee "$out/eval_$protocol.txt"
done

for model in cifar_resnet110 cifar_resnet1202; do
  for launch in 1 2; do
    $PY -m resnet_jax benchmark --model=$model --steps=3 \
      --compilation-cache-dir "$work/cache" --json | tee "$out/depth_${model}_$launch.txt"
  done
done

if $PY -c 'import torch' 2>/dev/null; then
  $PY experiments/benchmark_vs_pytorch.py --steps 5 | tee "$out/vs_pytorch.txt"
else
  echo "torch is not installed (pip install -e '.[bench]'): no comparison with PyTorch" \
    | tee "$out/vs_pytorch.txt"
fi

$PY experiments/bench_input_pipeline.py --json | tee "$out/input_pipeline.txt"
