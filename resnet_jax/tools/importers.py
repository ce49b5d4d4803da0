"""torchvision / timm, Hugging Face transformers and Keras ResNet weights in, as
``(model, variables)`` of this library, each checked name by name against the model."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from resnet_jax import models, paths
from resnet_jax.tools.layer_names import (
    check_name,
    check_shapes,
    describe,
    named_layers,
    net_name,
    set_leaf,
    table1,
)
from resnet_jax.tools.weight_files import is_transformers_style, read_state_dict


def _take_torch_layout(
    state_dict: Mapping[str, np.ndarray], model: models.ResNet, style: str, source: str
) -> dict:
    """``{'params', 'batch_stats'}`` of ``model`` from a state dict of torch modules
    (``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.Linear``) named as ``style``; ValueError
    naming the first key that is missing or left over."""
    params, stats, used = {}, {}, set()
    name = net_name(model.block_cls, model.stage_sizes)

    def take(key: str, ndim: int = 1) -> np.ndarray:
        if key not in state_dict:
            raise ValueError(f'{source}: missing {key} (needed by {name})')
        if state_dict[key].ndim != ndim:
            raise ValueError(
                f'{source}: {key} has shape {state_dict[key].shape}; a {ndim}-d tensor is expected'
            )
        used.add(key)
        return state_dict[key]

    for path, kind, layer in named_layers(model, style):
        if kind == 'conv':  # (out, in, h, w) -> (h, w, in, out)
            set_leaf(params, path, 'kernel', take(f'{layer}.weight', 4).transpose(2, 3, 1, 0))
        elif kind == 'bn':
            set_leaf(params, path, 'scale', take(f'{layer}.weight'))
            set_leaf(params, path, 'bias', take(f'{layer}.bias'))
            set_leaf(stats, path, 'mean', take(f'{layer}.running_mean'))
            set_leaf(stats, path, 'var', take(f'{layer}.running_var'))
        else:
            set_leaf(params, path, 'kernel', take(f'{layer}.weight', 2).T)
            set_leaf(params, path, 'bias', take(f'{layer}.bias'))
    extra = sorted(set(state_dict) - used)
    if extra:
        raise ValueError(f'{source}: {extra[0]} does not belong to {name}')
    return dict(check_shapes(model, {'params': params, 'batch_stats': stats}, source))


# --- torchvision and timm in ----------------------------------------------------------------


def _torchvision_layout(state_dict: Mapping) -> tuple[type, tuple[int, ...]] | None:
    """The blocks (basic or bottleneck) and blocks per layer a torchvision-named state
    dict holds, or None when its keys have no ``layer1..layerN`` blocks."""
    blocks: dict[int, int] = {}
    bottleneck = False
    for key in state_dict:
        match = re.match(r'layer(\d+)\.(\d+)\.', key)
        if match:
            layer, block = int(match.group(1)), int(match.group(2))
            blocks[layer] = max(blocks.get(layer, 0), block + 1)
            bottleneck |= key[match.end() :].startswith('conv3.')
    if not blocks or sorted(blocks) != list(range(1, len(blocks) + 1)):
        return None
    block_cls = models.BottleneckBlock if bottleneck else models.BasicBlock
    return block_cls, tuple(blocks[i] for i in sorted(blocks))


def _variant(state_dict: Mapping) -> list[str]:
    """What a torchvision-named state dict holds that the paper's nets do not (timm's
    variants): a deep stem, average-pool shortcuts, SE blocks, grouped or wider 3x3s."""
    keys = list(state_dict)
    found = []
    if 'conv1.0.weight' in state_dict:
        found.append("a deep stem (timm's resnet*c, *d, *s)")
    if any(re.match(r'layer\d+\.\d+\.downsample\.2\.', k) for k in keys):
        found.append("average-pool shortcuts (timm's resnet*d)")
    if any('.se.' in k for k in keys):
        found.append("squeeze-and-excitation blocks (timm's seresnet*)")
    mid = state_dict.get('layer1.0.conv2.weight')
    stem = state_dict.get('conv1.weight')
    if mid is not None and len(np.shape(mid)) == 4:
        out, per_group = np.shape(mid)[:2]
        if per_group < out:
            found.append(f'grouped 3x3 convs ({out // per_group} groups: ResNeXt)')
        elif stem is not None and out != np.shape(stem)[0]:
            width = np.shape(stem)[0]
            found.append(f'wider blocks ({out} channels in layer1, not {width}: wide_resnet*)')
    return found


def from_torchvision_state(
    state_dict: Mapping[str, np.ndarray], name: str | None, source: str
) -> tuple[models.ResNet, dict]:
    """``from_torchvision`` of a state dict already read (``read_state_dict``)."""
    if name is not None:
        check_name(name)
    if is_transformers_style(state_dict):
        raise ValueError(
            f'{source}: its keys are Hugging Face transformers names '
            '(embedder.embedder.convolution...); convert it with '
            'from_transformers and its config'
        )
    variant = _variant(state_dict)
    if variant:
        raise ValueError(
            f'{source}: a ResNet variant resnet_jax does not build: {", ".join(variant)}; '
            "it reads torchvision's and timm's resnet18 .. resnet152"
        )
    layout = _torchvision_layout(state_dict)
    inferred = net_name(*layout) if layout else None
    if name is None and inferred is None:
        found = (
            f'it holds {describe(*layout)}'
            if layout
            else f'its keys have no layer1.0.* blocks (they start {sorted(state_dict)[:3]})'
        )
        raise ValueError(
            f'{source}: not a torchvision/timm ResNet of Table 1 ({found}; Table 1: {table1()})'
        )
    if name is not None and inferred is not None and inferred != name:
        raise ValueError(f'{source} holds a {inferred} ({describe(*layout)}), not a {name}')
    name = name or inferred
    fc = state_dict.get('fc.weight')
    model = models.create_model(
        name, num_classes=0 if fc is None else int(fc.shape[0]), shortcut='B', stride_in_1x1=False
    )
    return model, _take_torch_layout(state_dict, model, 'torchvision', source)


def from_torchvision(source, name: str | None = None) -> tuple[models.ResNet, dict]:
    """A torchvision (or timm) ResNet's weights as ``(model, variables)``: v1.5, option B,
    ``num_classes`` from the fc layer (no fc: a headless model, ``num_classes=0``).

    ``source``: a state dict (names to torch tensors or arrays of any float dtype, cast to
    float32), a torch module (its ``state_dict()``), or a file: ``.safetensors`` (read
    without torch), ``.pth`` / ``.pt`` / ``.bin`` (``torch.load(weights_only=True)``).
    ``name`` (``'resnet50'``): default inferred from the keys (blocks per layer, basic or
    bottleneck); when given, checked against them. Keys all starting with ``module.``
    (DDP), ``_orig_mod.`` (``torch.compile``) or ``model.`` are read without the prefix,
    with a warning. timm's ``resnet18 .. resnet152`` use the same names."""
    state_dict, what = read_state_dict(source)
    return from_torchvision_state(state_dict, name, what)


