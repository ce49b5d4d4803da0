"""A folder's classes, files, labels and fixed splits (``list_folder``).

One subfolder per class, images at any depth inside it. With ``train/`` (and ``val/``)
subfolders those are the splits; otherwise (or without ``val/``) ``HELD_OUT_FRACTION`` of
each class's files, drawn with a fixed seed, are held out. A class needs a file named as an
image.

Symlinks are followed and each real file is one record, so no file is in both splits: a
folder is entered at most once per split (by st_dev and st_ino), the layout's own folders
only as themselves; a file reached by several paths is indexed under the first in sorted
walk order; a file that train/ and val/ both hold is in val/ only (an image trained on
would not measure the model). What is skipped is reported in one line. Hard links are
separate files, as copies are.

In a bucket (``gs://``, ``s3://``) the same layout is read from object names: no symlinks
there, and a folder's signature is a digest of its objects' names (buckets keep no folder
modification times), so an index is rebuilt when names change, not contents.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from etils import epath

from resnet_jax import paths
from resnet_jax.config import ConfigError

HELD_OUT_FRACTION = 0.1
HELD_OUT_SEED = 0
TRAIN, VAL = 0, 1
# A class needs a file named so; the others are records too, skipped if they do not decode.
IMAGE_EXTENSIONS = frozenset(
    (
        '.jpg',
        '.jpeg',
        '.jpe',
        '.jfif',
        '.png',
        '.bmp',
        '.gif',
        '.webp',
        '.tif',
        '.tiff',
        '.ppm',
        '.pgm',
        '.pbm',
        '.pnm',
    )
)


def _subfolders(path: str) -> list[str]:
    if not paths.is_local(path):  # one listing, not a request per entry
        found = next(epath.Path(path).walk(), (None, [], []))[1]
        return sorted(d for d in found if not d.startswith('.'))
    return sorted(e.name for e in os.scandir(path) if not e.name.startswith('.') and e.is_dir())


def _key(path: str) -> tuple[int, int] | None:
    """A folder's identity, (st_dev, st_ino), whatever path reaches it; None if gone or in
    a bucket."""
    if not paths.is_local(path):
        return None
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


def _files(
    class_dir: str, root: str, dirs: dict, visited: set, revisited: list
) -> list[tuple[str, str]]:
    """Every non-hidden file under ``class_dir`` as (path relative to ``root``, real path), in
    sorted walk order. A folder whose (st_dev, st_ino) is in ``visited`` is listed in
    ``revisited``, not entered; ``dirs`` gets each folder's modification time. One
    ``realpath`` per folder and per symlink, no ``stat`` per file."""
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
                entries = sorted(
                    (e for e in it if not e.name.startswith('.')), key=lambda e: e.name
                )
        except OSError:  # unreadable: skipped, as os.walk does
            continue
        dirs[rel] = st.st_mtime_ns
        real = os.path.realpath(path)
        subdirs = []
        for e in entries:
            if _is_dir(e):
                subdirs.append(e)
            else:
                out.append(
                    (
                        os.path.join(rel, e.name),
                        os.path.realpath(e.path) if e.is_symlink() else os.path.join(real, e.name),
                    )
                )
        stack += [(e.path, os.path.join(rel, e.name)) for e in reversed(subdirs)]
    return out


def _bucket_files(class_dir: str, root: str, dirs: dict, *_) -> list[tuple[str, str]]:
    """``_files`` for a bucket: every non-hidden object under ``class_dir`` as (path relative
    to ``root``, URL), in the same sorted walk order; ``dirs`` gets each folder's digest."""
    found = {}
    bare = len(root.split('://', 1)[-1]) + 1  # epath's walk yields paths without gs://
    for top, _, names in epath.Path(class_dir).walk():
        rel = str(top).split('://', 1)[-1][bare:]
        if not any(part.startswith('.') for part in rel.split('/')):
            found[rel] = sorted(n for n in names if not n.startswith('.'))
            dirs[rel] = hashlib.sha256('/'.join(found[rel]).encode()).hexdigest()[:16]
    return [
        (f'{rel}/{name}', f'{root}/{rel}/{name}')
        for rel in sorted(found, key=lambda r: r.split('/'))  # files, then subfolders
        for name in found[rel]
    ]


