"""ImageNet, sec. 3.4 and Tables 2-4: ``configs/imagenet.py:<name>``.

Names: plain18, plain34, resnet18, resnet34a, resnet34b, resnet34c, resnet50, resnet101,
resnet152 (18/34 use option A as in Table 2 unless the name says otherwise; 50/101/152
use option B, stride in the first 1x1 as the paper's models); and the large-batch recipes
that TPU-pod users start from, resnet50_goyal8k and resnet50_lars32k (below).

    python -m resnet_jax.main --config=configs/imagenet.py:resnet50 --workdir=gs://.../r50
    # reproducible fixed-step alternative: lr / 10 at epochs 30 and 60 of 90
    ... --config.schedule=step --config.num_train_steps=450450

Recipe: batch 256 (8 GPUs x 32, BatchNorm statistics per 32 images), SGD momentum 0.9,
weight decay 1e-4, lr 0.1 divided by 10 when the validation error plateaus, at most
60x10^4 iterations; scale augmentation [256, 480], 224 crops, flips, per-pixel mean,
PCA lighting. The ImageNet input pipeline is resnet_jax's tfds ``imagenet2012`` reader;
the same recipe trains on a folder of your own images with
``--config.dataset.name=folder:/path/to/images`` (one subfolder per class).

Paper (top-1 / top-5 error %, 10-crop, Tables 2-3; ``resnet_jax.paper``): plain-18 27.94,
plain-34 28.54/10.02,
ResNet-18 27.88, ResNet-34 A 25.03/7.76, B 24.52/7.46, C 24.19/7.40, ResNet-50 22.85/6.71,
ResNet-101 21.75/6.05, ResNet-152 21.43/5.71. Multi-scale (Table 4): ResNet-34 B
21.84/5.71, C 21.53/5.60, ResNet-50 20.74/5.25, ResNet-101 19.87/4.60, ResNet-152 19.38/4.49.

Large batches (``resnet_jax.paper.LARGE_BATCH``; single centre 224 crop):

* ``resnet50_goyal8k``: Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training
  ImageNet in 1 Hour" (arXiv:1706.02677). Batch 8192 with BatchNorm per 32 images (their
  256 workers x 32), lr 0.1 x 8192/256 = 3.2 (linear scaling rule) reached by gradual
  warm-up from 0.1 over 5 epochs, divided by 10 at epochs 30, 60 and 80 of 90, momentum
  0.9, weight decay 1e-4 off BatchNorm's scale and bias, the last BN scale of each residual
  block initialised to 0, the stride in the 3x3 conv, scale and aspect-ratio augmentation,
  per-colour mean and std. Paper (Table 1): 23.74 +- 0.09% top-1 error at batch 8k,
  23.60 +- 0.12% at 256.

      python -m resnet_jax.main --config=configs/imagenet.py:resnet50_goyal8k --workdir=...
      # the same training on fewer chips: 8 micro-batches of 1024 per step
      ...  --config.grad_accum_steps=8

* ``resnet50_lars32k``: LARS, You, Gitman and Ginsburg 2017, "Large Batch Training of
  Convolutional Networks" (arXiv:1708.03888), at batch 32768 as in You et al. 2018,
  "ImageNet Training in Minutes" (ICPP; arXiv:1709.05011), which reports 75.4% top-1
  accuracy (24.6% error) for ResNet-50 at 32k in 90 epochs. Trust coefficient 0.001,
  momentum 0.9, weight decay 1e-4, neither trust ratio nor weight decay on BatchNorm
  parameters and biases; the schedule of the tensorflow/tpu reference implementation for
  batch 32768 (``lars_util.poly_rate_schedule``): linear warm-up from 0 to 34.0 over 12
  epochs, then polynomial decay (power 2) to 0 at the end of 90 epochs. BatchNorm per 32
  images (32768 over 1,024 TPU cores).

      python -m resnet_jax.main --config=configs/imagenet.py:resnet50_lars32k --workdir=...
"""

import math

from resnet_jax.config import base_config

TRAIN_IMAGES = 1_281_167
STEPS_PER_EPOCH = 5005  # 1,281,167 training images / 256, rounded up


