"""Training on a folder of your own images: ``--config.dataset.name=folder:/path/to/images``.

The folder holds one subfolder per class, its images at any depth inside it. Where it has
``train/`` (and ``val/``) subfolders, those are the splits and the classes are train/'s
subfolders; otherwise (or without ``val/``) ``HELD_OUT_FRACTION`` of each class's files,
drawn with a fixed seed, are held out for evaluation. Every file inside a class folder is
a record (hidden ones aside): images in any format PIL reads (grayscale, CMYK and
transparent images are read as RGB; EXIF orientation is applied), and files that are not
readable images, which the pipeline skips and counts like corrupt records. A class needs
at least one file named as an image (``IMAGE_EXTENSIONS``). Images above PIL's
decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) are read anyway, and counted in
one line when the folder is prepared; above twice the limit PIL refuses them: they are
unreadable.

Symlinks are followed, to files and to folders, inside the folder or outside it, and each
real file is one record, whatever paths reach it, so that no file is in both splits:

- a folder is entered at most once per split (by its st_dev and st_ino): a symlink loop
  (``cat/loop -> .``, ``cat/a/up -> ..``) or a second link to a folder already walked is
  not followed again. Nor is a link to the dataset folder, train/, val/ or a class
  folder: those are walked as what they are (one class's folder never becomes another's).
- a file reached by several paths (a file symlink, a linked folder) is indexed once, under
  the first path in sorted walk order (a folder's files, then its subfolders' in turn;
  the classes in order), with that path's class.
- with train/ and val/, a file that both hold (a symlink in one to the other's file or
  folder) is in val/ only: val/ is what the model is evaluated on, and an image it was
  trained on would not measure it; the training split loses the copy (a class left with
  no image there is an error, which says why). Refusing such a folder instead would stop
  a run over one stray link, in data that may not be the user's to change.

The paths and folders skipped are reported in one line, with their counts, when the index
is built. Hard links are separate files, as copies are: neither is detected. (An index
built before, which held such files more than once, is rebuilt; one of a folder without
any is the same index, and is kept.)

Prepared once, on first use: the sorted list of files with their labels and splits, a
check that every file decodes, and the training split's mean image (as for ImageNet:
the mean of the centre views), in ``<folder>/.resnet_jax/`` (the index travels with the
data and is shared by every host reading the folder), or in
``~/.cache/resnet_jax/folders/`` when the folder is read-only. The index is rebuilt when
files are added, removed or renamed (a folder's modification time changes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Callable

import numpy as np

from resnet_jax.data import sources
from resnet_jax.config import ConfigError

PREFIX = 'folder:'
HELD_OUT_FRACTION = 0.1
HELD_OUT_SEED = 0
INDEX_VERSION = 1
_STORE = '.resnet_jax'
_ARRAYS = ('paths', 'offsets', 'labels', 'splits')
TRAIN, VAL = 0, 1
# Names that say "image": a class needs at least one. Every file is a record, though: the
# others are skipped (and counted) like corrupt records if they do not decode.
IMAGE_EXTENSIONS = frozenset(('.jpg', '.jpeg', '.jpe', '.jfif', '.png', '.bmp', '.gif',
                              '.webp', '.tif', '.tiff', '.ppm', '.pgm', '.pbm', '.pnm'))


def is_folder(name: str) -> bool:
    return name.startswith(PREFIX)


def folder_path(name: str) -> str:
    return os.path.abspath(os.path.expanduser(name[len(PREFIX):]))


# --- listing ---------------------------------------------------------------------------------

def _subfolders(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path)
                  if not e.name.startswith('.') and e.is_dir())


def _key(path: str) -> tuple[int, int] | None:
    """A folder's identity, (st_dev, st_ino), whatever path reaches it; None if gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks; False for a broken one
    except OSError:
        return False


