"""What the checkpoints' checksums cost: ResNet-50's train state saved and restored.

    python experiments/bench_checkpoint_checksum.py [--model resnet50] [--rounds 5]

Builds the train state of ``--model`` (parameters, SGD momentum, BatchNorm statistics,
float32: 51.2M numbers, 205 MB for ResNet-50) on this host's first device and, over
``--rounds`` rounds, times:

* the checksums of a save (``checksums.checksums``: SHA-256 of every part of the
  state, on the host) and their verification after a restore (``checksums.verify``);
* a whole save through the run's ``Checkpointer`` (the blocking part of ``save``, and
  until the step is committed) and a whole restore of the latest step
  (``restore_latest``, which reads, checks and verifies), into a temporary directory.

Prints the medians and ranges, and the checksums' share of a save and of a restore.
"""

import argparse
import statistics
import tempfile
import time

import jax
import numpy as np
from etils import epath


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='resnet50')
    parser.add_argument('--rounds', type=int, default=5)
    args = parser.parse_args()

    from resnet_jax import models, parallel
    from resnet_jax.config import base_config
    from resnet_jax.training import checkpoints as checkpointing
    from resnet_jax.training import checksums, optim, steps

    config = base_config()
    config.model.name = args.model
    config.keep_checkpoints = 2
    model = models.create_model(args.model)
    tx = optim.create_optimizer(config, optim.create_learning_rate_fn(config))
    mesh = parallel.create_mesh(jax.devices()[:1])
    start = time.perf_counter()
    state = steps.init_train_state(model, tx, jax.random.key(0), (224, 224, 3), mesh)
    # Random values, as a trained state has (a fresh one compresses differently).
    state = jax.tree_util.tree_map(
        lambda x: (
            parallel.replicate(
                mesh, np.random.default_rng(0).standard_normal(x.shape).astype(x.dtype)
            )
            if x.ndim
            else x
        ),
        state,
    )
    metrics = jax.device_put(steps.TrainMetrics.empty())
    leaves = jax.tree_util.tree_leaves(state)
    size = sum(x.size for x in leaves)
    nbytes = sum(x.nbytes for x in leaves)
    print(
        f'{args.model} train state: {size / 1e6:.1f}M numbers, {nbytes / 1e6:.0f} MB, '
        f'{len(leaves)} arrays (built in {time.perf_counter() - start:.1f} s); '
        f'{jax.devices()[0].device_kind}'
    )

    timings = {k: [] for k in ('checksums', 'verify', 'save_call', 'save_committed', 'restore')}
    with tempfile.TemporaryDirectory() as root:
        directory = epath.Path(root) / 'checkpoints'
        for r in range(args.rounds):
            t = time.perf_counter()
            parts = checksums.checksums(state, metrics)
            timings['checksums'].append(time.perf_counter() - t)
            t = time.perf_counter()
            checksums.verify(parts, 'state', state)
            timings['verify'].append(time.perf_counter() - t)

            ckpt = checkpointing.Checkpointer(directory, config)
            t = time.perf_counter()
            ckpt.save(r + 1, state, metrics, {'train': [], 'eval': []})
            timings['save_call'].append(time.perf_counter() - t)
            ckpt.wait()
            timings['save_committed'].append(time.perf_counter() - t)
            t = time.perf_counter()
            restored = ckpt.restore_latest(state, metrics)
            timings['restore'].append(time.perf_counter() - t)
            assert restored is not None and int(restored[0].step) == int(state.step)
            ckpt.close()

    def show(name):
        v = timings[name]
        return f'{statistics.median(v):.3f} s ({min(v):.3f}-{max(v):.3f})'

    print(f'checksums of a save (SHA-256 of {nbytes / 1e6:.0f} MB): {show("checksums")}')
    print(f'verifying a restore:                 {show("verify")}')
    print(f'save: blocking part {show("save_call")}, until committed {show("save_committed")}')
    print(f'restore of the latest step (read, check, verify): {show("restore")}')
    share_save = statistics.median(timings['checksums']) / statistics.median(
        timings['save_committed']
    )
    share_restore = statistics.median(timings['verify']) / statistics.median(timings['restore'])
    print(
        f'checksums: {100 * share_save:.0f}% of a save, {100 * share_restore:.0f}% of a '
        f'restore ({args.rounds} rounds, medians (range))'
    )
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
