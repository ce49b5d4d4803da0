"""Where a ResNet's variables are in a tree (a larger module's, a checkpoint's) and the
input channels they take."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from resnet_jax.models.resnet import ResNet


def input_channels(model: ResNet, params: Any = None) -> int:
    """The channels ``model`` takes: its ``in_chans``, else those of ``params``' conv1
    kernel (a ResNet's params, as ``locate_resnet`` finds them), else 3 (RGB)."""
    if model.in_chans is not None:
        return model.in_chans
    try:
        return int(np.shape(params['conv1']['kernel'])[2])
    except (KeyError, TypeError):  # no params, or not a ResNet's
        return 3


# Keys at every ResNet's top: how one is found inside a larger tree.
VARIABLE_MARKERS = ('conv1', 'bn1', 'conv2_1')


def find_resnets(tree: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The path inside ``tree`` (keyed as ``params``) of each ResNet's variables: ``[()]``
    when ``tree`` is one, ``[('backbone',)]`` when a module holds one as ``backbone``."""
    if not hasattr(tree, 'items'):
        return []
    if all(k in tree for k in VARIABLE_MARKERS):
        return [path]
    return [
        found for key, child in tree.items() for found in find_resnets(child, path + (str(key),))
    ]


def locate_resnet(params: Any, at: Sequence[str] | str | None = None) -> tuple[str, ...]:
    """The path inside ``params`` of its one ResNet, or ``at`` (``'backbone'``) checked to
    hold one; ValueError naming the candidates otherwise."""
    found = find_resnets(params)
    if at is None:
        if len(found) == 1:
            return found[0]
        if not found:
            raise ValueError(
                'no ResNet in the variables: no dict holds conv1, bn1 and conv2_1 '
                f'(params holds {sorted(params)[:6]})'
            )
        raise ValueError(
            'several ResNets in the variables, at '
            + ', '.join(repr(p) for p in found)
            + f'; choose one, e.g. at={found[0]!r}'
        )
    at = tuple(at.split('/')) if isinstance(at, str) else tuple(at)
    tree = params
    for key in at:
        if not hasattr(tree, 'items') or key not in tree:
            raise ValueError(
                f'at={at!r}: variables params have no {"/".join(at)} '
                f'(candidates: {found or "none"})'
            )
        tree = tree[key]
    if find_resnets(tree) != [()]:
        raise ValueError(
            f'at={at!r}: params/{"/".join(at)} is not a ResNet (it holds '
            f'{sorted(tree)[:6] if hasattr(tree, "items") else tree!r}; '
            f'candidates: {found or "none"})'
        )
    return at