# --- transformers in ------------------------------------------------------------------------

# ResNetConfig's defaults (transformers/models/resnet/configuration_resnet.py): what a
# config.json or a dict that leaves a field out means (transformers 5's save_pretrained
# writes every one; a config written by an older release or by hand may not).
_TRANSFORMERS_DEFAULTS = {
    'model_type': 'resnet',
    'num_channels': 3,
    'embedding_size': 64,
    'hidden_sizes': [256, 512, 1024, 2048],
    'depths': [3, 4, 6, 3],
    'layer_type': 'bottleneck',
    'hidden_act': 'relu',
    'downsample_in_first_stage': False,
    'downsample_in_bottleneck': False,
}
_TRANSFORMERS_WEIGHTS = ('model.safetensors', 'pytorch_model.bin')  # save_pretrained's files


def _transformers_model(config, num_classes: int, source: str) -> models.ResNet:
    """The flax model of a transformers ``ResNetConfig`` (or its dict), or ValueError
    naming every field of it that is not one of the paper's ImageNet ResNets."""
    if hasattr(config, 'to_dict'):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(
            f'{source}: config must be a transformers ResNetConfig or its dict; '
            f'got {type(config).__name__}'
        )
    c = {
        **_TRANSFORMERS_DEFAULTS,
        **{k: v for k, v in config.items() if k in _TRANSFORMERS_DEFAULTS},
    }
    problems = []
    if c['model_type'] != 'resnet':
        problems.append(f"model_type={c['model_type']!r}: only transformers' ResNet")
    block_cls = {'basic': models.BasicBlock, 'bottleneck': models.BottleneckBlock}.get(
        c['layer_type']
    )
    name = net_name(block_cls, c['depths']) if block_cls else None
    if block_cls is None:
        problems.append(f"layer_type={c['layer_type']!r}: 'basic' or 'bottleneck'")
    elif name is None:
        problems.append(
            f'depths={list(c["depths"])} with {c["layer_type"]} layers is no '
            f'network of Table 1 ({table1()})'
        )
    if block_cls is not None:
        widths = [
            64 * 2**i * (4 if block_cls is models.BottleneckBlock else 1)
            for i in range(len(c['depths']))
        ]
        if list(c['hidden_sizes']) != widths:
            problems.append(
                f"hidden_sizes={list(c['hidden_sizes'])}: the paper's "
                f'{c["layer_type"]} nets have {widths}'
            )
    if c['embedding_size'] != 64:
        problems.append(f"embedding_size={c['embedding_size']}: the paper's stem has 64")
    if c['hidden_act'] != 'relu':
        problems.append(f"hidden_act={c['hidden_act']!r}: the paper's nets use 'relu'")
    if c['downsample_in_first_stage']:
        problems.append(
            "downsample_in_first_stage=True: the paper's conv2_x does not "
            'downsample after the max pool'
        )
    if c['num_channels'] != 3:
        problems.append(f'num_channels={c["num_channels"]}: RGB (3) only')
    if problems:
        raise ValueError(f"{source}: not one of the paper's ResNets: {'; '.join(problems)}")
    bottleneck = block_cls is models.BottleneckBlock
    return models.create_model(
        name,
        num_classes=num_classes,
        shortcut='B',
        stride_in_1x1=bool(c['downsample_in_bottleneck']) and bottleneck,
    )


