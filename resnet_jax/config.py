"""Every config field, documented in one place (allowed values and ``validate``:
``resnet_jax.config_rules``); a run's identity; config files. Files in ``configs/`` start
from ``base_config()``; ``--config.<field>=<value>`` overrides any field.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import warnings
from typing import Any

import ml_collections

# Re-exported: the package and the config files import them from here.
from resnet_jax.config_rules import ConfigError, flatten, is_real, validate  # noqa: F401


def base_config() -> ml_collections.ConfigDict:
    """The defaults: the paper's CIFAR-10 recipe (sec. 4.2) on the embedded digits set."""
    c = ml_collections.ConfigDict()

    # --- model: create_model(model.name, **<the other model fields>) -----------------------
    c.model = ml_collections.ConfigDict()
    c.model.name = 'cifar_resnet20'  # any name of resnet_jax.models.list_models()
    c.model.shortcut = ml_collections.FieldReference(None, field_type=str)  # None: the net's own
    c.model.stride_in_1x1 = True  # bottleneck stride: True "v1" (paper), False "v1.5"
    c.model.zero_init_residual = False  # modern option: last BN scale of each branch = 0
    c.model.drop_path_rate = 0.0  # stochastic depth (timm's name); 0: the paper
    c.model.bn_group_size = 32  # BN statistics per 32 images (paper: per GPU); 0:
    #                                     over the whole global batch
    c.model.dtype = 'float32'  # compute dtype; 'bfloat16' for mixed precision
    c.model.bn_epsilon = 1e-5  # (Keras-converted ResNets use 1.001e-5)
    c.model.frozen_bn = False  # BatchNorm statistics and affine fixed (fine-tuning)

    # --- data ----------------------------------------------------------------------------
    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = 'digits'  # 'digits' (embedded), 'cifar10', 'imagenet2012',
    #                                     'folder:/path/to/images', any tfds dataset
    c.dataset.data_dir = ml_collections.FieldReference(None, field_type=str)  # tfds data_dir
    c.dataset.validation_split = False  # True: hold out part of train (CIFAR: 45k/5k)
    c.dataset.augment = True  # the paper's training augmentation
    c.dataset.image_size = 224  # train crop / test view side (arrays keep their size)
    c.dataset.min_scale = 256  # scale augmentation: shorter side in
    c.dataset.max_scale = 480  #   [min_scale, max_scale] (sec. 3.4)
    c.dataset.crop = 'scale'  # 'scale' (paper) or 'inception' (random-resized crop)
    c.dataset.lighting_std = 0.1  # AlexNet PCA lighting noise std (0 disables)
    c.dataset.num_workers = 0  # decode/augment processes per host (0: one per core)
    c.dataset.decoder = 'auto'  # training's JPEGs: 'cpu' (PIL), 'dali' (GPU; [gpu] extra),
    #                                     'auto' (dali where installed, on NVIDIA GPUs)
    c.dataset.preprocessing = 'mean'  # 'mean' (paper: minus the mean image); converted
    #                                     weights: 'torchvision' or 'caffe' (Keras)

    # --- optimisation (sec. 3.4 / 4.2) -----------------------------------------------------
    c.batch_size = 128  # global batch, over all devices and hosts
    c.eval_batch_size = 500  # global; the last batch is padded and masked
    c.learning_rate = 0.1  # base lr for reference_batch_size
    c.reference_batch_size = 128  # the paper's batch for this recipe
    c.scale_lr_with_batch = True  # lr *= batch_size / reference_batch_size
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = 1e-4  # the paper's L2 term, added to the gradient
    c.weight_decay_on = 'kernels'  # 'kernels' (conv + fc kernels) or 'all' parameters
    c.label_smoothing = 0.0  # modern option
    c.optimizer = 'sgd'  # 'sgd' (paper) or 'lars' (You et al. 2017: kernel
    #                                     steps scaled by trust_coefficient * |w| / |g + wd w|;
    #                                     its lr is on another scale: 34 at batch 32k, ~2 here)
    c.lars_trust_coefficient = 1e-3  # 'lars': eta of You et al.
    c.grad_accum_steps = 1  # micro-batches per step (whole BN groups): the same
    #                                     step in less memory
    c.ema_decay = 0.0  # > 0: ema = d * ema + (1 - d) * new of the weights and
    #                                     BN statistics, evaluated beside them (eval_ema_*)

    # --- schedule --------------------------------------------------------------------------
    c.schedule = 'step'  # 'step', 'plateau' (÷factor when eval error stalls),
    #                                     'cosine' (modern option), 'poly' (to 0 at the last
    #                                     step, as (1 - t)^lr_poly_power: the LARS recipes)
    c.lr_boundaries = (32_000, 48_000)  # 'step': iterations at which lr is divided
    c.lr_decay_factor = 0.1
    c.plateau_patience = 3  # 'plateau': evaluations without improvement
    c.plateau_min_scale = 1e-3  # 'plateau': lr never falls below base * this
    c.lr_poly_power = 2.0  # 'poly': the power of the decay
    c.warmup_steps = 0  # iterations of warm-up before the schedule
    c.warmup_learning_rate = 0.01  # base lr during warm-up (scaled like learning_rate)
    c.warmup_type = 'constant'  # 'constant' (paper, ResNet-110), 'linear' from 0, or
    #                                     'gradual' (Goyal et al.): from learning_rate to it
    #                                     scaled to batch_size

    # --- loop ------------------------------------------------------------------------------
    c.num_train_steps = 64_000
    c.log_every_steps = 100
    c.eval_every_steps = 1_000
    c.checkpoint_every_steps = 1_000
    c.keep_checkpoints = 3
    c.seed = 0
    c.profile = False  # capture a jax.profiler trace of a few steps
    c.execution = 'auto'  # 'auto' (the CPU plan on CPU, XLA's elsewhere), 'cpu',
    #                                     'xla': the same function (resnet_jax.backends)
    c.init_from = ml_collections.FieldReference(None, field_type=str)  # fine-tune: a workdir
    #                                     (a run or convert output) whose latest params start
    #                                     this run; an fc of another shape is re-initialised
    return c


