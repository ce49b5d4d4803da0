"""tfds dataset builders shipped with the package (importing registers them)."""

from resnet_jax.datasets.digits import Digits

__all__ = ['Digits']
