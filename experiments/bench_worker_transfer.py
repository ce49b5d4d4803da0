"""What a batch costs to move from a grain worker process into the training process.

    python experiments/bench_worker_transfer.py [--images 32 256] [--rounds 5]

Modes, each a batch of float32 224x224x3 images built in a worker:
  shared:  the worker writes into grain's SharedMemoryArray; the parent maps it (no copy):
           the input pipeline's way (resnet_jax.data.workers).
  copied:  the worker returns a numpy array, grain copies it into shared memory, the
           parent copies it out: what a copy out of shared memory would cost.
  pickled: no shared memory (``min_shm_size`` above the batch): pickled through a pipe.
Prints the parent's wall time per batch (median and spread over rounds), rounds alternating.
"""

import argparse
import functools
import statistics
import time

import numpy as np


def _batch(images: int, shared: bool, key: int):
    from grain.multiprocessing import SharedMemoryArray

    shape = (images, 224, 224, 3)
    out = SharedMemoryArray(shape, np.float32) if shared else np.empty(shape, np.float32)
    out[...] = key
    return out


def _iterate(mode: str, images: int, batches: int):
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    ds = (
        grain.MapDataset.range(batches)
        .map(functools.partial(_batch, images, mode == 'shared'))
        .to_iter_dataset()
    )
    if mode == 'pickled':
        ds = grain.experimental.WithOptionsIterDataset(
            ds, grain.experimental.DatasetOptions(min_shm_size=2**62)
        )
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=1, per_worker_buffer_size=2))


def measure(mode: str, images: int, batches: int) -> float:
    """Seconds per batch in the parent, the worker's buffer full before each take."""
    it = iter(_iterate(mode, images, batches + 1))
    next(it)  # the worker started
    spent = []
    for _ in range(batches):
        time.sleep(0.5)  # the worker's buffer refilled: only the parent's side is timed
        start = time.perf_counter()
        array = next(it)
        if mode != 'shared':
            array = np.array(array)  # the copy out of shared memory (or of the pickle)
        spent.append(time.perf_counter() - start)
        del array
    it.close()
    return statistics.median(spent)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--images', type=int, nargs='+', default=[32, 256])
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--batches', type=int, default=4)
    args = parser.parse_args()
    modes = ('shared', 'copied', 'pickled')
    for images in args.images:
        times = {m: [] for m in modes}
        for _ in range(args.rounds):
            for mode in modes:
                times[mode].append(measure(mode, images, args.batches))
        mb = images * 224 * 224 * 3 * 4 / 1e6
        for mode in modes:
            t = sorted(times[mode])
            median = 1e3 * statistics.median(t)
            print(
                f'{images:4d} images ({mb:5.0f} MB) {mode:8s} {median:7.1f} ms per batch'
                f' (range {1e3 * t[0]:.1f}-{1e3 * t[-1]:.1f}, {args.rounds} rounds)'
            )


if __name__ == '__main__':
    main()
