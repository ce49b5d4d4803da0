"""Input pipelines from tensorflow-datasets, deterministic at any scale.

Determinism: the contents and augmentation of global batch ``k`` are a function of
``(seed, k)`` only. Example ``p = k * batch_size + i`` of the stream is item ``p mod N`` of
epoch ``p // N``'s permutation (drawn from ``(seed, epoch)``), and the augmentation
parameters of the whole global batch are drawn from ``(seed, k)`` (a few numbers per
image), so the number of hosts or devices and restarts change nothing. Each host then
reads, decodes and augments only its own slice of the batch. No example is dropped:
batches run across epoch boundaries.

Why random access (and not a shuffled tf.data stream): a stream's order depends on its
shuffle buffer and on how it was sharded over hosts, and resuming it at step ``k`` means
replaying it. With random access, reading item ``i`` costs the same wherever it is, so
any host can build any slice of any batch directly. Small datasets (the digits, CIFAR-10)
are read into memory once; the others (ImageNet, imagenette, ...) are read through
``tfds.data_source`` over ArrayRecord files, JPEGs decoded and augmented in a thread pool
(PIL and numpy release the GIL), in order, so the result is deterministic.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import logging
import os
import queue
import threading
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from resnet_jax import augment
from resnet_jax import datasets as _registered_datasets  # noqa: F401  (registers 'digits')
from resnet_jax.config import ConfigError

# Small datasets read into memory: name -> (train, test) and the held-out-validation splits.
IN_MEMORY_DATASETS = {
    'digits': (('train', 'test'), ('train[:90%]', 'train[90%:]')),
    'cifar10': (('train', 'test'), ('train[:45000]', 'train[45000:]')),  # sec. 4.2's 45k/5k
}
CIFAR_PAD = 4  # sec. 4.2: 4 pixels padded on each side, then a random 32x32 crop
MANUAL_DATASETS = {'imagenet2012'}


def _prepare_hint(name: str, data_dir: str | None) -> str:
    where = data_dir or '~/tensorflow_datasets'
    manual = (f'put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in '
              f'{where}/downloads/manual, then ' if name in MANUAL_DATASETS else '')
    return (f'{manual}run: tfds build {name} --data_dir={where} --file_format=array_record '
            f'&& python -m resnet_jax.input_pipeline mean --dataset={name} '
            f'--data_dir={where}')


def check_dataset(name: str, data_dir: str | None) -> None:
    """Raises ConfigError unless ``name`` can be read (in memory, or prepared ArrayRecord)."""
    if data_dir is not None and not os.path.isdir(data_dir):
        raise ConfigError(f'dataset.data_dir {data_dir} does not exist')
    if name in IN_MEMORY_DATASETS:
        return  # built (digits) or downloaded (CIFAR-10) by tfds on first use
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception:  # tfds raises DatasetNotFoundError and friends
        raise ConfigError(f'unknown dataset {name!r}; allowed: digits, cifar10, imagenet2012 '
                          'or any tfds image classification dataset') from None
    if not builder.is_prepared():
        raise ConfigError(f'{name} is not prepared in {data_dir or "~/tensorflow_datasets"}; '
                          + _prepare_hint(name, data_dir))
    if builder.info.file_format.value != 'array_record':
        raise ConfigError(f'{name} in {builder.data_dir} is stored as '
                          f'{builder.info.file_format.value}; random access needs ArrayRecord: '
                          + _prepare_hint(name, data_dir))


# --- random-access sources -------------------------------------------------------------------

class CorruptImage(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """Decoded images (N, H, W, C) uint8 and labels (N,) in host memory."""
    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> np.ndarray:
        return self.images[i]

    def label(self, i: int) -> int:
        return int(self.labels[i])


class TfdsSource:
    """Encoded images from ``tfds.data_source`` (ArrayRecord), decoded on access."""

    def __init__(self, name: str, split: str, data_dir: str | None):
        self.source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                       decoders={'image': tfds.decode.SkipDecoding()})

    def __len__(self) -> int:
        return len(self.source)

    def record(self, i: int) -> dict:
        return self.source[int(i)]

    def image(self, i: int) -> np.ndarray:
        data = self.record(i)['image']
        try:
            with Image.open(io.BytesIO(data)) as pil:
                return np.asarray(pil.convert('RGB'))
        except Exception as e:  # PIL raises many types on bad data
            raise CorruptImage(f'record {i}: {e}') from None

    def label(self, i: int) -> int:
        return int(self.record(i)['label'])


def load_arrays(name: str, split: str, data_dir: str | None) -> tuple[ArraySource, int]:
    """Reads a whole split into memory (building the embedded dataset if needed)."""
    builder = tfds.builder(name, data_dir=data_dir)
    builder.download_and_prepare()
    images, labels = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1,
                                                      as_supervised=True))
    return (ArraySource(np.asarray(images, np.uint8), np.asarray(labels, np.int32)),
            builder.info.features['label'].num_classes)


# --- the paper's CIFAR augmentation (sec. 4.2), vectorised over a batch ----------------------

def mean_image(images: np.ndarray) -> np.ndarray:
    """The per-pixel mean of uint8 images, in [0, 1] units (H, W, C) float32."""
    return (images.astype(np.float64).mean(0) / 255.0).astype(np.float32)


def crop_flip_params(rng: np.random.Generator, n: int, pad: int = CIFAR_PAD):
    """Random crop offsets in [0, 2*pad] (rows and columns) and flip decisions for n images."""
    return rng.integers(0, 2 * pad + 1, size=(n, 2)), rng.random(n) < 0.5


def pad_crop_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray,
                  pad: int = CIFAR_PAD) -> np.ndarray:
    """Zero-pads ``pad`` pixels per side, crops the original size at ``offsets``, flips."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = offsets[:, 0, None] + np.arange(h)[None]
    cols = offsets[:, 1, None] + np.arange(w)[None]
    cols = np.where(flips[:, None], cols[:, ::-1], cols)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


