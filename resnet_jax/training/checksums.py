"""SHA-256 digests of a checkpoint's arrays, one per part of the state, saved in the same
step's meta (orbax renames a step once every item is written), and their check on restore.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

CHECKSUM = 'sha256'


class CorruptCheckpoint(RuntimeError):
    """A step whose files cannot be read or whose values differ from its checksums."""


def _key_name(key) -> str:
    for attribute in ('key', 'name', 'idx'):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def leaf_names(tree: Any) -> list[tuple[str, Any]]:
    """``[('params/conv1/kernel', leaf), ...]``: the same names for a ``TrainState``, the
    dicts orbax restores it as, and its metadata."""
    return [
        ('/'.join(_key_name(k) for k in path), leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def _host(value) -> np.ndarray:
    if isinstance(value, jax.Array):  # replicated: this process's copy will do
        value = value.addressable_data(0)
    return np.ascontiguousarray(np.asarray(value))


def digest(named_leaves: Iterable[tuple[str, Any]]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``named_leaves``, by name."""
    h = hashlib.sha256()
    for name, value in sorted(named_leaves, key=lambda item: item[0]):
        array = _host(value)
        h.update(f'{name}|{array.dtype.name}|{array.shape};'.encode())
        h.update(array.reshape(-1).view(np.uint8))
    return h.hexdigest()


def _by_part(tree: Any) -> dict[str, list]:
    parts: dict[str, list] = {}
    for name, leaf in leaf_names(tree):
        parts.setdefault(name.split('/')[0], []).append((name, leaf))
    return parts


def checksums(state: Any, metrics: Any) -> dict[str, str]:
    """The digest of each part of the state (``state/params``, ``state/opt_state``, ...)
    and of ``train_metrics``."""
    out = {f'state/{part}': digest(leaves) for part, leaves in _by_part(state).items()}
    out['train_metrics'] = digest(leaf_names(metrics))
    return out


def verify(checksummed: dict[str, str] | None, item: str, tree: Any) -> None:
    """CorruptCheckpoint where the parts of ``tree`` (the restored ``item``: 'state' or
    'train_metrics') differ from ``checksummed`` (None in older checkpoints: no check)."""
    if not checksummed:
        return
    if item == 'train_metrics':
        expected = {'train_metrics': checksummed.get('train_metrics')}
        found = {'train_metrics': digest(leaf_names(tree))}
    else:
        parts = _by_part(tree)
        expected = {p: checksummed.get(f'state/{p}') for p in parts}
        found = {p: digest(leaves) for p, leaves in parts.items()}
    bad = sorted(p for p in found if expected[p] is not None and expected[p] != found[p])
    if bad:
        raise CorruptCheckpoint(
            f'the contents of {", ".join(bad)} differ from the {CHECKSUM} checksum recorded with it'
        )
