"""The networks by name: Table 1's (``TABLE1``), their plain counterparts and the CIFAR
nets of sec. 4.2 (``cifar``), built by ``create_model`` and listed by ``list_models``."""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from resnet_jax.models.blocks import BasicBlock, BottleneckBlock
from resnet_jax.models.checks import canonical_dtype
from resnet_jax.models.resnet import ResNet

# Table 1: blocks per stage of the ImageNet networks.
TABLE1: dict[str, tuple[type[nn.Module], tuple[int, ...]]] = {
    'resnet18': (BasicBlock, (2, 2, 2, 2)),
    'resnet34': (BasicBlock, (3, 4, 6, 3)),
    'resnet50': (BottleneckBlock, (3, 4, 6, 3)),
    'resnet101': (BottleneckBlock, (3, 4, 23, 3)),
    'resnet152': (BottleneckBlock, (3, 8, 36, 3)),
}
_ImageNet = functools.partial(ResNet, stem='imagenet', width=64, num_classes=1000)
_IMAGENET: dict[str, Callable[..., ResNet]] = {
    name: functools.partial(_ImageNet, block_cls=block, stage_sizes=sizes)
    for name, (block, sizes) in TABLE1.items()
}
# The plain counterparts (Table 2 has plain-18/34; the bottleneck ones are offered too).
_IMAGENET.update(
    {
        name.replace('resnet', 'plain'): functools.partial(make, residual=False)
        for name, make in list(_IMAGENET.items())
    }
)

# Sec. 4.2: 6n+2 layers, option A (all shortcuts parameter-free).
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)
_CIFAR_NAME = re.compile(r'^cifar_(resnet|plain)(\d+)$')


def parse_cifar_name(name: str) -> tuple[bool, int] | None:
    """``(residual, depth)`` of a CIFAR net's name (``cifar_resnet110``), ``None`` for
    another name; ``ValueError`` for a depth that is not 6n+2."""
    match = _CIFAR_NAME.match(name)
    if not match:
        return None
    depth = int(match.group(2))
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f'CIFAR depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, '
            f'1202, ...); got {depth}.'
        )
    return match.group(1) == 'resnet', depth


def cifar(depth: int, residual: bool = True, **overrides: Any) -> ResNet:
    """The CIFAR-10 net of sec. 4.2 with ``depth = 6n + 2`` layers."""
    parse_cifar_name(f'cifar_resnet{depth}')
    n = (depth - 2) // 6
    kwargs = {
        'stage_sizes': (n, n, n),
        'block_cls': BasicBlock,
        'stem': 'cifar',
        'width': 16,
        'num_classes': 10,
        'shortcut': 'A',
        'residual': residual,
    }
    kwargs.update(overrides)
    return ResNet(**kwargs)


def list_models(pattern: str = '*') -> list[str]:
    """The registered names matching the shell-style ``pattern`` (``'cifar_resnet*'``,
    ``'*50'``), as timm's ``list_models`` does; CIFAR nets exist for any 6n+2 depth, the
    paper's are listed."""
    cifar_names = [f'cifar_{kind}{d}' for kind in ('resnet', 'plain') for d in CIFAR_DEPTHS]
    return fnmatch.filter(sorted(_IMAGENET) + cifar_names, pattern)


_OPTIONS = tuple(f for f in ResNet.__dataclass_fields__ if f not in ('parent', 'name'))


def create_model(model_name: str, /, **overrides: Any) -> ResNet:
    """Builds a model by name, e.g. ``create_model('resnet50', stride_in_1x1=False)``.

    Any ``ResNet`` field can be overridden (``dtype`` also as a string), and flax's ``name``
    and ``parent`` (``name='backbone'`` inside another module). Raises ValueError for an
    unknown name or option.
    """
    if 'dtype' in overrides:
        overrides['dtype'] = canonical_dtype(overrides['dtype'])
    unknown = set(overrides) - set(_OPTIONS) - {'parent', 'name'}
    if unknown:
        raise ValueError(f'unknown model option(s) {sorted(unknown)}; allowed: {sorted(_OPTIONS)}')
    if model_name in _IMAGENET:
        return _IMAGENET[model_name](**overrides)
    parsed = parse_cifar_name(model_name)
    if parsed:
        residual, depth = parsed
        return cifar(depth, **{'residual': residual, **overrides})
    raise ValueError(
        f'unknown model {model_name!r}; allowed: {", ".join(sorted(_IMAGENET))}, '
        'cifar_resnetN and cifar_plainN with N = 6n+2 (e.g. cifar_resnet20).'
    )
