"""Every config field, documented in one place.

Each file in ``configs/`` starts from ``base_config()`` and overrides the fields of its
experiment; any field can be overridden on the command line, e.g.
``--config.batch_size=64 --config.model.shortcut=C``.
"""

from __future__ import annotations

import math
import os
import pathlib
import warnings
from typing import Any, Callable

import ml_collections
import numpy as np


class ConfigError(ValueError):
    """A config that cannot run; raised before anything is compiled or written."""


def base_config() -> ml_collections.ConfigDict:
    """The defaults: the paper's CIFAR-10 recipe (sec. 4.2) on the embedded digits set."""
    c = ml_collections.ConfigDict()

    # --- model: create_model(model.name, **<the other model fields>) -----------------------
    c.model = ml_collections.ConfigDict()
    c.model.name = 'cifar_resnet20'     # any name of resnet_jax.models.list_models()
    c.model.shortcut = ml_collections.FieldReference(None, field_type=str)  # None: the net's own
    c.model.stride_in_1x1 = True        # bottleneck stride: True "v1" (paper), False "v1.5"
    c.model.zero_init_residual = False  # modern option: last BN scale of each branch = 0
    c.model.bn_group_size = 32          # BN statistics per 32 images (paper: 32 per GPU);
    #                                     0 = synchronised over the whole global batch
    c.model.dtype = 'float32'           # compute dtype; 'bfloat16' for mixed precision
    c.model.bn_epsilon = 1e-5           # (Keras-converted ResNets use 1.001e-5)
    c.model.frozen_bn = False           # BatchNorm statistics and affine fixed (fine-tuning)

    # --- data ----------------------------------------------------------------------------
    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = 'digits'           # 'digits' (embedded), 'cifar10', 'imagenet2012',
    #                                     'folder:/path/to/images', any tfds dataset
    c.dataset.data_dir = ml_collections.FieldReference(None, field_type=str)  # tfds data_dir
    c.dataset.validation_split = False  # True: hold out part of train (CIFAR: 45k/5k)
    c.dataset.augment = True            # the paper's training augmentation
    # Image datasets read from JPEGs (ImageNet, ...); CIFAR-style arrays keep their size.
    c.dataset.image_size = 224          # train crop / test view side
    c.dataset.min_scale = 256           # scale augmentation: shorter side in
    c.dataset.max_scale = 480           #   [min_scale, max_scale] (sec. 3.4)
    c.dataset.crop = 'scale'            # 'scale' (paper) or 'inception' (random-resized crop)
    c.dataset.lighting_std = 0.1        # AlexNet PCA lighting noise std (0 disables)
    c.dataset.num_workers = 0           # decode/augment worker processes per host (0: one
    #                                     per core); in-memory datasets need none
    c.dataset.preprocessing = 'mean'    # 'mean' (paper: minus the mean image); converted
    #                                     weights: 'torchvision' or 'caffe' (Keras)

    # --- optimisation (sec. 3.4 / 4.2) -----------------------------------------------------
    c.batch_size = 128                  # global batch, over all devices and hosts
    c.eval_batch_size = 500             # global; the last batch is padded and masked
    c.learning_rate = 0.1               # base lr for reference_batch_size
    c.reference_batch_size = 128        # the paper's batch for this recipe
    c.scale_lr_with_batch = True        # lr *= batch_size / reference_batch_size
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = 1e-4               # the paper's L2 term, added to the gradient
    c.weight_decay_on = 'kernels'       # 'kernels' (conv + fc kernels) or 'all' parameters
    c.label_smoothing = 0.0             # modern option
    c.optimizer = 'sgd'                 # 'sgd' (paper) or 'lars' (You et al. 2017: each
    #                                     kernel's step scaled by trust_coefficient *
    #                                     |w| / |g + wd w|; BN parameters and biases
    #                                     take plain momentum steps, without weight decay).
    #                                     LARS's learning_rate is on another scale than
    #                                     SGD's: 34 at batch 32k, ~2 on the digits
    c.lars_trust_coefficient = 1e-3     # 'lars': eta of You et al.
    c.grad_accum_steps = 1              # the global batch runs as this many micro-batches
    #                                     of batch_size / grad_accum_steps (whole BN groups)
    #                                     in one step: the same step, less memory
    c.ema_decay = 0.0                   # > 0: an exponential moving average of the weights
    #                                     and BN statistics (ema = d * ema + (1 - d) * new,
    #                                     every step), evaluated beside them (eval_ema_*)

    # --- schedule --------------------------------------------------------------------------
    c.schedule = 'step'                 # 'step', 'plateau' (÷factor when eval error stalls),
    #                                     'cosine' (modern option), 'poly' (to 0 at the last
    #                                     step, as (1 - t)^lr_poly_power: the LARS recipes)
    c.lr_boundaries = (32_000, 48_000)  # 'step': iterations at which lr is divided
    c.lr_decay_factor = 0.1
    c.plateau_patience = 3              # 'plateau': evaluations without improvement
    c.plateau_min_scale = 1e-3          # 'plateau': lr never falls below base * this
    c.lr_poly_power = 2.0               # 'poly': the power of the decay
    c.warmup_steps = 0                  # iterations of warm-up before the schedule
    c.warmup_learning_rate = 0.01       # base lr during warm-up (scaled like learning_rate)
    c.warmup_type = 'constant'          # 'constant' (paper, ResNet-110) or 'linear' from 0
    #                                     to the base lr; 'gradual' (Goyal et al.) linearly
    #                                     from learning_rate as given (the lr of
    #                                     reference_batch_size) to it scaled to batch_size

    # --- loop ------------------------------------------------------------------------------
    c.num_train_steps = 64_000
    c.log_every_steps = 100
    c.eval_every_steps = 1_000
    c.checkpoint_every_steps = 1_000
    c.keep_checkpoints = 3              # the last K checkpoints are kept
    c.seed = 0
    c.profile = False                   # capture a jax.profiler trace of a few steps
    c.execution = 'auto'                # how the model is run: 'auto' (the XLA:CPU plan on
    #                                     CPU, XLA's defaults elsewhere), 'cpu', 'xla'; the
    #                                     same function either way (resnet_jax.backends)
    c.init_from = ml_collections.FieldReference(None, field_type=str)  # fine-tune: a workdir
    #                                     (a run or `resnet-jax convert` output)
    #                                     whose latest params start this run; an fc of
    #                                     another shape is re-initialised
    return c