def _files(class_dir: str, root: str, dirs: dict, visited: set,
           revisited: list) -> list[tuple[str, str]]:
    """Every non-hidden file under ``class_dir`` as (path relative to ``root``, real path),
    in sorted walk order (a folder's files, then each subfolder's in turn).

    Symlinks are followed, but no folder is entered twice: a folder whose (st_dev, st_ino)
    is in ``visited`` (entered before in this split, or one of the layout's own folders:
    the dataset folder, train/, val/ and the class folders, walked as what they are) is
    listed in ``revisited`` instead. Records each folder entered, with its modification
    time, in ``dirs``. The real path of a file that is not a symlink is its folder's real
    path and its name: one ``realpath`` per folder and per symlink, no ``stat`` per file.
    """
    out = []
    stack = [(class_dir, os.path.relpath(class_dir, root))]
    while stack:
        path, rel = stack.pop()
        try:
            st = os.stat(path)
        except OSError:
            continue
        key = (st.st_dev, st.st_ino)
        if key in visited and path != class_dir:
            revisited.append(rel)
            continue
        visited.add(key)
        try:
            with os.scandir(path) as it:
                entries = sorted((e for e in it if not e.name.startswith('.')),
                                 key=lambda e: e.name)
        except OSError:  # unreadable: skipped, as os.walk does
            continue
        dirs[rel] = st.st_mtime_ns
        real = os.path.realpath(path)
        subdirs = []
        for e in entries:
            if _is_dir(e):
                subdirs.append(e)
            else:
                out.append((os.path.join(rel, e.name), os.path.realpath(e.path)
                            if e.is_symlink() else os.path.join(real, e.name)))
        stack += [(e.path, os.path.join(rel, e.name)) for e in reversed(subdirs)]
    return out


def list_folder(root: str) -> dict:
    """Classes, files, labels and fixed splits of the folder; ConfigError if unusable.

    Each real file is one record (see the module's docstring, "Symlinks"); the paths and
    folders skipped for that are in ``duplicates`` (paths to a file indexed under another
    path of its split), ``in_val`` (train/ paths to a file that val/ holds) and
    ``revisited`` (folders reached again through symlinks, not entered again).
    """
    if not os.path.isdir(root):
        raise ConfigError(f'dataset folder {root} does not exist' if not os.path.exists(root)
                          else f'dataset folder {root} is not a directory')
    layout = 'train/val' if os.path.isdir(os.path.join(root, 'train')) else 'classes'
    class_root = os.path.join(root, 'train') if layout == 'train/val' else root
    classes = _subfolders(class_root)
    if not classes:
        raise ConfigError(f'dataset folder {class_root} has no class subfolders; expected '
                          'one subfolder of images per class')
    val_root = os.path.join(root, 'val')
    has_val = layout == 'train/val' and os.path.isdir(val_root)
    val_classes = _subfolders(val_root) if has_val else []
    for name in val_classes:
        if name not in classes:
            raise ConfigError(f"class '{name}' of {val_root} is not a class of {class_root}")
    # The layout's own folders are never entered through a symlink (a loop to the dataset
    # folder, a link to another class's folder): each is walked as what it is.
    layout_dirs = [root, class_root, *(os.path.join(class_root, c) for c in classes)]
    if has_val:
        layout_dirs += [val_root, *(os.path.join(val_root, c) for c in val_classes)]
    layout_keys = {k for k in map(_key, layout_dirs) if k is not None}
    dirs: dict[str, int] = {}
    revisited: list[str] = []
    visited = set(layout_keys)  # one set per split: val/ is walked in full, below
    train_found = [_files(os.path.join(class_root, name), root, dirs, visited, revisited)
                   for name in classes]
    visited = set(layout_keys)
    val_found = [_files(os.path.join(val_root, name), root, dirs, visited, revisited)
                 for name in val_classes]

    files, labels, splits = [], [], []
    duplicates, in_val = [], []

    def add(found, label, split, indexed, overridden=frozenset()):
        for rel, real in found:
            if real in overridden:
                in_val.append(rel)
            elif real in indexed:
                duplicates.append(rel)
            else:
                indexed.add(real)
                files.append(rel)
                labels.append(label)
                splits.append(split)

    # val/ holds what is evaluated on: a file it shares with train/ is not trained on.
    val_real = {real for found in val_found for _, real in found}
    indexed: set[str] = set()
    for label, (name, found) in enumerate(zip(classes, train_found)):
        first, skipped = len(files), len(duplicates) + len(in_val)
        add(found, label, TRAIN, indexed, val_real)
        if not any(os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS for f in files[first:]):
            skipped = len(duplicates) + len(in_val) - skipped
            raise ConfigError(f"class '{name}' in {class_root} has no images" + (
                f' of its own: its {skipped} files are indexed under other paths (through '
                'symlinks)' + (' or held by val/' if has_val else '') if skipped else ''))
    indexed = set()
    for name, found in zip(val_classes, val_found):
        add(found, classes.index(name), VAL, indexed)
    labels, splits = np.asarray(labels, np.int32), np.asarray(splits, np.uint8)
    if not has_val:
        splits = held_out_splits(labels)
    if not (splits == VAL).any():
        raise ConfigError(f'dataset folder {root} has no images to evaluate on: put some in '
                          'val/<class>/, or more than one image in a class')
    signature = {'classes': classes, 'val_classes': val_classes, 'dirs': dirs}
    if duplicates or in_val or revisited:
        # So that an index built before these were skipped is rebuilt. (Without any, the
        # signature and the index are what they were: such an index is kept.)
        signature['skipped'] = [len(duplicates), len(in_val), len(revisited)]
    return {'root': root, 'layout': layout, 'classes': classes, 'files': files,
            'labels': labels, 'splits': splits, 'duplicates': duplicates, 'in_val': in_val,
            'revisited': revisited, 'signature': signature}


