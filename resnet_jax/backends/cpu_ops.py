"""The XLA:CPU plan's operations: the arguments, values and gradients of those they replace
(``tests/backends``), in the forms XLA:CPU runs fastest. Their gradients are
``jax.custom_vjp`` rules, so forward-mode AD raises a ``TypeError`` saying what to do."""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
from jax import lax

from resnet_jax.models.layers import NHWC, plain_nhwc

FORWARD_MODE_MESSAGE = (
    "forward-mode AD (jax.jvp, jax.jacfwd, jax.hessian) cannot go through resnet_jax's "
    'XLA:CPU execution plan, whose gradients are custom VJPs: use the model without the '
    "plan (models.create_model(...) as it is, or plans.get_plan('xla')), or "
    '--config.execution=xla'
)


def _reverse_mode_only(fn):
    """``fn`` with JAX's forward-mode error replaced by one that says what to do."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TypeError as e:
            if 'forward-mode' in str(e):
                raise TypeError(FORWARD_MODE_MESSAGE) from None
            raise

    return wrapper


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
    """``lax.conv_general_dilated``: ``pointwise_conv`` for 1x1 kernels, else ``canonical_conv``."""
    impl = pointwise_conv if rhs.shape[:2] == (1, 1) else canonical_conv
    return impl(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        precision,
    )


def pointwise_conv(
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
    """An NHWC/HWIO 1x1 convolution without padding, dilation or groups as a matrix product,
    which XLA:CPU runs faster forward and backward (``experiments/results/performance.md``);
    anything else goes to ``lax.conv_general_dilated``."""
    simple = (
        rhs.shape[:2] == (1, 1)
        and plain_nhwc(lhs, rhs, padding, lhs_dilation, dimension_numbers, feature_group_count)
        and all(p == 0 for pair in padding for p in pair)
        and all(d in (None, 1) for d in rhs_dilation or ())
    )
    if not simple:
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
    sh, sw = window_strides
    x = lhs[:, ::sh, ::sw, :] if (sh, sw) != (1, 1) else lhs
    return _reverse_mode_only(_pixels_dot)(x, rhs[0, 0], precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pixels_dot(x, w, precision):
    """[N, H, W, C] x [C, O] -> [N, H, W, O]."""
    return lax.dot_general(x, w, (((3,), (0,)), ((), ())), precision=precision)


def _pixels_dot_fwd(x, w, precision):
    return _pixels_dot(x, w, precision), (x, w)


def _pixels_dot_bwd(precision, residuals, g):
    x, w = residuals
    dx = lax.dot_general(g, w, (((3,), (1,)), ((), ())), precision=precision)
    # XLA:CPU copies the first operand transposed: the one with fewer channels goes first.
    pixels = ((0, 1, 2), (0, 1, 2))
    if x.shape[-1] <= g.shape[-1]:
        dw = lax.dot_general(x, g, (pixels, ((), ())), precision=precision)
    else:
        dw = lax.dot_general(g, x, (pixels, ((), ())), precision=precision).T
    return dx.astype(x.dtype), dw.astype(w.dtype)


_pixels_dot.defvjp(_pixels_dot_fwd, _pixels_dot_bwd)


def _window_slices(xp, window, stride, out_h, out_w):
    n, _, _, c = xp.shape
    for i in range(window):
        for j in range(window):
            yield (
                (i, j),
                lax.slice(
                    xp,
                    (0, i, j, 0),
                    (n, i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1, c),
                    (1, stride, stride, 1),
                ),
            )


def sliced_max_pool(x, window: int, stride: int, padding: int):
    """``layers.max_pool`` as the maximum of the window's strided slices, the gradient to
    each window's first maximum (as XLA's select-and-scatter); XLA:CPU runs it faster,
    forward and backward, than its reduce-window for the 3x3/2 stem pool."""
    return _reverse_mode_only(_sliced_max_pool)(x, window, stride, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _sliced_max_pool(x, window, stride, padding):
    return _sliced_max_pool_fwd(x, window, stride, padding)[0]


def _sliced_max_pool_fwd(x, window, stride, padding):
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    xp = jnp.pad(x, pad, constant_values=-jnp.inf)
    out_h = (xp.shape[1] - window) // stride + 1
    out_w = (xp.shape[2] - window) // stride + 1
    y = functools.reduce(
        jnp.maximum, (s for _, s in _window_slices(xp, window, stride, out_h, out_w))
    )
    return y, (xp, y)


def _sliced_max_pool_bwd(window, stride, padding, residuals, g):
    xp, y = residuals
    out_h, out_w = y.shape[1:3]
    taken = jnp.zeros(y.shape, bool)
    dxp = jnp.zeros(xp.shape, g.dtype)
    for (i, j), s in _window_slices(xp, window, stride, out_h, out_w):
        first = (s == y) & ~taken  # the window's first maximum, in row-major order
        taken = taken | first
        share = jnp.where(first, g, 0)
        dxp = dxp + lax.pad(
            share,
            jnp.zeros((), g.dtype),
            (
                (0, 0, 0),
                (i, xp.shape[1] - i - stride * (out_h - 1) - 1, stride - 1),
                (j, xp.shape[2] - j - stride * (out_w - 1) - 1, stride - 1),
                (0, 0, 0),
            ),
        )
    h, w = xp.shape[1] - 2 * padding, xp.shape[2] - 2 * padding
    return (dxp[:, padding : padding + h, padding : padding + w, :],)


_sliced_max_pool.defvjp(_sliced_max_pool_fwd, _sliced_max_pool_bwd)


def canonical_conv(
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
    """``lax.conv_general_dilated`` whose gradients are NHWC x HWIO convolutions, as the
    model's own (``models.layers.conv_general_dilated``), with the weight gradient summed
    over chunks of examples: at the train loop's batch sizes XLA:CPU steps faster so
    (ResNet-1202 at batch 128: 20.4-22.6 s against 24.4-26.6 s, ``experiments/results/
    performance.md``). Handles NHWC/HWIO with explicit padding, no dilation and one
    group; anything else goes to ``lax.conv_general_dilated``.
    """
    simple = (
        plain_nhwc(lhs, rhs, padding, lhs_dilation, dimension_numbers, feature_group_count)
        and all(d in (None, 1) for d in rhs_dilation or ())
        and len(set(window_strides)) == 1
    )
    if not simple:
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
    return _reverse_mode_only(_conv_nhwc)(
        lhs, rhs, window_strides[0], tuple(map(tuple, padding)), precision
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_nhwc(x, w, stride, padding, precision):
    return lax.conv_general_dilated(
        x, w, (stride, stride), padding, dimension_numbers=NHWC, precision=precision
    )


def _conv_nhwc_fwd(x, w, stride, padding, precision):
    return _conv_nhwc(x, w, stride, padding, precision), (x, w)


def _conv_nhwc_bwd(stride, padding, precision, residuals, g):
    x, w = residuals
    kh, kw = w.shape[:2]
    (top, bottom), (left, right) = padding
    height, width = x.shape[1:3]
    # Input gradient: rows the forward's stride skipped at the end get zero gradient.
    skip_h = (height + top + bottom - kh) % stride
    skip_w = (width + left + right - kw) % stride
    flipped = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    dx = lax.conv_general_dilated(
        g,
        flipped,
        (1, 1),
        ((kh - 1 - top, kh - 1 - bottom + skip_h), (kw - 1 - left, kw - 1 - right + skip_w)),
        lhs_dilation=(stride, stride),
        dimension_numbers=NHWC,
        precision=precision,
    )
    dw = weight_grad(x, g, (kh, kw), stride, padding, precision, weight_grad_chunk(x.shape))
    return dx.astype(x.dtype), dw.transpose(1, 2, 0, 3).astype(w.dtype)


def weight_grad(x, g, kernel_size, stride, padding, precision, chunk):
    """``canonical_conv``'s weight gradient [C_in, kh, kw, C_out]: [C_in, H, W, N] (*)
    [out_h, out_w, N, C_out], summed over chunks of ``chunk`` examples."""
    (kh, kw), ((top, _), (left, _)) = kernel_size, padding
    height, width = x.shape[1:3]
    out_h, out_w = g.shape[1:3]

    def one(x, g):
        return lax.conv_general_dilated(
            x.transpose(3, 1, 2, 0),
            g.transpose(1, 2, 0, 3),
            (1, 1),
            (
                (top, kh + (out_h - 1) * stride - height - top),
                (left, kw + (out_w - 1) * stride - width - left),
            ),
            rhs_dilation=(stride, stride),
            dimension_numbers=NHWC,
            precision=precision,
        )

    return functools.reduce(
        operator.add, (one(x[i : i + chunk], g[i : i + chunk]) for i in range(0, x.shape[0], chunk))
    )


_conv_nhwc.defvjp(_conv_nhwc_fwd, _conv_nhwc_bwd)


# At most _MAX_CHUNKS weight-gradient chunks: the program grows with their number.
_CHUNK_EXAMPLES = 16
_MAX_CHUNKS = 16


def weight_grad_chunk(input_shape: tuple[int, ...]) -> int:
    """Examples per chunk of ``canonical_conv``'s weight gradient for an NHWC input: XLA:CPU
    ran it fastest 16 at a time (``experiments/results/performance.md``)."""
    n = input_shape[0]
    return min(n, max(_CHUNK_EXAMPLES, -(-n // _MAX_CHUNKS)))
