"""Fine-tuning: pretrained variables into a model with another head, or into your module.

model = resnet_jax.create_model('resnet50', num_classes=10, stride_in_1x1=False)
fresh = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
moved = resnet_jax.transfer(fresh, 'workdirs/r50_tv')  # a workdir, converted weights
print(moved)  # kept 265 variables; freshly initialised: params/fc/bias, params/fc/kernel
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.models import locate_resnet

COLLECTIONS = ('params', 'batch_stats')


class Transfer(NamedTuple):
    """``transfer``'s result: the variables and the paths (``'params/fc/kernel'``) ``kept``
    from the pretrained ones, left ``fresh`` (another shape, absent, or outside the ResNet)
    and pretrained but ``unused``."""

    variables: Any
    kept: list[str]
    fresh: list[str]
    unused: list[str]

    def __str__(self) -> str:
        def names(paths):
            return ', '.join(paths) if paths else 'nothing'

        text = f'kept {len(self.kept)} variables; freshly initialised: {names(self.fresh)}'
        return text + (f'; not used: {names(self.unused)}' if self.unused else '')


def resnet_path(
    variables: Mapping[str, Any], at: Sequence[str] | str | None, what: str
) -> tuple[str, ...]:
    """``at`` (checked), or where ``variables['params']`` holds its one ResNet."""
    if 'params' not in variables:
        raise ValueError(f'{what}: no params collection (got {sorted(variables)})')
    try:
        return locate_resnet(variables['params'], at)
    except ValueError as e:
        raise ValueError(f'{what}: {e}') from None


def _subtree(tree: Mapping, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree.get(key, {}) if isinstance(tree, Mapping) else {}
    return tree


def _flat(tree: Any) -> dict[str, Any]:
    return {
        '/'.join(str(getattr(k, 'key', k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _pretrained_variables(pretrained: Any) -> Mapping[str, Any]:
    if isinstance(pretrained, (str, os.PathLike)):
        from resnet_jax import paths

        if paths.resolve(pretrained).is_file():  # torchvision's, timm's, Keras' weights
            from resnet_jax.tools import convert

            return convert.load_weights(pretrained)[1]
        from resnet_jax.training import runs  # orbax: only for a workdir

        return runs.load_variables(pretrained)[0]
    if isinstance(pretrained, tuple) and len(pretrained) == 2:
        return pretrained[1]  # (model, variables) of a converter
    if isinstance(pretrained, Mapping):
        return pretrained
    raise ValueError(
        f'pretrained: a workdir, a (model, variables) pair or a variables '
        f'mapping; got {type(pretrained).__name__}'
    )


def transfer(
    variables: Mapping[str, Any],
    pretrained: Any,
    at: Sequence[str] | None = None,
    source_at: Sequence[str] | None = None,
) -> Transfer:
    """``variables`` (``init``'s, of a ResNet or of a module holding one) with the ResNet's
    leaves taken from ``pretrained`` (a workdir, a converter's ``(model, variables)`` or a
    variables tree) where path and shape agree. ``at`` / ``source_at`` locate the ResNet in
    each tree (e.g. ``('backbone',)``; default: the one there); other collections and leaves
    stay as they are. Taken leaves get the dtype and sharding of those they replace."""
    source = _pretrained_variables(pretrained)
    target_at = resnet_path(variables, at, 'variables')
    from_at = resnet_path(source, source_at, 'pretrained')
    out = dict(variables)
    kept, fresh, unused, left = [], [], [], []  # left: the ResNet's own, fresh (not its fc)
    for collection in COLLECTIONS:
        if collection not in variables:
            continue
        target = _subtree(variables[collection], target_at)
        available = _flat(_subtree(source.get(collection, {}), from_at))
        used = set()

        def pick(path, leaf, collection=collection, available=available, used=used):
            name = '/'.join(str(getattr(k, 'key', k)) for k in path)
            full = '/'.join((collection, *target_at, name))
            value = available.get(name)
            if value is None or tuple(np.shape(value)) != tuple(leaf.shape):
                fresh.append(full)
                if not name.startswith('fc/'):
                    left.append(full)
                return leaf
            used.add(name)
            kept.append(full)
            value = np.asarray(value, leaf.dtype)  # a host value: see loop.empty_metrics
            sharding = getattr(leaf, 'sharding', None)
            return jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value)

        merged = jax.tree_util.tree_map_with_path(pick, target)
        unused += [
            '/'.join((collection, *from_at, name)) for name in sorted(available) if name not in used
        ]
        out[collection] = _replace(variables[collection], target_at, merged)
        if target_at:  # the user's own layers around the ResNet: as initialised
            inside = '/'.join(target_at) + '/'
            fresh.extend(
                f'{collection}/{name}'
                for name in _flat(variables[collection])
                if not name.startswith(inside)
            )
    if not kept:
        raise ValueError(
            f'no variable of the pretrained {_describe(source, from_at)} fits the '
            f'{_describe(variables, target_at)}: nothing to transfer'
        )
    if left:  # a near miss (another width, v1 for v1.5 is fine) loses the pretraining there
        warnings.warn(
            f'{len(left)} variables of the ResNet left freshly initialised (absent from the '
            f'pretrained {_describe(source, from_at)} or of another shape): '
            f'{", ".join(left[:4])}{", ..." if len(left) > 4 else ""}',
            stacklevel=2,
        )
    return Transfer(out, kept, fresh, unused)


def _describe(variables: Mapping[str, Any], at: tuple[str, ...]) -> str:
    """A ResNet's variables as Table 1's name, or its blocks per stage."""
    from resnet_jax import models
    from resnet_jax.tools.layer_names import net_name

    params = _subtree(variables['params'], at)
    blocks = [k for k in params if re.fullmatch(r'conv\d_\d+', k)]  # conv<stage>_<block>
    stages = [k.split('_') for k in blocks]
    sizes = tuple(max(int(b) for s, b in stages if s == stage) for stage in sorted(dict(stages)))
    bottleneck = any('conv3' in params[k] for k in blocks)
    block = models.BottleneckBlock if bottleneck else models.BasicBlock
    name = net_name(block, sizes)
    kind = 'bottleneck' if bottleneck else 'basic'
    return name or f'ResNet of {kind} blocks {sizes or "()"}'


def _replace(tree: Mapping, path: tuple[str, ...], value: Any) -> Any:
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = _replace(tree[path[0]], path[1:], value)
    return out
