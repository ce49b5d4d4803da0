"""The paper's plain and residual networks (``ResNet``): a stem, stages of blocks
(``blocks``), global average pool and fc, and where a ResNet's variables are in a tree.

The parts are handed in (``conv``, ``norm``, ``max_pool``, ``stage``, ``block_cls``), as in
flax's ImageNet example: a faster implementation of the same function (``backends``) is
another part. The default program is plain ``lax``, so every JAX transformation applies.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from numbers import Integral, Real
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.models import layers
from resnet_jax.models.blocks import (
    Dtype,
    ModuleDef,
    block_names,
    stage_name,
    stage_strides,
    unrolled_stage,
)
from resnet_jax.models.layers import BatchNorm, FrozenBatchNorm, check_shortcut


def _accepts(factory: Callable[..., Any], argument: str) -> bool:
    try:
        return argument in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


class Feature(NamedTuple):
    """A ``features_only`` output's channels and stride (input pixels per output pixel)."""

    channels: int
    stride: int


class ResNet(nn.Module):
    """A plain or residual network: a stem, stages of blocks, global average pool, fc.

    Attributes:
      stage_sizes: blocks per stage (Table 1 rows; ``(n, n, n)`` for CIFAR).
      block_cls: ``BasicBlock``, ``BottleneckBlock`` or your own, taking the fields
        ``filters``, ``strides``, ``conv``, ``norm``, ``residual``, ``shortcut``,
        ``zero_init_residual``, ``dtype`` (``stride_in_1x1`` if it declares it), with an
        ``expansion`` class attribute (output channels per ``filters``) for ``feature_info``.
      num_classes: outputs of the fc; 0: no fc, the pooled features are returned.
      stem: ``'imagenet'`` (7x7/2 conv + 3x3/2 max pool) or ``'cifar'`` (3x3 conv).
      width: filters of the first stage (64 ImageNet, 16 CIFAR), doubled each stage.
      residual: False gives the plain net.
      shortcut: 'A', 'B' or 'C' (Table 3).
      stride_in_1x1: bottleneck stride on the first 1x1 (True: v1, the paper) or the 3x3.
      zero_init_residual: start each residual branch's last BN scale at 0.
      bn_group_size: examples per BatchNorm group in training (0: the whole batch).
      bn_momentum, bn_epsilon: BatchNorm's.
      frozen_bn: BatchNorm fixed in training too (``layers.FrozenBatchNorm``, as detection
        fine-tunes); the same variables and evaluation function.
      features_only: return the stage outputs ``{'conv2': ..., 'conv5': ...}`` instead of
        logits; ``feature_info()`` gives their channels and strides.
      dtype: compute dtype (``jnp.bfloat16`` or ``'bfloat16'``); parameters and logits
        stay float32.
      conv: the conv factory, ``conv(features, kernel_size, strides, dtype=, name=)``.
      norm: the norm factory; None is the paper's BatchNorm. Any flax norm works (e.g.
        ``functools.partial(nn.GroupNorm, num_groups=8)``), given ``dtype`` and
        ``use_running_average=not train`` where it takes them.
      max_pool: the stem's pool, ``max_pool(x, window, stride, padding)``.
      stage: runs a stage's blocks after the first, ``stage(parent, make_block, names, x)``.

    Inputs are float NHWC images with 1-4 channels, normalised as the weights expect
    (``models.preprocess``), at least ``min_input_size()`` pixels a side. Bad fields and
    inputs raise ``ValueError`` saying what is allowed.
    """

    stage_sizes: Sequence[int]
    block_cls: type[nn.Module]
    num_classes: int = 1000
    stem: str = 'imagenet'
    width: int = 64
    residual: bool = True
    shortcut: str = 'B'
    stride_in_1x1: bool = True
    zero_init_residual: bool = False
    bn_group_size: int = 0
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    frozen_bn: bool = False
    features_only: bool = False
    dtype: Dtype = jnp.float32
    conv: ModuleDef = layers.conv
    norm: ModuleDef | None = None
    max_pool: Callable[..., jax.Array] = layers.max_pool
    stage: Callable[..., jax.Array] = unrolled_stage

    def __post_init__(self):
        _check_fields(self)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array | dict[str, jax.Array]:
        dtype = canonical_dtype(self.dtype)
        x = self._check_input(x)
        conv = functools.partial(self.conv, dtype=dtype)
        norm = self._norm(train, dtype)
        x = jnp.asarray(x, dtype)
        if self.stem == 'imagenet':  # conv1 and the max pool of Table 1
            x = conv(self.width, 7, 2, name='conv1')(x)
            x = nn.relu(norm(name='bn1')(x))
            x = self.max_pool(x, 3, 2, 1)
        else:  # the first 3x3 conv of sec. 4.2
            x = conv(self.width, 3, name='conv1')(x)
            x = nn.relu(norm(name='bn1')(x))

        extra = (
            {'stride_in_1x1': self.stride_in_1x1}
            if _accepts(self.block_cls, 'stride_in_1x1')
            else {}
        )
        features = {}
        for i, num_blocks in enumerate(self.stage_sizes):
            block = functools.partial(
                self.block_cls,
                filters=self.width * 2**i,
                conv=conv,
                norm=norm,
                residual=self.residual,
                shortcut=self.shortcut,
                zero_init_residual=self.zero_init_residual,
                dtype=dtype,
                **extra,
            )
            names = block_names(i, num_blocks)
            x = block(strides=stage_strides(i), name=names[0])(x)
            if names[1:]:
                x = self.stage(self, functools.partial(block, strides=1), names[1:], x)
            features[stage_name(i)] = x
        if self.features_only:
            return features

        x = jnp.mean(x, axis=(1, 2))
        if not self.num_classes:
            return x.astype(jnp.float32)
        x = nn.Dense(self.num_classes, dtype=dtype, param_dtype=jnp.float32, name='fc')(x)
        return x.astype(jnp.float32)

    @nn.nowrap
    def min_input_size(self) -> int:
        """The smallest input side: every stage then sees at least one pixel."""
        return (4 if self.stem == 'imagenet' else 1) * 2 ** (len(self.stage_sizes) - 1)

    @property
    def num_features(self) -> int:
        """Channels of the pooled features the fc reads (``num_classes=0``'s output):
        2048 for ResNet-50, 512 for ResNet-18, 64 for the CIFAR nets (timm's name)."""
        return list(self.feature_info().values())[-1].channels

    @nn.nowrap
    def feature_info(self) -> dict[str, Feature]:
        """``features_only``'s outputs without running the net, e.g. for ResNet-50
        ``{'conv2': Feature(channels=256, stride=4), ...}``."""
        expansion = getattr(self.block_cls, 'expansion', None)
        if not isinstance(expansion, int):
            raise ValueError(
                f'block_cls {getattr(self.block_cls, "__name__", self.block_cls)}'
                ' has no integer `expansion` class attribute (output channels '
                'per filters), which feature_info needs'
            )
        stride = 4 if self.stem == 'imagenet' else 1
        info = {}
        for i in range(len(self.stage_sizes)):
            stride *= stage_strides(i)
            info[stage_name(i)] = Feature(self.width * 2**i * expansion, stride)
        return info

    @nn.nowrap
    def _check_input(self, x: Any) -> jax.Array:
        if not hasattr(x, 'shape') or not hasattr(x, 'dtype'):
            x = jnp.asarray(x)  # a nested list
        shape = tuple(x.shape)
        if len(shape) != 4 or not _concrete(shape[-1]) or not 1 <= shape[-1] <= 4:
            hint = (
                ' (NCHW? use x.transpose(0, 2, 3, 1))'
                if len(shape) == 4 and _concrete(shape[1]) and 1 <= shape[1] <= 4
                else ''
            )
            raise ValueError(
                f'ResNet expects NHWC images (batch, height, width, channels) '
                f'with 1-4 channels; got shape {shape}{hint}'
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                f'ResNet expects float images normalised as its weights were '
                f'trained, got {x.dtype}: turn uint8 images into them with '
                "resnet_jax.models.preprocess(images, 'torchvision' | 'caffe' "
                "| 'mean', mean=...)"
            )
        smallest = self.min_input_size()
        sides = [d for d in shape[1:3] if _concrete(d)]
        if sides and min(sides) < smallest:
            raise ValueError(
                f'ResNet ({self.stem} stem, {len(self.stage_sizes)} stages) '
                f'needs inputs of at least {smallest}x{smallest} pixels; got '
                f'{shape[1]}x{shape[2]}'
            )
        return x

    @nn.nowrap  # a plain method: not a module call (nn.tabulate lists none)
    def _norm(self, train: bool, dtype) -> Callable[..., nn.Module]:
        if self.frozen_bn:
            return functools.partial(FrozenBatchNorm, epsilon=self.bn_epsilon, dtype=dtype)
        if self.norm is None:
            return functools.partial(
                BatchNorm,
                use_running_average=not train,
                group_size=self.bn_group_size,
                momentum=self.bn_momentum,
                epsilon=self.bn_epsilon,
                dtype=dtype,
            )
        kwargs = {'dtype': dtype} if _accepts(self.norm, 'dtype') else {}
        if _accepts(self.norm, 'use_running_average'):
            kwargs['use_running_average'] = not train
        return functools.partial(self.norm, **kwargs)


