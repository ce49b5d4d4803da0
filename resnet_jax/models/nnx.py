"""Any ``ResNet`` and its variables as a Flax NNX module (``flax.nnx.bridge.ToNNX``).

    net = to_nnx(resnet_jax.create_model('resnet50'), variables)
    logits = net(images, train=True, mutable=['batch_stats'])  # BatchNorm statistics update
    variables = to_linen_variables(net)  # back: checkpoints, export, convert

``params`` are ``nnx.Param``, ``batch_stats`` ``nnx.BatchStat``, under linen's names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from resnet_jax.models.resnet import ResNet
from resnet_jax.models.variables import input_channels

COLLECTIONS = {'params': nnx.Param, 'batch_stats': nnx.BatchStat}


def to_nnx(
    model: ResNet,
    variables: Mapping[str, Any] | None = None,
    *,
    rngs: nnx.Rngs | None = None,
    input_size: int | None = None,
) -> nnx.Module:
    """``model`` as an NNX module holding linen ``variables`` (e.g. ``resnet_jax.load``'s) or
    fresh ones from ``rngs`` (default ``nnx.Rngs(0)``), created on a sample input of
    ``input_size`` pixels (default 32 or ``model.min_input_size()``); any size runs after."""
    size = input_size or max(32, model.min_input_size())
    net = nnx.bridge.ToNNX(model, rngs=rngs or nnx.Rngs(0))
    channels = input_channels(model, (variables or {}).get('params'))
    net = nnx.bridge.lazy_init(net, jnp.zeros((1, size, size, channels), jnp.float32))
    if variables is not None:
        load(net, variables)
    return net


def load(net: nnx.Module, variables: Mapping[str, Any]) -> None:
    """Sets ``net``'s variables to linen ``variables`` of the same model; ValueError names
    the first one missing or of another shape."""
    state = nnx.state(net, nnx.Any(*COLLECTIONS.values()))
    current = nnx.to_pure_dict(state)
    merged: dict = {}
    for collection in COLLECTIONS:
        _merge(merged, variables.get(collection, {}))
    _check(current, merged, ())
    nnx.replace_by_pure_dict(state, merged)
    nnx.update(net, state)


def to_linen_variables(net: nnx.Module) -> dict[str, Any]:
    """``net``'s linen variables ``{'params': ..., 'batch_stats': ...}``."""
    out = {}
    for collection, kind in COLLECTIONS.items():
        tree = nnx.to_pure_dict(nnx.state(net, kind))
        if tree:
            out[collection] = tree
    return out


def _merge(into: dict, tree: Mapping[str, Any]) -> None:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            _merge(into.setdefault(key, {}), value)
        else:
            into[key] = value


def _check(current: Mapping, given: Mapping, path: tuple[str, ...]) -> None:
    for key, value in current.items():
        name = '/'.join(path + (key,))
        if key not in given:
            raise ValueError(f'variables: no value for {name}')
        if isinstance(value, Mapping):
            _check(value, given[key], path + (key,))
        elif tuple(jnp.shape(given[key])) != tuple(jnp.shape(value)):
            raise ValueError(
                f'variables: {name} has shape {tuple(jnp.shape(given[key]))}, '
                f'the network {tuple(jnp.shape(value))}'
            )
