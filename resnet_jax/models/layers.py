"""Conv, BatchNorm, shortcuts and max pool shared by every net (sec. 3.4's conventions).

Padding is symmetric, ``(k - 1) // 2`` a side, as in Caffe, torchvision and Keras: flax's
``'SAME'`` pads stride 2 asymmetrically, so converted weights would compute another function.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any
Initializer = Callable[..., jax.Array]

_he_normal_2d = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal', in_axis=0, out_axis=1)


def he_normal(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
    """torchvision's initialisation of ResNets (fan_out, normal) of a ``(kh, kw, in, out)``
    kernel, drawn as an ``(in, kh * kw * out)`` array (the same fans) and reshaped: the same
    values, as JAX's generators number the elements in row-major order. XLA:CPU compiles
    a 4-D draw in 2-6 s, a 2-D one in under 1 s: ``jax.jit(model.init)`` of ResNet-18 took
    7-9 s on 2 cores (31-37 s on one), now 4-5 s (8-10 s; results/init_draws.txt)."""
    *window, inputs, outputs = shape
    return _he_normal_2d(key, (inputs, math.prod(window) * outputs), dtype).reshape(shape)


NHWC = ('NHWC', 'HWIO', 'NHWC')


def plain_nhwc(lhs, rhs, padding, lhs_dilation, dimension_numbers, feature_group_count) -> bool:
    """Whether a convolution is NHWC x HWIO with explicit padding, no input dilation and
    one group: the form the model's and the CPU plan's own convolutions take."""
    return (
        feature_group_count == 1
        and not isinstance(padding, str)
        and all(d in (None, 1) for d in lhs_dilation or ())
        and lhs.ndim == 4
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
    )


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
):
    """``lax.conv_general_dilated`` whose backward pass XLA:CPU runs at full speed in a loop.

    JAX's derivatives of a convolution are convolutions with permuted dimension numbers,
    which XLA:CPU rewrites into its fast NHWC x HWIO form in a program's main computation
    but not inside a loop (jax#12868), as a deep stage's ``lax.scan`` is: ResNet-1202's
    training step ran 11x slower there (``experiments/results/performance.md``, "Deep
    stages"). On CPU the tangents here are convolutions of transposed operands, laid out so
    that JAX's transposes of them, the backward pass, are already NHWC x HWIO; elsewhere
    they are JAX's own. A custom JVP (not VJP), so forward-mode AD still works. NHWC/HWIO
    with explicit padding, no input dilation and one group; anything else is ``lax``'s.
    """
    if not plain_nhwc(lhs, rhs, padding, lhs_dilation, dimension_numbers, feature_group_count):
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation,
            rhs_dilation,
            dimension_numbers,
            feature_group_count,
            precision=precision,
        )
    geometry = tuple(window_strides), tuple(map(tuple, padding)), tuple(rhs_dilation or (1, 1))
    return _conv(lhs, rhs, geometry, precision)


def _lax_conv(x, w, geometry, precision, dimension_numbers):
    strides, padding, dilation = geometry
    return lax.conv_general_dilated(
        x,
        w,
        strides,
        padding,
        rhs_dilation=dilation,
        dimension_numbers=dimension_numbers,
        precision=precision,
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _conv(x, w, geometry, precision):
    return _lax_conv(x, w, geometry, precision, NHWC)


@_conv.defjvp
def _conv_jvp(geometry, precision, primals, tangents):
    def conv(x, w, dimension_numbers=NHWC):
        return _lax_conv(x, w, geometry, precision, dimension_numbers)

    def cpu(x, w, dx, dw):
        # d/dx: the kernel handed over as [kh, kw, out, in], so its transpose is HWIO.
        # d/dw: x as [C, H, W, N] and dw as [in, kh, kw, out], the result [oh, ow, N, out],
        # so that the weight gradient is an NHWC x HWIO convolution of x and the cotangent.
        by_x = conv(dx, w.transpose(0, 1, 3, 2), ('NHWC', 'HWOI', 'NHWC'))
        by_w = conv(x.transpose(3, 1, 2, 0), dw.transpose(2, 0, 1, 3), ('CHWN', 'IHWO', 'HWNC'))
        return by_x + by_w.transpose(2, 0, 1, 3)

    def default(x, w, dx, dw):
        return jax.jvp(conv, (x, w), (dx, dw))[1]

    x, w = primals
    tangent = lax.platform_dependent(x, w, *tangents, cpu=cpu, default=default)
    # (lax's primitive, not ``_conv``: remat policies such as the scanned stage's save
    # convolution outputs by primitive, and would recompute a custom call's)
    return conv(x, w), tangent


def conv(
    features: int,
    kernel_size: int,
    strides: int = 1,
    *,
    dilation: int = 1,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
    conv_general_dilated: Callable[..., jax.Array] = conv_general_dilated,
) -> nn.Conv:
    """A bias-free k x k convolution with symmetric padding and He initialisation;
    ``conv_general_dilated`` replaces the one above (``resnet_jax.backends``)."""
    pad = dilation * (kernel_size - 1) // 2
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=((pad, pad), (pad, pad)),
        kernel_dilation=(dilation, dilation),
        use_bias=False,
        kernel_init=he_normal,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
        conv_general_dilated=conv_general_dilated,
    )


def max_pool(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
    """A square max pool of an NHWC batch with symmetric ``padding``."""
    pad = ((padding, padding), (padding, padding))
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pad)


class BatchNorm(nn.Module):
    """BatchNorm over groups of ``group_size`` examples ("ghost" batches), or the whole batch.

    ``group_size=32`` is the paper's 8 GPUs x 32 images (sec. 3.4) on any devices: groups
    depend on the global batch only; 0 is synchronised BatchNorm under ``jit``. Variables
    are named as ``flax.linen.BatchNorm``'s; statistics are float32 whatever ``dtype``.
    """

    use_running_average: bool
    group_size: int = 0
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32  # of scale and bias (statistics: float32)
    scale_init: Initializer = nn.initializers.ones

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param('scale', self.scale_init, (features,), self.param_dtype)
        bias = self.param('bias', nn.initializers.zeros, (features,), self.param_dtype)
        ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)

        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
            mul = scale * jax.lax.rsqrt(var + self.epsilon)
            return x * mul.astype(self.dtype) + (bias - mean * mul).astype(self.dtype)

        n = x.shape[0]
        if n == 0:
            raise ValueError(
                'BatchNorm: an empty batch has no statistics to normalise with '
                '(train=True); evaluate it with train=False'
            )
        group = min(self.group_size, n) if self.group_size > 0 else n
        if n % group:
            raise ValueError(
                f'BatchNorm: a batch of {n} does not split into groups of '
                f'{group} (bn_group_size); use a batch that is a multiple of it.'
            )
        xg = x.reshape((n // group, group) + x.shape[1:]).astype(jnp.float32)
        axes = tuple(range(1, xg.ndim - 1))
        mean = jnp.mean(xg, axes, keepdims=True)
        # E[x^2] - E[x]^2 (flax's use_fast_variance): reads x once, broadcasts no mean.
        var = jnp.maximum(jnp.mean(jnp.square(xg), axes, keepdims=True) - jnp.square(mean), 0.0)
        mul = scale * jax.lax.rsqrt(var + self.epsilon)
        y = xg * mul + (bias - mean * mul)
        if not self.is_initializing():
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1 - m) * mean.reshape(-1, features).mean(0)
            ra_var.value = m * ra_var.value + (1 - m) * var.reshape(-1, features).mean(0)
        return y.reshape(x.shape).astype(self.dtype)


class FrozenBatchNorm(nn.Module):
    """BatchNorm fixed in training too, as detection code fine-tunes a backbone (Detectron's
    ``FrozenBatchNorm2d``): running statistics, no gradient, no update; ``BatchNorm``'s
    variables and evaluation function, so weights load and export unchanged."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scale_init: Initializer = nn.initializers.ones
    use_running_average: bool = True  # accepted for a norm factory's callers; always True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param('scale', self.scale_init, (features,), self.param_dtype)
        bias = self.param('bias', nn.initializers.zeros, (features,), self.param_dtype)
        mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32).value
        var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32).value
        scale, bias, mean, var = (jax.lax.stop_gradient(v) for v in (scale, bias, mean, var))
        mul = scale * jax.lax.rsqrt(var + self.epsilon)
        return x * mul.astype(self.dtype) + (bias - mean * mul).astype(self.dtype)


SHORTCUT_OPTIONS = ('A', 'B', 'C')


def check_shortcut(option: str) -> None:
    if option not in SHORTCUT_OPTIONS:
        raise ValueError(
            f'unknown shortcut option {option!r}; allowed: A, B, C '
            '(Table 3: A zero-pads, B projects where dimensions increase, '
            'C projects everywhere).'
        )


def projects(option: str, strides: int, in_features: int, features: int) -> bool:
    """Whether a shortcut projects (eq. 2): C always, B where dimensions change, A never."""
    return option == 'C' or (option == 'B' and (strides != 1 or in_features != features))


class Shortcut(nn.Module):
    """The shortcut of eq. (1)/(2) by Table 3's options: A identity, strided and zero-padded
    where dimensions increase; B a 1x1 projection + BN there; C one on every block."""

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
        if self.strides != 1:  # a slice keeps the conv's size on jax.export's symbolic shapes
            x = jax.lax.slice(x, (0, 0, 0, 0), x.shape, (1, self.strides, self.strides, 1))
        extra = self.features - x.shape[-1]
        if extra > 0:
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
        return x.astype(self.dtype)
