"""Weights from torchvision and Keras in, torchvision out.

    model, variables = convert.from_torchvision(state_dict_or_pth, 'resnet50')
    model, variables = convert.from_keras(keras_model_or_h5, 'resnet50')
    state_dict = convert.to_torchvision(variables, 'resnet50')

    resnet-jax convert --from=torchvision --input=r50.pth --model=resnet50 \\
        --output=workdirs/r50_tv

Both directions go through one table of names (``_layer_names``): each conv / BN of the
flax model and its name in the other framework, so a name or shape that does not fit is
reported as the first mismatch. torchvision's nets are v1.5 (stride in the 3x3) with
option B; Keras' ``ResNet50/101/152`` are v1 (stride in the first 1x1), with conv biases,
which are folded into the BatchNorm that follows (``mean -= bias``) so the flax model,
which has none, computes the same function.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import models

# The input each source's weights were trained on (recorded with converted checkpoints).
PREPROCESSING = {
    'torchvision': 'torchvision',  # RGB / 255, minus ImageNet mean, divided by its std
    'keras': 'caffe',              # BGR, minus the per-channel ImageNet mean, 0..255
}
IMAGENET_DEPTHS = tuple(models.TABLE1)


def _check_name(name: str) -> None:
    if name not in IMAGENET_DEPTHS:
        raise ValueError(f'conversion supports {", ".join(IMAGENET_DEPTHS)}; got {name!r}')


def _layer_names(model: models.ResNet, style: str) -> Iterator[tuple[tuple[str, ...], str, str]]:
    """(flax module path, kind 'conv'|'bn'|'fc', the other framework's layer name)."""
    params = _expected_variables(model)['params']
    yield ('conv1',), 'conv', 'conv1' if style == 'torch' else 'conv1_conv'
    yield ('bn1',), 'bn', 'bn1' if style == 'torch' else 'conv1_bn'
    convs = 3 if model.block_cls is models.BottleneckBlock else 2
    for i, n in enumerate(model.stage_sizes):
        for j, block in enumerate(models.block_names(i, n)):
            prefix = f'layer{i + 1}.{j}' if style == 'torch' else f'conv{i + 2}_block{j + 1}'
            for k in range(1, convs + 1):
                if style == 'torch':
                    yield (block, f'conv{k}'), 'conv', f'{prefix}.conv{k}'
                    yield (block, f'bn{k}'), 'bn', f'{prefix}.bn{k}'
                else:
                    yield (block, f'conv{k}'), 'conv', f'{prefix}_{k}_conv'
                    yield (block, f'bn{k}'), 'bn', f'{prefix}_{k}_bn'
            if 'shortcut' in params[block]:  # a projection (option B: where dims increase)
                if style == 'torch':
                    yield (block, 'shortcut', 'proj_conv'), 'conv', f'{prefix}.downsample.0'
                    yield (block, 'shortcut', 'proj_bn'), 'bn', f'{prefix}.downsample.1'
                else:
                    yield (block, 'shortcut', 'proj_conv'), 'conv', f'{prefix}_0_conv'
                    yield (block, 'shortcut', 'proj_bn'), 'bn', f'{prefix}_0_bn'
    yield ('fc',), 'fc', 'fc' if style == 'torch' else 'predictions'


def _set(tree: dict, path: tuple[str, ...], key: str, value: np.ndarray) -> None:
    for p in path:
        tree = tree.setdefault(p, {})
    tree[key] = value


def _get(tree: Mapping, path: tuple[str, ...], key: str) -> np.ndarray:
    for p in path:
        tree = tree[p]
    return np.asarray(tree[key])


@functools.lru_cache(maxsize=16)
def _expected_variables(model: models.ResNet) -> Any:
    """The model's variables as shapes (no computation)."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))


def _check_shapes(model: models.ResNet, variables: dict, source: str) -> dict:
    """Raises ValueError naming the first variable whose shape does not fit ``model``."""
    expected = _expected_variables(model)
    flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    for path, value in jax.tree_util.tree_flatten_with_path(variables)[0]:
        name = '/'.join(str(getattr(p, 'key', p)) for p in path)
        if path not in flat_expected:
            raise ValueError(f'{source}: {name} is not a variable of the model')
        if tuple(value.shape) != tuple(flat_expected[path].shape):
            raise ValueError(f'{source}: {name} has shape {tuple(value.shape)}, the model '
                             f'expects {tuple(flat_expected[path].shape)}')
    missing = set(flat_expected) - {p for p, _ in jax.tree_util.tree_flatten_with_path(
        variables)[0]}
    if missing:
        first = sorted('/'.join(str(getattr(p, 'key', p)) for p in path) for path in missing)[0]
        raise ValueError(f'{source}: no value for the model variable {first}')
    return variables


# --- torchvision ---------------------------------------------------------------------------

def _to_numpy(value) -> np.ndarray:
    if hasattr(value, 'detach'):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _load_state_dict(source) -> Mapping[str, Any]:
    if isinstance(source, (str, os.PathLike)):
        try:
            import torch
        except ImportError:
            raise ImportError('reading a .pth file needs torch: pip install '
                              "'resnet_jax[interop]'") from None
        source = torch.load(source, map_location='cpu', weights_only=True)
        source = source.get('state_dict', source) if isinstance(source, dict) else source
    return source


def from_torchvision(state_dict, name: str) -> tuple[models.ResNet, dict]:
    """A torchvision ResNet's weights (a mapping of names to tensors/arrays, or a .pth path)
    as ``(model, variables)``: v1.5, option B, classes from the fc layer."""
    _check_name(name)
    state_dict = {k: v for k, v in _load_state_dict(state_dict).items()
                  if not k.endswith('num_batches_tracked')}
    if 'fc.weight' not in state_dict:
        raise ValueError(f'torchvision state dict: no fc.weight (keys start with '
                         f'{sorted(state_dict)[:3]})')
    model = models.create_model(name, num_classes=int(np.shape(state_dict['fc.weight'])[0]),
                                shortcut='B', stride_in_1x1=False)
    params, stats, used = {}, {}, set()

    def take(key):
        if key not in state_dict:
            raise ValueError(f'torchvision state dict: missing {key} (needed by {name})')
        used.add(key)
        return _to_numpy(state_dict[key]).astype(np.float32)

    for path, kind, tname in _layer_names(model, 'torch'):
        if kind == 'conv':
            _set(params, path, 'kernel', take(f'{tname}.weight').transpose(2, 3, 1, 0))
        elif kind == 'bn':
            _set(params, path, 'scale', take(f'{tname}.weight'))
            _set(params, path, 'bias', take(f'{tname}.bias'))
            _set(stats, path, 'mean', take(f'{tname}.running_mean'))
            _set(stats, path, 'var', take(f'{tname}.running_var'))
        else:
            _set(params, path, 'kernel', take('fc.weight').T)
            _set(params, path, 'bias', take('fc.bias'))
    extra = sorted(set(state_dict) - used)
    if extra:
        raise ValueError(f'torchvision state dict: {extra[0]} does not belong to {name}')
    variables = {'params': params, 'batch_stats': stats}
    return model, _check_shapes(model, variables, 'torchvision state dict')


def to_torchvision(variables: Mapping, name: str, num_classes: int | None = None) -> dict:
    """The reverse of ``from_torchvision``: a state dict torchvision's ``resnetN`` loads
    (torch tensors when torch is installed, numpy arrays otherwise)."""
    _check_name(name)
    params, stats = variables['params'], variables['batch_stats']
    num_classes = num_classes or int(np.shape(params['fc']['bias'])[0])
    model = models.create_model(name, num_classes=num_classes, stride_in_1x1=False)
    out: dict[str, np.ndarray] = {}
    for path, kind, tname in _layer_names(model, 'torch'):
        if kind == 'conv':
            out[f'{tname}.weight'] = _get(params, path, 'kernel').transpose(3, 2, 0, 1)
        elif kind == 'bn':
            out[f'{tname}.weight'] = _get(params, path, 'scale')
            out[f'{tname}.bias'] = _get(params, path, 'bias')
            out[f'{tname}.running_mean'] = _get(stats, path, 'mean')
            out[f'{tname}.running_var'] = _get(stats, path, 'var')
            out[f'{tname}.num_batches_tracked'] = np.array(0, np.int64)
        else:
            out['fc.weight'] = _get(params, path, 'kernel').T
            out['fc.bias'] = _get(params, path, 'bias')
    out = {k: np.array(v, order='C') for k, v in out.items()}
    try:
        import torch
    except ImportError:
        return out
    return {k: torch.from_numpy(v) for k, v in out.items()}


# --- Keras ----------------------------------------------------------------------------------

def from_keras(source, name: str) -> tuple[models.ResNet, dict]:
    """A ``keras.applications`` ResNet50/101/152 (a model or an .h5/.keras path) as
    ``(model, variables)``: v1, option B, conv biases folded into the BatchNorms."""
    if name not in ('resnet50', 'resnet101', 'resnet152'):
        raise ValueError(f'keras.applications has resnet50, resnet101, resnet152; got {name!r}')
    if isinstance(source, (str, os.PathLike)):
        import keras
        source = keras.models.load_model(source, compile=False)
    layers = {layer.name: layer for layer in source.layers}
    weights = {lname: [np.asarray(w) for w in layer.get_weights()]
               for lname, layer in layers.items() if layer.get_weights()}
    dense = weights.get('predictions')
    if dense is None:
        raise ValueError('Keras model: no "predictions" layer (build it with include_top=True)')
    epsilon = float(getattr(layers.get('conv1_bn'), 'epsilon', 1.001e-5))
    model = models.create_model(name, num_classes=dense[0].shape[1], shortcut='B',
                                stride_in_1x1=True, bn_epsilon=epsilon)
    params, stats, used, bias = {}, {}, set(), {}

    def take(lname, count):
        if lname not in weights:
            raise ValueError(f'Keras model: missing layer {lname} (needed by {name})')
        if len(weights[lname]) != count:
            raise ValueError(f'Keras model: layer {lname} has {len(weights[lname])} weights, '
                             f'expected {count}')
        used.add(lname)
        return [w.astype(np.float32) for w in weights[lname]]

    for path, kind, kname in _layer_names(model, 'keras'):
        if kind == 'conv':
            kernel, b = take(kname, 2)
            _set(params, path, 'kernel', kernel)
            bias[path[:-1] + (path[-1].replace('conv', 'bn'),)] = b
        elif kind == 'bn':
            gamma, beta, mean, var = take(kname, 4)
            conv_bias = bias.pop(path)
            _set(params, path, 'scale', gamma)
            _set(params, path, 'bias', beta)
            # BN(conv(x) + b) = BN'(conv(x)) with BN' the same but mean - b.
            _set(stats, path, 'mean', mean - conv_bias)
            _set(stats, path, 'var', var)
        else:
            kernel, b = take(kname, 2)
            _set(params, path, 'kernel', kernel)
            _set(params, path, 'bias', b)
    extra = sorted(set(weights) - used)
    if extra:
        raise ValueError(f'Keras model: layer {extra[0]} does not belong to {name}')
    variables = {'params': params, 'batch_stats': stats}
    return model, _check_shapes(model, variables, 'Keras model')


# --- the command line ---------------------------------------------------------------------

def save_converted(model: models.ResNet, variables: dict, name: str, source: str,
                   output: str | os.PathLike) -> pathlib.Path:
    """Writes ``output`` as a workdir that ``resnet-jax evaluate`` and ``init_from`` accept:
    an orbax checkpoint (step 0) and ``config.json`` with the model and preprocessing."""
    from resnet_jax.training import checkpoints as checkpointing
    from resnet_jax.config import base_config

    config = base_config()
    config.model.name = name
    config.model.shortcut = model.shortcut
    config.model.stride_in_1x1 = model.stride_in_1x1
    config.model.bn_epsilon = model.bn_epsilon
    config.dataset.name = 'imagenet2012'
    config.dataset.preprocessing = PREPROCESSING[source]
    config.batch_size, config.reference_batch_size = 256, 256
    output = pathlib.Path(checkpointing.save_variables(output, variables, config,
                                                       converted_from=source))
    (output / 'converted.json').write_text(json.dumps(
        {'source': source, 'model': name, 'preprocessing': PREPROCESSING[source]}, indent=2))
    return output
