"""resnet_jax: the plain and residual networks of He et al. (2015) in JAX/Flax.

    model = resnet_jax.create_model('resnet50')               # the paper's network
    model, variables, config, step = resnet_jax.load(workdir)  # a trained run
    model, variables, config, step = resnet_jax.load(workdir, weights='ema')  # its EMA
    variables = resnet_jax.transfer(fresh_variables, workdir).variables  # fine-tuning

The package, by role:

* ``resnet_jax.models``: the paper's networks (pure flax; nothing else of the package);
* ``resnet_jax.data``: datasets, the paper's augmentation, deterministic input pipelines;
* ``resnet_jax.training``: the recipe's train loop, steps, optimiser, checkpoints;
* ``resnet_jax.evaluation``: the paper's test protocols and layer responses;
* ``resnet_jax.backends``: how the networks run fastest on a backend (execution plans);
* ``resnet_jax.tools``: weights in from torchvision, timm, transformers and Keras and out
  to torchvision (``resnet_jax.convert``), the Table-1 summary, the benchmark;
* ``resnet_jax.config`` (every field of a run, validated), ``resnet_jax.paper`` (the
  paper's numbers), ``resnet_jax.parallel`` (meshes and processes), ``resnet_jax.cli``
  (the ``resnet-jax`` command).
"""

from resnet_jax import models
from resnet_jax.models import create_model, list_models
from resnet_jax.models.complexity import count_macs, count_params

__version__ = '0.1.0'


def load(workdir, step=None, config=None, weights='raw'):
    """``model, variables, config, step`` of a trained run's latest good (or given)
    checkpoint, its raw weights or (``weights='ema'``) their moving average; see
    ``resnet_jax.training.checkpoints.load``."""
    from resnet_jax.training import checkpoints  # orbax: imported when a run is loaded
    return checkpoints.load(workdir, step, config, weights)


def transfer(variables, pretrained, at=None, source_at=None):
    """``variables`` with a ResNet's leaves from ``pretrained`` (a workdir, converted
    weights, a variables tree; nested anywhere), and what was kept and left fresh; see
    ``resnet_jax.training.finetune.transfer``."""
    from resnet_jax.training import finetune
    return finetune.transfer(variables, pretrained, at, source_at)


def __getattr__(name):
    """``resnet_jax.convert`` (``from resnet_jax import convert``): the converters, imported
    when first used."""
    if name == 'convert':
        from resnet_jax.tools import convert
        return convert
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = ['models', 'create_model', 'list_models', 'load', 'transfer', 'count_params',
           'count_macs', 'convert', '__version__']
