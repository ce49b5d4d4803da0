"""The embedded default: cifar_resnet20 on scikit-learn's digits, the paper's recipe shortened.

    python -m resnet_jax.main                      # this config, workdir ./workdirs/default

The CIFAR-10 recipe of sec. 4.2 (batch 128, SGD momentum 0.9, weight decay 1e-4, lr 0.1
divided by 10 twice, pad-4 crop + flip, per-pixel mean) on 1,437 training digits, with
the 64k-iteration schedule shortened to 250 iterations (÷10 at 150 and 200).
Expected: test error below 3% on the 360 test digits in under 5 minutes on 2 CPU cores.
"""

from resnet_jax.config import base_config


def get_config():
    config = base_config()
    config.num_train_steps = 250
    config.lr_boundaries = (150, 200)
    config.log_every_steps = 20
    config.eval_every_steps = 50
    config.checkpoint_every_steps = 100
    return config
