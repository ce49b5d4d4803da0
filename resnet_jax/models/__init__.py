"""The paper's networks as pure ``flax.linen`` modules (``resnet``, ``blocks``, ``stages``,
``layers``),
by name (``registry``), their ``complexity``, the inputs weights expect (``preprocess``),
NNX (``nnx``), where their variables are in a tree (``variables``) and what a ``ResNet``
accepts (``checks``). Nothing here imports the rest of the package."""

from resnet_jax.models.blocks import (
    BasicBlock,
    BottleneckBlock,
    block_names,
    stage_name,
    stage_strides,
)
from resnet_jax.models.checks import DTYPES, canonical_dtype
from resnet_jax.models.layers import FrozenBatchNorm
from resnet_jax.models.preprocessing import preprocess
from resnet_jax.models.registry import (
    CIFAR_DEPTHS,
    TABLE1,
    cifar,
    create_model,
    list_models,
    parse_cifar_name,
)
from resnet_jax.models.resnet import Feature, ResNet
from resnet_jax.models.stages import DEEP_STAGE_BLOCKS, scan_groups, scanned_stage, unrolled_stage
from resnet_jax.models.variables import find_resnets, input_channels, locate_resnet

__all__ = [
    'CIFAR_DEPTHS',
    'DEEP_STAGE_BLOCKS',
    'DTYPES',
    'TABLE1',
    'BasicBlock',
    'BottleneckBlock',
    'Feature',
    'FrozenBatchNorm',
    'ResNet',
    'block_names',
    'canonical_dtype',
    'cifar',
    'create_model',
    'find_resnets',
    'input_channels',
    'list_models',
    'locate_resnet',
    'parse_cifar_name',
    'preprocess',
    'scan_groups',
    'scanned_stage',
    'stage_name',
    'stage_strides',
    'unrolled_stage',
]