# --- deterministic global batches ------------------------------------------------------------

def batch_indices(seed: int, step: int, batch_size: int, n: int) -> np.ndarray:
    """Dataset indices of global batch ``step``: a function of (seed, step) only."""
    positions = step * batch_size + np.arange(batch_size)
    epochs, within = np.divmod(positions, n)
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(n)
        sel = epochs == epoch
        out[sel] = perm[within[sel]]
    return out


def host_slice(batch_size: int, process_index: int, process_count: int) -> slice:
    per_host = batch_size // process_count
    return slice(process_index * per_host, (process_index + 1) * per_host)


class Pipeline:
    """Training batches and evaluation images of one dataset (see the module docstring).

    Args:
      dataset: the ``config.dataset`` fields (name, data_dir, validation_split, augment,
        image_size, min_scale, max_scale, crop, lighting_std, num_workers).
      seed: the data seed.
    """

    def __init__(self, dataset, seed: int):
        self.seed = seed
        self.cfg = dataset
        self.corrupt_records = 0
        self._lock = threading.Lock()
        name, data_dir = dataset.name, dataset.data_dir
        if name in IN_MEMORY_DATASETS:
            train_split, eval_split = IN_MEMORY_DATASETS[name][int(dataset.validation_split)]
            self.train, self.num_classes = load_arrays(name, train_split, data_dir)
            self.eval, _ = load_arrays(name, eval_split, data_dir)
            self.small = True  # CIFAR-style: fixed-size images, pad-and-crop augmentation
            self.image_size = self.train.images.shape[1]
            self.mean = mean_image(self.train.images)
        else:
            check_dataset(name, data_dir)
            builder = tfds.builder(name, data_dir=data_dir)
            splits = builder.info.splits
            test = 'validation' if 'validation' in splits else 'test'
            train_split, eval_split = (('train[:98%]', 'train[98%:]')
                                       if dataset.validation_split else ('train', test))
            self.train = TfdsSource(name, train_split, data_dir)
            self.eval = TfdsSource(name, eval_split, data_dir)
            self.num_classes = builder.info.features['label'].num_classes
            self.small = False
            self.image_size = dataset.image_size
            self.mean = stored_mean(builder.data_dir, self.image_size)
        self.resize_size = round(self.image_size * 256 / 224)
        self._pool = concurrent.futures.ThreadPoolExecutor(dataset.num_workers or os.cpu_count())

    @property
    def channel_mean(self) -> np.ndarray:
        return self.mean.reshape(-1, self.mean.shape[-1]).mean(0)

    def normalize(self, images: np.ndarray, channel_mean: bool = False) -> np.ndarray:
        """uint8 views to network inputs, by ``dataset.preprocessing``; ``channel_mean``
        for views whose size differs from the mean image's."""
        mean = self.channel_mean if channel_mean else self.mean
        return augment.normalize(images, mean, self.cfg.preprocessing)

    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, 3)

    def _read(self, source, i: int) -> tuple[np.ndarray, int]:
        """Image and label of item i; a corrupt record is skipped (the next one is used)."""
        for attempt in range(16):
            j = (int(i) + attempt) % len(source)
            try:
                return source.image(j), source.label(j)
            except CorruptImage as e:
                with self._lock:
                    self.corrupt_records += 1
                logging.warning('skipping corrupt record (%d so far): %s',
                                self.corrupt_records, e)
        raise CorruptImage(f'16 corrupt records in a row from index {i}')

    def train_batch(self, step: int, batch_size: int, process_index: int = 0,
                    process_count: int = 1) -> dict[str, np.ndarray]:
        """This host's slice of global training batch ``step``, augmented and normalised."""
        idx = batch_indices(self.seed, step, batch_size, len(self.train))
        rng = np.random.default_rng([self.seed, 1 << 20, step])
        mine = host_slice(batch_size, process_index, process_count)
        if self.small:
            offsets, flips = crop_flip_params(rng, batch_size)
            images = self.train.images[idx[mine]]
            if self.cfg.augment:
                images = pad_crop_flip(images, offsets[mine], flips[mine])
            return {'image': self.normalize(images), 'label': self.train.labels[idx[mine]]}
        params = augment.draw_params(rng, batch_size, min_scale=self.cfg.min_scale,
                                     max_scale=self.cfg.max_scale,
                                     lighting_std=self.cfg.lighting_std)

        def one(i):
            image, label = self._read(self.train, idx[i])
            if not self.cfg.augment:
                return self.center_view(image), label
            return augment.train_view(image, augment.params_at(params, i), self.mean,
                                      size=self.image_size, crop_style=self.cfg.crop,
                                      lighting_std=self.cfg.lighting_std,
                                      preprocessing=self.cfg.preprocessing), label

        images, labels = zip(*self._pool.map(one, range(mine.start, mine.stop)))
        return {'image': np.stack(images), 'label': np.asarray(labels, np.int32)}

    def eval_images(self, indices) -> Iterator[tuple[np.ndarray, int]]:
        """Decoded (image, label) of the eval split, in order, decoded in parallel."""
        return self._pool.map(lambda i: self._read(self.eval, i), indices)

    def center_view(self, image: np.ndarray) -> np.ndarray:
        """The ``center`` protocol's single view (CIFAR-style data: the image itself)."""
        if self.small:
            return self.normalize(image)
        return self.normalize(augment.center_view(image, self.resize_size, self.image_size))

    def eval_batches(self, batch_size: int, process_index: int = 0, process_count: int = 1,
                     view=None) -> Iterator[dict[str, np.ndarray]]:
        """The whole eval split in order, one view per image (default: the centre view);
        the last batch is padded and its padding masked out (``mask``)."""
        view = view or self.center_view
        mine = host_slice(batch_size, process_index, process_count)
        for start in range(0, len(self.eval), batch_size):
            idx = np.arange(start, start + batch_size)
            mask = idx < len(self.eval)
            idx = np.where(mask, idx, 0)[mine]
            images, labels = zip(*self.eval_images(idx))
            yield {'image': np.stack([view(im) for im in images]),
                   'label': np.asarray(labels, np.int32), 'mask': mask[mine]}


