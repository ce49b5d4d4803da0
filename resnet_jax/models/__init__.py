"""The paper's plain and residual networks as pure ``flax.linen`` modules.

* ``layers``: the conv, BatchNorm, shortcuts (options A/B/C) and max pool every net uses.
* ``resnet``: the blocks of Fig. 5, the stacks of Table 1 and sec. 4.2, and the one place
  that maps names to models (``create_model``, ``list_models``).
* ``complexity``: parameter and multiply-add counts (Table 1's "FLOPs"), from the model.
* ``preprocessing``: the inputs converted and trained weights expect (``preprocess``).
* ``nnx``: the networks in Flax NNX code (``to_nnx``).

Nothing here imports the rest of the package: a research user who calls
``model.apply`` gets the paper's network, the same program on every backend.
"""

from resnet_jax.models.layers import FrozenBatchNorm
from resnet_jax.models.preprocessing import preprocess
from resnet_jax.models.resnet import (CIFAR_DEPTHS, DTYPES, TABLE1, BasicBlock,
                                      BottleneckBlock, Feature, ResNet, block_names,
                                      canonical_dtype, cifar, create_model, find_resnets,
                                      list_models, locate_resnet,
                                      parse_cifar_name, stage_name, stage_strides,
                                      unrolled_stage)

__all__ = ['CIFAR_DEPTHS', 'DTYPES', 'TABLE1', 'BasicBlock', 'BottleneckBlock', 'Feature',
           'FrozenBatchNorm', 'ResNet', 'block_names', 'canonical_dtype', 'cifar',
           'create_model', 'find_resnets', 'list_models', 'locate_resnet', 'parse_cifar_name',
           'preprocess', 'stage_name', 'stage_strides', 'unrolled_stage']