def _transformers_source(source, config) -> tuple[Mapping, Any, str]:
    """``(state dict, config, description)`` of what ``from_transformers`` accepts."""
    if isinstance(source, (str, os.PathLike)):
        path = paths.resolve(source)
        if not path.exists():
            raise FileNotFoundError(f'{path} does not exist')
        if path.is_dir():
            found = [path / f for f in _TRANSFORMERS_WEIGHTS if (path / f).exists()]
            if not found:
                raise ValueError(
                    f'{path}: no {" or ".join(_TRANSFORMERS_WEIGHTS)} (the files '
                    'save_pretrained writes)'
                )
            weights, config_file = found[0], path / 'config.json'
        else:
            weights, config_file = path, path.parent / 'config.json'
        if config is None and config_file.exists():
            try:
                config = json.loads(config_file.read_text())
            except ValueError as e:
                raise ValueError(f'{config_file} cannot be read: {e}') from None
        if config is None:
            raise ValueError(
                f'{path}: no config.json beside the weights; pass config= (the '
                "model's ResNetConfig or its dict)"
            )
        state_dict, what = read_state_dict(weights)
        return state_dict, config, what
    if not isinstance(source, Mapping) and config is None:
        config = getattr(source, 'config', None)  # a ResNetModel / ...ForImageClassification
    if config is None:
        raise ValueError(
            "transformers state dict: pass config= (the model's ResNetConfig or "
            'its dict): the names do not tell where a bottleneck strides '
            '(downsample_in_bottleneck) nor anything else of the config'
        )
    state_dict, what = read_state_dict(source)
    return state_dict, config, f'transformers {what}'


def from_transformers(source, config=None) -> tuple[models.ResNet, dict]:
    """A Hugging Face transformers ResNet as ``(model, variables)``.

    ``source``: a ``ResNetForImageClassification`` (``resnet.*`` and ``classifier.1.*``;
    ``num_classes`` from the classifier) or a ``ResNetModel`` (no classifier: a headless
    model, ``num_classes=0``, returning the pooled features, ``pooler_output``); a folder
    as ``save_pretrained`` writes it (``config.json`` with ``model.safetensors``, read
    without torch, or ``pytorch_model.bin``); a weights file (with ``config=`` or a
    ``config.json`` beside it); or a state dict with ``config=`` (a ``ResNetConfig`` or its
    dict). The config decides the network: ``layer_type`` and ``depths`` one of Table 1's,
    ``downsample_in_bottleneck`` as ``stride_in_1x1`` (True: v1), the standard
    ``hidden_sizes`` and ``embedding_size``, ``hidden_act='relu'``; anything else (e.g.
    ``downsample_in_first_stage=True``) is refused naming the field."""
    state_dict, config, what = _transformers_source(source, config)
    if any(k.startswith('resnet.') for k in state_dict):  # ResNetForImageClassification
        state_dict = {k.removeprefix('resnet.'): v for k, v in state_dict.items()}
    fc = state_dict.get('classifier.1.weight')
    model = _transformers_model(config, 0 if fc is None else int(fc.shape[0]), what)
    return model, _take_torch_layout(state_dict, model, 'transformers', what)


