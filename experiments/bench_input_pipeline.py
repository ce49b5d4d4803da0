"""Images/s per core of the ImageNet training pipeline on real-size JPEGs.

    python experiments/bench_input_pipeline.py [--images 64] [--batches 8]

Builds an ArrayRecord tfds dataset of real photographs at ImageNet size (scikit-learn's
two 427x640 sample photos, re-encoded as JPEGs with flips and crops so the records differ)
in a temp dir, then times ``Pipeline.train_batch`` (read, decode, scale augmentation,
crop, flip, mean, lighting) with 1 worker thread and with one per core. Prints medians.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from sklearn.datasets import load_sample_images  # noqa: E402

from resnet_jax import input_pipeline  # noqa: E402
from resnet_jax.config import base_config  # noqa: E402


def build(data_dir: str, n: int) -> None:
    photos = load_sample_images().images

    class BenchPhotos(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version('1.0.0')

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(encoding_format='jpeg'),
                'label': tfds.features.ClassLabel(num_classes=2)}))

        def _split_generators(self, dl_manager):
            return {'train': self._generate_examples(n), 'validation': self._generate_examples(2)}

        def _generate_examples(self, count):
            for i in range(count):
                photo = photos[i % 2]
                photo = photo[:, ::-1] if (i // 2) % 2 else photo
                dy, dx = (i * 7) % 20, (i * 13) % 30   # ~400x600 crops: ImageNet-like
                yield i, {'image': np.ascontiguousarray(photo[dy:dy + 400, dx:dx + 600]),
                          'label': i % 2}

    BenchPhotos(data_dir=data_dir, file_format='array_record').download_and_prepare()


def measure(data_dir: str, workers: int, batches: int, batch_size: int) -> float:
    cfg = base_config().dataset
    cfg.name, cfg.data_dir, cfg.num_workers = 'bench_photos', data_dir, workers
    pipeline = input_pipeline.Pipeline(cfg, seed=0)
    pipeline.train_batch(0, batch_size)  # warm-up
    times = []
    for step in range(1, batches + 1):
        start = time.perf_counter()
        pipeline.train_batch(step, batch_size)
        times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, default=64)
    parser.add_argument('--batches', type=int, default=8)
    parser.add_argument('--batch-size', type=int, default=32)
    args = parser.parse_args()
    cores = os.cpu_count()
    with tempfile.TemporaryDirectory() as data_dir:
        build(data_dir, args.images)
        one = measure(data_dir, 1, args.batches, args.batch_size)
        many = measure(data_dir, cores, args.batches, args.batch_size)
    print(f'ImageNet train pipeline on ~400x600 JPEGs, batch {args.batch_size}, '
          f'median of {args.batches} batches ({cores} cores):')
    print(f'  1 worker thread : {one:7.1f} images/s  ({one:.1f} images/s per core)')
    print(f'  {cores} worker threads: {many:7.1f} images/s  ({many / cores:.1f} images/s per core)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
