"""The building blocks shared by every network: conv, BatchNorm and the shortcuts.

One conv factory (`conv`) and one BatchNorm (`BatchNorm`) serve every layer of every net,
so the paper's layer conventions live in one place (sec. 3.4):

* convolutions have no bias and He initialisation [He et al. 2015, "Delving deep"];
* padding is symmetric, ``(k - 1) // 2`` on each side, as in the paper's Caffe models,
  torchvision and Keras (flax's ``'SAME'`` pads asymmetrically for stride 2, which would
  make converted weights compute a different function);
* BatchNorm follows every conv, before the activation, with momentum 0.9 and epsilon 1e-5.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any
Initializer = Callable[..., jax.Array]

# He initialisation (fan_out, normal), the convention torchvision uses for ResNets.
he_normal = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def conv(features: int, kernel_size: int, strides: int = 1, *, dtype: Dtype = jnp.float32,
         canonical_grads: bool = False, dot_1x1: bool = False,
         name: str | None = None) -> nn.Conv:
    """A bias-free k x k convolution with symmetric padding and He initialisation.

    ``canonical_grads=True`` computes the gradients with ``canonical_conv``, and
    ``dot_1x1=True`` a 1x1 convolution as a matrix product (``pointwise_conv``); both give
    the same values and take the same parameters.
    """
    pad = (kernel_size - 1) // 2
    if dot_1x1 and kernel_size == 1:
        impl = pointwise_conv
    else:
        impl = canonical_conv if canonical_grads else None
    return nn.Conv(features, (kernel_size, kernel_size), strides=(strides, strides),
                   padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=he_normal,
                   dtype=dtype, param_dtype=jnp.float32, name=name,
                   conv_general_dilated=impl)


_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _is_nhwc(lhs, rhs, dimension_numbers) -> bool:
    return (lhs.ndim == 4 and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))


def pointwise_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, precision=None):
    """A 1x1 ``lax.conv_general_dilated`` as a matrix product of the (strided) pixels.

    XLA:CPU runs a matrix product 1.5-3x faster than the same 1x1 convolution, forward and
    backward (ResNet-50's 1x1 shapes at batch 16: 31-160 vs 46-350 GFLOP/s); the
    gradients are matrix products too. Takes ``lax.conv_general_dilated``'s arguments and
    handles an NHWC/HWIO 1x1 kernel without padding, dilation or groups; anything else
    goes to ``lax.conv_general_dilated`` unchanged.
    """
    simple = (rhs.shape[:2] == (1, 1) and feature_group_count == 1
              and not isinstance(padding, str) and all(p == 0 for pair in padding for p in pair)
              and all(d in (None, 1) for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
              and _is_nhwc(lhs, rhs, dimension_numbers))
    if not simple:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, precision=precision)
    sh, sw = window_strides
    x = lhs[:, ::sh, ::sw, :] if (sh, sw) != (1, 1) else lhs
    return _pixels_dot(x, rhs[0, 0], precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pixels_dot(x, w, precision):
    """[N, H, W, C] x [C, O] -> [N, H, W, O]."""
    return lax.dot_general(x, w, (((3,), (0,)), ((), ())), precision=precision)


def _pixels_dot_fwd(x, w, precision):
    return _pixels_dot(x, w, precision), (x, w)


def _pixels_dot_bwd(precision, residuals, g):
    x, w = residuals
    dx = lax.dot_general(g, w, (((3,), (1,)), ((), ())), precision=precision)
    # The weight gradient contracts over every pixel; XLA:CPU copies the product's first
    # operand transposed to do that, so the one with fewer channels goes first (a
    # 256 -> 64 bottleneck reduction at 56x56, batch 16: 31 vs 55 ms).
    pixels = ((0, 1, 2), (0, 1, 2))
    if x.shape[-1] <= g.shape[-1]:
        dw = lax.dot_general(x, g, (pixels, ((), ())), precision=precision)
    else:
        dw = lax.dot_general(g, x, (pixels, ((), ())), precision=precision).T
    return dx.astype(x.dtype), dw.astype(w.dtype)


_pixels_dot.defvjp(_pixels_dot_fwd, _pixels_dot_bwd)


def max_pool(x: jax.Array, window: int, stride: int, padding: int,
             sliced: bool = False) -> jax.Array:
    """A ``window`` x ``window`` max pool of an NHWC batch with symmetric ``padding``.

    ``sliced=False`` is ``flax.linen.max_pool``. ``sliced=True`` computes the same
    values as the maximum of the window's strided slices, and the gradient as
    ``max_pool``'s (each output's gradient to the first maximum of its window) by
    padding the slices' shares back into place: XLA:CPU runs ResNet's 3x3/2 stem pool
    forward and backward ~4x faster that way than its select-and-scatter.
    """
    if not sliced:
        pad = ((padding, padding), (padding, padding))
        return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pad)
    return _sliced_max_pool(x, window, stride, padding)


def _window_slices(xp, window, stride, out_h, out_w):
    n, _, _, c = xp.shape
    for i in range(window):
        for j in range(window):
            yield (i, j), lax.slice(xp, (0, i, j, 0),
                                    (n, i + stride * (out_h - 1) + 1,
                                     j + stride * (out_w - 1) + 1, c), (1, stride, stride, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _sliced_max_pool(x, window, stride, padding):
    return _sliced_max_pool_fwd(x, window, stride, padding)[0]


def _sliced_max_pool_fwd(x, window, stride, padding):
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    xp = jnp.pad(x, pad, constant_values=-jnp.inf)
    out_h = (xp.shape[1] - window) // stride + 1
    out_w = (xp.shape[2] - window) // stride + 1
    y = functools.reduce(jnp.maximum, (s for _, s in _window_slices(
        xp, window, stride, out_h, out_w)))
    return y, (xp, y)


def _sliced_max_pool_bwd(window, stride, padding, residuals, g):
    xp, y = residuals
    out_h, out_w = y.shape[1:3]
    taken = jnp.zeros(y.shape, bool)
    dxp = jnp.zeros(xp.shape, g.dtype)
    for (i, j), s in _window_slices(xp, window, stride, out_h, out_w):
        first = (s == y) & ~taken  # the window's first maximum, in row-major order
        taken = taken | first
        share = jnp.where(first, g, jnp.zeros_like(g))
        dxp = dxp + lax.pad(share, jnp.zeros((), g.dtype), (
            (0, 0, 0), (i, xp.shape[1] - i - stride * (out_h - 1) - 1, stride - 1),
            (j, xp.shape[2] - j - stride * (out_w - 1) - 1, stride - 1), (0, 0, 0)))
    h, w = xp.shape[1] - 2 * padding, xp.shape[2] - 2 * padding
    return (dxp[:, padding:padding + h, padding:padding + w, :],)


_sliced_max_pool.defvjp(_sliced_max_pool_fwd, _sliced_max_pool_bwd)


def canonical_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, precision=None):
    """``lax.conv_general_dilated`` whose gradients are convolutions in the forward layout.

    JAX's own transpose rules give the input gradient an OI kernel layout and the weight
    gradient a (feature, spatial, batch) input layout. XLA:CPU rewrites such convolutions
    into its one fast form (NHWC x HWIO -> NHWC, plus transposes) in a program's main
    computation but not inside loops, where they fall back to a naive loop nest that is
    ~50x slower; the blocks of a stage run in a loop on CPU (``ResNet.scan_blocks``).
    This function writes both gradients in that form itself: the input gradient as the
    convolution of the dilated output gradient with the flipped, in/out-swapped kernel;
    the weight gradient as a convolution over the input's channels-as-batch with the
    output gradient as the (dilated) window, summed over chunks of the batch on the CPU
    (``weight_grad_chunk``). The values are those of JAX's rules (up to the order of the
    weight gradient's float32 sums).

    Takes ``lax.conv_general_dilated``'s arguments (``flax.linen.Conv`` passes them) and
    handles NHWC/HWIO with explicit padding, no dilation and one group, as ``conv``
    builds; anything else goes to ``lax.conv_general_dilated`` unchanged.
    """
    simple = (feature_group_count == 1 and not isinstance(padding, str)
              and all(d in (None, 1) for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
              and _is_nhwc(lhs, rhs, dimension_numbers) and len(set(window_strides)) == 1)
    if not simple:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, precision=precision)
    return _conv_nhwc(lhs, rhs, window_strides[0], tuple(map(tuple, padding)), precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_nhwc(x, w, stride, padding, precision):
    return lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=_NHWC,
                                    precision=precision)


def _conv_nhwc_fwd(x, w, stride, padding, precision):
    return _conv_nhwc(x, w, stride, padding, precision), (x, w)


def _conv_nhwc_bwd(stride, padding, precision, residuals, g):
    x, w = residuals
    kh, kw = w.shape[:2]
    (top, bottom), (left, right) = padding
    height, width = x.shape[1:3]
    out_h, out_w = g.shape[1:3]
    # Input gradient: rows the forward's stride skipped at the end get zero gradient.
    skip_h = (height + top + bottom - kh) % stride
    skip_w = (width + left + right - kw) % stride
    flipped = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    dx = lax.conv_general_dilated(
        g, flipped, (1, 1), ((kh - 1 - top, kh - 1 - bottom + skip_h),
                             (kw - 1 - left, kw - 1 - right + skip_w)),
        lhs_dilation=(stride, stride), dimension_numbers=_NHWC, precision=precision)
    # Weight gradient: [C_in, H, W, N] (*) [out_h, out_w, N, C_out] -> [C_in, kh, kw, C_out],
    # summed over chunks of the batch (see weight_grad_chunk).
    def weight_grad(x, g):
        return lax.conv_general_dilated(
            x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), (1, 1),
            ((top, kh + (out_h - 1) * stride - height - top),
             (left, kw + (out_w - 1) * stride - width - left)),
            rhs_dilation=(stride, stride), dimension_numbers=_NHWC, precision=precision)
    n, chunk = x.shape[0], weight_grad_chunk(x.shape)
    dw = functools.reduce(operator.add, (weight_grad(x[i:i + chunk], g[i:i + chunk])
                                         for i in range(0, n, chunk)))
    return dx.astype(x.dtype), dw.transpose(1, 2, 0, 3).astype(w.dtype)


# Weight-gradient chunks: this many examples each, and at most this many chunks per
# convolution (the program grows with their number).
_CHUNK_EXAMPLES = 16
_MAX_CHUNKS = 16


def weight_grad_chunk(input_shape: tuple[int, ...]) -> int:
    """Examples per chunk of ``canonical_conv``'s weight gradient for an NHWC input.

    The weight gradient of a k x k convolution is a convolution whose window is the whole
    output gradient and whose contracted features are the examples. XLA:CPU's (Eigen)
    kernel ran it fastest with 16 examples at a time: at batch 128, 1.4-1.7x faster on
    the CIFAR shapes as a sum over 8 chunks than in one piece, and at ImageNet's batch
    16 one piece was fastest (2-3x faster than one example at a time). Other backends:
    the whole batch in one piece.
    """
    n = input_shape[0]
    if jax.default_backend() != 'cpu':
        return n
    return min(n, max(_CHUNK_EXAMPLES, -(-n // _MAX_CHUNKS)))


_conv_nhwc.defvjp(_conv_nhwc_fwd, _conv_nhwc_bwd)


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


SHORTCUT_OPTIONS = ('A', 'B', 'C')


def check_shortcut(option: str) -> None:
    if option not in SHORTCUT_OPTIONS:
        raise ValueError(f'unknown shortcut option {option!r}; allowed: A, B, C '
                         '(Table 3: A zero-pads, B projects where dimensions increase, '
                         'C projects everywhere).')


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
    dtype: Dtype = jnp.float32
    canonical_grads: bool = False
    dot_1x1: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        changes = self.strides != 1 or x.shape[-1] != self.features
        if self.option == 'C' or (self.option == 'B' and changes):
            x = conv(self.features, 1, self.strides, dtype=self.dtype,
                     canonical_grads=self.canonical_grads, dot_1x1=self.dot_1x1,
                     name='proj_conv')(x)
            return self.norm(name='proj_bn')(x)
        if self.strides != 1:
            x = x[:, ::self.strides, ::self.strides, :]
        extra = self.features - x.shape[-1]
        if extra > 0:
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
        return x.astype(self.dtype)