def skipped_message(listing: dict) -> str | None:
    """One line on the paths and folders ``list_folder`` skipped, with their counts."""
    duplicates, in_val, revisited = (listing['duplicates'], listing['in_val'],
                                     listing['revisited'])
    if not (duplicates or in_val or revisited):
        return None

    def count(n, one, many):
        return f'{n} {one if n == 1 else many}'
    parts = []
    if duplicates:
        parts.append(count(len(duplicates), 'path to a file indexed under another path',
                           'paths to files indexed under other paths')
                     + ' (the first in sorted order is kept)')
    if in_val:
        parts.append(count(len(in_val), 'train/ path to a file', 'train/ paths to files')
                     + ' that val/ holds (evaluated on, not trained on)')
    if revisited:
        parts.append(count(len(revisited), 'folder', 'folders')
                     + ' reached again through symlinks (not entered again)')
    skipped = duplicates + in_val + revisited
    more = ', ...' if len(skipped) > 10 else ''
    return (f"dataset folder {listing['root']} indexes each real file once; skipped "
            f"{', '.join(parts)}: {', '.join(skipped[:10])}{more}")


def held_out_splits(labels: np.ndarray) -> np.ndarray:
    """``HELD_OUT_FRACTION`` of each class's files (at least one, never all) for evaluation,
    drawn from (``HELD_OUT_SEED``, class)."""
    splits = np.full(len(labels), TRAIN, np.uint8)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = min(len(members) - 1, max(1, round(HELD_OUT_FRACTION * len(members))))
        rng = np.random.default_rng([HELD_OUT_SEED, int(label)])
        splits[rng.permutation(members)[:count]] = VAL
    return splits


# --- the prepared index ----------------------------------------------------------------------

def store_dir(root: str) -> str:
    """Where the folder's index lives: inside it when writable, else in the user's cache."""
    inside = os.path.join(root, _STORE)
    if os.path.isdir(inside) or os.access(root, os.W_OK):
        return inside
    digest = hashlib.sha256(os.path.realpath(root).encode()).hexdigest()[:16]
    return os.path.join(os.path.expanduser('~/.cache/resnet_jax/folders'),
                        f'{os.path.basename(root)}-{digest}')


def _save(path: str, write) -> None:
    tmp = f'{path}.tmp-{os.getpid()}'
    write(tmp)
    os.replace(tmp, path)


def _save_array(path: str, array: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, 'wb') as f:
            np.save(f, array)
    _save(path, write)


def _read_info(store: str) -> dict | None:
    try:
        with open(os.path.join(store, 'info.json')) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def mean_path(store: str, size: int) -> str:
    return os.path.join(store, f'mean_image_{size}.npy')


