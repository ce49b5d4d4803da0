"""The blocks of Fig. 5 (``residual=False``: their plain counterparts), the default
``stage`` that applies a stage's blocks in turn, and the paper's names of stages and blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(self.filters, 3, self.strides, name='conv1')(x)
        y = nn.relu(self.norm(name='bn1')(y))
        y = self.conv(self.filters, 3, name='conv2')(y)
        y = self.norm(name='bn2', scale_init=_last_scale_init(self.zero_init_residual))(y)
        return _merge(self, x, y, self.filters)


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
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s1, s3 = (self.strides, 1) if self.stride_in_1x1 else (1, self.strides)
        y = self.conv(self.filters, 1, s1, name='conv1')(x)
        y = nn.relu(self.norm(name='bn1')(y))
        y = self.conv(self.filters, 3, s3, name='conv2')(y)
        y = nn.relu(self.norm(name='bn2')(y))
        y = self.conv(self.filters * 4, 1, name='conv3')(y)
        y = self.norm(name='bn3', scale_init=_last_scale_init(self.zero_init_residual))(y)
        return _merge(self, x, y, self.filters * 4)


def _last_scale_init(zero_init: bool):
    return nn.initializers.zeros if zero_init else nn.initializers.ones


def _merge(block, x: jax.Array, y: jax.Array, features: int) -> jax.Array:
    """The addition of eq. (1)/(2) followed by the ReLU; plain nets skip the addition."""
    if block.residual:
        y = y + Shortcut(
            features,
            block.strides,
            block.shortcut,
            block.norm,
            block.conv,
            dtype=block.dtype,
            name='shortcut',
        )(x)
    return nn.relu(y)


def unrolled_stage(
    parent: nn.Module, make_block: Callable[..., nn.Module], names: Sequence[str], x: jax.Array
) -> jax.Array:
    """Applies the identical blocks ``names`` of a stage in turn, each its own submodule of
    ``parent`` (the default ``ResNet.stage``). ``make_block(name=...)`` builds one."""
    del parent  # the blocks are created in the calling module's scope
    for name in names:
        x = make_block(name=name)(x)
    return x


def stage_name(stage: int) -> str:
    """The paper's name of a stage's output: conv2 (conv2_x of Table 1) for stage 0."""
    return f'conv{stage + 2}'


def stage_strides(stage: int) -> int:
    """The stride of a stage's first block: every stage but the first halves (Table 1)."""
    return 2 if stage > 0 else 1


def block_names(stage: int, num_blocks: int) -> list[str]:
    """The paper's names of a stage's blocks: conv2_1, conv2_2, ... for stage 0."""
    return [f'conv{stage + 2}_{j + 1}' for j in range(num_blocks)]
