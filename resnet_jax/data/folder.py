"""Training on a folder of your own images: ``--config.dataset.name=folder:/path/to/images``.

One subfolder per class, images at any depth inside it; ``train/`` and ``val/`` subfolders
are the splits, else ``HELD_OUT_FRACTION`` of each class is held out (``folder_listing``).
Every non-hidden file is a record (any format PIL reads, as RGB, EXIF-rotated); files that
do not decode are skipped and counted like corrupt records.

Prepared once, on first use: the index (files, labels, splits), a check that every file
decodes, and the training split's mean image, in ``<folder>/.resnet_jax/`` (or
``~/.cache/resnet_jax/folders/`` when read-only); rebuilt when a folder's modification time
changes. A folder may be in a bucket (``folder:gs://bucket/images``); its index is then
read into the local cache at each launch, where the input workers map it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Callable

import numpy as np
from etils import epath

from resnet_jax import paths
from resnet_jax.config import ConfigError
from resnet_jax.data import sources
from resnet_jax.data.folder_listing import (
    HELD_OUT_FRACTION,
    TRAIN,
    VAL,
    list_folder,
    skipped_message,
)

__all__ = [
    'HELD_OUT_FRACTION',
    'INDEX_VERSION',
    'PREFIX',
    'TRAIN',
    'VAL',
    'FolderSource',
    'encode',
    'folder_path',
    'is_folder',
    'list_folder',
    'load',
    'mean_path',
    'prepare',
    'skipped_message',
    'store_dir',
]

PREFIX = 'folder:'
INDEX_VERSION = 1
_STORE = '.resnet_jax'
_ARRAYS = ('paths', 'offsets', 'labels', 'splits')


def is_folder(name: str) -> bool:
    return name.startswith(PREFIX)


def folder_path(name: str) -> str:
    """The folder's absolute path or bucket URL (ConfigError for a scheme not readable)."""
    return str(paths.resolve(name[len(PREFIX) :].rstrip('/') or '/'))


def _cache(root: str) -> str:
    """A folder's place in the user's cache, named by its real path or its URL."""
    key = os.path.realpath(root) if paths.is_local(root) else root
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(
        os.path.expanduser('~/.cache/resnet_jax/folders'), f'{key.rsplit("/", 1)[-1]}-{digest}'
    )


def _writable(root: str) -> bool:
    if paths.is_local(root):
        return os.access(root, os.W_OK)
    try:
        paths.check_writable(epath.Path(root), 'dataset folder')
    except ConfigError:
        return False
    return True


def store_dir(root: str) -> str:
    """Where the folder's index lives: inside it when writable, else in the user's cache."""
    inside = f'{root}/{_STORE}'
    return inside if epath.Path(inside).is_dir() or _writable(root) else _cache(root)