def _concrete(dim: Any) -> bool:
    """Whether an array dimension is a number (not a symbolic size of ``jax.export``)."""
    return isinstance(dim, Integral)


def _check_fields(model: ResNet) -> None:
    def integer(value, low):
        return isinstance(value, Integral) and not isinstance(value, bool) and value >= low

    def flag(value):
        return isinstance(value, (bool, np.bool_))

    sizes = model.stage_sizes
    checks = [
        (
            'stage_sizes',
            isinstance(sizes, Sequence)
            and not isinstance(sizes, str)
            and len(sizes) > 0
            and all(integer(n, 1) for n in sizes),
            'a non-empty sequence of block counts >= 1, e.g. (3, 4, 6, 3)',
        ),
        ('block_cls', callable(model.block_cls), 'a block module class'),
        (
            'num_classes',
            integer(model.num_classes, 0),
            'an integer >= 0 (0: no fc, the pooled features)',
        ),
        ('stem', model.stem in ('imagenet', 'cifar'), "'imagenet' or 'cifar'"),
        ('width', integer(model.width, 1), 'an integer >= 1 (64 ImageNet, 16 CIFAR)'),
        ('bn_group_size', integer(model.bn_group_size, 0), 'an integer >= 0 (0: the whole batch)'),
        (
            'bn_momentum',
            isinstance(model.bn_momentum, Real)
            and not flag(model.bn_momentum)
            and 0 <= model.bn_momentum <= 1,
            'a number in [0, 1]',
        ),
        (
            'bn_epsilon',
            isinstance(model.bn_epsilon, Real)
            and not flag(model.bn_epsilon)
            and 0 < model.bn_epsilon < float('inf'),
            'a finite number > 0',
        ),
        *[
            (name, flag(getattr(model, name)), 'True or False')
            for name in (
                'residual',
                'stride_in_1x1',
                'zero_init_residual',
                'frozen_bn',
                'features_only',
            )
        ],
        *[
            (name, callable(getattr(model, name)), 'a callable')
            for name in ('conv', 'max_pool', 'stage')
        ],
        (
            'norm',
            model.norm is None or callable(model.norm),
            "None (the paper's BatchNorm) or a norm module factory",
        ),
        (
            'frozen_bn',
            not (model.frozen_bn and model.norm is not None),
            "False with a norm of your own (frozen_bn freezes the paper's BatchNorm)",
        ),
    ]
    for name, ok, allowed in checks:
        if not ok:
            raise ValueError(
                f'ResNet.{name}={getattr(model, name)!r} is not allowed: it must be {allowed}'
            )
    check_shortcut(model.shortcut)
    canonical_dtype(model.dtype)


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


DTYPES = ('float32', 'bfloat16', 'float16')


def canonical_dtype(dtype: Any) -> jnp.dtype:
    """A compute dtype given as a name or a dtype; ``ValueError`` for anything else."""
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved.name not in DTYPES:
        raise ValueError(f'unknown dtype {dtype!r}; allowed: {", ".join(DTYPES)}')
    return resolved