def steps_for(epochs: float, batch_size: int) -> int:
    """The iterations of ``epochs`` passes over the training set at ``batch_size``."""
    return math.ceil(epochs * TRAIN_IMAGES / batch_size)


# name -> (model, shortcut); the paper's errors of each: resnet_jax.paper.TEN_CROP
VARIANTS = {
    'plain18': ('plain18', 'A'),
    'plain34': ('plain34', 'A'),
    'resnet18': ('resnet18', 'A'),
    'resnet34a': ('resnet34', 'A'),
    'resnet34b': ('resnet34', 'B'),
    'resnet34c': ('resnet34', 'C'),
    'resnet50': ('resnet50', 'B'),
    'resnet101': ('resnet101', 'B'),
    'resnet152': ('resnet152', 'B'),
}


def goyal8k(config):
    """Goyal et al. 2017's batch-8192 recipe (see the module docstring)."""
    batch = 8192
    config.model.stride_in_1x1 = False  # "stride-2 convolutions on 3x3 layers"
    config.model.zero_init_residual = True  # gamma = 0 in each block's last BN
    config.dataset.crop = 'inception'  # scale and aspect-ratio augmentation
    config.dataset.preprocessing = 'torchvision'  # per-colour mean and std
    config.batch_size = batch  # 256 workers x 32 images
    config.learning_rate = 0.1  # x 8192 / 256 = 3.2
    config.reference_batch_size = 256
    config.warmup_type = 'gradual'  # 0.1 -> 3.2, linearly
    config.warmup_steps = steps_for(5, batch)
    config.schedule = 'step'
    config.lr_boundaries = tuple(steps_for(e, batch) for e in (30, 60, 80))
    config.num_train_steps = steps_for(90, batch)
    config.eval_every_steps = config.checkpoint_every_steps = steps_for(1, batch)
    config.log_every_steps = 20
    return config


def lars32k(config):
    """LARS at batch 32768 (You et al.; see the module docstring)."""
    batch = 32768
    config.model.stride_in_1x1 = False
    config.model.zero_init_residual = True
    config.dataset.crop = 'inception'
    config.dataset.preprocessing = 'torchvision'
    config.dataset.lighting_std = 0.0
    config.optimizer = 'lars'
    config.lars_trust_coefficient = 1e-3
    config.batch_size = batch
    config.learning_rate = 34.0  # the peak lr at 32768
    config.reference_batch_size = batch
    config.warmup_type = 'linear'  # from 0
    config.warmup_steps = steps_for(12, batch)
    config.schedule = 'poly'
    config.lr_poly_power = 2.0
    config.num_train_steps = steps_for(90, batch)
    config.eval_every_steps = config.checkpoint_every_steps = steps_for(1, batch)
    config.log_every_steps = 10
    return config


# name -> the paper recipe it starts from and the changes; targets: paper.LARGE_BATCH
LARGE_BATCH = {'resnet50_goyal8k': goyal8k, 'resnet50_lars32k': lars32k}


def get_config(arg: str = 'resnet50'):
    if arg in LARGE_BATCH:
        return LARGE_BATCH[arg](get_config('resnet50'))
    if arg not in VARIANTS:
        raise ValueError(
            f'imagenet config argument must be one of '
            f'{", ".join([*VARIANTS, *LARGE_BATCH])}; got {arg!r}'
        )
    model, shortcut = VARIANTS[arg]
    config = base_config()
    config.model.name = model
    config.model.shortcut = shortcut
    config.model.bn_group_size = 32
    config.dataset.name = 'imagenet2012'
    config.batch_size = 256
    config.reference_batch_size = 256
    config.learning_rate = 0.1
    config.schedule = 'plateau'
    config.plateau_patience = 5  # epochs without improvement, then lr / 10
    config.lr_boundaries = (30 * STEPS_PER_EPOCH, 60 * STEPS_PER_EPOCH)  # schedule='step'
    config.num_train_steps = 600_000
    config.eval_batch_size = 250
    config.log_every_steps = 100
    config.eval_every_steps = STEPS_PER_EPOCH
    config.checkpoint_every_steps = STEPS_PER_EPOCH
    return config
