"""Input pipelines, deterministic at any scale: global batch ``k``'s examples and
augmentation are a function of ``(seed, k)`` only (example ``p`` of the stream is item
``p mod N`` of epoch ``p // N``'s permutation), so hosts, devices, workers and restarts
change nothing, and no example is dropped. Random access, not a shuffled stream, lets any
host build its slice of any batch without replaying; small datasets are augmented in
memory, vectorised, the others in worker processes (``workers``).
"""

from __future__ import annotations

import functools
import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from resnet_jax.data import augment, folder, workers
from resnet_jax.data.prepare import IN_MEMORY_DATASETS, check_dataset, load_arrays, stored_mean
from resnet_jax.data.sources import CorruptImage, TfdsSource, decode, decode_array

CIFAR_PAD = 4  # sec. 4.2: 4 pixels padded on each side, then a random 32x32 crop


def mean_image(images: np.ndarray) -> np.ndarray:
    """The per-pixel mean of uint8 images, in [0, 1] units (H, W, C) float32."""
    return (images.astype(np.float64).mean(0) / 255.0).astype(np.float32)


def crop_flip_params(rng: np.random.Generator, n: int, pad: int = CIFAR_PAD):
    """Random crop offsets in [0, 2*pad] (rows and columns) and flip decisions for n images."""
    return rng.integers(0, 2 * pad + 1, size=(n, 2)), rng.random(n) < 0.5