def from_dict(values: dict, strict: bool = False) -> ml_collections.ConfigDict:
    """``base_config()`` overlaid with ``values`` (e.g. a run's saved ``config.json``), so
    fields it lacks keep their defaults.

    Fields this version does not have are never applied: those removed from the schema in
    an earlier version (``REMOVED_FIELDS``, e.g. a run's ``model.scan_blocks``) are
    dropped quietly; any other (a typo in a hand-edited file) is a warning naming it, or
    with ``strict`` a ``ConfigError``."""
    config = base_config()
    unknown = []

    def overlay(target, source, prefix):
        for key, value in source.items():
            name = f'{prefix}{key}'
            if key not in target:
                if name not in REMOVED_FIELDS:
                    unknown.append(name)
                continue
            if isinstance(value, dict) and isinstance(target[key], ml_collections.ConfigDict):
                overlay(target[key], value, f'{name}.')
            else:
                if isinstance(value, list) and isinstance(target.get(key), tuple):
                    value = tuple(value)  # JSON has no tuples
                try:
                    target[key] = value
                except TypeError as e:
                    raise ConfigError(f'{name}: {e}') from None

    overlay(config, values, '')
    if unknown:
        message = f'unknown config field(s) {", ".join(unknown)} (not in this version\'s schema)'
        if strict:
            raise ConfigError(message)
        warnings.warn(f'{message}; ignored', stacklevel=2)
    return config


# Fields of earlier versions' configs, read from their config.json and ignored.
REMOVED_FIELDS = frozenset({'model.scan_blocks', 'model.canonical_grads', 'model.dot_1x1',
                            'cpu_train_step_fusion'})


