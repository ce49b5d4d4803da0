"""Images/s of the ImageNet training pipeline on real-size JPEGs, by workers and per core.

    python experiments/bench_input_pipeline.py [--images 64] [--rounds 5] [--json]

Builds an ArrayRecord tfds dataset of real photographs at ImageNet size (scikit-learn's
two 427x640 sample photos, re-encoded as JPEGs with flips and crops so the records differ)
in a temp dir, then measures ``train_iterator`` (read, decode, scale augmentation, crop,
flip, lighting, mean) with 1 and 2 worker processes, and beside it:

* the same per-image work run by 1 and 2 threads of one process (the batch split between
  them), i.e. a thread-pool pipeline;
* a torchvision-style PIL pipeline on the same JPEG bytes written as files (read file,
  ``Image.open``, shorter side to a random 256..480 with bilinear resampling, random 224
  crop, flip, float32, mean, PCA lighting: what ``torchvision.transforms`` does with the
  paper's augmentation), its batches built by 1 and 2 worker processes through the same
  grain machinery (so only the per-image work differs);
* the in-memory digits pipeline (CIFAR-style, batch 128) built in the training process
  and in 1 and 2 worker processes.

The machine may be shared, so the configurations are measured in alternating rounds
(each: ``--settle`` seconds for every worker to go idle, the ready batches drained, then
``--batches`` batches timed) and each figure is the median over rounds; ratios are
medians of the per-round ratios. With ``--json`` the last line is one JSON object.
"""

import argparse
import concurrent.futures
import functools
import itertools
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from sklearn.datasets import load_sample_images  # noqa: E402

from resnet_jax.config import base_config  # noqa: E402
from resnet_jax.data import dali  # noqa: E402
from resnet_jax.data import pipeline as input_pipeline  # noqa: E402


