"""What ``ResNet`` accepts: its fields checked (one ``ValueError`` naming the field), the
compute and parameter dtypes, and what a part handed in (a block, a conv, a norm) takes."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from numbers import Integral, Real
from typing import Any

import jax.numpy as jnp
import numpy as np

from resnet_jax.models.layers import check_shortcut


def accepts(factory: Callable[..., Any], argument: str) -> bool:
    try:
        return argument in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def if_accepted(factory: Callable[..., Any], **kwargs: Any) -> dict[str, Any]:
    """The ``kwargs`` that ``factory`` takes: a part of your own need not know newer ones."""
    return {k: v for k, v in kwargs.items() if accepts(factory, k)}


def block_class(block_cls: Any) -> Any:
    """The class of a block given as a class or (nested) ``functools.partial`` of one."""
    while isinstance(block_cls, functools.partial):
        block_cls = block_cls.func
    return block_cls


def check_fields(model) -> None:
    """Raises ValueError naming the first ``ResNet`` field that is not allowed."""

    def integer(value, low):
        return isinstance(value, Integral) and not isinstance(value, bool) and value >= low

    def flag(value):
        return isinstance(value, (bool, np.bool_))

    sizes = model.stage_sizes
    checks = [
        (
            'stage_sizes',
            isinstance(sizes, Sequence)
            and not isinstance(sizes, str)
            and len(sizes) > 0
            and all(integer(n, 1) for n in sizes),
            'a non-empty sequence of block counts >= 1, e.g. (3, 4, 6, 3)',
        ),
        ('block_cls', callable(model.block_cls), 'a block module class'),
        (
            'num_classes',
            integer(model.num_classes, 0),
            'an integer >= 0 (0: no fc, the pooled features)',
        ),
        ('stem', model.stem in ('imagenet', 'cifar'), "'imagenet' or 'cifar'"),
        ('width', integer(model.width, 1), 'an integer >= 1 (64 ImageNet, 16 CIFAR)'),
        ('bn_group_size', integer(model.bn_group_size, 0), 'an integer >= 0 (0: the whole batch)'),
        (
            'bn_momentum',
            isinstance(model.bn_momentum, Real)
            and not flag(model.bn_momentum)
            and 0 <= model.bn_momentum <= 1,
            'a number in [0, 1]',
        ),
        (
            'bn_epsilon',
            isinstance(model.bn_epsilon, Real)
            and not flag(model.bn_epsilon)
            and 0 < model.bn_epsilon < float('inf'),
            'a finite number > 0',
        ),
        *[
            (name, flag(getattr(model, name)), 'True or False')
            for name in (
                'residual',
                'stride_in_1x1',
                'zero_init_residual',
                'frozen_bn',
                'features_only',
            )
        ],
        *[
            (name, callable(getattr(model, name)), 'a callable')
            for name in ('conv', 'max_pool', 'stage')
        ],
        (
            'norm',
            model.norm is None or callable(model.norm),
            "None (the paper's BatchNorm) or a norm module factory",
        ),
        (
            'frozen_bn',
            not (model.frozen_bn and model.norm is not None),
            "False with a norm of your own (frozen_bn freezes the paper's BatchNorm)",
        ),
        (
            'zero_init_residual',
            not (
                model.zero_init_residual
                and model.norm is not None
                and not accepts(model.norm, 'scale_init')
            ),
            'False with a norm that takes no scale_init (it starts the last norm of each '
            'branch at zero: norm(name=, scale_init=zeros))',
        ),
        (
            'drop_path_rate',
            isinstance(model.drop_path_rate, Real)
            and not flag(model.drop_path_rate)
            and 0 <= model.drop_path_rate < 1
            and (model.residual or not model.drop_path_rate),
            'a number in [0, 1), 0 for a plain net (it drops residual branches)',
        ),
        (
            'output_stride',
            integer(model.output_stride, 8) and model.output_stride in (8, 16, 32),
            '8, 16 or 32',
        ),
        ('in_chans', model.in_chans is None or integer(model.in_chans, 1), 'None or >= 1'),
        (
            'out_indices',
            model.out_indices is None
            or (
                model.features_only
                and isinstance(model.out_indices, Sequence)
                and len(model.out_indices) > 0
                and all(integer(i, -len(sizes)) and i < len(sizes) for i in model.out_indices)
                and len({i % len(sizes) for i in model.out_indices}) == len(model.out_indices)
            ),
            f'None, or with features_only=True distinct stage indices in '
            f'[-{len(sizes)}, {len(sizes)}) (0: conv2)',
        ),
    ]
    for name, ok, allowed in checks:
        if not ok:
            raise ValueError(
                f'ResNet.{name}={getattr(model, name)!r} is not allowed: it must be {allowed}'
            )
    check_shortcut(model.shortcut)
    canonical_dtype(model.dtype)
    canonical_dtype(model.param_dtype)
    try:  # (a stage of the earlier protocol took no train)
        inspect.signature(model.stage).bind(*[None] * 5)
    except TypeError:
        raise ValueError(
            f'ResNet.stage={model.stage!r} is not allowed: it must take (parent, make_block, '
            'names, x, train) and call each block as block(x, train)'
        ) from None
    except ValueError:  # no signature to read (a builtin): trusted
        pass
    dilated = any(d > 1 for _, d, _ in model._stage_geometry())
    if dilated and not accepts(model.conv, 'dilation'):
        raise ValueError(
            f'ResNet.conv={model.conv!r} takes no dilation=, which '
            f'output_stride={model.output_stride} needs'
        )
    block_cls = block_class(model.block_cls)
    needs = [('drop_path', model.drop_path_rate, 'drop_path_rate')] + [
        (field, dilated, f'output_stride={model.output_stride}')
        for field in ('dilation', 'first_dilation')
    ]
    for field, needed, why in needs:
        if needed and not accepts(block_cls, field):
            raise ValueError(
                f'block_cls {getattr(block_cls, "__name__", block_cls)} has no field '
                f'{field!r}, which {why} needs (the block protocol: resnet_jax.models.blocks)'
            )


DTYPES = ('float32', 'bfloat16', 'float16')


def canonical_dtype(dtype: Any) -> jnp.dtype:
    """A compute dtype given as a name or a dtype; ``ValueError`` for anything else."""
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved.name not in DTYPES:
        raise ValueError(f'unknown dtype {dtype!r}; allowed: {", ".join(DTYPES)}')
    return resolved
