"""Variables out as the state dict torchvision's ``resnetN`` loads strictly, for the models
whose function torchvision computes; the rest are refused naming each field."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from resnet_jax import models, paths
from resnet_jax.models import layers
from resnet_jax.tools.layer_names import (
    block_kind,
    check_shapes,
    get_leaf,
    named_layers,
    net_name,
    table1,
)
from resnet_jax.tools.weight_files import check_finite

TORCHVISION_EPSILON = 1e-5  # torch.nn.BatchNorm2d's default eps (torchvision, timm, transformers)


def torchvision_differences(model: models.ResNet) -> list[str]:
    """Where ``model`` computes another function than torchvision's ``resnetN``: one line
    per field, ``field=value: why (what to do)``; empty when it converts."""
    out = []
    block = model.block_cls
    bottleneck = block is models.BottleneckBlock
    if getattr(model, 'features_only', False):
        out.append(
            "features_only=True: torchvision's resnets return logits or, headless, the "
            'pooled features; convert model.clone(features_only=False) (the same '
            'variables)'
        )
    if not model.residual:
        out.append(
            "residual=False: a plain net; torchvision's resnets have shortcuts (no "
            'torchvision network computes a plain one)'
        )
    if model.stem != 'imagenet':
        out.append(
            f"stem={model.stem!r}: torchvision's resnets have the ImageNet stem (7x7/2 "
            'conv, 3x3/2 max pool); the CIFAR nets have no torchvision counterpart'
        )
    if model.width != 64:
        out.append(f"width={model.width}: torchvision's resnets start at 64 filters")
    if block not in (models.BasicBlock, models.BottleneckBlock):
        out.append(
            f'block_cls={getattr(block, "__name__", block)}: only BasicBlock and '
            "BottleneckBlock are torchvision's"
        )
    elif net_name(block, model.stage_sizes) is None:
        out.append(
            f'stage_sizes={tuple(model.stage_sizes)}: with {block_kind(block)} blocks '
            f"torchvision has Table 1's ({table1()})"
        )
    if model.shortcut != 'B':
        out.append(
            f"shortcut={model.shortcut!r}: torchvision's resnets project only where the "
            'dimensions change (option B); train with --config.model.shortcut=B'
        )
    if bottleneck and model.stride_in_1x1:
        out.append(
            "stride_in_1x1=True: torchvision's resnets stride in the 3x3 (v1.5); "
            'train with --config.model.stride_in_1x1=False'
        )
    if model.bn_epsilon != TORCHVISION_EPSILON:
        out.append(
            f"bn_epsilon={model.bn_epsilon}: torchvision's BatchNorm2d has eps=1e-5; "
            "train with --config.model.bn_epsilon=1e-5 (or set every BatchNorm2d's "
            'eps yourself after loading)'
        )
    for field, default in (
        ('norm', None),
        ('conv', layers.conv),
        ('max_pool', layers.max_pool),
        ('stage', models.scanned_stage),
    ):
        value = getattr(model, field)
        if value is not default and value is not models.unrolled_stage:
            out.append(
                f'{field}={getattr(value, "__name__", value)!r}: only the default '
                f"{field} ({getattr(default, '__name__', default)}) is torchvision's; "
                'convert the model itself, not plan.apply_to(model) (the same variables)'
            )
    return out


def _workdir_model(workdir, num_classes: int) -> models.ResNet:
    """The model a workdir's ``config.json`` records, as ``resnet_jax.load`` builds it."""
    from resnet_jax import config as config_lib
    from resnet_jax.training import runs

    return config_lib.model_from_config(runs.run_config(workdir), num_classes)


def _resolve_model(model, num_classes: int) -> models.ResNet:
    if isinstance(model, models.ResNet):
        return model
    if isinstance(model, (str, os.PathLike)):
        if paths.resolve(model).is_dir():
            return _workdir_model(model, num_classes)
        raise ValueError(
            f'model={str(model)!r} is not a workdir: pass the ResNet itself or the workdir '
            'whose config.json records it (the variables alone, or a name, cannot tell v1, '
            "the stride in a bottleneck's first 1x1, from v1.5, in its 3x3: the shapes are "
            'the same, the functions are not)'
        )
    raise ValueError(f'model must be a ResNet or a workdir; got {type(model).__name__}')


def check_torchvision(model) -> models.ResNet:
    """``model`` (a ``ResNet``, or a workdir's, built with 1000 classes: the check does not
    depend on them) when torchvision's resnets compute its function; otherwise ValueError
    listing every field that differs and what to do."""
    model = _resolve_model(model, 1000)
    differences = torchvision_differences(model)
    if differences:
        raise ValueError("torchvision's resnets compute another network: " + '; '.join(differences))
    return model


