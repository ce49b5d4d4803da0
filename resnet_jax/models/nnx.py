"""The networks in Flax NNX code: any ``ResNet`` (and trained or converted variables) as
an ``nnx.Module``, through flax's own bridge (``flax.nnx.bridge.ToNNX``).

    net = to_nnx(resnet_jax.create_model('resnet50'), variables)   # or rngs=nnx.Rngs(0)
    logits = net(images)                                           # evaluation
    logits = net(images, train=True, mutable=['batch_stats'])      # training: BN updates
    optimizer = nnx.Optimizer(net, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    variables = to_linen_variables(net)        # back: checkpoints, export, convert

In the module the linen collections are NNX variable types: ``params`` are
``nnx.Param``, BatchNorm's ``batch_stats`` ``nnx.BatchStat``, both under the linen
variable names (``net.conv1['kernel']``, ``net.bn1['mean']``). A train step differentiates
the ``nnx.Param`` state only (``nnx.DiffState(0, nnx.Param)``).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
from flax import nnx

from resnet_jax.models.resnet import ResNet

COLLECTIONS = {'params': nnx.Param, 'batch_stats': nnx.BatchStat}


def to_nnx(model: ResNet, variables: Mapping[str, Any] | None = None, *,
           rngs: nnx.Rngs | None = None, input_size: int | None = None) -> nnx.Module:
    """``model`` as an NNX module, holding ``variables`` (``model.init``'s, a run's from
    ``resnet_jax.load`` or converted ones) or, without them, fresh ones drawn from
    ``rngs`` (default ``nnx.Rngs(0)``). The variables are created from a sample input of
    ``input_size`` pixels (default: 32, or the net's ``min_input_size()`` if larger); the
    network takes any size afterwards."""
    size = input_size or max(32, model.min_input_size())
    net = nnx.bridge.ToNNX(model, rngs=rngs or nnx.Rngs(0))
    net = nnx.bridge.lazy_init(net, jnp.zeros((1, size, size, 3), jnp.float32))
    if variables is not None:
        load(net, variables)
    return net


def load(net: nnx.Module, variables: Mapping[str, Any]) -> None:
    """Sets the variables of ``net`` (``to_nnx``'s) to ``variables`` (linen's
    ``{'params': ..., 'batch_stats': ...}``, of the same model); ``ValueError`` naming the
    first one that is missing or of another shape."""
    state = nnx.state(net, nnx.Any(*COLLECTIONS.values()))
    current = nnx.to_pure_dict(state)
    merged: dict = {}
    for collection in COLLECTIONS:
        _merge(merged, variables.get(collection, {}))
    _check(current, merged, ())
    nnx.replace_by_pure_dict(state, merged)
    nnx.update(net, state)


def to_linen_variables(net: nnx.Module) -> dict[str, Any]:
    """The linen variables ``{'params': ..., 'batch_stats': ...}`` of ``net``
    (``to_nnx``'s): what ``model.apply``, the checkpoints and the converters take."""
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
            raise ValueError(f'variables: {name} has shape {tuple(jnp.shape(given[key]))}, '
                             f'the network {tuple(jnp.shape(value))}')
