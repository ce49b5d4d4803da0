"""resnet_jax: the plain and residual networks of He et al. (2015) in JAX/Flax.

    model = resnet_jax.create_model('resnet50')               # the paper's network
    model, variables, config, step = resnet_jax.load(workdir)  # a trained run
    model, variables, config, step = resnet_jax.load(workdir, weights='ema')  # its EMA

``resnet_jax.models`` (the networks), ``resnet_jax.execution`` (how they run fastest on a
backend), ``resnet_jax.train`` (the paper's recipe), ``resnet_jax.evaluate`` (the test
protocols), ``resnet_jax.convert`` (torchvision and Keras weights).
"""

from resnet_jax import models
from resnet_jax.complexity import count_macs, count_params
from resnet_jax.models import create_model, list_models

__version__ = '0.1.0'


def load(workdir, step=None, config=None, weights='raw'):
    """``model, variables, config, step`` of a trained run's latest (or given) checkpoint,
    its raw weights or (``weights='ema'``) their moving average; see
    ``resnet_jax.checkpointing.load``."""
    from resnet_jax import checkpointing  # orbax: imported when a run is loaded
    return checkpointing.load(workdir, step, config, weights)


__all__ = ['models', 'create_model', 'list_models', 'load', 'count_params', 'count_macs',
           '__version__']
