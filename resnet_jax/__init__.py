"""resnet_jax: the plain and residual networks of He et al. (2015) in JAX/Flax.

model = resnet_jax.create_model('resnet50')               # the paper's network
model, variables, config, step = resnet_jax.load(workdir)  # a trained run
inputs = resnet_jax.preprocess(images, workdir)             # as the run's input pipeline
variables = resnet_jax.transfer(fresh_variables, workdir).variables  # fine-tuning
"""

from resnet_jax import models
from resnet_jax.models import create_model, list_models
from resnet_jax.models.complexity import count_macs, count_params

__version__ = '0.1.0'


def load(workdir, step=None, config=None, weights='raw'):
    """``model, variables, config, step`` of a trained run's latest good (or given)
    checkpoint, its raw weights or (``weights='ema'``) their moving average; see
    ``resnet_jax.training.runs.load``."""
    from resnet_jax.training import runs  # orbax: imported when a run is loaded

    return runs.load(workdir, step, config, weights)


def preprocess(images, workdir, config=None):
    """``images`` as the run in ``workdir`` was trained on them (its preprocessing and the
    mean image it kept); see ``resnet_jax.training.runs.preprocess``."""
    from resnet_jax.training import runs

    return runs.preprocess(images, workdir, config)


def transfer(variables, pretrained, at=None, source_at=None):
    """``variables`` with a ResNet's leaves from ``pretrained`` (a workdir, converted
    weights, a variables tree; nested anywhere), and what was kept and left fresh; see
    ``resnet_jax.training.finetune.transfer``."""
    from resnet_jax.training import finetune

    return finetune.transfer(variables, pretrained, at, source_at)


def __getattr__(name):
    """``resnet_jax.convert``, the converters, imported when first used."""
    if name == 'convert':
        from resnet_jax.tools import convert

        return convert
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = [
    'models',
    'create_model',
    'list_models',
    'load',
    'preprocess',
    'transfer',
    'count_params',
    'count_macs',
    'convert',
    '__version__',
]