# --- Keras ----------------------------------------------------------------------------------


def _keras_name(layer_names, name: str | None) -> str:
    """The Keras ResNet's name, inferred from its layers (``conv4_block23_1_conv``: 23
    blocks in conv4_x) and checked against ``name`` when given."""
    blocks: dict[int, int] = {}
    for layer in layer_names:
        match = re.fullmatch(r'conv(\d+)_block(\d+)_1_conv', layer)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            blocks[stage] = max(blocks.get(stage, 0), block)
    inferred = (
        net_name(models.BottleneckBlock, tuple(blocks[s] for s in sorted(blocks)))
        if blocks
        else None
    )
    if name is not None:
        if name not in ('resnet50', 'resnet101', 'resnet152'):
            raise ValueError(f'keras.applications has resnet50, resnet101, resnet152; got {name!r}')
        if inferred is not None and inferred != name:
            raise ValueError(f'Keras model: its layers are a {inferred}, not a {name}')
        return name
    if inferred is None:
        raise ValueError(
            'Keras model: not a keras.applications ResNet50/101/152 (its layers '
            f'have {blocks or "no"} convN_blockM_1_conv blocks per stage)'
        )
    return inferred


def from_keras(source, name: str | None = None) -> tuple[models.ResNet, dict]:
    """A ``keras.applications`` ResNet50/101/152 (a model or an .h5/.keras path) as
    ``(model, variables)``: v1, option B, conv biases folded into the BatchNorms, the
    model's BatchNorm epsilon (1.001e-5). ``name``: default inferred from the layers;
    when given, checked against them. ``include_top=False``: a headless model."""
    if isinstance(source, (str, os.PathLike)):
        import keras

        with paths.local_file(paths.resolve(source)) as local:
            source = keras.models.load_model(local, compile=False)
    layers_by_name = {layer.name: layer for layer in source.layers}
    weights = {
        lname: [np.asarray(w) for w in layer.get_weights()]
        for lname, layer in layers_by_name.items()
        if layer.get_weights()
    }
    name = _keras_name(layers_by_name, name)
    dense = weights.get('predictions')
    epsilon = float(getattr(layers_by_name.get('conv1_bn'), 'epsilon', 1.001e-5))
    model = models.create_model(
        name,
        num_classes=0 if dense is None else dense[0].shape[1],
        shortcut='B',
        stride_in_1x1=True,
        bn_epsilon=epsilon,
    )
    params, stats, used, bias = {}, {}, set(), {}

    def take(lname, count):
        if lname not in weights:
            raise ValueError(f'Keras model: missing layer {lname} (needed by {name})')
        if len(weights[lname]) != count:
            raise ValueError(
                f'Keras model: layer {lname} has {len(weights[lname])} weights, expected {count}'
            )
        used.add(lname)
        return [w.astype(np.float32) for w in weights[lname]]

    for path, kind, kname in named_layers(model, 'keras'):
        if kind == 'conv':
            kernel, b = take(kname, 2)
            set_leaf(params, path, 'kernel', kernel)
            bias[path[:-1] + (path[-1].replace('conv', 'bn'),)] = b
        elif kind == 'bn':
            gamma, beta, mean, var = take(kname, 4)
            conv_bias = bias.pop(path)
            set_leaf(params, path, 'scale', gamma)
            set_leaf(params, path, 'bias', beta)
            # BN(conv(x) + b) = BN'(conv(x)) with BN' the same but mean - b.
            set_leaf(stats, path, 'mean', mean - conv_bias)
            set_leaf(stats, path, 'var', var)
        else:
            kernel, b = take(kname, 2)
            set_leaf(params, path, 'kernel', kernel)
            set_leaf(params, path, 'bias', b)
    extra = sorted(set(weights) - used)
    if extra:
        raise ValueError(f'Keras model: layer {extra[0]} does not belong to {name}')
    variables = {'params': params, 'batch_stats': stats}
    return model, dict(check_shapes(model, variables, 'Keras model'))
