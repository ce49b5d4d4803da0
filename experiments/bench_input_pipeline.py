"""Images/s per core of the ImageNet training pipeline on real-size JPEGs, beside PIL.

    python experiments/bench_input_pipeline.py [--images 64] [--batches 8]

Builds an ArrayRecord tfds dataset of real photographs at ImageNet size (scikit-learn's
two 427x640 sample photos, re-encoded as JPEGs with flips and crops so the records differ)
in a temp dir, then times ``Pipeline.train_batch`` (read, decode, scale augmentation,
crop, flip, mean, lighting) with 1 worker thread and with one per core. The same JPEG
bytes are also written as files and run through a torchvision-style PIL pipeline (read
file, ``Image.open``, shorter side to a random 256..480 with bilinear resampling, random
224 crop, flip, float32, mean, PCA lighting: what ``torchvision.transforms`` would do
with the paper's augmentation), with the same threads. Prints medians.
"""

import argparse
import concurrent.futures
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


def write_jpeg_files(data_dir: str, out_dir: str) -> list[str]:
    """The dataset's training JPEGs, byte for byte, as files (an ImageFolder-style copy)."""
    source = tfds.data_source('bench_photos', split='train', data_dir=data_dir,
                              decoders={'image': tfds.decode.SkipDecoding()})
    paths = []
    for i in range(len(source)):
        paths.append(os.path.join(out_dir, f'{i:05d}.jpg'))
        with open(paths[-1], 'wb') as f:
            f.write(source[i]['image'])
    return paths


def pil_train_view(path: str, rng: np.random.Generator, mean: np.ndarray) -> np.ndarray:
    """The paper's training augmentation written the torchvision way, with PIL."""
    from PIL import Image

    with open(path, 'rb') as f:
        image = Image.open(f).convert('RGB')
    short = int(rng.integers(256, 481))
    w, h = image.size
    scale = short / min(w, h)
    image = image.resize((max(short, round(w * scale)), max(short, round(h * scale))),
                         Image.BILINEAR)
    w, h = image.size
    left, top = int(rng.integers(0, w - 223)), int(rng.integers(0, h - 223))
    image = image.crop((left, top, left + 224, top + 224))
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    x = np.asarray(image, np.float32) - mean
    eigval = np.array([0.2175, 0.0188, 0.0045], np.float32) * 255
    eigvec = np.array([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140],
                       [-0.5836, -0.6948, 0.4203]], np.float32)
    return x + eigvec @ (rng.normal(0, 0.1, 3).astype(np.float32) * eigval)


def measure_pil(paths: list[str], workers: int, batches: int, batch_size: int) -> float:
    mean = np.array([123.68, 116.78, 103.94], np.float32)
    times = []
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for step in range(batches + 1):
            rngs = [np.random.default_rng([step, i]) for i in range(batch_size)]
            files = [paths[(step * batch_size + i) % len(paths)] for i in range(batch_size)]
            start = time.perf_counter()
            np.stack(list(pool.map(lambda a: pil_train_view(a[0], a[1], mean),
                                   zip(files, rngs))))
            if step:  # the first batch is the warm-up
                times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times)


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
        with tempfile.TemporaryDirectory() as jpeg_dir:
            paths = write_jpeg_files(data_dir, jpeg_dir)
            pil_one = measure_pil(paths, 1, args.batches, args.batch_size)
            pil_many = measure_pil(paths, cores, args.batches, args.batch_size)
    print(f'ImageNet train pipeline on ~400x600 JPEGs, batch {args.batch_size}, '
          f'median of {args.batches} batches ({cores} cores), images/s:')
    print('| pipeline | 1 thread | per core, 1 thread | '
          f'{cores} threads | per core, {cores} threads |')
    print('|---|---|---|---|---|')
    for name, a, b in (('resnet_jax (tfds ArrayRecord, PIL decode)', one, many),
                       ('torchvision-style PIL, JPEG files', pil_one, pil_many)):
        print(f'| {name} | {a:.1f} | {a:.1f} | {b:.1f} | {b / cores:.1f} |')
    print(f'resnet_jax / PIL: {one / pil_one:.2f} (1 thread), {many / pil_many:.2f} '
          f'({cores} threads)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