def build(data_dir: str, n: int) -> None:
    photos = load_sample_images().images

    class BenchPhotos(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version('1.0.0')

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        'image': tfds.features.Image(encoding_format='jpeg'),
                        'label': tfds.features.ClassLabel(num_classes=2),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {'train': self._generate_examples(n), 'validation': self._generate_examples(2)}

        def _generate_examples(self, count):
            for i in range(count):
                photo = photos[i % 2]
                photo = photo[:, ::-1] if (i // 2) % 2 else photo
                dy, dx = (i * 7) % 20, (i * 13) % 30  # ~400x600 crops: ImageNet-like
                yield (
                    i,
                    {
                        'image': np.ascontiguousarray(photo[dy : dy + 400, dx : dx + 600]),
                        'label': i % 2,
                    },
                )

    BenchPhotos(data_dir=data_dir, file_format='array_record').download_and_prepare()


def write_jpeg_files(data_dir: str, out_dir: str) -> list[str]:
    """The dataset's training JPEGs, byte for byte, as files (an ImageFolder-style copy)."""
    source = tfds.data_source(
        'bench_photos',
        split='train',
        data_dir=data_dir,
        decoders={'image': tfds.decode.SkipDecoding()},
    )
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
    image = image.resize(
        (max(short, round(w * scale)), max(short, round(h * scale))), Image.BILINEAR
    )
    w, h = image.size
    left, top = int(rng.integers(0, w - 223)), int(rng.integers(0, h - 223))
    image = image.crop((left, top, left + 224, top + 224))
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    x = np.asarray(image, np.float32) - mean
    eigval = np.array([0.2175, 0.0188, 0.0045], np.float32) * 255
    eigvec = np.array(
        [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]],
        np.float32,
    )
    return x + eigvec @ (rng.normal(0, 0.1, 3).astype(np.float32) * eigval)


def pil_batch(paths: list[str], batch_size: int, step: int) -> np.ndarray:
    mean = np.array([123.68, 116.78, 103.94], np.float32)
    return np.stack(
        [
            pil_train_view(
                paths[(step * batch_size + i) % len(paths)], np.random.default_rng([step, i]), mean
            )
            for i in range(batch_size)
        ]
    )


# --- the configurations: each yields batches of batch_size images, forever -----------------


def dataset_config(name: str, data_dir: str, workers: int):
    cfg = base_config().dataset
    cfg.name, cfg.data_dir, cfg.num_workers = name, data_dir, workers
    return cfg


def worker_batches(data_dir: str, workers: int, batch_size: int, name='bench_photos'):
    """``train_iterator``: batches built in ``workers`` processes (grain)."""
    pipeline = input_pipeline.Pipeline(dataset_config(name, data_dir, workers), seed=0)
    if pipeline.small:  # forced through workers, to compare with building them here
        build = lambda step, start, stop: pipeline.train_examples(  # noqa: E731
            step, batch_size, start, stop
        )
        return pipeline._host_batches(build, 0, 1 << 62, batch_size)
    return input_pipeline.train_iterator(pipeline, 0, batch_size, 0, 1)


def inprocess_batches(data_dir: str, batch_size: int, name: str):
    pipeline = input_pipeline.Pipeline(dataset_config(name, data_dir, 1), seed=0)
    return (pipeline.train_batch(step, batch_size) for step in itertools.count())


def thread_batches(data_dir: str, threads: int, batch_size: int):
    """The same per-image work, the batch split between ``threads`` threads."""
    pipeline = input_pipeline.Pipeline(dataset_config('bench_photos', data_dir, 1), seed=0)
    pool = concurrent.futures.ThreadPoolExecutor(threads)
    bounds = np.linspace(0, batch_size, threads + 1).astype(int)
    for step in itertools.count():
        parts = list(
            pool.map(
                lambda a, s=step: pipeline.train_examples(s, batch_size, *a),
                zip(bounds[:-1], bounds[1:]),
            )
        )
        yield {k: np.concatenate([p[k] for p in parts]) for k in ('image', 'label')}


def dali_batches(data_dir: str, threads: int, batch_size: int):
    """DALI's CPU operators (``dataset.decoder='dali'`` without a GPU), ``threads`` threads
    decoding; the batches finished on this process's one JAX CPU device."""
    import jax

    from resnet_jax import parallel

    cfg = dataset_config('bench_photos', data_dir, threads)
    cfg.decoder = 'dali'
    pipeline = input_pipeline.Pipeline(cfg, seed=0)
    mesh = parallel.create_mesh(jax.devices()[:1])
    return dali.train_batches(pipeline, mesh, 0, batch_size)


def pil_batches(paths: list[str], workers: int, batch_size: int):
    """torchvision-style batches built in ``workers`` processes (grain, as ours)."""
    from resnet_jax.data import workers as worker_processes

    return worker_processes.map_in_workers(
        functools.partial(pil_batch, paths, batch_size), range(1 << 62), workers
    )


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and all its descendants so far (Linux)."""
    parents = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/stat') as f:
                    fields = f.read().rsplit(')', 1)[1].split()
            except OSError:
                continue
            parents[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    mine, total = {os.getpid()}, 0
    for _ in range(8):  # descendants, generation by generation
        mine |= {pid for pid, (ppid, _) in parents.items() if ppid in mine}
    total = sum(parents[pid][1] for pid in mine if pid in parents)
    return total / os.sysconf('SC_CLK_TCK')


def measure(
    configs: dict,
    batch_size: int,
    batches: int,
    rounds: int,
    drain: dict,
    settle: float,
    cpu: dict | None = None,
) -> dict[str, list[float]]:
    """Images/s of each configuration in each round, the configurations alternating.

    Workers refill their buffers after being measured; ``settle`` seconds before each
    measurement let them finish, so that no configuration is timed while another one's
    workers are still busy."""
    rates = {name: [] for name in configs}
    for name, it in configs.items():  # start the workers, warm up
        for _ in range(drain[name] + 1):
            next(it)
    for _ in range(rounds):
        for name, it in configs.items():
            time.sleep(settle)
            for _ in range(drain[name]):  # what was prepared while others were measured
                next(it)
            start, start_cpu = time.perf_counter(), cpu_seconds()
            for _ in range(batches):
                next(it)
            rates[name].append(batches * batch_size / (time.perf_counter() - start))
            if cpu is not None:
                cpu.setdefault(name, []).append(
                    1e3 * (cpu_seconds() - start_cpu) / (batches * batch_size)
                )
    return rates


def median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, default=64)
    parser.add_argument('--batches', type=int, default=8, help='timed batches per round')
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument(
        '--settle', type=float, default=3.0, help='seconds of quiet before each measurement'
    )
    parser.add_argument('--json', action='store_true', help='end with one JSON line')
    args = parser.parse_args()
    bs = args.batch_size
    with tempfile.TemporaryDirectory() as data_dir, tempfile.TemporaryDirectory() as jpeg_dir:
        build(data_dir, args.images)
        paths = write_jpeg_files(data_dir, jpeg_dir)
        configs = {
            'workers_1': worker_batches(data_dir, 1, bs),
            'workers_2': worker_batches(data_dir, 2, bs),
            'threads_1': thread_batches(data_dir, 1, bs),
            'threads_2': thread_batches(data_dir, 2, bs),
            'pil_1': pil_batches(paths, 1, bs),
            'pil_2': pil_batches(paths, 2, bs),
        }
        if dali.installed():
            configs.update(
                dali_1=dali_batches(data_dir, 1, bs), dali_2=dali_batches(data_dir, 2, bs)
            )
        # Up to 3 batches a worker wait ready (its buffer, its queue, grain's interleave).
        drain = {
            'workers_1': 3,
            'workers_2': 6,
            'threads_1': 0,
            'threads_2': 0,
            'pil_1': 3,
            'pil_2': 6,
            'dali_1': 0,
            'dali_2': 0,
        }
        cpu_ms: dict[str, list[float]] = {}
        rates = measure(configs, bs, args.batches, args.rounds, drain, args.settle, cpu_ms)
        for it in configs.values():
            getattr(it, 'close', lambda: None)()
        # In-memory digits (CIFAR-style 32x32, batch 128): here vs in worker processes.
        tfds_dir = os.path.join(data_dir, 'digits')
        small = {
            'in_process': inprocess_batches(tfds_dir, 128, 'digits'),
            'workers_1': worker_batches(tfds_dir, 1, 128, 'digits'),
            'workers_2': worker_batches(tfds_dir, 2, 128, 'digits'),
        }
        small_rates = measure(
            small,
            128,
            20,
            args.rounds,
            {'in_process': 0, 'workers_1': 3, 'workers_2': 6},
            args.settle,
        )
        for it in small.values():
            getattr(it, 'close', lambda: None)()
    med = {k: statistics.median(v) for k, v in rates.items()}
    cores = os.cpu_count()
    print(
        f'ImageNet training pipeline on ~400x600 JPEGs, batch {bs}, {cores} cores, '
        f'images/s (median of {args.rounds} alternating rounds of {args.batches} batches):'
    )
    print(
        '| pipeline | 1 worker | 2 workers | per core, 2 workers | 2 / 1 | CPU ms an image '
        '(1 / 2) |'
    )
    print('|---|---|---|---|---|---|')
    rows = (
        ('resnet_jax, worker processes (grain)', 'workers'),
        ('resnet_jax per-image work, threads of one process', 'threads'),
        ('torchvision-style PIL, worker processes', 'pil'),
        ('DALI, CPU operators, threads of one process', 'dali'),
    )
    for label, key in rows:
        if f'{key}_1' not in med:
            continue
        one, two = med[f'{key}_1'], med[f'{key}_2']
        print(
            f'| {label} | {one:.1f} | {two:.1f} | {two / 2:.1f} | '
            f'{median_ratio(rates[f"{key}_2"], rates[f"{key}_1"]):.2f}x | '
            f'{statistics.median(cpu_ms[f"{key}_1"]):.2f} / '
            f'{statistics.median(cpu_ms[f"{key}_2"]):.2f} |'
        )
    print(
        f'1 worker / 1 thread: {median_ratio(rates["workers_1"], rates["threads_1"]):.2f}; '
        f'workers / PIL: {median_ratio(rates["workers_1"], rates["pil_1"]):.2f} (1), '
        f'{median_ratio(rates["workers_2"], rates["pil_2"]):.2f} (2)'
    )
    small_med = {k: statistics.median(v) for k, v in small_rates.items()}
    print(
        'in-memory digits, batch 128, images/s: '
        + ', '.join(f'{k.replace("_", " ")} {v:.0f}' for k, v in small_med.items())
    )
    if args.json:
        print(
            json.dumps(
                {
                    'images_per_sec_1_worker': round(med['workers_1'], 1),
                    'images_per_sec_2_workers': round(med['workers_2'], 1),
                    'images_per_sec_per_core_2_workers': round(med['workers_2'] / 2, 1),
                    'scaling_2_workers': round(
                        median_ratio(rates['workers_2'], rates['workers_1']), 3
                    ),
                    'images_per_sec_1_thread': round(med['threads_1'], 1),
                    'images_per_sec_2_threads': round(med['threads_2'], 1),
                    'worker_vs_thread_1': round(
                        median_ratio(rates['workers_1'], rates['threads_1']), 3
                    ),
                    'cpu_ms_per_image': {
                        k: round(statistics.median(v), 3) for k, v in cpu_ms.items()
                    },
                    'pil_images_per_sec_1_worker': round(med['pil_1'], 1),
                    'pil_images_per_sec_2_workers': round(med['pil_2'], 1),
                    'dali_images_per_sec': {
                        k: round(v, 1) for k, v in med.items() if k.startswith('dali')
                    },
                    'in_memory_images_per_sec': {k: round(v, 1) for k, v in small_med.items()},
                    'batch_size': bs,
                    'cores': cores,
                    'rounds': args.rounds,
                }
            )
        )
    return 0


if __name__ == '__main__':
    sys.exit(main())
