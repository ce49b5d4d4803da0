"""Analysis of trained networks: the layer responses of Fig. 7."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from resnet_jax import models
from resnet_jax.models import layers


def _is_3x3_bn(path: tuple[str, ...], model: models.ResNet) -> bool:
    *parents, name = path
    if 'shortcut' in parents:
        return False  # the 1x1 projections
    if not parents:  # the stem: 3x3 in the CIFAR nets, 7x7 in the ImageNet ones
        return model.stem == 'cifar'
    if model.block_cls is models.BottleneckBlock:
        return name == 'bn2'  # 1x1, 3x3, 1x1
    return True


def layer_responses(model: models.ResNet, variables, images) -> np.ndarray:
    """The std of each 3x3 layer's response (after its BatchNorm, before the ReLU or the
    addition) over every element of ``images``, in eval mode, in layer order (Fig. 7)."""
    _, state = model.apply(
        variables,
        images,
        train=False,
        mutable=['intermediates'],
        capture_intermediates=lambda mdl, method: (
            isinstance(mdl, layers.BatchNorm) and method == '__call__'
        ),
    )
    responses = []

    def visit(tree, path):
        for key, value in tree.items():  # insertion order = execution order
            if key == '__call__':
                if _is_3x3_bn(path, model):
                    responses.append(float(np.std(np.asarray(value[0], np.float64))))
            else:
                visit(value, path + (key,))

    visit(jax.device_get(nn.unbox(state['intermediates'])), ())
    return np.asarray(responses)