def _find_resnet(variables, at) -> tuple[dict, tuple[str, ...]]:
    """``({'params', 'batch_stats'} of the ResNet, its path)`` in ``variables`` (its own or
    a module's holding it): at ``at``, or the one there is."""
    if not isinstance(variables, Mapping):
        raise TypeError(
            "variables must be {'params': ..., 'batch_stats': ...} (model.init's "
            f"or resnet_jax.load's); got {type(variables).__name__}"
        )
    params, stats = variables.get('params'), variables.get('batch_stats')
    if params is None or stats is None:
        raise ValueError(
            "variables must be {'params': ..., 'batch_stats': ...} (model.init's "
            "or resnet_jax.load's: torchvision needs the BatchNorms' running "
            f'statistics too); these hold {sorted(variables)[:6]}'
        )
    at = models.locate_resnet(params, at)
    parts = {'params': params, 'batch_stats': stats}
    for collection in parts:
        for key in at:
            if not isinstance(parts[collection], Mapping) or key not in parts[collection]:
                raise ValueError(f'at={at!r}: variables {collection} have no {"/".join(at)}')
            parts[collection] = parts[collection][key]
    return parts, at


def to_torchvision(
    variables: Mapping,
    model,
    path: str | os.PathLike | None = None,
    at: tuple[str, ...] | str | None = None,
    *,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
) -> dict:
    """The reverse of ``from_torchvision``: ``variables`` as the state dict torchvision's
    ``resnetN`` loads with ``load_state_dict(state_dict, strict=True)`` and computes the
    same function with; torch tensors when torch is installed, numpy arrays otherwise.

    ``model``: the ``ResNet`` or a workdir, not a name (v1 and v1.5 have the same
    variables). What torchvision does not compute (v1, shortcut A or C, plain or CIFAR nets,
    another width, epsilon, norm or conv, ``features_only``) is refused naming each field.

    A headless model (``num_classes=0``) writes no ``fc`` keys: load it into
    ``tv = torchvision.models.resnet50(); tv.fc = torch.nn.Identity()`` with
    ``tv.load_state_dict(state_dict, strict=True)``; ``tv`` then returns the pooled
    features as the flax model does.

    ``variables`` may be a larger module's (e.g. ``{'params': {'backbone': ..., 'head':
    ...}, 'batch_stats': {'backbone': ...}}``): the ResNet in it (the one dict holding
    conv1, bn1, conv2_1) is found, or chosen by ``at`` (``('backbone',)`` or
    ``'backbone'``). ``path``: also write it there, ``.safetensors``
    (``safetensors.numpy``, no torch needed) or ``.pth`` / ``.pt`` (``torch.save``),
    after every check has passed; an existing file only with ``overwrite``. Weights holding
    NaN or Inf are refused naming the first such tensor unless ``allow_nonfinite``."""
    path = paths.resolve(path) if path is not None else None
    if path is not None:
        if path.suffix not in ('.safetensors', '.pth', '.pt'):
            raise ValueError(f'{path}: write a .safetensors, .pth or .pt file')
        paths.check_new_file(path, overwrite)
    check_torchvision(model)  # the network first: a refusal names a field, not a variable
    parts, at = _find_resnet(variables, at)
    fc = parts['params'].get('fc')
    num_classes = int(np.shape(fc['bias'])[0]) if isinstance(fc, Mapping) and 'bias' in fc else 0
    model = _resolve_model(model, num_classes)
    where = f'variables at {"/".join(at)}' if at else 'variables'
    check_shapes(model, parts, where)
    params, stats = parts['params'], parts['batch_stats']
    out: dict[str, np.ndarray] = {}
    for module, kind, layer in named_layers(model, 'torchvision'):
        if kind == 'conv':  # (h, w, in, out) -> (out, in, h, w)
            out[f'{layer}.weight'] = get_leaf(params, module, 'kernel').transpose(3, 2, 0, 1)
        elif kind == 'bn':
            out[f'{layer}.weight'] = get_leaf(params, module, 'scale')
            out[f'{layer}.bias'] = get_leaf(params, module, 'bias')
            out[f'{layer}.running_mean'] = get_leaf(stats, module, 'mean')
            out[f'{layer}.running_var'] = get_leaf(stats, module, 'var')
            out[f'{layer}.num_batches_tracked'] = np.array(0, np.int64)
        else:
            out[f'{layer}.weight'] = get_leaf(params, module, 'kernel').T
            out[f'{layer}.bias'] = get_leaf(params, module, 'bias')
    # contiguous, 0-d kept 0-d; float32 whatever param_dtype (torch reads no numpy bfloat16)
    out = {
        k: np.array(v, np.int64 if k.endswith('num_batches_tracked') else np.float32, order='C')
        for k, v in out.items()
    }
    if not allow_nonfinite:
        check_finite(out, where)
    try:
        import torch
    except ImportError:
        torch = None
    if path is not None and path.suffix == '.safetensors':
        from safetensors.numpy import save

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(save(out, metadata={'format': 'pt'}))  # torch loaders expect 'pt'
    if torch is None:
        if path is not None and path.suffix != '.safetensors':
            raise ImportError(
                f'writing {path.name} needs torch: pip install '
                "'resnet_jax[interop]' (a .safetensors file needs no torch)"
            )
        return out
    tensors = {k: torch.from_numpy(v) for k, v in out.items()}
    if path is not None and path.suffix != '.safetensors':
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open('wb') as f:  # a local file or an object in a bucket
            torch.save(tensors, f)
    return tensors