# --- validation: every field, before anything is built or written ------------------------------

OPTIMIZERS = ('sgd', 'lars')
SCHEDULES = ('step', 'plateau', 'cosine', 'poly')
WARMUP_TYPES = ('constant', 'linear', 'gradual')
CROPS = ('scale', 'inception')
WEIGHT_DECAY_ON = ('kernels', 'all')
PREPROCESSING = ('mean', 'torchvision', 'caffe')
EXECUTION_PLANS = ('auto', 'xla', 'cpu')
MAX_SEED = 2**31 - 1  # numpy's and JAX's seeds alike


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return _is_int(value) or isinstance(value, (float, np.floating))


def _integer(least: int, most: int | None = None):
    def check(value):
        if not _is_int(value):
            return f'must be an integer; got {value!r}'
        if value < least or (most is not None and value > most):
            if least == 1 and most is None:
                return f'must be positive; got {value}'
            return (f'must be at least {least}; got {value}' if most is None
                    else f'must be in [{least}, {most}]; got {value}')
        return None
    return check


def _real(low: float, high: float = math.inf, low_open: bool = False,
          high_open: bool = True):
    """A finite number in the interval [low, high] (open where said)."""
    def check(value):
        if not _is_real(value) or not math.isfinite(value):
            return f'must be a finite number; got {value!r}'
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if too_low or too_high:
            if low == 0 and low_open and high == math.inf:
                return f'must be positive; got {value}'
            if high == math.inf:
                return f'must be {">" if low_open else ">="} {low:g}; got {value}'
            return (f'must be in {"(" if low_open else "["}{low:g}, {high:g}'
                    f'{")" if high_open else "]"}; got {value}')
        return None
    return check


def _flag(value):
    if not isinstance(value, (bool, np.bool_)):
        return f'must be True or False; got {value!r}'
    return None


def _one_of(choices: tuple[str, ...]):
    def check(value):
        if value not in choices:
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
    if isinstance(value, str) or not isinstance(value, (tuple, list)) or \
            not all(_is_int(b) for b in value):
        shown = tuple(value) if isinstance(value, (tuple, list)) else value
        return ("must be a tuple of iterations, e.g. --config.lr_boundaries='(32000,48000)'; "
                f'got {shown!r}')
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


def _shortcut(value):
    if value is None:
        return None
    return _one_of(('A', 'B', 'C'))(value)


def _dtype(value):
    return _one_of(('float32', 'bfloat16', 'float16'))(value)


