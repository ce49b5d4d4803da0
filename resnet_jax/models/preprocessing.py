"""The inputs the networks' weights expect, in ``jax.numpy`` (jittable): the arithmetic of
the input pipeline (``data.augment.standardize``, which reads these constants)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

STYLES = ('mean', 'torchvision', 'caffe')
IMAGENET_CHANNEL_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
TORCHVISION_STD = np.array([0.229, 0.224, 0.225], np.float32)
CAFFE_BGR_MEAN = np.array([103.939, 116.779, 123.68], np.float32)


def preprocess(images: jax.Array, style: str = 'torchvision', mean=None) -> jax.Array:
    """Images (NHWC or HWC; integers in 0..255 or floats in [0, 1]) as float32 inputs with
    their channel count kept.

    ``style``: 'torchvision' (torchvision, timm, transformers weights: minus ImageNet's
    channel mean, over its std), 'caffe' (Keras weights: BGR in 0..255 minus the BGR mean)
    or 'mean' (this library's runs: minus ``mean``, a mean image (H, W, C) or channel mean
    (C,) in [0, 1], e.g. ``data.Pipeline(...).mean``). Raises ValueError otherwise.
    Other channel counts than RGB's take the constants as ``convert.adapt_input_channels``
    takes the weights: one channel their average, more R, G, B, R, ... (no BGR swap)."""
    if style not in STYLES:
        raise ValueError(f'unknown preprocessing {style!r}; allowed: {", ".join(STYLES)}')
    images = jnp.asarray(images)
    if jnp.issubdtype(images.dtype, jnp.integer):
        x = images.astype(jnp.float32) * np.float32(1 / 255.0)
    elif jnp.issubdtype(images.dtype, jnp.floating):
        x = images.astype(jnp.float32)
    else:
        raise ValueError(
            f'preprocess takes integer (0..255) or float ([0, 1]) images; got {images.dtype}'
        )
    channels = x.shape[-1] if x.ndim else 0
    if style == 'torchvision':
        return (x - _per_channel(IMAGENET_CHANNEL_MEAN, channels)) / _per_channel(
            TORCHVISION_STD, channels
        )
    if style == 'caffe':
        if channels == 3:
            return x[..., ::-1] * np.float32(255.0) - CAFFE_BGR_MEAN
        return x * np.float32(255.0) - _per_channel(CAFFE_BGR_MEAN[::-1].copy(), channels)
    if mean is None:
        raise ValueError(
            "preprocess(style='mean') needs the mean: a mean image (H, W, 3) or "
            'channel mean (3,) in [0, 1]'
        )
    return x - jnp.asarray(mean, jnp.float32)


def _per_channel(constants: np.ndarray, channels: int) -> np.ndarray:
    """RGB ``constants`` for ``channels`` channels: as they are for 3, averaged for 1,
    repeated R, G, B, R, ... otherwise."""
    if channels == 3:
        return constants
    if channels == 1:
        return constants.mean(keepdims=True)
    return np.resize(constants, channels)
