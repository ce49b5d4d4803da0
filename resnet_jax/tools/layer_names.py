"""The one table of layer names: each conv / BN / fc of the flax model and its name in
torchvision (and timm), Keras and transformers; and the check of converted variables
against the model, which names the first variable that does not fit."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import models
from resnet_jax.models import layers

IMAGENET_DEPTHS = tuple(models.TABLE1)

# The format fields: {layer} = stage + 1 (torchvision's layer1..4), {paper} = stage + 2 (the
# paper's conv2_x..conv5_x, as Keras), {stage} = stage (transformers' stages.0..3); {block} /
# {block1}: the block in its stage from 0 / 1; {k} / {k0}: the conv in its block from 1 / 0.
_STYLES = ('torchvision', 'keras', 'transformers')
_NAMES = {
    #               torchvision, timm                   Keras
    #               transformers (ResNetModel; ResNetForImageClassification: 'resnet.' + it)
    'conv1': ('conv1', 'conv1_conv', 'embedder.embedder.convolution'),
    'bn1': ('bn1', 'conv1_bn', 'embedder.embedder.normalization'),
    'conv': (
        'layer{layer}.{block}.conv{k}',
        'conv{paper}_block{block1}_{k}_conv',
        'encoder.stages.{stage}.layers.{block}.layer.{k0}.convolution',
    ),
    'bn': (
        'layer{layer}.{block}.bn{k}',
        'conv{paper}_block{block1}_{k}_bn',
        'encoder.stages.{stage}.layers.{block}.layer.{k0}.normalization',
    ),
    'proj_conv': (
        'layer{layer}.{block}.downsample.0',
        'conv{paper}_block{block1}_0_conv',
        'encoder.stages.{stage}.layers.{block}.shortcut.convolution',
    ),
    'proj_bn': (
        'layer{layer}.{block}.downsample.1',
        'conv{paper}_block{block1}_0_bn',
        'encoder.stages.{stage}.layers.{block}.shortcut.normalization',
    ),
    'fc': ('fc', 'predictions', 'classifier.1'),
}


def named_layers(model: models.ResNet, style: str) -> Iterator[tuple[tuple[str, ...], str, str]]:
    """``(flax module path, kind 'conv'|'bn'|'fc', the layer's name in ``style``)`` for every
    layer of ``model`` with variables, in the order torchvision's state dict lists them.
    The projections are where ``model.shortcut`` puts them (option B: where the
    dimensions change), the fc only when ``model.num_classes`` is not 0."""
    column = _STYLES.index(style)

    def name(row: str, **numbers: int) -> str:
        return _NAMES[row][column].format(**numbers)

    yield ('conv1',), 'conv', name('conv1')
    yield ('bn1',), 'bn', name('bn1')
    bottleneck = model.block_cls is models.BottleneckBlock
    in_features = model.width
    for i, num_blocks in enumerate(model.stage_sizes):
        features = model.width * 2**i * (4 if bottleneck else 1)
        for j, block in enumerate(models.block_names(i, num_blocks)):
            numbers = {'layer': i + 1, 'paper': i + 2, 'stage': i, 'block': j, 'block1': j + 1}
            for k in range(1, 4 if bottleneck else 3):
                yield (block, f'conv{k}'), 'conv', name('conv', k=k, k0=k - 1, **numbers)
                yield (block, f'bn{k}'), 'bn', name('bn', k=k, k0=k - 1, **numbers)
            strides = models.stage_strides(i) if j == 0 else 1
            if model.residual and layers.projects(model.shortcut, strides, in_features, features):
                yield (block, 'shortcut', 'proj_conv'), 'conv', name('proj_conv', **numbers)
                yield (block, 'shortcut', 'proj_bn'), 'bn', name('proj_bn', **numbers)
            in_features = features
    if model.num_classes:
        yield ('fc',), 'fc', name('fc')


def net_name(block_cls, stage_sizes) -> str | None:
    """The name of Table 1's network with these blocks, or None."""
    for name, (block, sizes) in models.TABLE1.items():
        if block is block_cls and tuple(sizes) == tuple(stage_sizes):
            return name
    return None


def table1_name(model: models.ResNet) -> str | None:
    """The Table 1 name (``'resnet50'``) of a residual ImageNet model's blocks, or None."""
    if not model.residual or model.stem != 'imagenet' or model.width != 64:
        return None
    return net_name(model.block_cls, model.stage_sizes)


def table1() -> str:
    return '; '.join(
        f'{name}: {describe(block, sizes)}' for name, (block, sizes) in models.TABLE1.items()
    )


def block_kind(block_cls) -> str:
    return {models.BasicBlock: 'basic', models.BottleneckBlock: 'bottleneck'}.get(
        block_cls, getattr(block_cls, '__name__', repr(block_cls))
    )


def describe(block_cls, stage_sizes) -> str:
    return f'{block_kind(block_cls)} blocks {tuple(stage_sizes)}'


def check_name(name: str) -> None:
    if name not in IMAGENET_DEPTHS:
        raise ValueError(f'conversion supports {", ".join(IMAGENET_DEPTHS)}; got {name!r}')


def set_leaf(tree: dict, path: tuple[str, ...], key: str, value: np.ndarray) -> None:
    for p in path:
        tree = tree.setdefault(p, {})
    tree[key] = value


def get_leaf(tree: Mapping, path: tuple[str, ...], key: str) -> np.ndarray:
    for p in path:
        tree = tree[p]
    return np.asarray(tree[key], np.float32)


@functools.lru_cache(maxsize=16)
def _expected_variables(model: models.ResNet, channels: int = 3) -> Any:
    """The model's variables as shapes (no computation)."""
    x = jnp.zeros((1, 224, 224, channels))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x))


def _path_name(path) -> str:
    return '/'.join(str(getattr(p, 'key', p)) for p in path)


def check_shapes(model: models.ResNet, variables: Mapping, source: str) -> Mapping:
    """Raises ValueError naming the first variable whose shape does not fit ``model`` (or
    that it lacks, or has in excess)."""
    flat_expected = {
        _path_name(p): v
        for p, v in jax.tree_util.tree_flatten_with_path(
            _expected_variables(model, models.input_channels(model, variables.get('params')))
        )[0]
    }
    flat = {_path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(variables)[0]}
    for name, value in flat.items():
        if name not in flat_expected:
            raise ValueError(f'{source}: {name} is not a variable of the model')
        if tuple(np.shape(value)) != tuple(flat_expected[name].shape):
            raise ValueError(
                f'{source}: {name} has shape {tuple(np.shape(value))}, the model '
                f'expects {tuple(flat_expected[name].shape)}'
            )
    missing = sorted(set(flat_expected) - set(flat))
    if missing:
        raise ValueError(f'{source}: no value for the model variable {missing[0]}')
    return variables