# Every field and its rule: a function of the value giving what is wrong, or None.
FIELD_RULES: dict[str, Callable[[Any], str | None]] = {
    'model.name': _model_name,
    'model.shortcut': _shortcut,
    'model.stride_in_1x1': _flag,
    'model.zero_init_residual': _flag,
    'model.bn_group_size': _integer(0),
    'model.dtype': _dtype,
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
        raise ConfigError(f'a config is an ml_collections.ConfigDict (get_config() of a '
                          f'config file); got {type(config).__name__}')
    fields = flatten(config)
    unknown = sorted(set(fields) - set(FIELD_RULES))
    if unknown:
        raise ConfigError(f'unknown config field {unknown[0]!r} (every field: '
                          'resnet_jax/config.py)')
    missing = sorted(set(FIELD_RULES) - set(fields))
    if missing:
        raise ConfigError(f'config field {missing[0]!r} is missing (start from '
                          'resnet_jax.config.base_config())')
    for name, rule in FIELD_RULES.items():
        problem = rule(fields[name])
        if problem:  # 'must ...' about the field, or a sentence that names it itself
            raise ConfigError(f'{name} {problem}' if problem.startswith('must ')
                              else problem.replace('{name}', name))
    _check_agreement(config)


def _check_agreement(c: ml_collections.ConfigDict) -> None:
    """The rules between fields."""
    if c.dataset.min_scale > c.dataset.max_scale:
        raise ConfigError(f'dataset.min_scale={c.dataset.min_scale} is larger than '
                          f'dataset.max_scale={c.dataset.max_scale}')
    if c.dataset.crop == 'scale' and c.dataset.augment and \
            c.dataset.min_scale < c.dataset.image_size:
        raise ConfigError(f'dataset.min_scale={c.dataset.min_scale} is smaller than '
                          f'dataset.image_size={c.dataset.image_size}: scale augmentation '
                          'crops image_size from a shorter side in [min_scale, max_scale]')
    group = c.model.bn_group_size
    if group and c.batch_size % min(group, c.batch_size):
        raise ConfigError(f'batch_size={c.batch_size} is not a multiple of '
                          f'model.bn_group_size={group}')
    k, batch = c.grad_accum_steps, c.batch_size
    if k > 1:
        if batch % k:
            raise ConfigError(f'grad_accum_steps={k} does not split batch_size={batch} into '
                              'equal micro-batches')
        micro = batch // k
        if not group:
            raise ConfigError(f'grad_accum_steps={k} needs model.bn_group_size > 0: '
                              'statistics over the whole batch cannot be split into '
                              f'micro-batches (set model.bn_group_size={micro} for '
                              'statistics per micro-batch)')
        if micro % group:
            raise ConfigError(f'micro-batches of {micro} (batch_size={batch} / '
                              f'grad_accum_steps={k}) are not a multiple of '
                              f'model.bn_group_size={group}')
    if c.schedule == 'step' and c.warmup_steps and c.lr_boundaries and \
            min(c.lr_boundaries) <= c.warmup_steps:
        raise ConfigError(f'lr_boundaries {tuple(c.lr_boundaries)} must come after the '
                          f'warm-up (warmup_steps={c.warmup_steps})')
    if c.init_from and c.init_from.startswith('folder:'):
        raise ConfigError(f'init_from is a workdir; got {c.init_from!r}')
    if c.model.frozen_bn and c.weight_decay_on != 'kernels':
        raise ConfigError(f'model.frozen_bn=True needs weight_decay_on=\'kernels\' (got '
                          f'{c.weight_decay_on!r}): decay on every parameter would still '
                          'move the frozen BatchNorm scales and biases')


# --- a run's identity: what a checkpoint must match to be resumed --------------------------------

# The fields that change what a checkpoint means or which batches the run sees: the
# network (every model field), the data stream (the dataset, its split and augmentation,
# the batch, the seed, the micro-batches), and the layout of the optimiser state (the
# optimiser, the weight decay mask, the schedule, the EMA). A checkpoint is resumed only
# by a config that agrees on all of them; the other fields (learning rates, boundaries,
# warm-up, momentum and weight decay values, the run's length, intervals, evaluation,
# execution, where the data lives) may change between launches.
IDENTITY_FIELDS = (
    'dataset.name', 'dataset.validation_split', 'dataset.augment', 'dataset.image_size',
    'dataset.min_scale', 'dataset.max_scale', 'dataset.crop', 'dataset.lighting_std',
    'dataset.preprocessing', 'batch_size', 'seed', 'grad_accum_steps', 'optimizer',
    'weight_decay_on', 'schedule', 'ema_decay')
# The model fields that decide the function a trained network computes (the others,
# bn_group_size, zero_init_residual and dtype, concern training or arithmetic): what
# evaluating or loading a checkpoint with a config checks.
ARCHITECTURE_FIELDS = ('model.name', 'model.shortcut', 'model.stride_in_1x1',
                       'model.bn_epsilon')


def identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The run identity of ``config``: ``{dotted field: value}`` for every model field and
    ``IDENTITY_FIELDS``, as JSON values (``model.shortcut`` as the net's own option when
    unset)."""
    fields = flatten(config)
    out = {name: value for name, value in fields.items() if name.startswith('model.')}
    if out.get('model.shortcut') is None:
        from resnet_jax import models
        try:
            out['model.shortcut'] = models.create_model(config.model.name).shortcut
        except ValueError:
            pass  # an unknown model: validate() names it
    out.update({name: fields[name] for name in IDENTITY_FIELDS})
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


# The identity of checkpoints written before the full identity was recorded (only the model
# and dataset names, and whether the state holds an EMA).
_LEGACY_IDENTITY = {'model': 'model.name', 'dataset': 'dataset.name'}


def recorded_identity(meta: dict) -> dict[str, Any]:
    """The identity a checkpoint's meta records (``identity()``; older checkpoints: the
    part they recorded, with ``ema`` as ``ema_decay > 0``)."""
    if 'identity' in meta:
        return dict(meta['identity'])
    recorded = {field: meta[key] for key, field in _LEGACY_IDENTITY.items() if key in meta}
    recorded['ema'] = bool(meta.get('ema', False))
    return recorded


def identity_differences(recorded: dict[str, Any],
                         config: ml_collections.ConfigDict) -> list[tuple[str, Any, Any]]:
    """``[(field, recorded value, config's value)]`` where ``config`` disagrees with a
    recorded identity (fields it did not record are not compared)."""
    current = identity(config)
    current['ema'] = config.ema_decay > 0
    out = []
    for field, value in recorded.items():
        if field == 'ema' and 'ema_decay' in recorded:
            continue
        mine = current.get(field, '<not a field>')
        if _same(value, mine):
            continue
        out.append((field, value, mine))
    return out


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    if _is_real(a) and _is_real(b) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


# --- config files --------------------------------------------------------------------------------

def shipped_configs_dir() -> pathlib.Path:
    """The folder of the config files that ship with the package: ``resnet_jax.configs``
    of an installed wheel (``setup.py`` maps the checkout's ``configs/`` to it), or the
    ``configs/`` of a source checkout."""
    try:
        import resnet_jax.configs as shipped
        return pathlib.Path(shipped.__file__).parent
    except ImportError:
        return pathlib.Path(__file__).resolve().parent.parent / 'configs'


def resolve_config_path(spec: str) -> str:
    """``path[:arg]`` with ``path`` as given where it exists, else the shipped config of
    that name: ``cifar10.py:resnet110`` or ``configs/cifar10.py:resnet110`` from any
    folder (``shipped_configs_dir``)."""
    path, sep, arg = spec.partition(':')
    if os.path.exists(path):
        return spec
    candidate = pathlib.PurePath(path)
    if len(candidate.parts) == 1 or (len(candidate.parts) == 2 and
                                     candidate.parts[0] == 'configs'):
        shipped = shipped_configs_dir() / candidate.name
        if shipped.is_file():
            return f'{shipped}{sep}{arg}'
    return spec


def load_file(spec: str) -> ml_collections.ConfigDict:
    """The config of a config file, ``path/to/file.py`` or ``path/to/file.py:arg``
    (``get_config()`` or ``get_config(arg)``; a shipped config by its name: see
    ``resolve_config_path``), validated; ConfigError (one line) for a file that does not
    load, raises, or does not return a valid config."""
    import importlib.util

    path, _, arg = resolve_config_path(spec).partition(':')
    if not os.path.isfile(path):
        raise ConfigError(f'cannot load config file {path}: '
                          f'{"it is not a file" if os.path.exists(path) else "it does not exist"}')
    try:
        module_spec = importlib.util.spec_from_file_location('resnet_jax_config_file', path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        if not hasattr(module, 'get_config'):
            raise ConfigError(f'cannot load config file {path}: it has no get_config()')
        config = module.get_config(arg) if arg else module.get_config()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 (a config file can raise anything)
        first = (str(e).splitlines() or [''])[0]
        raise ConfigError(f'cannot load config file {path}: {type(e).__name__}: {first}'
                          ) from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f'config file {path}: get_config() returned a '
                          f'{type(config).__name__}; it must return an '
                          'ml_collections.ConfigDict')
    validate(config)
    return config


def model_from_config(config: ml_collections.ConfigDict, num_classes: int):
    """The network of ``config.model`` with ``num_classes`` outputs:
    ``models.create_model(config.model.name, <the other model fields that are set>)``."""
    from resnet_jax import models
    overrides = {k: v for k, v in config.model.items() if k != 'name' and v is not None}
    return models.create_model(config.model.name, num_classes=num_classes, **overrides)