def _save_array(path: str, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    paths.write_atomically(epath.Path(path), buffer.getvalue())


def _read_info(store: str) -> dict | None:
    try:
        return json.loads(epath.Path(store, 'info.json').read_text())
    except (OSError, ValueError):
        return None


def mean_path(store: str, size: int) -> str:
    return f'{store}/mean_image_{size}.npy'


class FolderSource:
    """Records of a prepared folder (one split, or all with ``split=None``), the index
    memory-mapped from ``store`` in each process that reads, or given as ``arrays``."""

    def __init__(
        self,
        root: str,
        store: str | None = None,
        split: int | None = None,
        arrays: dict | None = None,
    ):
        self.root, self.store, self.split = root, store, split
        self._arrays = arrays
        self._len = len(self.records)

    @property
    def arrays(self) -> dict:
        if self._arrays is None:
            self._arrays = {
                k: np.load(os.path.join(self.store, f'{k}.npy'), mmap_mode='r') for k in _ARRAYS
            }
        if 'records' not in self._arrays:
            splits = np.asarray(self._arrays['splits'])
            self._arrays = {
                **self._arrays,
                'records': (
                    np.arange(len(splits))
                    if self.split is None
                    else np.flatnonzero(splits == self.split)
                ),
            }
        return self._arrays

    @property
    def records(self) -> np.ndarray:
        return self.arrays['records']

    def __getstate__(self):
        return {**self.__dict__, '_arrays': None if self.store else self._arrays}

    def __len__(self) -> int:
        return self._len

    def path(self, i: int) -> str:
        a = self.arrays
        j = int(a['records'][int(i)])
        relative = bytes(a['paths'][a['offsets'][j] : a['offsets'][j + 1]]).decode()
        return f'{self.root}/{relative}'

    def label(self, i: int) -> int:
        return int(self.arrays['labels'][int(self.records[int(i)])])

    def record(self, i: int) -> dict:
        path = self.path(i)
        try:
            data = epath.Path(path).read_bytes()  # a local file or an object in a bucket
        except OSError as e:
            raise sources.CorruptImage(f'{path}: {e}') from None
        return {'image': data, 'label': self.label(i)}

    def image(self, i: int) -> np.ndarray:
        try:
            return sources.decode_array(self.record(i)['image'])
        except sources.CorruptImage as e:
            raise sources.CorruptImage(f'{self.path(i)}: {e}') from None


def encode(listing: dict) -> dict[str, np.ndarray]:
    """The listing as the index's arrays: the relative paths as one UTF-8 blob with
    offsets (cheap to map and to pickle into workers), labels and splits."""
    encoded = [f.encode() for f in listing['files']]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    offsets[1:] = np.cumsum([len(e) for e in encoded])
    return {
        'paths': np.frombuffer(b''.join(encoded), np.uint8),
        'offsets': offsets,
        'labels': listing['labels'],
        'splits': listing['splits'],
    }


def prepare(
    name: str,
    image_size: int = 224,
    num_workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> str:
    """Checks the folder and prepares (or reuses) its index and mean image; returns the
    index's directory. Raises ConfigError, before writing anything, for a folder that cannot
    be trained on (no classes, a class without readable images, nothing to evaluate on)."""
    root = folder_path(name)
    listing = list_folder(root)
    store = store_dir(root)
    info = _read_info(store)
    fresh = not (
        info
        and info.get('version') == INDEX_VERSION
        and info.get('signature') == listing['signature']
    )
    if not fresh and epath.Path(mean_path(store, image_size)).exists():
        return store
    skipped = skipped_message(listing)
    if fresh and skipped:
        logging.warning('%s', skipped)
    arrays = encode(listing)
    train = listing['splits'] == TRAIN
    # A new index decodes every file (to find the unreadable ones) and sums the training
    # split's centre views; an index without this size's mean, the training split only.
    todo = np.arange(len(train)) if fresh else np.flatnonzero(train)
    scan = sources.scan(
        FolderSource(root, arrays=arrays),
        todo,
        image_size,
        num_workers,
        progress,
        summed=train[todo],
    )
    unreadable = [listing['files'][i] for i in scan.unreadable]
    oversized = [listing['files'][i] for i in scan.oversized]
    if fresh:
        readable_train = train.copy()
        readable_train[scan.unreadable] = False
        for label, cls in enumerate(listing['classes']):
            if not readable_train[listing['labels'] == label].any():
                raise ConfigError(f"class '{cls}' in {root} has no readable image for training")
    epath.Path(store).mkdir(parents=True, exist_ok=True)
    if fresh:
        for key in _ARRAYS:
            _save_array(f'{store}/{key}.npy', arrays[key])
        sources.log_scan(scan, root, listing['files'].__getitem__)
        info = {
            'version': INDEX_VERSION,
            'root': root,
            'layout': listing['layout'],
            'classes': listing['classes'],
            'num_files': len(listing['files']),
            'num_train': int(train.sum()),
            'num_val': int((~train).sum()),
            'unreadable': unreadable,
            'oversized': oversized,
            'signature': listing['signature'],
        }
        paths.write_atomically(epath.Path(store, 'info.json'), json.dumps(info, indent=1))
    _save_array(
        mean_path(store, image_size), (scan.total / max(1, scan.count) / 255.0).astype(np.float32)
    )
    return store


def load(name: str) -> tuple[dict, str]:
    """(info, index directory) of a prepared folder; ConfigError if not prepared."""
    root = folder_path(name)
    store = store_dir(root)
    info = _read_info(store)
    if info is None or info.get('version') != INDEX_VERSION:
        raise ConfigError(
            f'dataset folder {root} is not prepared; run: python -m '
            f'resnet-jax prepare --dataset={name}'
        )
    if not paths.is_local(store):  # mapped by each input worker: a local copy
        local = _cache(root)
        os.makedirs(local, exist_ok=True)
        for path in epath.Path(store).iterdir():
            if path.name.endswith(('.npy', '.json')):
                paths.write_atomically(epath.Path(local, path.name), path.read_bytes())
        store = local
    return info, store
