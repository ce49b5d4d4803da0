"""Weights from torchvision, timm, Hugging Face transformers and Keras in; torchvision out.

    model, variables = convert.from_torchvision('r50.pth')           # or .safetensors, a dict
    model, variables = convert.from_transformers('microsoft-resnet-50/')  # save_pretrained's
    model, variables = convert.from_keras('r50.h5')
    model, variables, kind = convert.load_weights(anything)           # any of the above
    state_dict = convert.to_torchvision(variables, model, 'r50.safetensors')

torchvision's and timm's ``resnetN`` are v1.5 (the stride in the bottleneck's 3x3);
transformers' too unless its config says ``downsample_in_bottleneck``; Keras' are v1. The
shapes do not tell, so ``to_torchvision`` needs the model (or a workdir), not a name."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
from etils import epath

from resnet_jax import models, paths
from resnet_jax.tools.importers import (
    from_keras,
    from_torchvision,
    from_torchvision_state,
    from_transformers,
)
from resnet_jax.tools.layer_names import IMAGENET_DEPTHS, net_name, table1_name
from resnet_jax.tools.torchvision_export import (
    TORCHVISION_EPSILON,
    check_torchvision,
    to_torchvision,
    torchvision_differences,
)
from resnet_jax.tools.weight_files import (
    KERAS_SUFFIXES,
    TORCH_SUFFIXES,
    check_finite,
    detect_kind,
    is_transformers_style,
    read_state_dict,
)

__all__ = [
    'IMAGENET_DEPTHS',
    'KERAS_SUFFIXES',
    'PREPROCESSING',
    'SOURCES',
    'TORCHVISION_EPSILON',
    'TORCH_SUFFIXES',
    'check_torchvision',
    'from_keras',
    'from_torchvision',
    'from_transformers',
    'load_weights',
    'save_converted',
    'table1_name',
    'to_torchvision',
    'torchvision_differences',
]

# Each source and the input its weights were trained on (a workdir's dataset.preprocessing):
# timm's and transformers' take torchvision's (RGB / 255, ImageNet mean and std).
PREPROCESSING = {
    'torchvision': 'torchvision',
    'timm': 'torchvision',
    'transformers': 'torchvision',
    'keras': 'caffe',  # BGR, minus the per-channel ImageNet mean, 0..255
}
SOURCES = tuple(PREPROCESSING)


def load_weights(
    source,
    name: str | None = None,
    *,
    kind: str = 'auto',
    config=None,
    allow_nonfinite=False,
    in_chans: int | None = None,
) -> tuple[models.ResNet, dict, str]:
    """``(model, variables, kind)`` from any of the sources; ``kind``, a key of
    ``PREPROCESSING``, says which. ``kind='auto'`` tells it by the file, folder or object:
    .h5 / .keras or a Keras model: Keras; a folder with config.json, a transformers model or
    transformers' names: transformers (``config=`` or the config.json beside the file); a
    timm model: timm; else torchvision's names. ``name``: default inferred; given, checked.
    Weights holding NaN or Inf are refused naming the first such tensor unless
    ``allow_nonfinite``. ``in_chans``: a model for that many input channels, its first conv
    adapted from RGB (``adapt_input_channels``)."""
    model, variables, kind = _load_weights(source, name, kind, config)
    if not allow_nonfinite:
        check_finite(variables, str(source) if isinstance(source, (str, os.PathLike)) else kind)
    if in_chans is not None:
        bgr = PREPROCESSING[kind] == 'caffe'
        model, variables = adapt_input_channels(model, variables, in_chans, bgr=bgr)
    return model, variables, kind


def adapt_input_channels(
    model: models.ResNet, variables: dict, in_chans: int, bgr: bool = False
) -> tuple[models.ResNet, dict]:
    """``(model, variables)`` for ``in_chans`` input channels from RGB weights (``bgr``:
    Keras' BGR kernels, put in RGB order first), as timm's ``adapt_input_conv``: one
    channel takes the sum of conv1's kernels (before normalisation, a grey image gives
    what its RGB copy gave); other counts repeat R, G, B, R, ... scaled by 3 /
    ``in_chans``, for inputs ordered so (``models.preprocess`` keeps that order). Says so
    in a warning."""
    kernel = np.asarray(variables['params']['conv1']['kernel'])  # (h, w, in, out)
    if bgr and in_chans != 3:
        kernel = kernel[:, :, ::-1]
    if kernel.shape[2] != 3:
        raise ValueError(
            f'in_chans={in_chans}: adapts RGB weights; conv1 takes {kernel.shape[2]} channels'
        )
    model = model.clone(in_chans=in_chans)  # (checks in_chans)
    if in_chans == 3:
        return model, variables
    if in_chans == 1:
        adapted, how = kernel.sum(axis=2, keepdims=True), 'the sum of its RGB kernels'
    else:
        repeats = -(-in_chans // 3)
        adapted = np.tile(kernel, (1, 1, repeats, 1))[:, :, :in_chans] * (3 / in_chans)
        how = f'its RGB kernels repeated and scaled by 3/{in_chans}'
    warnings.warn(f'in_chans={in_chans}: conv1 adapted from RGB weights: {how}', stacklevel=2)
    params = dict(variables['params'])
    params['conv1'] = {**params['conv1'], 'kernel': adapted.astype(kernel.dtype)}
    return model, {**variables, 'params': params}


def _load_weights(source, name, kind, config) -> tuple[models.ResNet, dict, str]:
    if kind not in ('auto', *SOURCES):
        raise ValueError(f'unknown source {kind!r}; allowed: auto, {", ".join(SOURCES)}')
    detected = detect_kind(source) if kind == 'auto' else kind
    if detected == 'keras':
        return (*from_keras(source, name), 'keras')
    if detected != 'transformers':
        if isinstance(source, (str, os.PathLike)) and paths.resolve(source).is_dir():
            raise ValueError(
                f'{source} is a folder; --from={detected or kind} reads a weights file'
            )
        state_dict, what = read_state_dict(source)
        if kind == 'auto' and is_transformers_style(state_dict):
            detected, source = (
                'transformers',
                (source if isinstance(source, (str, os.PathLike)) else state_dict),
            )
        else:
            model, variables = from_torchvision_state(state_dict, name, what)
            return model, variables, detected or 'torchvision'
    model, variables = from_transformers(source, config=config)
    converted = net_name(model.block_cls, model.stage_sizes)
    if name is not None and name != converted:
        raise ValueError(f'the transformers model is a {converted}, not a {name}')
    return model, variables, 'transformers'


def save_converted(
    model: models.ResNet, variables: dict, name: str | None, source: str, output: str | os.PathLike
) -> epath.Path:
    """Writes ``output`` as a workdir that ``resnet-jax evaluate`` and ``init_from`` accept:
    an orbax checkpoint (step 0) and ``config.json`` with the model and preprocessing.
    ``name``: default the model's Table 1 name."""
    name = name or table1_name(model)
    if name != table1_name(model):
        raise ValueError(f'the model is a {table1_name(model)}, not a {name}')
    if source not in PREPROCESSING:
        raise ValueError(f'unknown source {source!r}; allowed: {", ".join(SOURCES)}')
    if not model.num_classes:
        raise ValueError(
            'a headless model (no classifier, num_classes=0) cannot be written '
            'as a workdir (evaluate and resnet_jax.load read its fc); convert it '
            'in Python: resnet_jax.convert.load_weights(path) returns its '
            '(model, variables, kind)'
        )
    from resnet_jax.config import base_config
    from resnet_jax.training import runs

    config = base_config()
    config.model.name = name
    config.model.shortcut = model.shortcut
    config.model.stride_in_1x1 = model.stride_in_1x1
    config.model.bn_epsilon = model.bn_epsilon
    config.dataset.name = 'imagenet2012'
    config.dataset.preprocessing = PREPROCESSING[source]
    config.batch_size, config.reference_batch_size = 256, 256
    output = runs.save_variables(output, variables, config, converted_from=source)
    (output / 'converted.json').write_text(
        json.dumps(
            {'source': source, 'model': name, 'preprocessing': PREPROCESSING[source]}, indent=2
        )
    )
    return output
