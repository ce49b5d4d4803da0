"""The paper's plain and residual networks (``ResNet``): a stem, stages of blocks
(``blocks``), global average pool and fc.

The parts are handed in (``conv``, ``norm``, ``max_pool``, ``stage``, ``block_cls``), as in
flax's ImageNet example: a faster implementation of the same function (``backends``) is
another part. The default program is plain ``lax``, so every JAX transformation applies.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from numbers import Integral
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.models import layers
from resnet_jax.models.blocks import Dtype, ModuleDef, block_names, stage_name, stage_strides
from resnet_jax.models.checks import block_class, canonical_dtype, check_fields, if_accepted
from resnet_jax.models.layers import BatchNorm, FrozenBatchNorm
from resnet_jax.models.stages import scanned_stage


class Feature(NamedTuple):
    """A ``features_only`` output's channels and stride (input pixels per output pixel)."""

    channels: int
    stride: int


class ResNet(nn.Module):
    """A plain or residual network: a stem, stages of blocks, global average pool, fc.

    Attributes:
      stage_sizes: blocks per stage (Table 1 rows; ``(n, n, n)`` for CIFAR).
      block_cls: ``BasicBlock``, ``BottleneckBlock`` or your own (the protocol:
        ``models.blocks``); a class or a ``functools.partial`` of one.
      num_classes: outputs of the fc; 0: no fc, the pooled features are returned. To
        replace a classifier: ``model.clone(num_classes=k)`` and ``transfer`` the rest.
      stem: ``'imagenet'`` (7x7/2 conv + 3x3/2 max pool) or ``'cifar'`` (3x3 conv).
      width: filters of the first stage (64 ImageNet, 16 CIFAR), doubled each stage.
      residual: False gives the plain net.
      shortcut: 'A', 'B' or 'C' (Table 3).
      stride_in_1x1: bottleneck stride on the first 1x1 (True: v1, the paper) or the 3x3.
      zero_init_residual: start each residual branch's last BN scale at 0.
      drop_path_rate: stochastic depth (Huang et al. 2016), timm's name: in training, each
        residual branch is dropped per example with a probability rising linearly from 0
        (first block) to this (last), drawn from the 'dropout' rng; 0 (the paper): none.
      output_stride: 32, 16 or 8: the input pixels per output pixel at most; the last
        stages dilate their 3x3s instead of striding (DeepLab, torchvision's
        ``replace_stride_with_dilation``).
      in_chans: input channels (1 greyscale, 4 RGB-D, 13 multispectral); None: 1-4, taken
        from the input.
      bn_group_size: examples per BatchNorm group in training (0: the whole batch).
      bn_momentum, bn_epsilon: BatchNorm's.
      frozen_bn: BatchNorm fixed in training too (``layers.FrozenBatchNorm``, as detection
        fine-tunes); the same variables and evaluation function.
      features_only: return the stage outputs ``{'conv2': ..., 'conv5': ...}`` instead of
        logits; ``feature_info()`` gives their channels and strides.
      out_indices: with ``features_only``, the stages returned (0: conv2; -1 the last);
        later stages are not built.
      dtype: compute dtype (``jnp.bfloat16`` or ``'bfloat16'``); logits stay float32.
      param_dtype: the parameters' dtype (float32; ``'bfloat16'`` halves their memory).
        BatchNorm statistics stay float32.
      conv: the conv factory, ``conv(features, kernel_size, strides, dtype=, name=)``, with
        ``param_dtype=`` and ``dilation=`` where those are used.
      norm: the norm factory; None is the paper's BatchNorm. Any flax norm works (e.g.
        ``functools.partial(nn.GroupNorm, num_groups=8)``), given ``dtype``,
        ``param_dtype`` and ``use_running_average=not train`` where it takes them.
      max_pool: the stem's pool, ``max_pool(x, window, stride, padding)``.
      stage: runs a stage's blocks after the first,
        ``stage(parent, make_block, names, x, train)``: ``stages.scanned_stage`` (one
        ``lax.scan`` where a stage has ``DEEP_STAGE_BLOCKS`` or more, as ResNet-1202's) or
        ``stages.unrolled_stage``. In training with ``drop_path_rate`` the blocks differ
        and run in turn without it.

    Inputs are float NHWC images normalised as the weights expect (``models.preprocess``),
    at least ``min_input_size()`` pixels a side. Bad fields and inputs raise ``ValueError``
    saying what is allowed.
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
    drop_path_rate: float = 0.0
    output_stride: int = 32
    in_chans: int | None = None
    bn_group_size: int = 0
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    frozen_bn: bool = False
    features_only: bool = False
    out_indices: Sequence[int] | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv: ModuleDef = layers.conv
    norm: ModuleDef | None = None
    max_pool: Callable[..., jax.Array] = layers.max_pool
    stage: Callable[..., jax.Array] = scanned_stage

    def __post_init__(self):
        if isinstance(self.out_indices, list):  # hashable, as a module's fields must be
            object.__setattr__(self, 'out_indices', tuple(self.out_indices))
        check_fields(self)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array | dict[str, jax.Array]:
        dtype = canonical_dtype(self.dtype)
        param_dtype = canonical_dtype(self.param_dtype)
        x = self._check_input(x)
        conv = functools.partial(
            self.conv, dtype=dtype, **if_accepted(self.conv, param_dtype=param_dtype)
        )
        norm = self._norm(train, dtype, param_dtype)
        x = jnp.asarray(x, dtype)
        if self.stem == 'imagenet':  # conv1 and the max pool of Table 1
            x = conv(self.width, 7, 2, name='conv1')(x)
            x = nn.relu(norm(name='bn1')(x))
            x = self.max_pool(x, 3, 2, 1)
        else:  # the first 3x3 conv of sec. 4.2
            x = conv(self.width, 3, name='conv1')(x)
            x = nn.relu(norm(name='bn1')(x))

        block_cls = block_class(self.block_cls)
        extra = if_accepted(block_cls, stride_in_1x1=self.stride_in_1x1)
        rates = iter(self._drop_path_rates())
        wanted = self._out_stages()
        features = {}
        for i, (num_blocks, (strides, dilation, first)) in enumerate(
            zip(self.stage_sizes, self._stage_geometry())
        ):
            if i > max(wanted):
                break
            dilated = {'dilation': dilation, 'first_dilation': first} if dilation > 1 else {}
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
                **dilated,
            )
            names = block_names(i, num_blocks)
            stage_rates = [next(rates) for _ in names]
            # after the first block: stride 1, and the stage's dilation on every 3x3
            later = functools.partial(
                block, strides=1, **({'first_dilation': dilation} if dilated else {})
            )
            x = block(strides=strides, name=names[0], **self._drop(stage_rates[0], train))(x, train)
            if names[1:] and train and self.drop_path_rate:  # they differ: each its rate
                for name, rate in zip(names[1:], stage_rates[1:]):
                    x = later(name=name, drop_path=rate)(x, train)
            elif names[1:]:
                x = self.stage(self, later, names[1:], x, train)
            features[stage_name(i)] = x
        if self.features_only:
            return {k: v for i, (k, v) in enumerate(features.items()) if i in wanted}

        x = jnp.mean(x, axis=(1, 2))
        if not self.num_classes:
            return x.astype(jnp.float32)
        x = nn.Dense(self.num_classes, dtype=dtype, param_dtype=param_dtype, name='fc')(x)
        return x.astype(jnp.float32)

    @nn.nowrap
    def _stage_geometry(self) -> list[tuple[int, int, int]]:
        """Per stage: its first block's stride, its 3x3s' dilation and the first block's
        first 3x3's (torchvision's ``replace_stride_with_dilation``): a stage that would
        take the stride past ``output_stride`` dilates by its stride instead."""
        stride, dilation, out = (4 if self.stem == 'imagenet' else 1), 1, []
        for i in range(len(self.stage_sizes)):
            s, first = stage_strides(i), dilation
            if stride * s > self.output_stride:
                dilation, s = dilation * s, 1
            stride *= s
            out.append((s, dilation, first))
        return out

    @nn.nowrap
    def _drop_path_rates(self) -> list[float]:
        """Each block's drop probability: linear in its index over the net, 0 to the rate."""
        n = sum(self.stage_sizes)
        return [self.drop_path_rate * k / max(n - 1, 1) for k in range(n)]

    @nn.nowrap
    def _drop(self, rate: float, train: bool) -> dict[str, float]:
        return {'drop_path': rate} if train and self.drop_path_rate else {}

    @nn.nowrap
    def _out_stages(self) -> list[int]:
        count = len(self.stage_sizes)
        if not self.features_only or self.out_indices is None:
            return list(range(count))
        return sorted(i % count for i in self.out_indices)

    @nn.nowrap
    def min_input_size(self) -> int:
        """The smallest input side: every stage then sees at least one pixel."""
        return (4 if self.stem == 'imagenet' else 1) * 2 ** (len(self.stage_sizes) - 1)

    @property
    def num_features(self) -> int:
        """Channels of the pooled features the fc reads (``num_classes=0``'s output):
        2048 for ResNet-50, 512 for ResNet-18, 64 for the CIFAR nets (timm's name)."""
        expansion = self._expansion()
        return self.width * 2 ** (len(self.stage_sizes) - 1) * expansion

    @nn.nowrap
    def feature_info(self) -> dict[str, Feature]:
        """``features_only``'s outputs without running the net, e.g. for ResNet-50
        ``{'conv2': Feature(channels=256, stride=4), ...}`` (``out_indices``' only)."""
        expansion = self._expansion()
        stride = 4 if self.stem == 'imagenet' else 1
        info = {}
        for i, (strides, _, _) in enumerate(self._stage_geometry()):
            stride *= strides
            info[stage_name(i)] = Feature(self.width * 2**i * expansion, stride)
        return {k: v for i, (k, v) in enumerate(info.items()) if i in self._out_stages()}

    @nn.nowrap
    def _expansion(self) -> int:
        block_cls = block_class(self.block_cls)
        expansion = getattr(block_cls, 'expansion', None)
        if not isinstance(expansion, int):
            raise ValueError(
                f'block_cls {getattr(block_cls, "__name__", block_cls)}'
                ' has no integer `expansion` class attribute (output channels '
                'per filters), which feature_info and num_features need'
            )
        return expansion

    @nn.nowrap
    def _check_input(self, x: Any) -> jax.Array:
        if not hasattr(x, 'shape') or not hasattr(x, 'dtype'):
            x = jnp.asarray(x)  # a nested list
        shape = tuple(x.shape)
        if self.in_chans is not None:
            if len(shape) != 4 or shape[-1] != self.in_chans:
                raise ValueError(
                    f'ResNet (in_chans={self.in_chans}) expects NHWC images (batch, height, '
                    f'width, {self.in_chans}); got shape {shape}'
                )
        elif len(shape) != 4 or not _concrete(shape[-1]) or not 1 <= shape[-1] <= 4:
            hint = (
                ' (NCHW? use x.transpose(0, 2, 3, 1))'
                if len(shape) == 4 and _concrete(shape[1]) and 1 <= shape[1] <= 4
                else ''
            )
            raise ValueError(
                f'ResNet expects NHWC images (batch, height, width, channels) '
                f'with 1-4 channels (more: set in_chans); got shape {shape}{hint}'
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
    def _norm(self, train: bool, dtype, param_dtype) -> Callable[..., nn.Module]:
        if self.frozen_bn:
            return functools.partial(
                FrozenBatchNorm, epsilon=self.bn_epsilon, dtype=dtype, param_dtype=param_dtype
            )
        if self.norm is None:
            return functools.partial(
                BatchNorm,
                use_running_average=not train,
                group_size=self.bn_group_size,
                momentum=self.bn_momentum,
                epsilon=self.bn_epsilon,
                dtype=dtype,
                param_dtype=param_dtype,
            )
        kwargs = if_accepted(
            self.norm, dtype=dtype, param_dtype=param_dtype, use_running_average=not train
        )
        return functools.partial(self.norm, **kwargs)


def _concrete(dim: Any) -> bool:
    """Whether an array dimension is a number (not a symbolic size of ``jax.export``)."""
    return isinstance(dim, Integral)
