"""The building blocks shared by every network: conv, BatchNorm, the shortcuts and the stem's
max pool.

One conv factory (``conv``) and one BatchNorm (``BatchNorm``) serve every layer of every net,
so the paper's layer conventions live in one place (sec. 3.4):

* convolutions have no bias and He initialisation [He et al. 2015, "Delving deep"];
* padding is symmetric, ``(k - 1) // 2`` on each side, as in the paper's Caffe models,
  torchvision and Keras (flax's ``'SAME'`` pads asymmetrically for stride 2, which would
  make converted weights compute a different function);
* BatchNorm follows every conv, before the activation, with momentum 0.9 and epsilon 1e-5.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]

# He initialisation (fan_out, normal), the convention torchvision uses for ResNets.
he_normal = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def conv(features: int, kernel_size: int, strides: int = 1, *, dtype: Dtype = jnp.float32,
         name: str | None = None,
         conv_general_dilated: Callable[..., jax.Array] | None = None) -> nn.Conv:
    """A bias-free k x k convolution with symmetric padding and He initialisation.

    ``conv_general_dilated`` is the function ``flax.linen.Conv`` computes with (default
    ``jax.lax.conv_general_dilated``); another implementation of the same function can be
    handed in (see ``resnet_jax.backends``).
    """
    pad = (kernel_size - 1) // 2
    return nn.Conv(features, (kernel_size, kernel_size), strides=(strides, strides),
                   padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=he_normal,
                   dtype=dtype, param_dtype=jnp.float32, name=name,
                   conv_general_dilated=conv_general_dilated)


def max_pool(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
    """A ``window`` x ``window`` max pool of an NHWC batch with symmetric ``padding``
    (the stem's 3x3/2 pool of Table 1)."""
    pad = ((padding, padding), (padding, padding))
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pad)


class BatchNorm(nn.Module):
    """BatchNorm over groups of ``group_size`` examples ("ghost" batches), or the whole batch.

    The paper trained on 8 GPUs x 32 images with each GPU normalising its own 32 images
    (sec. 3.4); ``group_size=32`` reproduces that on any number of devices, because the
    groups are a function of the global batch only, not of how it is sharded. With
    ``group_size=0`` the statistics are taken over the whole (global) batch, which under
    ``jax.jit`` with a sharded batch is synchronised BatchNorm.

    The variables are named like ``flax.linen.BatchNorm``'s (``params/{scale,bias}``,
    ``batch_stats/{mean,var}``). The running statistics are the average of the groups'
    statistics, as averaging the per-GPU running averages of the original runs.
    Statistics are always computed in float32, whatever the compute dtype.
    """

    use_running_average: bool
    group_size: int = 0
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    scale_init: Initializer = nn.initializers.ones

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param('scale', self.scale_init, (features,), jnp.float32)
        bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
        ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)

        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
            mul = scale * jax.lax.rsqrt(var + self.epsilon)
            return (x * mul.astype(self.dtype) + (bias - mean * mul).astype(self.dtype))

        n = x.shape[0]
        if n == 0:
            raise ValueError('BatchNorm: an empty batch has no statistics to normalise with '
                             '(train=True); evaluate it with train=False')
        group = min(self.group_size, n) if self.group_size > 0 else n
        if n % group:
            raise ValueError(f'BatchNorm: a batch of {n} does not split into groups of '
                             f'{group} (bn_group_size); use a batch that is a multiple of it.')
        xg = x.reshape((n // group, group) + x.shape[1:]).astype(jnp.float32)
        axes = tuple(range(1, xg.ndim - 1))
        mean = jnp.mean(xg, axes, keepdims=True)
        # E[x^2] - E[x]^2 as flax.linen.BatchNorm (use_fast_variance): the two sums read
        # x once and need no full-size broadcast of the mean.
        var = jnp.maximum(jnp.mean(jnp.square(xg), axes, keepdims=True) - jnp.square(mean), 0.0)
        mul = scale * jax.lax.rsqrt(var + self.epsilon)
        y = xg * mul + (bias - mean * mul)
        if not self.is_initializing():
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1 - m) * mean.reshape(-1, features).mean(0)
            ra_var.value = m * ra_var.value + (1 - m) * var.reshape(-1, features).mean(0)
        return y.reshape(x.shape).astype(self.dtype)


class FrozenBatchNorm(nn.Module):
    """BatchNorm with its statistics and affine parameters fixed, in training too, as
    detection and segmentation code fine-tunes a backbone (Detectron's
    ``FrozenBatchNorm2d``): always the running statistics, no gradient to any of the four
    (``stop_gradient``), no update. The variables and the function are ``BatchNorm``'s
    in evaluation, so weights load and export unchanged. (The parameters stay in
    ``params``: with weight decay on every parameter an optimiser would still move them;
    the recipe decays only the kernels.)"""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    scale_init: Initializer = nn.initializers.ones
    use_running_average: bool = True  # accepted for a norm factory's callers; always True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param('scale', self.scale_init, (features,), jnp.float32)
        bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
        mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32).value
        var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32).value
        scale, bias, mean, var = (jax.lax.stop_gradient(v) for v in (scale, bias, mean, var))
        mul = scale * jax.lax.rsqrt(var + self.epsilon)
        return x * mul.astype(self.dtype) + (bias - mean * mul).astype(self.dtype)


SHORTCUT_OPTIONS = ('A', 'B', 'C')


def check_shortcut(option: str) -> None:
    if option not in SHORTCUT_OPTIONS:
        raise ValueError(f'unknown shortcut option {option!r}; allowed: A, B, C '
                         '(Table 3: A zero-pads, B projects where dimensions increase, '
                         'C projects everywhere).')


def projects(option: str, strides: int, in_features: int, features: int) -> bool:
    """Whether a shortcut is a projection (eq. 2) under ``option``: C always, B where the
    dimensions change (stride or width), A never."""
    return option == 'C' or (option == 'B' and (strides != 1 or in_features != features))


class Shortcut(nn.Module):
    """The identity / projection shortcut of eq. (1) and (2), by the options of Table 3.

    * A: identity; where dimensions increase, subsample with stride and zero-pad the new
      channels (no parameters).
    * B: a 1x1 projection + BN where dimensions increase, identity elsewhere.
    * C: a 1x1 projection + BN on every block.
    """

    features: int
    strides: int
    option: str
    norm: Callable[..., nn.Module]
    conv: Callable[..., nn.Module] = conv
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if projects(self.option, self.strides, x.shape[-1], self.features):
            x = self.conv(self.features, 1, self.strides, dtype=self.dtype, name='proj_conv')(x)
            return self.norm(name='proj_bn')(x)
        if self.strides != 1:  # a strided slice: the stride-2 conv's output size, also
            # on the symbolic sizes of jax.export (floor((h - 1) / s) + 1 both)
            x = jax.lax.slice(x, (0, 0, 0, 0), x.shape, (1, self.strides, self.strides, 1))
        extra = self.features - x.shape[-1]
        if extra > 0:
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
        return x.astype(self.dtype)
