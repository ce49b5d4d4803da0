#!/usr/bin/env bash
# A Cloud TPU pod slice: the VM created, this checkout's wheel installed on every worker,
# and the same train command started on every worker (one process per host; JAX finds the
# pod's shape). The workdir is in a bucket: a pod has no shared filesystem. After a
# preemption, run it again with STEP=train: the command resumes from the bucket's latest
# checkpoint.
#
#   BUCKET=gs://my-bucket ZONE=us-central2-b TPU=v4-32 bash experiments/launch/tpu_pod.sh
#   STEP=train BUCKET=gs://my-bucket bash experiments/launch/tpu_pod.sh   # resume
#   ... bash experiments/launch/tpu_pod.sh --config.seed=1   # arguments go to the command
set -euo pipefail
BUCKET=${BUCKET:?name the bucket: BUCKET=gs://...}
NAME=${NAME:-resnet-jax}
ZONE=${ZONE:-us-central2-b}
TPU=${TPU:-v4-32}
VERSION=${VERSION:-tpu-ubuntu2204-base}
CONFIG=${CONFIG:-imagenet.py:resnet50}
WORKDIR=${WORKDIR:-$BUCKET/runs/imagenet_resnet50}
DATA_DIR=${DATA_DIR:-$BUCKET/tfds}  # where the dataset was prepared (README, "Data")
STEP=${STEP:-all}  # all: create, install, train; train: the train command only

on_every_worker() {
  gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="$1"
}

if [ "$STEP" = all ]; then
  gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" --accelerator-type="$TPU" \
    --version="$VERSION"
  dist=$(mktemp -d)
  python3 -m pip wheel -q --no-deps -w "$dist" "$(dirname "$0")/../.."
  wheel=$(basename "$dist"/resnet_jax-*.whl)
  gcloud compute tpus tpu-vm scp "$dist/$wheel" "$NAME:" --zone="$ZONE" --worker=all
  on_every_worker "pip install './$wheel[gcs]' && pip install -U 'jax[tpu]'"
fi
on_every_worker "resnet-jax train --config=$CONFIG --workdir=$WORKDIR \
--config.dataset.data_dir=$DATA_DIR $*"
