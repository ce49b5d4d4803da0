"""Every config field, documented in one place.

Each file in ``configs/`` starts from ``base_config()`` and overrides the fields of its
experiment; any field can be overridden on the command line, e.g.
``--config.batch_size=64 --config.model.shortcut=C``.
"""

from __future__ import annotations

import ml_collections


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
    #                                     same function either way (resnet_jax.execution)
    c.init_from = ml_collections.FieldReference(None, field_type=str)  # fine-tune: a workdir
    #                                     (a run or `python -m resnet_jax.convert` output)
    #                                     whose latest params start this run; an fc of
    #                                     another shape is re-initialised
    return c


def from_dict(values: dict) -> ml_collections.ConfigDict:
    """``base_config()`` overlaid with ``values`` (e.g. a run's saved ``config.json``), so
    fields it lacks keep their defaults and fields this version does not have (e.g. a
    run's ``model.scan_blocks``) are left out."""
    config = base_config()

    def overlay(target, source):
        for key, value in source.items():
            if key not in target:
                continue
            if isinstance(value, dict) and isinstance(target[key], ml_collections.ConfigDict):
                overlay(target[key], value)
            else:
                if isinstance(value, list) and isinstance(target.get(key), tuple):
                    value = tuple(value)  # JSON has no tuples
                target[key] = value

    overlay(config, values)
    return config
