"""ImageNet, sec. 3.4 and Tables 2-4: ``configs/imagenet.py:<name>``.

Names: plain18, plain34, resnet18, resnet34a, resnet34b, resnet34c, resnet50, resnet101,
resnet152 (18/34 use option A as in Table 2 unless the name says otherwise; 50/101/152
use option B, stride in the first 1x1 as the paper's models).

    python -m resnet_jax.main --config=configs/imagenet.py:resnet50 --workdir=gs://.../r50
    # reproducible fixed-step alternative: lr / 10 at epochs 30 and 60 of 90
    ... --config.schedule=step --config.num_train_steps=450450

Recipe: batch 256 (8 GPUs x 32, BatchNorm statistics per 32 images), SGD momentum 0.9,
weight decay 1e-4, lr 0.1 divided by 10 when the validation error plateaus, at most
60x10^4 iterations; scale augmentation [256, 480], 224 crops, flips, per-pixel mean,
PCA lighting. The ImageNet input pipeline is resnet_jax's tfds ``imagenet2012`` reader;
the same recipe trains on a folder of your own images with
``--config.dataset.name=folder:/path/to/images`` (one subfolder per class).

Paper (top-1 / top-5 error %, 10-crop, Tables 2-3; ``resnet_jax.paper``): plain-18 27.94, plain-34 28.54/10.02,
ResNet-18 27.88, ResNet-34 A 25.03/7.76, B 24.52/7.46, C 24.19/7.40, ResNet-50 22.85/6.71,
ResNet-101 21.75/6.05, ResNet-152 21.43/5.71. Multi-scale (Table 4): ResNet-34 B
21.84/5.71, C 21.53/5.60, ResNet-50 20.74/5.25, ResNet-101 19.87/4.60, ResNet-152 19.38/4.49.
"""

from resnet_jax.config import base_config

STEPS_PER_EPOCH = 5005  # 1,281,167 training images / 256, rounded up

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


def get_config(arg: str = 'resnet50'):
    if arg not in VARIANTS:
        raise ValueError(f'imagenet config argument must be one of {", ".join(VARIANTS)}; '
                         f'got {arg!r}')
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
    config.plateau_patience = 5               # epochs without improvement, then lr / 10
    config.lr_boundaries = (30 * STEPS_PER_EPOCH, 60 * STEPS_PER_EPOCH)  # schedule='step'
    config.num_train_steps = 600_000
    config.eval_batch_size = 250
    config.log_every_steps = 100
    config.eval_every_steps = STEPS_PER_EPOCH
    config.checkpoint_every_steps = STEPS_PER_EPOCH
    return config
