"""The inputs the networks' weights expect, from images, as a jittable function.

    x = preprocess(images_uint8, 'torchvision')   # torchvision / timm / transformers weights
    x = preprocess(images_uint8, 'caffe')         # Keras' (and the paper's Caffe) weights
    x = preprocess(images_uint8, 'mean', mean=m)  # this library's runs: minus the mean image

The same arithmetic as the input pipeline's (``resnet_jax.data.augment.standardize``,
which reads these constants), in ``jax.numpy``: it runs under ``jit``, ``vmap`` and inside
an exported program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

STYLES = ('mean', 'torchvision', 'caffe')
# ImageNet's RGB channel mean and std in [0, 1] (torchvision's normalisation).
IMAGENET_CHANNEL_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
TORCHVISION_STD = np.array([0.229, 0.224, 0.225], np.float32)
# ImageNet's BGR channel mean in 0..255 (Caffe's and Keras' "caffe" mode).
CAFFE_BGR_MEAN = np.array([103.939, 116.779, 123.68], np.float32)


def preprocess(images: jax.Array, style: str = 'torchvision', mean=None) -> jax.Array:
    """RGB images (NHWC or HWC) as float32 network inputs.

    ``images`` are integers in 0..255 (uint8, as decoded) or floats in [0, 1]. Styles:
    'torchvision' (minus ImageNet's channel mean, divided by its std), 'caffe' (BGR,
    0..255, minus ImageNet's BGR channel mean) and 'mean' (minus ``mean``, a per-pixel
    mean image (H, W, 3) or a per-channel mean (3,) in [0, 1]: the paper's, which this
    library's runs train with, the training set's mean: ``data.Pipeline(...).mean``).
    """
    if style not in STYLES:
        raise ValueError(f'unknown preprocessing {style!r}; allowed: {", ".join(STYLES)}')
    images = jnp.asarray(images)
    if jnp.issubdtype(images.dtype, jnp.integer):
        x = images.astype(jnp.float32) * np.float32(1 / 255.0)
    elif jnp.issubdtype(images.dtype, jnp.floating):
        x = images.astype(jnp.float32)
    else:
        raise ValueError(f'preprocess takes integer (0..255) or float ([0, 1]) images; got '
                         f'{images.dtype}')
    if style == 'torchvision':
        return (x - IMAGENET_CHANNEL_MEAN) / TORCHVISION_STD
    if style == 'caffe':
        return x[..., ::-1] * np.float32(255.0) - CAFFE_BGR_MEAN
    if mean is None:
        raise ValueError("preprocess(style='mean') needs the mean: a mean image (H, W, 3) or "
                         'channel mean (3,) in [0, 1]')
    return x - jnp.asarray(mean, jnp.float32)
