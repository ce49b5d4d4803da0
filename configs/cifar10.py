"""CIFAR-10, sec. 4.2 and Table 6: ``configs/cifar10.py:{resnet,plain}{20,32,44,56,110,1202}``.

    python -m resnet_jax.main --config=configs/cifar10.py:resnet20 --workdir=workdirs/c10_r20
    python -m resnet_jax.main --config=configs/cifar10.py:plain56 --workdir=workdirs/c10_p56
    # the 45k/5k train/val split the schedule was chosen on:
    ... --config.dataset.validation_split=True

Recipe: batch 128 (the paper's 2 GPUs x 64, so BatchNorm groups of 64), SGD momentum
0.9, weight decay 1e-4, lr 0.1 divided by 10 at 32k and 48k iterations, stop at 64k;
ResNet-110 and deeper start at lr 0.01 for 400 iterations. Augmentation: 4-pixel padding,
random 32x32 crop and flip, per-pixel mean subtraction. Test: the single 32x32 view.

Paper (Table 6, test error %, ``resnet_jax.paper.CIFAR10``): ResNet-20 8.75, 32 7.51,
44 7.17, 56 6.97, 110 6.43 (best; mean of 5 runs 6.61 +- 0.16), 1202 7.93. Plain nets
(Fig. 6): deeper is worse (plain-56 trains and tests worse than plain-20).
"""

from resnet_jax import models
from resnet_jax.config import base_config


def get_config(arg: str = 'resnet20'):
    name = f'cifar_{arg}'
    parsed = models.parse_cifar_name(name)  # ValueError for a depth that is not 6n+2
    if parsed is None:
        raise ValueError(
            f'cifar10 config argument must be resnetN or plainN (N = 6n+2), '
            f'e.g. cifar10.py:resnet110; got {arg!r}'
        )
    _, depth = parsed
    config = base_config()
    config.model.name = name
    config.model.bn_group_size = 64
    config.dataset.name = 'cifar10'
    config.batch_size = 128
    config.reference_batch_size = 128
    config.learning_rate = 0.1
    config.schedule = 'step'
    config.lr_boundaries = (32_000, 48_000)
    config.num_train_steps = 64_000
    if depth >= 110:  # "0.01 to warm up the training until the training error is below 80%"
        config.warmup_steps = 400
        config.warmup_learning_rate = 0.01
        config.warmup_type = 'constant'
    config.eval_batch_size = 500
    config.log_every_steps = 100
    config.eval_every_steps = 1_000
    config.checkpoint_every_steps = 2_000
    return config
