#!/usr/bin/env bash
# A GPU (or TPU) host measured start to end, without edits:
#   bash experiments/accelerator_benchmark.sh [--toy] [OUTDIR]
# 1. resnet50, bfloat16, synthetic data, at the largest of $BATCHES that fits: train
#    images/s, first compile, peak device memory; then relaunched on the compilation cache.
# 2. Real JPEGs (ImageNet-sized, written here) through the input pipeline beside the same
#    step on synthetic data (accelerator_readiness.py), decoded on the host's cores and by
#    DALI (on the GPU; where the gpu or dali extra is installed).
# 3. cifar_resnet1202 in research code's own jax.jit: first init, apply and gradient.
# 4. PyTorch on the same device (benchmark_vs_pytorch.py), where torch is installed.
# The last line is a one-line table. Knobs, from the environment and printed first:
# BATCHES (largest first), XLA_FLAGS (e.g. --xla_gpu_enable_latency_hiding_scheduler=true),
# CONFIG_FLAGS (more --config.<field>=<value> for step 1, e.g. the BN statistics dtype).
# --toy: CPU sizes (resnet18 float32 at 32 px, tiny CIFAR nets), to check the script itself.
set -uo pipefail
toy=0
[ "${1:-}" = --toy ] && { toy=1; shift; }
out=${1:-$(mktemp -d)}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$(mktemp -d)}
PY=${PYTHON:-python3}
if [ $toy = 1 ]; then
  BATCHES=${BATCHES:-8 4} model=(--model=resnet18 --image_size=32) steps=1
  readiness=(--toy) deep=(--models cifar_resnet8 --batch_size 2) torch_nets=()
else
  BATCHES=${BATCHES:-512 384 256 128} model=(--model=resnet50 --config.model.dtype=bfloat16)
  steps=20 readiness=() deep=(--models cifar_resnet1202 --batch_size 128)
  torch_nets=(resnet50:256 cifar_resnet56:128)
fi
{
  echo "knobs: BATCHES='$BATCHES' XLA_FLAGS='${XLA_FLAGS:-}' CONFIG_FLAGS='${CONFIG_FLAGS:-}'"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader
  $PY -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
    "optax", optax.__version__, jax.devices())'
} | tee "$out/device.txt" || exit 1

# 1. The largest batch that fits: a batch the device cannot hold is refused before it runs
#    (exit 2) or fails allocating; either way the next one is tried.
for batch in $BATCHES; do
  # shellcheck disable=SC2086
  bench=(-m resnet_jax benchmark "${model[@]}" --batch_size="$batch" --steps=$steps --json
         --compilation_cache_dir="$JAX_COMPILATION_CACHE_DIR" ${CONFIG_FLAGS:-})
  if $PY "${bench[@]}" > "$out/synthetic.txt" 2>&1; then
    cat "$out/synthetic.txt"
    $PY "${bench[@]}" > "$out/synthetic_relaunch.txt" 2>&1
    tail -n 3 "$out/synthetic_relaunch.txt"
    break
  fi
  echo "batch $batch: $(grep -m1 -E 'error|RESOURCE_EXHAUSTED' "$out/synthetic.txt")"
done
[ -s "$out/synthetic_relaunch.txt" ] || { echo "no batch of '$BATCHES' ran" >&2; exit 1; }

# 2. and 3.
$PY "$here/accelerator_readiness.py" "${readiness[@]}" --log="$out/readiness.txt" > /dev/null \
  || { tail -n 20 "$out/readiness.txt" >&2; exit 1; }
tail -n 3 "$out/readiness.txt"
$PY "$here/bench_plain_model.py" "${deep[@]}" --rounds 1 --steps 2 | tee "$out/plain_model.txt"

# 4.
if [ ${#torch_nets[@]} -gt 0 ] && $PY -c 'import torch' 2>/dev/null; then
  $PY "$here/benchmark_vs_pytorch.py" --dtype bfloat16 --steps 20 --rounds 1 \
    --nets "${torch_nets[@]}" | tee "$out/vs_pytorch_bf16.txt"
fi

$PY - "$out" <<'EOF'
import json, pathlib, sys

out = pathlib.Path(sys.argv[1])
last = lambda name: json.loads((out / name).read_text().strip().splitlines()[-1])
s, again, ready = last('synthetic.txt'), last('synthetic_relaunch.txt'), last('readiness.txt')
real, (deep, plain) = ready['real_jpeg'], next(iter(last('plain_model.txt').items()))
peak = f"{s['peak_device_mb'] / 1024:.1f} GiB" if s['peak_device_mb'] else 'n/a (cpu)'
decoded = lambda d: (
    f"{real[d]['images_per_sec']:,.0f} img/s ({real[d]['over_synthetic']:.0%})"
    if d in real else "not installed (pip install -e '.[gpu]')"
)
print(
    f"| {s['model']} {s['dtype']} batch {s['batch_size']} on {s['device_kind']} "
    f"| synthetic {s['train_images_per_sec']:,.0f} img/s "
    f"| real JPEG, cpu decoding {decoded('cpu')} | dali decoding {decoded('dali')} "
    f"| compile {s['compile_seconds']:.1f} s, relaunch {again['compile_seconds']:.1f} s "
    f"| peak device memory {peak} "
    f"| {deep} plain model: jit(init) {plain['init']:.1f} s, first gradient "
    f"{plain['value_and_grad']:.1f} s |"
)
EOF