def pad_crop_flip(
    images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, pad: int = CIFAR_PAD
) -> np.ndarray:
    """Zero-pads ``pad`` pixels per side, crops the original size at ``offsets``, flips."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = offsets[:, 0, None] + np.arange(h)[None]
    cols = offsets[:, 1, None] + np.arange(w)[None]
    cols = np.where(flips[:, None], cols[:, ::-1], cols)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


_epoch_permutation = functools.lru_cache(maxsize=4)(_permutation)  # ImageNet's is 1.3M long


def batch_indices(seed: int, step: int, batch_size: int, n: int) -> np.ndarray:
    """Dataset indices of global batch ``step``: a function of (seed, step) only."""
    positions = step * batch_size + np.arange(batch_size)
    epochs, within = np.divmod(positions, n)
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        out[sel] = _epoch_permutation(seed, int(epoch), n)[within[sel]]
    return out


def host_slice(batch_size: int, process_index: int, process_count: int) -> slice:
    per_host = batch_size // process_count
    return slice(process_index * per_host, (process_index + 1) * per_host)


MAX_CORRUPT_IN_A_ROW = 16
IMAGES_PER_TASK = 256  # a worker builds at most this many images of a batch as one task


def _concat(parts: list[dict]) -> dict:
    """The chunks of one host batch, built by different workers, as one batch."""
    return {
        k: (
            sum((p[k] for p in parts), [])
            if k == 'skipped'
            else np.concatenate([p[k] for p in parts])
        )
        for k in parts[0]
    }


class Pipeline:
    """Training batches and evaluation images of ``dataset`` (the ``config.dataset`` fields)
    with data ``seed``. ``corrupt_records`` counts the unreadable records skipped (each
    replaced by the next, up to ``MAX_CORRUPT_IN_A_ROW`` in a row), in workers too."""

    def __init__(self, dataset, seed: int):
        self.seed = seed
        self.cfg = dataset
        self.corrupt_records = 0
        name, data_dir = dataset.name, dataset.data_dir
        self.num_workers = dataset.num_workers or workers.default_num_workers()
        if name in IN_MEMORY_DATASETS:
            train_split, eval_split = IN_MEMORY_DATASETS[name][int(dataset.validation_split)]
            self.train, self.num_classes = load_arrays(name, train_split, data_dir)
            self.eval, _ = load_arrays(name, eval_split, data_dir)
            self.small = True  # CIFAR-style: fixed-size images, pad-and-crop augmentation
            self.image_size = self.train.images.shape[1]
            self.mean = mean_image(self.train.images)
        elif folder.is_folder(name):
            info, store = folder.load(name)
            root = folder.folder_path(name)
            self.train = folder.FolderSource(root, store, folder.TRAIN)
            self.eval = folder.FolderSource(root, store, folder.VAL)
            self.num_classes = len(info['classes'])
            self.small = False
            self.image_size = dataset.image_size
            self.mean = stored_mean(store, self.image_size)
        else:
            check_dataset(name, data_dir)
            builder = tfds.builder(name, data_dir=data_dir)
            splits = builder.info.splits
            test = 'validation' if 'validation' in splits else 'test'
            train_split, eval_split = (
                ('train[:98%]', 'train[98%:]') if dataset.validation_split else ('train', test)
            )
            self.train = TfdsSource(name, train_split, data_dir)
            self.eval = TfdsSource(name, eval_split, data_dir)
            self.num_classes = builder.info.features['label'].num_classes
            self.small = False
            self.image_size = dataset.image_size
            self.mean = stored_mean(builder.data_dir, self.image_size)
        self.resize_size = round(self.image_size * 256 / 224)

    @property
    def channel_mean(self) -> np.ndarray:
        return self.mean.reshape(-1, self.mean.shape[-1]).mean(0)

    def normalize(
        self, images: np.ndarray, channel_mean: bool = False, out: np.ndarray | None = None
    ) -> np.ndarray:
        """uint8 views (one or a batch) to network inputs, by ``dataset.preprocessing``;
        ``channel_mean`` for views whose size differs from the mean image's."""
        mean = self.channel_mean if channel_mean else self.mean
        return augment.normalize(images, mean, self.cfg.preprocessing, out=out)

    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, 3)

    def first_readable(self, source, i: int, fn: Callable) -> tuple:
        """``(fn(encoded image), label, skipped)`` of item ``i``, or of the next readable
        item when it is corrupt (``skipped`` describes the corrupt ones)."""
        skipped = []
        for attempt in range(MAX_CORRUPT_IN_A_ROW):
            j = (int(i) + attempt) % len(source)
            try:
                record = source.record(j)
                return fn(record['image']), int(record['label']), skipped
            except CorruptImage as e:
                where = source.path(j) if hasattr(source, 'path') else f'record {j}'
                skipped.append(f'{where}: {e}')
        raise CorruptImage(
            f'{MAX_CORRUPT_IN_A_ROW} corrupt records in a row from index {i}: ' + '; '.join(skipped)
        )

    def count_skipped(self, skipped: list[str]) -> None:
        for what in skipped:
            self.corrupt_records += 1
            logging.warning('skipped corrupt record (%d so far): %s', self.corrupt_records, what)

    def _received(self, batch: dict) -> dict:
        """A batch with its skipped records counted."""
        self.count_skipped(batch.pop('skipped'))
        return batch

    def _read(self, source, i: int, shorter_side: int | None = None) -> tuple[np.ndarray, int]:
        """Image and label of item i; a corrupt record is skipped (the next one is used)."""
        image, label, skipped = self.first_readable(
            source, i, functools.partial(decode_array, min_shorter_side=shorter_side)
        )
        self.count_skipped(skipped)
        return image, label

    def train_batch(
        self, step: int, batch_size: int, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        """This host's slice of global training batch ``step``, augmented and normalised
        (built in this process; ``train_iterator`` builds them in worker processes)."""
        mine = host_slice(batch_size, process_index, process_count)
        return self._received(self.train_examples(step, batch_size, mine.start, mine.stop))

    def train_examples(
        self, step: int, batch_size: int, start: int, stop: int, alloc: Callable = np.empty
    ) -> dict:
        """Examples ``start:stop`` of global batch ``step``, with the corrupt records
        skipped to build them; the images in an array from ``alloc(shape, dtype)``."""
        if self.small:
            idx = batch_indices(self.seed, step, batch_size, len(self.train))[start:stop]
            offsets, flips = crop_flip_params(self._augment_rng(step), batch_size)
            images = self.train.images[idx]
            if self.cfg.augment:
                images = pad_crop_flip(images, offsets[start:stop], flips[start:stop])
            return {'image': self.normalize(images), 'label': self.train.labels[idx], 'skipped': []}
        crops, labels, params, skipped = self.train_crops(step, batch_size, start, stop)
        out = alloc(crops.shape, np.float32)
        images = (
            augment.train_batch(
                crops,
                params,
                self.mean,
                lighting_std=self.cfg.lighting_std,
                preprocessing=self.cfg.preprocessing,
                out=out,
            )
            if self.cfg.augment
            else self.normalize(crops, out=out)
        )
        return {'image': images, 'label': labels, 'skipped': skipped}

    def train_draws(self, step: int, batch_size: int) -> tuple[np.ndarray, dict]:
        """Dataset indices and augmentation parameters (``augment.draw_params``) of global
        batch ``step`` of an encoded dataset: what every decoder builds it from."""
        cfg = self.cfg
        params = augment.draw_params(
            self._augment_rng(step),
            batch_size,
            min_scale=cfg.min_scale,
            max_scale=cfg.max_scale,
            lighting_std=cfg.lighting_std,
        )
        return batch_indices(self.seed, step, batch_size, len(self.train)), params

    def _augment_rng(self, step: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, 1 << 20, step])  # batch step's choices

    def train_crops(self, step: int, batch_size: int, start: int, stop: int) -> tuple:
        """(uint8 crops, labels, parameters, skipped records) of examples ``start:stop`` of
        global batch ``step`` of an encoded dataset, decoded here with PIL."""
        idx, params = self.train_draws(step, batch_size)
        idx, params = idx[start:stop], {k: v[start:stop] for k, v in params.items()}
        size = self.image_size
        crops = np.empty((stop - start, size, size, 3), np.uint8)
        labels = np.empty(stop - start, np.int32)
        skipped = []
        for k, i in enumerate(idx):
            if self.cfg.augment:
                crop_fn = functools.partial(self.train_crop, augment.params_at(params, k))
            else:
                crop_fn = self.center_crop
            crops[k], labels[k], s = self.first_readable(self.train, i, crop_fn)
            skipped += s
        return crops, labels, params, skipped

    def train_crop(self, p: dict, data: bytes) -> np.ndarray:
        """The uint8 training crop of an encoded image with parameters ``p``, by PIL."""
        size, style = self.image_size, self.cfg.crop
        image, factor, shape = decode(
            data,
            functools.partial(augment.train_crop_shorter_side, p=p, size=size, crop_style=style),
        )
        return augment.train_crop(
            image, p, size=size, crop_style=style, full_shape=shape, factor=factor
        )

    def center_crop(self, data: bytes) -> np.ndarray:
        """The uint8 centre view of an encoded image, by PIL."""
        return augment.center_view(
            decode_array(data, self.resize_size), self.resize_size, self.image_size
        )

    def _host_batches(
        self, build: Callable, first: int, stop: int, host_batch: int
    ) -> Iterator[dict]:
        """``build(b, start, stop)`` (examples of this host's slice of batch b) for batches
        ``first..stop - 1`` in worker processes, in tasks of ``IMAGES_PER_TASK`` at most."""
        chunks = -(-host_batch // IMAGES_PER_TASK)
        per_chunk = -(-host_batch // chunks)
        task = functools.partial(_chunk_task, build, chunks, per_chunk, host_batch)
        return workers.map_in_workers(
            task,
            range(first * chunks, stop * chunks),
            self.num_workers,
            group=chunks,
            combine=_concat,
        )

    def eval_images(
        self, indices, view: Callable | None = None, shorter_side: int | None = None
    ) -> Iterator[tuple]:
        """(image, label) of the eval split's items ``indices``, in order, or
        ``(view(image), label)``; encoded images are decoded (at a reduced scale that
        keeps ``shorter_side``, if given) in worker processes."""
        if self.small:
            for i in indices:
                image = self.eval.image(i)
                yield (view(image) if view else image), self.eval.label(i)
            return
        task = functools.partial(_eval_image_task, self, view, shorter_side)
        indices = list(indices)
        items = workers.map_in_workers(task, indices, self.num_workers)
        try:  # exactly len(indices) items: the workers stop at close(), not by exhaustion
            reported = workers.reported(items, lambda n: f'image {indices[n]} of the eval split')
            for out, label, skipped in itertools.islice(reported, len(indices)):
                self.count_skipped(skipped)
                yield out, int(label)
        finally:
            items.close()

    def center_view(self, image: np.ndarray) -> np.ndarray:
        """The ``center`` protocol's single view (CIFAR-style data: the image itself)."""
        if self.small:
            return self.normalize(image)
        return self.normalize(augment.center_view(image, self.resize_size, self.image_size))

    def eval_batches(
        self, batch_size: int, process_index: int = 0, process_count: int = 1, view=None
    ) -> Iterator[dict[str, np.ndarray]]:
        """The whole eval split in order, one view per image (default: the centre view);
        the last batch is padded and its padding masked out (``mask``)."""
        mine = host_slice(batch_size, process_index, process_count)
        num_batches = -(-len(self.eval) // batch_size)
        build = functools.partial(_eval_task, self, batch_size, view, mine.start)
        if self.small:
            batches = (build(b, 0, mine.stop - mine.start) for b in range(num_batches))
        else:
            batches = self._host_batches(build, 0, num_batches, mine.stop - mine.start)
        try:  # (see eval_images)
            reported = workers.reported(batches, lambda n: f'eval batch {n}')
            for batch in itertools.islice(reported, num_batches):
                yield self._received(batch)
        finally:
            batches.close()

    def eval_examples(self, batch_size: int, view, b: int, start: int, stop: int) -> dict:
        """Examples ``start:stop`` of eval batch ``b`` (past the end: item 0, masked)."""
        idx = b * batch_size + np.arange(start, stop)
        mask = idx < len(self.eval)
        idx = np.where(mask, idx, 0)
        if self.small:
            images = self.eval.images[idx]
            return {
                'image': np.stack([view(im) for im in images]) if view else self.normalize(images),
                'label': self.eval.labels[idx],
                'mask': mask,
                'skipped': [],
            }
        fn = functools.partial(_decoded_view, view) if view else self.center_crop
        outs, labels, skipped = zip(*(self.first_readable(self.eval, i, fn) for i in idx))
        images = np.stack(outs)
        return {
            'image': images if view else self.normalize(images),
            'label': np.asarray(labels, np.int32),
            'mask': mask,
            'skipped': sum(skipped, []),
        }


# Tasks run in worker processes: module-level functions of picklable arguments.


def _chunk_task(build: Callable, chunks: int, per_chunk: int, host_batch: int, key: int):
    b, c = divmod(key, chunks)
    return build(b, c * per_chunk, min(host_batch, (c + 1) * per_chunk))


def _train_task(
    pipeline: Pipeline, batch_size: int, offset: int, step: int, start: int, stop: int
) -> dict:
    return pipeline.train_examples(
        step, batch_size, offset + start, offset + stop, alloc=workers.shared_array
    )


def _eval_task(
    pipeline: Pipeline, batch_size: int, view, offset: int, b: int, start: int, stop: int
) -> dict:
    return pipeline.eval_examples(batch_size, view, b, offset + start, offset + stop)


def _decoded_view(view: Callable, data: bytes):
    return view(decode_array(data))


def _eval_image_task(pipeline: Pipeline, view, shorter_side, i: int):
    image, label, skipped = pipeline.first_readable(
        pipeline.eval, i, functools.partial(decode_array, min_shorter_side=shorter_side)
    )
    return (view(image) if view else image), label, skipped


def prefetch(iterator: Iterator, put, size: int = 2) -> Iterator:
    """Runs ``put(next(iterator))`` (e.g. a host-to-device copy) ``size`` batches ahead in
    a thread; closing the result stops the thread and closes ``iterator``."""
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    sentinel = object()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def worker():
        try:
            for item in iterator:
                if not offer(put(item)):
                    break
            else:
                offer(sentinel)
        except BaseException as e:  # surfaced in the consumer
            offer(e)
        finally:
            getattr(iterator, 'close', lambda: None)()

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is sentinel:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
        if thread.is_alive():  # stuck in next(iterator): the input workers do not answer
            workers.kill_all()
            thread.join(timeout=5)


def train_iterator(
    pipeline: Pipeline, start_step: int, batch_size: int, process_index: int, process_count: int
) -> Iterator[dict[str, np.ndarray]]:
    """This host's slices of the global batches from ``start_step`` on (encoded images built
    in worker processes); closing it stops the workers."""
    mine = host_slice(batch_size, process_index, process_count)
    build = functools.partial(_train_task, pipeline, batch_size, mine.start)
    if pipeline.small:
        batches = (build(step, 0, mine.stop - mine.start) for step in range(start_step, 1 << 62))
    else:
        batches = pipeline._host_batches(build, start_step, 1 << 62, mine.stop - mine.start)
    try:
        for batch in workers.reported(batches, lambda n: f'the batch of step {start_step + n}'):
            yield pipeline._received(batch)
    finally:
        batches.close()