def from_dict(values: dict, strict: bool = False) -> ml_collections.ConfigDict:
    """``base_config()`` overlaid with ``values`` (e.g. a run's saved ``config.json``).
    Fields of earlier versions (``REMOVED_FIELDS``) are dropped quietly; any other unknown
    field is a warning naming it, or with ``strict`` a ``ConfigError``."""
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
        message = f"unknown config field(s) {', '.join(unknown)} (not in this version's schema)"
        if strict:
            raise ConfigError(message)
        warnings.warn(f'{message}; ignored', stacklevel=2)
    return config


# Fields of earlier versions' configs, read from their config.json and ignored.
REMOVED_FIELDS = frozenset(
    {'model.scan_blocks', 'model.canonical_grads', 'model.dot_1x1', 'cpu_train_step_fusion'}
)


# --- a run's identity: what a checkpoint must match to be resumed --------------------------------

# With every model field: what changes a checkpoint's meaning, the batches the run sees or
# the optimiser state's layout. A checkpoint resumes only with a config that agrees on all
# of them; the rest (learning rates, lengths, intervals, where data lives) may change.
IDENTITY_FIELDS = (
    'dataset.name',
    'dataset.validation_split',
    'dataset.augment',
    'dataset.image_size',
    'dataset.min_scale',
    'dataset.max_scale',
    'dataset.crop',
    'dataset.lighting_std',
    'dataset.preprocessing',
    'batch_size',
    'seed',
    'grad_accum_steps',
    'optimizer',
    'weight_decay_on',
    'schedule',
    'ema_decay',
)
# The model fields that decide what a trained network computes: checked on evaluate and load.
ARCHITECTURE_FIELDS = ('model.name', 'model.shortcut', 'model.stride_in_1x1', 'model.bn_epsilon')


def identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``{dotted field: JSON value}`` of every model field and ``IDENTITY_FIELDS`` (an unset
    ``model.shortcut`` as the net's own)."""
    fields = flatten(config)
    out = {name: value for name, value in fields.items() if name.startswith('model.')}
    if out.get('model.shortcut') is None:
        from resnet_jax import models

        with contextlib.suppress(ValueError):  # an unknown model: validate() names it
            out['model.shortcut'] = models.create_model(config.model.name).shortcut
    out.update({name: fields[name] for name in IDENTITY_FIELDS})
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


# Older checkpoints recorded only these (and whether the state holds an EMA).
_LEGACY_IDENTITY = {'model': 'model.name', 'dataset': 'dataset.name'}


def recorded_identity(meta: dict) -> dict[str, Any]:
    """The identity a checkpoint's meta records (older ones: a part, ``ema`` for EMA)."""
    if 'identity' in meta:
        return dict(meta['identity'])
    recorded = {field: meta[key] for key, field in _LEGACY_IDENTITY.items() if key in meta}
    recorded['ema'] = bool(meta.get('ema', False))
    return recorded


def identity_differences(
    recorded: dict[str, Any], config: ml_collections.ConfigDict
) -> list[tuple[str, Any, Any]]:
    """``[(field, recorded value, config's value)]`` for each recorded field ``config``
    disagrees with."""
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
    if is_real(a) and is_real(b) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


# --- config files --------------------------------------------------------------------------------
# Local paths only (pathlib, os.path): a config file is a Python module that ml_collections'
# config_flags imports from the local disk; a bucket URL is not importable.


def shipped_configs_dir() -> pathlib.Path:
    """The shipped config files: ``resnet_jax.configs`` of a wheel (``setup.py`` maps
    ``configs/`` to it), or a source checkout's ``configs/``."""
    try:
        import resnet_jax.configs as shipped

        return pathlib.Path(shipped.__file__).parent
    except ImportError:
        return pathlib.Path(__file__).resolve().parent.parent / 'configs'


def resolve_config_path(spec: str) -> str:
    """``path[:arg]`` as given where ``path`` exists, else the shipped config of that name
    (``cifar10.py:resnet110`` or ``configs/cifar10.py:resnet110`` from any folder)."""
    path, sep, arg = spec.partition(':')
    if os.path.exists(path):
        return spec
    candidate = pathlib.PurePath(path)
    if len(candidate.parts) == 1 or (len(candidate.parts) == 2 and candidate.parts[0] == 'configs'):
        shipped = shipped_configs_dir() / candidate.name
        if shipped.is_file():
            return f'{shipped}{sep}{arg}'
    return spec


def model_from_config(config: ml_collections.ConfigDict, num_classes: int):
    """``models.create_model`` of ``config.model``'s set fields, ``num_classes`` outputs."""
    from resnet_jax import models

    overrides = {k: v for k, v in config.model.items() if k != 'name' and v is not None}
    return models.create_model(config.model.name, num_classes=num_classes, **overrides)