def list_folder(root: str) -> dict:
    """Classes, files, labels and fixed splits of the folder; ConfigError if unusable. The
    paths skipped are in ``duplicates`` (indexed under another path), ``in_val`` (train/
    paths to a file val/ holds) and ``revisited`` (folders reached again by symlinks)."""
    if not epath.Path(root).is_dir():
        raise ConfigError(
            f'dataset folder {root} does not exist'
            if not epath.Path(root).exists()
            else f'dataset folder {root} is not a directory'
        )
    files_under = _files if paths.is_local(root) else _bucket_files
    layout = 'train/val' if epath.Path(root, 'train').is_dir() else 'classes'
    class_root = f'{root}/train' if layout == 'train/val' else root
    classes = _subfolders(class_root)
    if not classes:
        raise ConfigError(
            f'dataset folder {class_root} has no class subfolders; expected '
            'one subfolder of images per class'
        )
    val_root = f'{root}/val'
    has_val = layout == 'train/val' and epath.Path(val_root).is_dir()
    val_classes = _subfolders(val_root) if has_val else []
    for name in val_classes:
        if name not in classes:
            raise ConfigError(f"class '{name}' of {val_root} is not a class of {class_root}")
    # Never entered through a symlink: one class's folder never becomes another's.
    layout_dirs = [root, class_root, *(f'{class_root}/{c}' for c in classes)]
    if has_val:
        layout_dirs += [val_root, *(f'{val_root}/{c}' for c in val_classes)]
    layout_keys = {k for k in map(_key, layout_dirs) if k is not None}  # (local only)
    dirs: dict[str, int] = {}
    revisited: list[str] = []
    visited = set(layout_keys)  # one set per split: val/ is walked in full, below
    train_found = [
        files_under(f'{class_root}/{name}', root, dirs, visited, revisited) for name in classes
    ]
    visited = set(layout_keys)
    val_found = [
        files_under(f'{val_root}/{name}', root, dirs, visited, revisited) for name in val_classes
    ]

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
            raise ConfigError(
                f"class '{name}' in {class_root} has no images"
                + (
                    f' of its own: its {skipped} files are indexed under other paths (through '
                    'symlinks)' + (' or held by val/' if has_val else '')
                    if skipped
                    else ''
                )
            )
    indexed = set()
    for name, found in zip(val_classes, val_found):
        add(found, classes.index(name), VAL, indexed)
    labels, splits = np.asarray(labels, np.int32), np.asarray(splits, np.uint8)
    if not has_val:
        splits = held_out_splits(labels)
    if not (splits == VAL).any():
        raise ConfigError(
            f'dataset folder {root} has no images to evaluate on: put some in '
            'val/<class>/, or more than one image in a class'
        )
    signature = {'classes': classes, 'val_classes': val_classes, 'dirs': dirs}
    if duplicates or in_val or revisited:
        # Rebuilds an index built before these were skipped; without any, one is kept.
        signature['skipped'] = [len(duplicates), len(in_val), len(revisited)]
    return {
        'root': root,
        'layout': layout,
        'classes': classes,
        'files': files,
        'labels': labels,
        'splits': splits,
        'duplicates': duplicates,
        'in_val': in_val,
        'revisited': revisited,
        'signature': signature,
    }


def skipped_message(listing: dict) -> str | None:
    """One line on the paths and folders ``list_folder`` skipped, with their counts."""
    duplicates, in_val, revisited = (listing['duplicates'], listing['in_val'], listing['revisited'])
    if not (duplicates or in_val or revisited):
        return None

    def count(n, one, many):
        return f'{n} {one if n == 1 else many}'

    parts = []
    if duplicates:
        parts.append(
            count(
                len(duplicates),
                'path to a file indexed under another path',
                'paths to files indexed under other paths',
            )
            + ' (the first in sorted order is kept)'
        )
    if in_val:
        parts.append(
            count(len(in_val), 'train/ path to a file', 'train/ paths to files')
            + ' that val/ holds (evaluated on, not trained on)'
        )
    if revisited:
        parts.append(
            count(len(revisited), 'folder', 'folders')
            + ' reached again through symlinks (not entered again)'
        )
    skipped = duplicates + in_val + revisited
    more = ', ...' if len(skipped) > 10 else ''
    return (
        f'dataset folder {listing["root"]} indexes each real file once; skipped '
        f'{", ".join(parts)}: {", ".join(skipped[:10])}{more}'
    )


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
