"""The blocks of Fig. 5 (``residual=False``: their plain counterparts) and the paper's
names of stages and blocks.

The block protocol, which ``ResNet.block_cls`` of your own follows: a module with the fields
``filters``, ``strides``, ``conv``, ``norm``, ``residual``, ``shortcut``,
``zero_init_residual`` and ``dtype``, called ``block(x, train)``, with an integer
``expansion`` class attribute (output channels per ``filters``). The fields
``stride_in_1x1``, ``dilation``, ``first_dilation`` and ``drop_path`` are given where the
block declares them, and must be where the net needs them (``output_stride``,
``drop_path_rate``). ``norm(name=)`` builds a norm; with ``zero_init_residual`` the last of
a branch is ``norm(name=, scale_init=zeros)``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.models.layers import Shortcut

Dtype = Any
ModuleDef = Any


class BasicBlock(nn.Module):
    """Two 3x3 convs (Fig. 5 left). y = relu(F(x) + shortcut(x)), eq. (1)."""

    expansion: ClassVar[int] = 1  # output channels per ``filters``
    filters: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    residual: bool = True
    shortcut: str = 'B'
    zero_init_residual: bool = False
    dilation: int = 1  # of the 3x3 convs (``ResNet.output_stride``)
    first_dilation: int | None = None  # the first 3x3's where a stage starts dilating
    drop_path: float = 0.0  # probability of dropping the residual branch in training
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        first = self.first_dilation or self.dilation
        y = _conv(self, 3, self.strides, first, name='conv1')(x)
        y = nn.relu(self.norm(name='bn1')(y))
        y = _conv(self, 3, 1, self.dilation, name='conv2')(y)
        y = _last_norm(self, 'bn2')(y)
        return _merge(self, x, y, self.filters, train)


class BottleneckBlock(nn.Module):
    """1x1 (reduce), 3x3, 1x1 (expand x4) convs (Fig. 5 right); ``stride_in_1x1`` puts the
    stride on the first 1x1 (the paper's Caffe models, "v1"), else on the 3x3 ("v1.5")."""

    expansion: ClassVar[int] = 4
    filters: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    residual: bool = True
    shortcut: str = 'B'
    stride_in_1x1: bool = True
    zero_init_residual: bool = False
    dilation: int = 1
    first_dilation: int | None = None
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        s1, s3 = (self.strides, 1) if self.stride_in_1x1 else (1, self.strides)
        y = self.conv(self.filters, 1, s1, name='conv1')(x)
        y = nn.relu(self.norm(name='bn1')(y))
        y = _conv(self, 3, s3, self.first_dilation or self.dilation, name='conv2')(y)
        y = nn.relu(self.norm(name='bn2')(y))
        y = self.conv(self.filters * 4, 1, name='conv3')(y)
        y = _last_norm(self, 'bn3')(y)
        return _merge(self, x, y, self.filters * 4, train)


def _conv(block, kernel: int, strides: int, dilation: int, name: str) -> nn.Module:
    # (dilation only where there is one: a conv factory of your own need not take it)
    extra = {'dilation': dilation} if dilation != 1 else {}
    return block.conv(block.filters, kernel, strides, name=name, **extra)


def _last_norm(block, name: str) -> nn.Module:
    """A branch's last norm; zero-initialised scale with ``zero_init_residual`` (a norm of
    your own then takes ``scale_init``: ``ResNet`` checks)."""
    if block.zero_init_residual:
        return block.norm(name=name, scale_init=nn.initializers.zeros)
    return block.norm(name=name)


def drop_path(module: nn.Module, y: jax.Array, rate: float, train: bool) -> jax.Array:
    """Stochastic depth (Huang et al. 2016): in training, each example's ``y`` zeroed with
    probability ``rate`` and the rest scaled by 1 / (1 - rate); the 'dropout' rng stream."""
    if not train or not rate:
        return y
    keep = 1.0 - rate
    mask = jax.random.bernoulli(
        module.make_rng('dropout'), keep, (y.shape[0],) + (1,) * (y.ndim - 1)
    )
    return y * (mask / keep).astype(y.dtype)


def _merge(block, x: jax.Array, y: jax.Array, features: int, train: bool) -> jax.Array:
    """The addition of eq. (1)/(2) followed by the ReLU; plain nets skip the addition."""
    if block.residual:
        y = drop_path(block, y, block.drop_path, train) + Shortcut(
            features,
            block.strides,
            block.shortcut,
            block.norm,
            block.conv,
            dtype=block.dtype,
            name='shortcut',
        )(x)
    return nn.relu(y)


def stage_name(stage: int) -> str:
    """The paper's name of a stage's output: conv2 (conv2_x of Table 1) for stage 0."""
    return f'conv{stage + 2}'


def stage_strides(stage: int) -> int:
    """The stride of a stage's first block: every stage but the first halves (Table 1)."""
    return 2 if stage > 0 else 1


def block_names(stage: int, num_blocks: int) -> list[str]:
    """The paper's names of a stage's blocks: conv2_1, conv2_2, ... for stage 0."""
    return [f'conv{stage + 2}_{j + 1}' for j in range(num_blocks)]
