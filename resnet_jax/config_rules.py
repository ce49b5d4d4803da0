"""The allowed values of every config field, and ``validate``, which reads them.

Each field's rule in ``FIELD_RULES`` checks the value and words the error, so the choices
a message lists are the ones validation allows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np


class ConfigError(ValueError):
    """A config that cannot run; raised before anything is compiled or written."""


OPTIMIZERS = ('sgd', 'lars')
SCHEDULES = ('step', 'plateau', 'cosine', 'poly')
WARMUP_TYPES = ('constant', 'linear', 'gradual')
CROPS = ('scale', 'inception')
DECODERS = ('auto', 'cpu', 'dali')
WEIGHT_DECAY_ON = ('kernels', 'all')
PREPROCESSING = ('mean', 'torchvision', 'caffe')
EXECUTION_PLANS = ('auto', 'xla', 'cpu')
SHORTCUTS = ('A', 'B', 'C')
DTYPES = ('float32', 'bfloat16', 'float16')
MAX_SEED = 2**31 - 1  # numpy's and JAX's seeds alike


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value) -> bool:
    return _is_int(value) or isinstance(value, (float, np.floating))


def _integer(least: int, most: int | None = None):
    def check(value):
        if not _is_int(value):
            return f'must be an integer; got {value!r}'
        if value < least or (most is not None and value > most):
            if least == 1 and most is None:
                return f'must be positive; got {value}'
            return (
                f'must be at least {least}; got {value}'
                if most is None
                else f'must be in [{least}, {most}]; got {value}'
            )
        return None

    return check


def _real(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = True):
    """A finite number in the interval [low, high] (open where said)."""

    def check(value):
        if not is_real(value) or not math.isfinite(value):
            return f'must be a finite number; got {value!r}'
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if too_low or too_high:
            if low == 0 and low_open and high == math.inf:
                return f'must be positive; got {value}'
            if high == math.inf:
                return f'must be {">" if low_open else ">="} {low:g}; got {value}'
            return (
                f'must be in {"(" if low_open else "["}{low:g}, {high:g}'
                f'{")" if high_open else "]"}; got {value}'
            )
        return None

    return check


def _flag(value):
    if not isinstance(value, (bool, np.bool_)):
        return f'must be True or False; got {value!r}'
    return None


def _one_of(choices: tuple[str, ...], optional: bool = False):
    def check(value):
        if value not in choices and not (optional and value is None):
            return f'unknown {{name}} {value!r}; allowed: {", ".join(choices)}'
        return None

    return check


def _text(optional: bool):
    def check(value):
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            return f'must be a {"path or None" if optional else "non-empty string"}; got {value!r}'
        return None

    return check


def _boundaries(value):
    if (
        isinstance(value, str)
        or not isinstance(value, (tuple, list))
        or not all(_is_int(b) for b in value)
    ):
        shown = tuple(value) if isinstance(value, (tuple, list)) else value
        return (
            "must be a tuple of iterations, e.g. --config.lr_boundaries='(32000,48000)'; "
            f'got {shown!r}'
        )
    if not all(b >= 1 for b in value):
        return f'must be positive iterations; got {tuple(value)!r}'
    if list(value) != sorted(value):
        return f'must be in increasing order; got {tuple(value)!r}'
    return None


def _model_name(value):
    from resnet_jax import models

    if not isinstance(value, str):
        return f'must be a model name; got {value!r}'
    try:
        models.create_model(value)
    except ValueError as e:
        return str(e)
    return None


# Each rule gives what is wrong with a value ('must ...', or a sentence naming {name}), or None.
FIELD_RULES: dict[str, Callable[[Any], str | None]] = {
    'model.name': _model_name,
    'model.shortcut': _one_of(SHORTCUTS, optional=True),
    'model.stride_in_1x1': _flag,
    'model.zero_init_residual': _flag,
    'model.drop_path_rate': _real(0, high=1, high_open=True),
    'model.bn_group_size': _integer(0),
    'model.dtype': _one_of(DTYPES),
    'model.bn_epsilon': _real(0, low_open=True),
    'model.frozen_bn': _flag,
    'dataset.name': _text(optional=False),
    'dataset.data_dir': _text(optional=True),
    'dataset.validation_split': _flag,
    'dataset.augment': _flag,
    'dataset.image_size': _integer(1),
    'dataset.min_scale': _integer(1),
    'dataset.max_scale': _integer(1),
    'dataset.crop': _one_of(CROPS),
    'dataset.lighting_std': _real(0),
    'dataset.num_workers': _integer(0),
    'dataset.decoder': _one_of(DECODERS),
    'dataset.preprocessing': _one_of(PREPROCESSING),
    'batch_size': _integer(1),
    'eval_batch_size': _integer(1),
    'learning_rate': _real(0, low_open=True),
    'reference_batch_size': _integer(1),
    'scale_lr_with_batch': _flag,
    'momentum': _real(0, 1),
    'nesterov': _flag,
    'weight_decay': _real(0),
    'weight_decay_on': _one_of(WEIGHT_DECAY_ON),
    'label_smoothing': _real(0, 1),
    'optimizer': _one_of(OPTIMIZERS),
    'lars_trust_coefficient': _real(0, low_open=True),
    'grad_accum_steps': _integer(1),
    'ema_decay': _real(0, 1),
    'schedule': _one_of(SCHEDULES),
    'lr_boundaries': _boundaries,
    'lr_decay_factor': _real(0, 1, low_open=True, high_open=False),
    'plateau_patience': _integer(1),
    'plateau_min_scale': _real(0, 1, low_open=True, high_open=False),
    'lr_poly_power': _real(0, low_open=True),
    'warmup_steps': _integer(0),
    'warmup_learning_rate': _real(0, low_open=True),
    'warmup_type': _one_of(WARMUP_TYPES),
    'num_train_steps': _integer(1),
    'log_every_steps': _integer(1),
    'eval_every_steps': _integer(1),
    'checkpoint_every_steps': _integer(1),
    'keep_checkpoints': _integer(1),
    'seed': _integer(0, MAX_SEED),
    'profile': _flag,
    'execution': _one_of(EXECUTION_PLANS),
    'init_from': _text(optional=True),
}


def flatten(config: ml_collections.ConfigDict, prefix: str = '') -> dict[str, Any]:
    """``{'model.name': ..., 'batch_size': ...}``: every field by its dotted name."""
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(flatten(value, f'{prefix}{key}.'))
        else:
            out[f'{prefix}{key}'] = value
    return out


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError, naming the field, unless every field of ``config`` has a value
    its rule (``FIELD_RULES``) allows and the fields agree with each other. Needs no
    devices, data or files: what depends on those is checked where they are known
    (``resnet_jax.training``)."""
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(
            f'a config is an ml_collections.ConfigDict (get_config() of a '
            f'config file); got {type(config).__name__}'
        )
    fields = flatten(config)
    unknown = sorted(set(fields) - set(FIELD_RULES))
    if unknown:
        raise ConfigError(
            f'unknown config field {unknown[0]!r} (every field: resnet_jax/config.py)'
        )
    missing = sorted(set(FIELD_RULES) - set(fields))
    if missing:
        raise ConfigError(
            f'config field {missing[0]!r} is missing (start from resnet_jax.config.base_config())'
        )
    for name, rule in FIELD_RULES.items():
        problem = rule(fields[name])
        if problem:
            raise ConfigError(
                f'{name} {problem}'
                if problem.startswith('must ')
                else problem.replace('{name}', name)
            )
    _check_agreement(config)


