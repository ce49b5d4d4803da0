"""The paper's plain and residual networks as pure ``flax.linen`` modules.

* ``layers``: the conv, BatchNorm, shortcuts (options A/B/C) and max pool every net uses.
* ``resnet``: the blocks of Fig. 5, the stacks of Table 1 and sec. 4.2, and the one place
  that maps names to models (``create_model``, ``list_models``).
* ``complexity``: parameter and multiply-add counts (Table 1's "FLOPs"), from the model.

Nothing here imports the rest of the package: a research user who calls
``model.apply`` gets the paper's network, the same program on every backend.
"""

from resnet_jax.models.resnet import (CIFAR_DEPTHS, DTYPES, TABLE1, BasicBlock,
                                      BottleneckBlock, ResNet, block_names, canonical_dtype,
                                      cifar, create_model, list_models, parse_cifar_name,
                                      stage_strides, unrolled_stage)

__all__ = ['CIFAR_DEPTHS', 'DTYPES', 'TABLE1', 'BasicBlock', 'BottleneckBlock', 'ResNet',
           'block_names', 'canonical_dtype', 'cifar', 'create_model', 'list_models',
           'parse_cifar_name', 'stage_strides', 'unrolled_stage']