def mean_path(dataset_dir, size: int) -> str:
    return os.path.join(str(dataset_dir), f'mean_image_{size}.npy')


def stored_mean(dataset_dir, size: int) -> np.ndarray:
    """The training set's mean image stored beside the data, else ImageNet's channel mean."""
    path = mean_path(dataset_dir, size)
    if os.path.exists(path):
        return np.load(path).astype(np.float32)
    logging.warning('no mean image at %s (compute it with `python -m resnet_jax.input_pipeline '
                    'mean`); subtracting the per-channel mean instead', path)
    return augment.IMAGENET_CHANNEL_MEAN


def compute_mean(name: str, data_dir: str | None, size: int = 224,
                 max_images: int | None = None, num_workers: int | None = None) -> str:
    """Averages the centre views of the training images and stores the mean image."""
    source = TfdsSource(name, 'train', data_dir)
    n = len(source) if max_images is None else min(max_images, len(source))
    resize_size = round(size * 256 / 224)
    total = np.zeros((size, size, 3), np.float64)
    with concurrent.futures.ThreadPoolExecutor(num_workers or os.cpu_count()) as pool:
        for view in pool.map(lambda i: augment.center_view(source.image(i), resize_size, size),
                             range(n)):
            total += view
    mean = (total / n / 255.0).astype(np.float32)
    path = mean_path(tfds.builder(name, data_dir=data_dir).data_dir, size)
    np.save(path, mean)
    return path


# --- feeding the devices -------------------------------------------------------------------

def prefetch(iterator: Iterator, put, size: int = 2) -> Iterator:
    """Runs ``put(next(iterator))`` (e.g. a host-to-device copy) ``size`` batches ahead."""
    q: queue.Queue = queue.Queue(maxsize=size)
    sentinel = object()

    def worker():
        try:
            for item in iterator:
                q.put(put(item))
        except BaseException as e:  # surfaced in the consumer
            q.put(e)
        q.put(sentinel)

    threading.Thread(target=worker, daemon=True).start()
    while True:
        item = q.get()
        if item is sentinel:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def train_iterator(pipeline: Pipeline, start_step: int, batch_size: int, process_index: int,
                   process_count: int) -> Iterator[dict[str, np.ndarray]]:
    """This host's slices of the global batches ``start_step, start_step + 1, ...``."""
    step = start_step
    while True:
        yield pipeline.train_batch(step, batch_size, process_index, process_count)
        step += 1


def main(argv: list[str] | None = None) -> int:
    """``python -m resnet_jax.input_pipeline mean --dataset=imagenet2012 --data_dir=DIR``."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description='Compute and store a dataset\'s mean image.')
    parser.add_argument('command', choices=['mean'])
    parser.add_argument('--dataset', required=True)
    parser.add_argument('--data_dir', default=None)
    parser.add_argument('--image_size', type=int, default=224)
    parser.add_argument('--max_images', type=int, default=None)
    args = parser.parse_args(argv)
    try:
        check_dataset(args.dataset, args.data_dir)
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print('wrote', compute_mean(args.dataset, args.data_dir, args.image_size, args.max_images))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
