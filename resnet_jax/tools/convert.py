"""Weights from torchvision, timm, Hugging Face transformers and Keras in; torchvision out.

    model, variables = convert.from_torchvision('r50.pth')           # or .safetensors, a dict
    model, variables = convert.from_transformers('microsoft-resnet-50/')  # save_pretrained's
    model, variables = convert.from_keras('r50.h5')
    model, variables, kind = convert.load_weights(anything)           # any of the above
    state_dict = convert.to_torchvision(variables, model, 'r50.safetensors')

    resnet-jax convert --input=r50.pth --output=workdirs/r50_tv      # --from=auto, the net inferred
    resnet-jax convert --to=torchvision --workdir=workdirs/r50 --output=r50.safetensors

Every direction and format goes through one table of names (``_NAMES``): each conv / BN /
fc of the flax model and its name in torchvision (and timm, which uses the same names),
Keras and transformers, so a name or shape that does not fit is reported as the first
mismatch. The networks differ where the names do not show it:

* torchvision's and timm's ``resnetN`` are v1.5 (the stride in the bottleneck's 3x3) with
  option B shortcuts and BatchNorm epsilon 1e-5;
* transformers' ``ResNet`` is v1.5 unless its config says ``downsample_in_bottleneck``
  (the stride in the first 1x1, v1); its config, not its names, tells;
* Keras' ``ResNet50/101/152`` are v1, with conv biases, which are folded into the
  BatchNorm that follows (``mean -= bias``) so the flax model, which has none, computes
  the same function, and BatchNorm epsilon 1.001e-5.

``to_torchvision`` therefore needs the model (or a workdir, whose ``config.json`` records
it), not only the variables: v1 and v1.5 have the same shapes, and it refuses, naming the
field, any model torchvision's resnets do not compute.

Weights are read as float32 whatever their dtype (bfloat16, float16); ``.safetensors``
files are read with the ``safetensors`` package alone (no torch), ``.pth`` / ``.pt`` /
``.bin`` files with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import models
from resnet_jax.models import layers

# Where weights come from, and the input each source's weights were trained on (recorded
# with converted checkpoints as ``dataset.preprocessing``). timm's and transformers'
# ImageNet ResNets take torchvision's input (RGB / 255, minus ImageNet's mean
# (0.485, 0.456, 0.406), divided by its std (0.229, 0.224, 0.225)).
PREPROCESSING = {
    'torchvision': 'torchvision',
    'timm': 'torchvision',
    'transformers': 'torchvision',
    'keras': 'caffe',  # BGR, minus the per-channel ImageNet mean, 0..255
}
SOURCES = tuple(PREPROCESSING)
IMAGENET_DEPTHS = tuple(models.TABLE1)
TORCH_SUFFIXES = ('.pth', '.pt', '.bin')
KERAS_SUFFIXES = ('.h5', '.keras')
TORCHVISION_EPSILON = 1e-5  # torch.nn.BatchNorm2d's default eps (torchvision, timm, transformers)

# --- the one name table ---------------------------------------------------------------------

# Each layer of the flax model and its name in each framework (the names torchvision's
# state dict, transformers' ``ResNetModel`` and Keras' layers use; timm's ResNets are named
# as torchvision's). The format fields: {layer} = stage + 1 (torchvision's layer1..layer4),
# {paper} = stage + 2 (the paper's conv2_x..conv5_x, as Keras), {stage} = stage
# (transformers' stages.0..3); {block} / {block1}: the block in its stage counted from 0 /
# 1; {k} / {k0}: the conv in its block counted from 1 / 0.
_STYLES = ('torchvision', 'keras', 'transformers')
_NAMES = {
    #               torchvision, timm                   Keras
    #               transformers (ResNetModel; ResNetForImageClassification: 'resnet.' + it)
    'conv1': ('conv1', 'conv1_conv',
              'embedder.embedder.convolution'),
    'bn1': ('bn1', 'conv1_bn',
            'embedder.embedder.normalization'),
    'conv': ('layer{layer}.{block}.conv{k}', 'conv{paper}_block{block1}_{k}_conv',
             'encoder.stages.{stage}.layers.{block}.layer.{k0}.convolution'),
    'bn': ('layer{layer}.{block}.bn{k}', 'conv{paper}_block{block1}_{k}_bn',
           'encoder.stages.{stage}.layers.{block}.layer.{k0}.normalization'),
    'proj_conv': ('layer{layer}.{block}.downsample.0', 'conv{paper}_block{block1}_0_conv',
                  'encoder.stages.{stage}.layers.{block}.shortcut.convolution'),
    'proj_bn': ('layer{layer}.{block}.downsample.1', 'conv{paper}_block{block1}_0_bn',
                'encoder.stages.{stage}.layers.{block}.shortcut.normalization'),
    'fc': ('fc', 'predictions',
           'classifier.1'),
}


def _layer_names(model: models.ResNet, style: str) -> Iterator[tuple[tuple[str, ...], str, str]]:
    """``(flax module path, kind 'conv'|'bn'|'fc', the layer's name in ``style``)`` for every
    layer of ``model`` with variables, in the order torchvision's state dict lists them.
    The projections are where ``model.shortcut`` puts them (option B: where the
    dimensions change), the fc only when ``model.num_classes`` is not 0."""
    column = _STYLES.index(style)

    def name(row: str, **numbers: int) -> str:
        return _NAMES[row][column].format(**numbers)

    yield ('conv1',), 'conv', name('conv1')
    yield ('bn1',), 'bn', name('bn1')
    bottleneck = model.block_cls is models.BottleneckBlock
    in_features = model.width
    for i, num_blocks in enumerate(model.stage_sizes):
        features = model.width * 2**i * (4 if bottleneck else 1)
        for j, block in enumerate(models.block_names(i, num_blocks)):
            numbers = {'layer': i + 1, 'paper': i + 2, 'stage': i, 'block': j, 'block1': j + 1}
            for k in range(1, 4 if bottleneck else 3):
                yield (block, f'conv{k}'), 'conv', name('conv', k=k, k0=k - 1, **numbers)
                yield (block, f'bn{k}'), 'bn', name('bn', k=k, k0=k - 1, **numbers)
            strides = models.stage_strides(i) if j == 0 else 1
            if model.residual and layers.projects(model.shortcut, strides, in_features,
                                                  features):
                yield (block, 'shortcut', 'proj_conv'), 'conv', name('proj_conv', **numbers)
                yield (block, 'shortcut', 'proj_bn'), 'bn', name('proj_bn', **numbers)
            in_features = features
    if model.num_classes:
        yield ('fc',), 'fc', name('fc')


def _net_name(block_cls, stage_sizes) -> str | None:
    """The name of Table 1's network with these blocks, or None."""
    for name, (block, sizes) in models.TABLE1.items():
        if block is block_cls and tuple(sizes) == tuple(stage_sizes):
            return name
    return None


def table1_name(model: models.ResNet) -> str | None:
    """The Table 1 name (``'resnet50'``) of a residual ImageNet model's blocks, or None."""
    if not model.residual or model.stem != 'imagenet' or model.width != 64:
        return None
    return _net_name(model.block_cls, model.stage_sizes)


def _table1() -> str:
    return '; '.join(f'{name}: {_describe(block, sizes)}'
                     for name, (block, sizes) in models.TABLE1.items())


def _block_kind(block_cls) -> str:
    return {models.BasicBlock: 'basic', models.BottleneckBlock: 'bottleneck'}.get(
        block_cls, getattr(block_cls, '__name__', repr(block_cls)))


def _describe(block_cls, stage_sizes) -> str:
    return f'{_block_kind(block_cls)} blocks {tuple(stage_sizes)}'


def _check_name(name: str) -> None:
    if name not in IMAGENET_DEPTHS:
        raise ValueError(f'conversion supports {", ".join(IMAGENET_DEPTHS)}; got {name!r}')


def _set(tree: dict, path: tuple[str, ...], key: str, value: np.ndarray) -> None:
    for p in path:
        tree = tree.setdefault(p, {})
    tree[key] = value


def _get(tree: Mapping, path: tuple[str, ...], key: str) -> np.ndarray:
    for p in path:
        tree = tree[p]
    return np.asarray(tree[key], np.float32)


@functools.lru_cache(maxsize=16)
def _expected_variables(model: models.ResNet) -> Any:
    """The model's variables as shapes (no computation)."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))


def _path_name(path) -> str:
    return '/'.join(str(getattr(p, 'key', p)) for p in path)


def _check_shapes(model: models.ResNet, variables: Mapping, source: str) -> Mapping:
    """Raises ValueError naming the first variable whose shape does not fit ``model`` (or
    that it lacks, or has in excess)."""
    flat_expected = {_path_name(p): v for p, v in
                     jax.tree_util.tree_flatten_with_path(_expected_variables(model))[0]}
    flat = {_path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(variables)[0]}
    for name, value in flat.items():
        if name not in flat_expected:
            raise ValueError(f'{source}: {name} is not a variable of the model')
        if tuple(np.shape(value)) != tuple(flat_expected[name].shape):
            raise ValueError(f'{source}: {name} has shape {tuple(np.shape(value))}, the model '
                             f'expects {tuple(flat_expected[name].shape)}')
    missing = sorted(set(flat_expected) - set(flat))
    if missing:
        raise ValueError(f'{source}: no value for the model variable {missing[0]}')
    return variables


# --- reading weights ------------------------------------------------------------------------

_WRAPPER_PREFIXES = ('module.', '_orig_mod.', 'model.')  # DDP, torch.compile, a wrapper


def _float32(value, key: str, source: str) -> np.ndarray:
    """A tensor or array of any floating dtype (bfloat16, float16, float64) as float32."""
    if hasattr(value, 'detach'):  # a torch tensor: numpy has no bfloat16, cast in torch
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        value = value.numpy()
    array = np.asarray(value)
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise ValueError(f'{source}: {key} is {array.dtype}, not floating-point weights')
    return array.astype(np.float32)


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    """A ``.safetensors`` file's tensors as numpy arrays, without torch."""
    import ml_dtypes  # noqa: F401 (numpy learns 'bfloat16': safetensors' numpy reader needs it)
    import safetensors

    try:
        with safetensors.safe_open(str(path), framework='numpy') as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (no __iter__)
    except Exception as e:  # noqa: BLE001 (safetensors raises its own SafetensorError)
        raise ValueError(f'{path}: not a readable .safetensors file ({type(e).__name__}: '
                         f'{(str(e).splitlines() or [""])[0]})') from None


def _read_torch(path: pathlib.Path) -> Any:
    """A ``.pth`` / ``.pt`` / ``.bin`` file read with ``torch.load(weights_only=True)``."""
    try:
        import torch
    except ImportError:
        raise ImportError(f'reading {path.name} needs torch: pip install '
                          "'resnet_jax[interop]' (a .safetensors file needs no torch)") from None
    try:
        loaded = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 (pickle and torch raise many kinds)
        raise ValueError(f'{path}: torch.load(weights_only=True) cannot read it '
                         f'({type(e).__name__}: {(str(e).splitlines() or [""])[0]})') from None
    if not isinstance(loaded, Mapping):  # a file's content: a value, not a type, is wrong
        raise ValueError(f'{path} holds a {type(loaded).__name__}, not a state dict')  # noqa: TRY004
    return loaded


def _strip_prefixes(state_dict: dict, source: str) -> dict:
    """``state_dict`` without the wrappers' prefixes every key shares (``module.`` of DDP,
    ``_orig_mod.`` of ``torch.compile``, ``model.``, in any combination), with a warning
    naming them."""
    stripped = ''
    while state_dict:
        prefix = next((p for p in _WRAPPER_PREFIXES
                       if all(k.startswith(p) for k in state_dict)), None)
        if prefix is None:
            break
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
        stripped += prefix
    if stripped:
        warnings.warn(f'{source}: every key starts with {stripped!r} (a wrapper: DDP module., '
                      'torch.compile _orig_mod., model.); read without it', stacklevel=4)
    return state_dict


def _state_dict(source) -> tuple[dict[str, np.ndarray], str]:
    """``(state dict as float32 numpy arrays, a description for messages)`` of a mapping, a
    torch module (its ``state_dict()``) or a file (``.safetensors``, ``.pth``, ``.pt``,
    ``.bin``); a checkpoint holding it under ``state_dict`` or ``model`` is unwrapped, the
    BatchNorms' ``num_batches_tracked`` dropped, the wrappers' prefixes stripped."""
    what = 'state dict'
    if isinstance(source, (str, os.PathLike)):
        path = pathlib.Path(source)
        what = str(path)
        if not path.exists():
            raise FileNotFoundError(f'{path} does not exist')
        if path.is_dir():
            raise ValueError(f'{path} is a folder, not a weights file (a transformers '
                             'folder: from_transformers or load_weights)')
        if path.suffix == '.safetensors':
            source = _read_safetensors(path)
        elif path.suffix in TORCH_SUFFIXES:
            source = _read_torch(path)
        else:
            raise ValueError(f'{path}: unknown weights file type {path.suffix!r}; allowed: '
                             f'.safetensors, {", ".join(TORCH_SUFFIXES)} (Keras: '
                             f'{", ".join(KERAS_SUFFIXES)})')
    elif not isinstance(source, Mapping) and callable(getattr(source, 'state_dict', None)):
        source = source.state_dict()
    if not isinstance(source, Mapping):
        raise TypeError(f'{what}: expected a mapping of names to tensors, a torch module or a '
                        f'file; got {type(source).__name__}')
    for wrapper in ('state_dict', 'model'):  # a training checkpoint holding the weights
        if isinstance(source.get(wrapper), Mapping):
            source = source[wrapper]
            break
    state_dict = {str(k): v for k, v in source.items()
                  if not str(k).endswith('num_batches_tracked')}
    state_dict = _strip_prefixes(state_dict, what)
    return {k: _float32(v, k, what) for k, v in state_dict.items()}, what


def _is_transformers_style(state_dict: Mapping) -> bool:
    return any(k.startswith(('embedder.embedder.', 'resnet.embedder.')) for k in state_dict)


def _take_torch_layout(state_dict: Mapping[str, np.ndarray], model: models.ResNet,
                       style: str, source: str) -> dict:
    """``{'params', 'batch_stats'}`` of ``model`` from a state dict of torch modules
    (``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.Linear``) named as ``style``; ValueError
    naming the first key that is missing or left over."""
    params, stats, used = {}, {}, set()
    name = _net_name(model.block_cls, model.stage_sizes)

    def take(key: str, ndim: int = 1) -> np.ndarray:
        if key not in state_dict:
            raise ValueError(f'{source}: missing {key} (needed by {name})')
        if state_dict[key].ndim != ndim:
            raise ValueError(f'{source}: {key} has shape {state_dict[key].shape}; a '
                             f'{ndim}-d tensor is expected')
        used.add(key)
        return state_dict[key]

    for path, kind, layer in _layer_names(model, style):
        if kind == 'conv':  # (out, in, h, w) -> (h, w, in, out)
            _set(params, path, 'kernel', take(f'{layer}.weight', 4).transpose(2, 3, 1, 0))
        elif kind == 'bn':
            _set(params, path, 'scale', take(f'{layer}.weight'))
            _set(params, path, 'bias', take(f'{layer}.bias'))
            _set(stats, path, 'mean', take(f'{layer}.running_mean'))
            _set(stats, path, 'var', take(f'{layer}.running_var'))
        else:
            _set(params, path, 'kernel', take(f'{layer}.weight', 2).T)
            _set(params, path, 'bias', take(f'{layer}.bias'))
    extra = sorted(set(state_dict) - used)
    if extra:
        raise ValueError(f'{source}: {extra[0]} does not belong to {name}')
    return dict(_check_shapes(model, {'params': params, 'batch_stats': stats}, source))


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
            bottleneck |= key[match.end():].startswith('conv3.')
    if not blocks or sorted(blocks) != list(range(1, len(blocks) + 1)):
        return None
    block_cls = models.BottleneckBlock if bottleneck else models.BasicBlock
    return block_cls, tuple(blocks[i] for i in sorted(blocks))


def _from_torchvision_state(state_dict: Mapping[str, np.ndarray], name: str | None,
                            source: str) -> tuple[models.ResNet, dict]:
    if name is not None:
        _check_name(name)
    if _is_transformers_style(state_dict):
        raise ValueError(f'{source}: its keys are Hugging Face transformers names '
                         '(embedder.embedder.convolution...); convert it with '
                         'from_transformers and its config')
    layout = _torchvision_layout(state_dict)
    inferred = _net_name(*layout) if layout else None
    if name is None and inferred is None:
        found = (f'it holds {_describe(*layout)}' if layout else
                 f'its keys have no layer1.0.* blocks (they start {sorted(state_dict)[:3]})')
        raise ValueError(f'{source}: not a torchvision/timm ResNet of Table 1 ({found}; '
                         f'Table 1: {_table1()})')
    if name is not None and inferred is not None and inferred != name:
        raise ValueError(f'{source} holds a {inferred} ({_describe(*layout)}), not a {name}')
    name = name or inferred
    fc = state_dict.get('fc.weight')
    model = models.create_model(name, num_classes=0 if fc is None else int(fc.shape[0]),
                                shortcut='B', stride_in_1x1=False)
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
    state_dict, what = _state_dict(source)
    return _from_torchvision_state(state_dict, name, what)


# --- transformers in ------------------------------------------------------------------------

# ResNetConfig's defaults (transformers/models/resnet/configuration_resnet.py): what a
# config.json or a dict that leaves a field out means (transformers 5's save_pretrained
# writes every one; a config written by an older release or by hand may not).
_TRANSFORMERS_DEFAULTS = {
    'model_type': 'resnet', 'num_channels': 3, 'embedding_size': 64,
    'hidden_sizes': [256, 512, 1024, 2048], 'depths': [3, 4, 6, 3],
    'layer_type': 'bottleneck', 'hidden_act': 'relu', 'downsample_in_first_stage': False,
    'downsample_in_bottleneck': False,
}
_TRANSFORMERS_WEIGHTS = ('model.safetensors', 'pytorch_model.bin')  # save_pretrained's files


def _transformers_model(config, num_classes: int, source: str) -> models.ResNet:
    """The flax model of a transformers ``ResNetConfig`` (or its dict), or ValueError
    naming every field of it that is not one of the paper's ImageNet ResNets."""
    if hasattr(config, 'to_dict'):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(f'{source}: config must be a transformers ResNetConfig or its dict; '
                        f'got {type(config).__name__}')
    c = {**_TRANSFORMERS_DEFAULTS, **{k: v for k, v in config.items()
                                      if k in _TRANSFORMERS_DEFAULTS}}
    problems = []
    if c['model_type'] != 'resnet':
        problems.append(f"model_type={c['model_type']!r}: only transformers' ResNet")
    block_cls = {'basic': models.BasicBlock, 'bottleneck': models.BottleneckBlock}.get(
        c['layer_type'])
    name = _net_name(block_cls, c['depths']) if block_cls else None
    if block_cls is None:
        problems.append(f"layer_type={c['layer_type']!r}: 'basic' or 'bottleneck'")
    elif name is None:
        problems.append(f"depths={list(c['depths'])} with {c['layer_type']} layers is no "
                        f'network of Table 1 ({_table1()})')
    if block_cls is not None:
        widths = [64 * 2**i * (4 if block_cls is models.BottleneckBlock else 1)
                  for i in range(len(c['depths']))]
        if list(c['hidden_sizes']) != widths:
            problems.append(f"hidden_sizes={list(c['hidden_sizes'])}: the paper's "
                            f"{c['layer_type']} nets have {widths}")
    if c['embedding_size'] != 64:
        problems.append(f"embedding_size={c['embedding_size']}: the paper's stem has 64")
    if c['hidden_act'] != 'relu':
        problems.append(f"hidden_act={c['hidden_act']!r}: the paper's nets use 'relu'")
    if c['downsample_in_first_stage']:
        problems.append('downsample_in_first_stage=True: the paper\'s conv2_x does not '
                        'downsample after the max pool')
    if c['num_channels'] != 3:
        problems.append(f"num_channels={c['num_channels']}: RGB (3) only")
    if problems:
        raise ValueError(f'{source}: not one of the paper\'s ResNets: {"; ".join(problems)}')
    bottleneck = block_cls is models.BottleneckBlock
    return models.create_model(name, num_classes=num_classes, shortcut='B',
                               stride_in_1x1=bool(c['downsample_in_bottleneck']) and bottleneck)


def _transformers_source(source, config) -> tuple[Mapping, Any, str]:
    """``(state dict, config, description)`` of what ``from_transformers`` accepts."""
    if isinstance(source, (str, os.PathLike)):
        path = pathlib.Path(source)
        if not path.exists():
            raise FileNotFoundError(f'{path} does not exist')
        if path.is_dir():
            found = [path / f for f in _TRANSFORMERS_WEIGHTS if (path / f).exists()]
            if not found:
                raise ValueError(f'{path}: no {" or ".join(_TRANSFORMERS_WEIGHTS)} (the files '
                                 'save_pretrained writes)')
            weights, config_file = found[0], path / 'config.json'
        else:
            weights, config_file = path, path.parent / 'config.json'
        if config is None and config_file.exists():
            try:
                config = json.loads(config_file.read_text())
            except ValueError as e:
                raise ValueError(f'{config_file} cannot be read: {e}') from None
        if config is None:
            raise ValueError(f'{path}: no config.json beside the weights; pass config= (the '
                             "model's ResNetConfig or its dict)")
        state_dict, what = _state_dict(weights)
        return state_dict, config, what
    if not isinstance(source, Mapping) and config is None:
        config = getattr(source, 'config', None)  # a ResNetModel / ...ForImageClassification
    if config is None:
        raise ValueError("transformers state dict: pass config= (the model's ResNetConfig or "
                         'its dict): the names do not tell where a bottleneck strides '
                         '(downsample_in_bottleneck) nor anything else of the config')
    state_dict, what = _state_dict(source)
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


# --- torchvision out -----------------------------------------------------------------------

def torchvision_differences(model: models.ResNet) -> list[str]:
    """Where ``model`` computes another function than torchvision's ``resnetN``: one line
    per field, ``field=value: why (what to do)``; empty when it converts."""
    out = []
    block = model.block_cls
    bottleneck = block is models.BottleneckBlock
    if getattr(model, 'features_only', False):
        out.append("features_only=True: torchvision's resnets return logits or, headless, the "
                   'pooled features; convert model.clone(features_only=False) (the same '
                   'variables)')
    if not model.residual:
        out.append("residual=False: a plain net; torchvision's resnets have shortcuts (no "
                   'torchvision network computes a plain one)')
    if model.stem != 'imagenet':
        out.append(f"stem={model.stem!r}: torchvision's resnets have the ImageNet stem (7x7/2 "
                   'conv, 3x3/2 max pool); the CIFAR nets have no torchvision counterpart')
    if model.width != 64:
        out.append(f"width={model.width}: torchvision's resnets start at 64 filters")
    if block not in (models.BasicBlock, models.BottleneckBlock):
        out.append(f'block_cls={getattr(block, "__name__", block)}: only BasicBlock and '
                   'BottleneckBlock are torchvision\'s')
    elif _net_name(block, model.stage_sizes) is None:
        out.append(f'stage_sizes={tuple(model.stage_sizes)}: with {_block_kind(block)} blocks '
                   f"torchvision has Table 1's ({_table1()})")
    if model.shortcut != 'B':
        out.append(f"shortcut={model.shortcut!r}: torchvision's resnets project only where the "
                   'dimensions change (option B); train with --config.model.shortcut=B')
    if bottleneck and model.stride_in_1x1:
        out.append("stride_in_1x1=True: torchvision's resnets stride in the 3x3 (v1.5); "
                   'train with --config.model.stride_in_1x1=False')
    if model.bn_epsilon != TORCHVISION_EPSILON:
        out.append(f"bn_epsilon={model.bn_epsilon}: torchvision's BatchNorm2d has eps=1e-5; "
                   'train with --config.model.bn_epsilon=1e-5 (or set every BatchNorm2d\'s '
                   'eps yourself after loading)')
    for field, default in (('norm', None), ('conv', layers.conv),
                           ('max_pool', layers.max_pool), ('stage', models.unrolled_stage)):
        value = getattr(model, field)
        if value is not default:
            out.append(f'{field}={getattr(value, "__name__", value)!r}: only the default '
                       f'{field} ({getattr(default, "__name__", default)}) is torchvision\'s; '
                       'convert the model itself, not plan.apply_to(model) (the same variables)')
    return out


def _workdir_model(workdir, num_classes: int) -> models.ResNet:
    """The model a workdir's ``config.json`` records, as ``resnet_jax.load`` builds it."""
    from resnet_jax import config as config_lib
    from resnet_jax.training import checkpoints
    return config_lib.model_from_config(checkpoints.run_config(workdir), num_classes)


def _resolve_model(model, num_classes: int) -> models.ResNet:
    if isinstance(model, models.ResNet):
        return model
    if isinstance(model, (str, os.PathLike)):
        if os.path.isdir(model):
            return _workdir_model(model, num_classes)
        raise ValueError(
            f'model={str(model)!r} is not a workdir: pass the ResNet itself or the workdir '
            'whose config.json records it (the variables alone, or a name, cannot tell v1, '
            "the stride in a bottleneck's first 1x1, from v1.5, in its 3x3: the shapes are "
            "the same, the functions are not)")
    raise ValueError(f'model must be a ResNet or a workdir; got {type(model).__name__}')


def check_torchvision(model) -> models.ResNet:
    """``model`` (a ``ResNet``, or a workdir's, built with 1000 classes: the check does not
    depend on them) when torchvision's resnets compute its function; otherwise ValueError
    listing every field that differs and what to do."""
    model = _resolve_model(model, 1000)
    differences = torchvision_differences(model)
    if differences:
        raise ValueError("torchvision's resnets compute another network: "
                         + '; '.join(differences))
    return model


def _find_resnet(variables, at) -> tuple[dict, tuple[str, ...]]:
    """``({'params', 'batch_stats'} of the ResNet, its path)`` in ``variables`` (a model's
    own, or a module's holding it, e.g. under ``backbone``): at ``at``, or the one there
    is."""
    if not isinstance(variables, Mapping):
        raise TypeError("variables must be {'params': ..., 'batch_stats': ...} (model.init's "
                        f"or resnet_jax.load's); got {type(variables).__name__}")
    params, stats = variables.get('params'), variables.get('batch_stats')
    if params is None or stats is None:
        raise ValueError("variables must be {'params': ..., 'batch_stats': ...} (model.init's "
                         "or resnet_jax.load's: torchvision needs the BatchNorms' running "
                         f'statistics too); these hold {sorted(variables)[:6]}')
    at = models.locate_resnet(params, at)
    parts = {'params': params, 'batch_stats': stats}
    for collection in parts:
        for key in at:
            if not isinstance(parts[collection], Mapping) or key not in parts[collection]:
                raise ValueError(f'at={at!r}: variables {collection} have no {"/".join(at)}')
            parts[collection] = parts[collection][key]
    return parts, at


def to_torchvision(variables: Mapping, model, path: str | os.PathLike | None = None,
                   at: tuple[str, ...] | str | None = None) -> dict:
    """The reverse of ``from_torchvision``: ``variables`` as the state dict torchvision's
    ``resnetN`` loads with ``load_state_dict(state_dict, strict=True)`` and computes the
    same function with; torch tensors when torch is installed, numpy arrays otherwise.

    ``model``: the ``ResNet`` the variables belong to, or a workdir (its ``config.json``
    records the model). A name is refused: v1 and v1.5 have the same variables. Anything
    torchvision's resnets do not compute (v1 bottlenecks, shortcut A or C, plain nets,
    the CIFAR nets, another width, epsilon, norm or conv, ``features_only``) is refused
    with a ValueError naming each field, its value and what to do.

    A headless model (``num_classes=0``) writes no ``fc`` keys: load it into
    ``tv = torchvision.models.resnet50(); tv.fc = torch.nn.Identity()`` with
    ``tv.load_state_dict(state_dict, strict=True)``; ``tv`` then returns the pooled
    features as the flax model does.

    ``variables`` may be a larger module's (e.g. ``{'params': {'backbone': ..., 'head':
    ...}, 'batch_stats': {'backbone': ...}}``): the ResNet in it (the one dict holding
    conv1, bn1, conv2_1) is found, or chosen by ``at`` (``('backbone',)`` or
    ``'backbone'``). ``path``: also write it there, ``.safetensors``
    (``safetensors.numpy``, no torch needed) or ``.pth`` / ``.pt`` (``torch.save``),
    after every check has passed.
    """
    path = pathlib.Path(path) if path is not None else None
    if path is not None and path.suffix not in ('.safetensors', '.pth', '.pt'):
        raise ValueError(f'{path}: write a .safetensors, .pth or .pt file')
    check_torchvision(model)  # the network first: a refusal names a field, not a variable
    parts, at = _find_resnet(variables, at)
    fc = parts['params'].get('fc')
    num_classes = int(np.shape(fc['bias'])[0]) if isinstance(fc, Mapping) and 'bias' in fc \
        else 0
    model = _resolve_model(model, num_classes)
    where = f'variables at {"/".join(at)}' if at else 'variables'
    _check_shapes(model, parts, where)
    params, stats = parts['params'], parts['batch_stats']
    out: dict[str, np.ndarray] = {}
    for module, kind, layer in _layer_names(model, 'torchvision'):
        if kind == 'conv':  # (h, w, in, out) -> (out, in, h, w)
            out[f'{layer}.weight'] = _get(params, module, 'kernel').transpose(3, 2, 0, 1)
        elif kind == 'bn':
            out[f'{layer}.weight'] = _get(params, module, 'scale')
            out[f'{layer}.bias'] = _get(params, module, 'bias')
            out[f'{layer}.running_mean'] = _get(stats, module, 'mean')
            out[f'{layer}.running_var'] = _get(stats, module, 'var')
            out[f'{layer}.num_batches_tracked'] = np.array(0, np.int64)
        else:
            out[f'{layer}.weight'] = _get(params, module, 'kernel').T
            out[f'{layer}.bias'] = _get(params, module, 'bias')
    out = {k: np.array(v, order='C') for k, v in out.items()}  # contiguous, 0-d kept 0-d
    try:
        import torch
    except ImportError:
        torch = None
    if path is not None and path.suffix == '.safetensors':
        from safetensors.numpy import save_file
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(out, str(path), metadata={'format': 'pt'})  # torch loaders expect 'pt'
    if torch is None:
        if path is not None and path.suffix != '.safetensors':
            raise ImportError(f'writing {path.name} needs torch: pip install '
                              "'resnet_jax[interop]' (a .safetensors file needs no torch)")
        return out
    tensors = {k: torch.from_numpy(v) for k, v in out.items()}
    if path is not None and path.suffix != '.safetensors':
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(tensors, path)
    return tensors


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
    inferred = (_net_name(models.BottleneckBlock, tuple(blocks[s] for s in sorted(blocks)))
                if blocks else None)
    if name is not None:
        if name not in ('resnet50', 'resnet101', 'resnet152'):
            raise ValueError(f'keras.applications has resnet50, resnet101, resnet152; '
                             f'got {name!r}')
        if inferred is not None and inferred != name:
            raise ValueError(f'Keras model: its layers are a {inferred}, not a {name}')
        return name
    if inferred is None:
        raise ValueError('Keras model: not a keras.applications ResNet50/101/152 (its layers '
                         f'have {blocks or "no"} convN_blockM_1_conv blocks per stage)')
    return inferred


def from_keras(source, name: str | None = None) -> tuple[models.ResNet, dict]:
    """A ``keras.applications`` ResNet50/101/152 (a model or an .h5/.keras path) as
    ``(model, variables)``: v1, option B, conv biases folded into the BatchNorms, the
    model's BatchNorm epsilon (1.001e-5). ``name``: default inferred from the layers;
    when given, checked against them. ``include_top=False``: a headless model."""
    if isinstance(source, (str, os.PathLike)):
        import keras
        source = keras.models.load_model(source, compile=False)
    layers_by_name = {layer.name: layer for layer in source.layers}
    weights = {lname: [np.asarray(w) for w in layer.get_weights()]
               for lname, layer in layers_by_name.items() if layer.get_weights()}
    name = _keras_name(layers_by_name, name)
    dense = weights.get('predictions')
    epsilon = float(getattr(layers_by_name.get('conv1_bn'), 'epsilon', 1.001e-5))
    model = models.create_model(name, num_classes=0 if dense is None else dense[0].shape[1],
                                shortcut='B', stride_in_1x1=True, bn_epsilon=epsilon)
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
    return model, dict(_check_shapes(model, variables, 'Keras model'))


# --- any of them ----------------------------------------------------------------------------

def _kind_of(source) -> str:
    """The source a file, folder or object holds (``'auto'`` detection)."""
    if isinstance(source, (str, os.PathLike)):
        path = pathlib.Path(source)
        if path.suffix in KERAS_SUFFIXES:
            return 'keras'
        if path.is_dir():
            if (path / 'checkpoints').is_dir():
                raise ValueError(f'{path} is a resnet_jax workdir: resnet_jax.load({str(path)!r})'
                                 ' reads it')
            if (path / 'config.json').exists():
                return 'transformers'
            raise ValueError(f'{path}: a folder without config.json (a transformers model is '
                             'saved with config.json and model.safetensors)')
        return ''  # a weights file: by its names
    if hasattr(source, 'get_layer') and hasattr(source, 'layers'):
        return 'keras'
    if getattr(getattr(source, 'config', None), 'model_type', None) == 'resnet':
        return 'transformers'
    if hasattr(source, 'pretrained_cfg'):  # every timm model has one
        return 'timm'
    return ''


def load_weights(source, name: str | None = None, *, kind: str = 'auto',
                 config=None) -> tuple[models.ResNet, dict, str]:
    """``(model, variables, kind)`` of ResNet weights from any source this module reads;
    ``kind`` is the source (``'torchvision'``, ``'timm'``, ``'transformers'``,
    ``'keras'``: the key of ``PREPROCESSING``).

    ``kind='auto'`` tells it by the file, folder or object: ``.h5`` / ``.keras`` files and
    Keras models: ``from_keras``; a folder with ``config.json``, a transformers model, or
    weights with transformers' names: ``from_transformers`` (``config=``, or the
    ``config.json`` beside the file); a timm model: timm; other ``.safetensors`` / ``.pth``
    / ``.pt`` / ``.bin`` files, state dicts and torch modules: torchvision's names.
    ``name``: the network, default inferred; when given, checked."""
    if kind not in ('auto', *SOURCES):
        raise ValueError(f'unknown source {kind!r}; allowed: auto, {", ".join(SOURCES)}')
    detected = _kind_of(source) if kind == 'auto' else kind
    if detected == 'keras':
        return (*from_keras(source, name), 'keras')
    if detected != 'transformers':
        if isinstance(source, (str, os.PathLike)) and pathlib.Path(source).is_dir():
            raise ValueError(f'{source} is a folder; --from={detected or kind} reads a '
                             'weights file')
        state_dict, what = _state_dict(source)
        if kind == 'auto' and _is_transformers_style(state_dict):
            detected, source = 'transformers', (source if isinstance(source, (str, os.PathLike))
                                                else state_dict)
        else:
            model, variables = _from_torchvision_state(state_dict, name, what)
            return model, variables, detected or 'torchvision'
    model, variables = from_transformers(source, config=config)
    converted = _net_name(model.block_cls, model.stage_sizes)
    if name is not None and name != converted:
        raise ValueError(f'the transformers model is a {converted}, not a {name}')
    return model, variables, 'transformers'


# --- the command line ---------------------------------------------------------------------

def save_converted(model: models.ResNet, variables: dict, name: str | None, source: str,
                   output: str | os.PathLike) -> pathlib.Path:
    """Writes ``output`` as a workdir that ``resnet-jax evaluate`` and ``init_from`` accept:
    an orbax checkpoint (step 0) and ``config.json`` with the model and preprocessing.
    ``name``: default the model's Table 1 name. A headless model (no fc) is refused: a
    workdir's model classifies."""
    name = name or table1_name(model)
    if name != table1_name(model):
        raise ValueError(f'the model is a {table1_name(model)}, not a {name}')
    if source not in PREPROCESSING:
        raise ValueError(f'unknown source {source!r}; allowed: {", ".join(SOURCES)}')
    if not model.num_classes:
        raise ValueError('a headless model (no classifier, num_classes=0) cannot be written '
                         'as a workdir (evaluate and resnet_jax.load read its fc); convert it '
                         'in Python: resnet_jax.convert.load_weights(path) returns its '
                         '(model, variables, kind)')
    from resnet_jax.config import base_config
    from resnet_jax.training import checkpoints as checkpointing

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