def _check_agreement(c: ml_collections.ConfigDict) -> None:
    """The rules between fields."""
    if c.dataset.min_scale > c.dataset.max_scale:
        raise ConfigError(
            f'dataset.min_scale={c.dataset.min_scale} is larger than '
            f'dataset.max_scale={c.dataset.max_scale}'
        )
    if (
        c.dataset.crop == 'scale'
        and c.dataset.augment
        and c.dataset.min_scale < c.dataset.image_size
    ):
        raise ConfigError(
            f'dataset.min_scale={c.dataset.min_scale} is smaller than '
            f'dataset.image_size={c.dataset.image_size}: scale augmentation '
            'crops image_size from a shorter side in [min_scale, max_scale]'
        )
    group = c.model.bn_group_size
    if group and c.batch_size % min(group, c.batch_size):
        raise ConfigError(
            f'batch_size={c.batch_size} is not a multiple of model.bn_group_size={group}'
        )
    k, batch = c.grad_accum_steps, c.batch_size
    if k > 1:
        if batch % k:
            raise ConfigError(
                f'grad_accum_steps={k} does not split batch_size={batch} into equal micro-batches'
            )
        micro = batch // k
        if not group:
            raise ConfigError(
                f'grad_accum_steps={k} needs model.bn_group_size > 0: '
                'statistics over the whole batch cannot be split into '
                f'micro-batches (set model.bn_group_size={micro} for '
                'statistics per micro-batch)'
            )
        if micro % group:
            raise ConfigError(
                f'micro-batches of {micro} (batch_size={batch} / '
                f'grad_accum_steps={k}) are not a multiple of '
                f'model.bn_group_size={group}'
            )
    if (
        c.schedule == 'step'
        and c.warmup_steps
        and c.lr_boundaries
        and min(c.lr_boundaries) <= c.warmup_steps
    ):
        raise ConfigError(
            f'lr_boundaries {tuple(c.lr_boundaries)} must come after the '
            f'warm-up (warmup_steps={c.warmup_steps})'
        )
    if c.init_from and c.init_from.startswith('folder:'):
        raise ConfigError(f'init_from is a workdir; got {c.init_from!r}')
    if c.model.drop_path_rate and 'plain' in c.model.name:  # plain18.., cifar_plainN
        raise ConfigError(
            f'model.drop_path_rate={c.model.drop_path_rate} drops residual branches; '
            f'{c.model.name} is a plain net (set it to 0)'
        )
    if c.model.frozen_bn and c.weight_decay_on != 'kernels':
        raise ConfigError(
            f"model.frozen_bn=True needs weight_decay_on='kernels' (got "
            f'{c.weight_decay_on!r}): decay on every parameter would still '
            'move the frozen BatchNorm scales and biases'
        )
