"""Input pipelines for datasets that fit in host memory (the digits set, CIFAR-10).

Determinism at any scale: the contents and augmentation of global batch ``k`` are a
function of ``(seed, k)`` only. Example ``p = k * batch_size + i`` of the stream is item
``p mod N`` of epoch ``p // N``'s permutation (drawn from ``(seed, epoch)``), and the
augmentation parameters of batch ``k`` are drawn from ``(seed, k)`` for the whole global
batch (a few integers), so the number of hosts or devices and restarts change nothing.
Each host decodes and augments only its own slice of every global batch. No example is
ever dropped: batches run across epoch boundaries.

The data is read once into memory with tfds (random access into a numpy array is then
free), which suits the small datasets this module serves.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Iterator

import jax
import numpy as np
import tensorflow_datasets as tfds

from resnet_jax import datasets as _registered_datasets  # noqa: F401  (registers 'digits')

# Datasets this pipeline knows: tfds name -> (train split, test split, held-out-val splits).
IN_MEMORY_DATASETS = {
    'digits': ('train', 'test', ('train[:90%]', 'train[90%:]')),
    'cifar10': ('train', 'test', ('train[:45000]', 'train[45000:]')),  # sec. 4.2's 45k/5k
}
CIFAR_PAD = 4  # sec. 4.2: 4 pixels padded on each side, then a random 32x32 crop


@dataclasses.dataclass(frozen=True)
class ArrayData:
    """Images (N, H, W, C) uint8 and labels (N,) int32 in host memory."""
    images: np.ndarray
    labels: np.ndarray
    num_classes: int

    def __len__(self) -> int:
        return len(self.labels)


def splits(dataset: str, validation_split: bool) -> tuple[str, str]:
    train, test, held_out = IN_MEMORY_DATASETS[dataset]
    return held_out if validation_split else (train, test)


def load(dataset: str, split: str, data_dir: str | None) -> ArrayData:
    """Reads a whole split into memory (building the embedded dataset if needed)."""
    builder = tfds.builder(dataset, data_dir=data_dir)
    builder.download_and_prepare()
    ds = builder.as_dataset(split=split, batch_size=-1, as_supervised=True)
    images, labels = tfds.as_numpy(ds)
    return ArrayData(np.asarray(images, np.uint8), np.asarray(labels, np.int32),
                     builder.info.features['label'].num_classes)


# --- the paper's CIFAR augmentation (sec. 4.2), each piece callable on its own ------------

def mean_image(images: np.ndarray) -> np.ndarray:
    """The training set's per-pixel mean, in [0, 1] units (H, W, C) float32."""
    return (images.astype(np.float64).mean(0) / 255.0).astype(np.float32)


def crop_flip_params(rng: np.random.Generator, n: int, pad: int = CIFAR_PAD):
    """Random crop offsets in [0, 2*pad] (rows and columns) and flip decisions for n images."""
    offsets = rng.integers(0, 2 * pad + 1, size=(n, 2))
    flips = rng.random(n) < 0.5
    return offsets, flips


def pad_crop_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray,
                  pad: int = CIFAR_PAD) -> np.ndarray:
    """Zero-pads ``pad`` pixels per side, crops the original size at ``offsets``, flips."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = offsets[:, 0, None] + np.arange(h)[None]           # (n, h)
    cols = offsets[:, 1, None] + np.arange(w)[None]           # (n, w)
    cols = np.where(flips[:, None], cols[:, ::-1], cols)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def normalize(images: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Pixels to [0, 1], minus the per-pixel mean image."""
    return images.astype(np.float32) * np.float32(1 / 255.0) - mean


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


def train_batch(data: ArrayData, mean: np.ndarray, seed: int, step: int, batch_size: int,
                augment: bool = True, process_index: int = 0,
                process_count: int = 1) -> dict[str, np.ndarray]:
    """This host's slice of global training batch ``step``, augmented and normalised."""
    idx = batch_indices(seed, step, batch_size, len(data))
    offsets, flips = crop_flip_params(np.random.default_rng([seed, 1 << 20, step]), batch_size)
    mine = host_slice(batch_size, process_index, process_count)
    images = data.images[idx[mine]]
    if augment:
        images = pad_crop_flip(images, offsets[mine], flips[mine])
    return {'image': normalize(images, mean), 'label': data.labels[idx[mine]]}


def eval_batches(data: ArrayData, mean: np.ndarray, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """The whole split in order; the last batch is padded and its padding masked out."""
    mine = host_slice(batch_size, process_index, process_count)
    for start in range(0, len(data), batch_size):
        idx = np.arange(start, start + batch_size)
        mask = idx < len(data)
        idx = np.where(mask, idx, 0)[mine]
        yield {'image': normalize(data.images[idx], mean), 'label': data.labels[idx],
               'mask': mask[mine]}


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


def train_iterator(data: ArrayData, mean: np.ndarray, seed: int, start_step: int,
                   batch_size: int, augment: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """This host's slices of the global batches ``start_step, start_step + 1, ...``."""
    step = start_step
    while True:
        yield train_batch(data, mean, seed, step, batch_size, augment,
                          jax.process_index(), jax.process_count())
        step += 1