class FolderSource:
    """Records of a prepared folder (one split, or all with ``split=None``):
    ``record(i)`` reads the file. The index arrays are memory-mapped from ``store`` in
    each process that reads, or given as ``arrays`` (``encode``)."""

    def __init__(self, root: str, store: str | None = None, split: int | None = None,
                 arrays: dict | None = None):
        self.root, self.store, self.split = root, store, split
        self._arrays = arrays
        self._len = len(self.records)

    @property
    def arrays(self) -> dict:
        if self._arrays is None:
            self._arrays = {k: np.load(os.path.join(self.store, f'{k}.npy'), mmap_mode='r')
                            for k in _ARRAYS}
        if 'records' not in self._arrays:
            splits = np.asarray(self._arrays['splits'])
            self._arrays = {**self._arrays, 'records': (
                np.arange(len(splits)) if self.split is None
                else np.flatnonzero(splits == self.split))}
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
        relative = bytes(a['paths'][a['offsets'][j]:a['offsets'][j + 1]]).decode()
        return os.path.join(self.root, relative)

    def label(self, i: int) -> int:
        return int(self.arrays['labels'][int(self.records[int(i)])])

    def record(self, i: int) -> dict:
        path = self.path(i)
        try:
            with open(path, 'rb') as f:
                data = f.read()
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
    return {'paths': np.frombuffer(b''.join(encoded), np.uint8), 'offsets': offsets,
            'labels': listing['labels'], 'splits': listing['splits']}


def prepare(name: str, image_size: int = 224, num_workers: int = 1,
            progress: Callable[[int, int], None] | None = None) -> str:
    """Checks the folder and prepares (or reuses) its index and mean image.

    Returns the index's directory. Raises ConfigError, before writing anything, for a
    folder that cannot be trained on: missing, without class subfolders, with a class
    without files, with nothing to evaluate on, or with a class none of whose training
    files is a readable image.
    """
    root = folder_path(name)
    listing = list_folder(root)
    store = store_dir(root)
    info = _read_info(store)
    fresh = not (info and info.get('version') == INDEX_VERSION
                 and info.get('signature') == listing['signature'])
    if not fresh and os.path.exists(mean_path(store, image_size)):
        return store
    skipped = skipped_message(listing)
    if fresh and skipped:
        logging.warning('%s', skipped)
    arrays = encode(listing)
    train = listing['splits'] == TRAIN
    # A new index decodes every file (to find the unreadable ones) and sums the training
    # split's centre views; an index without this size's mean, the training split only.
    todo = np.arange(len(train)) if fresh else np.flatnonzero(train)
    scan = sources.scan(FolderSource(root, arrays=arrays), todo, image_size, num_workers,
                        progress, summed=train[todo])
    unreadable = [listing['files'][i] for i in scan.unreadable]
    oversized = [listing['files'][i] for i in scan.oversized]
    if fresh:
        readable_train = train.copy()
        readable_train[scan.unreadable] = False
        for label, cls in enumerate(listing['classes']):
            if not readable_train[listing['labels'] == label].any():
                raise ConfigError(f"class '{cls}' in {root} has no readable image for "
                                  'training')
    os.makedirs(store, exist_ok=True)
    if fresh:
        for key in _ARRAYS:
            _save_array(os.path.join(store, f'{key}.npy'), arrays[key])
        if unreadable:
            logging.warning('%d files in %s are not readable images; training skips them '
                            'and counts them as corrupt records: %s', len(unreadable), root,
                            ', '.join(unreadable[:10]))
        if oversized:  # counted in the workers, where PIL's warnings are not shown
            one = len(oversized) == 1
            logging.warning("%d %s in %s %s larger than PIL's decompression-bomb limit "
                            '(PIL.Image.MAX_IMAGE_PIXELS, %s pixels); read anyway: %s',
                            len(oversized), 'image' if one else 'images', root,
                            'is' if one else 'are', scan.pixel_limit, ', '.join(oversized[:10]))
        info = {'version': INDEX_VERSION, 'root': root, 'layout': listing['layout'],
                'classes': listing['classes'], 'num_files': len(listing['files']),
                'num_train': int(train.sum()), 'num_val': int((~train).sum()),
                'unreadable': unreadable, 'oversized': oversized,
                'signature': listing['signature']}

        def write_info(tmp):
            with open(tmp, 'w') as f:
                json.dump(info, f, indent=1)
        _save(os.path.join(store, 'info.json'), write_info)
    _save_array(mean_path(store, image_size),
                (scan.total / max(1, scan.count) / 255.0).astype(np.float32))
    return store


def load(name: str) -> tuple[dict, str]:
    """(info, index directory) of a prepared folder; ConfigError if not prepared."""
    root = folder_path(name)
    store = store_dir(root)
    info = _read_info(store)
    if info is None or info.get('version') != INDEX_VERSION:
        raise ConfigError(f'dataset folder {root} is not prepared; run: python -m '
                          f'resnet-jax prepare --dataset={name}')
    return info, store
