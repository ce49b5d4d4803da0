"""resnet_jax: the plain and residual networks of He et al. (2015) in JAX/Flax."""

from resnet_jax import models
from resnet_jax.complexity import count_macs, count_params
from resnet_jax.models import create_model, list_models

__version__ = '0.1.0'

__all__ = ['models', 'create_model', 'list_models', 'count_params', 'count_macs',
           '__version__']
