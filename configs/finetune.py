"""Fine-tuning ImageNet weights on a folder of your own images (one subfolder per class):
``configs/finetune.py:/path/to/images`` with ``--config.init_from=<the weights' workdir>``.

    resnet-jax convert --input=resnet50.safetensors --output=workdirs/r50_tv  # torchvision's
    resnet-jax train --config=finetune.py:/data/flowers --config.init_from=workdirs/r50_tv \\
        --workdir=workdirs/flowers

The pretrained network keeps every layer but the fc, which is initialised afresh for the
folder's classes (``resnet_jax.transfer``; the launch prints what was kept). The defaults
suit torchvision's (and timm's, transformers') ResNet-50: v1.5 (stride in the 3x3), option
B, their input normalisation. Weights of another net: ``--config.model.name=resnet18``;
Keras' (v1, Caffe inputs): ``--config.model.stride_in_1x1=True
--config.model.bn_epsilon=1.001e-5 --config.dataset.preprocessing=caffe``.

Recipe (the common transfer-learning one, not the paper's): BatchNorm frozen (statistics
and affine parameters as pretrained: small batches of few classes would move them), SGD
with momentum 0.9 at lr 0.01 for batch 32, divided by 10 at 60% and 85% of the run,
weight decay 1e-4 on the kernels; random-resized crops and flips (no PCA lighting), the
centre crop for evaluation on the folder's val/ (or 10% of each class held out). The run's
length is in steps: ``--config.num_train_steps`` (default 1,000, ~30 epochs of 1,000
images). Frozen statistics suit weights trained on natural colour images (ImageNet's);
from weights far from your images, train BatchNorm: ``--config.model.frozen_bn=False``
(measured on real photographs: ``experiments/results/finetune_photos.md``).
"""

from resnet_jax.config import base_config


def get_config(folder: str = ''):
    c = base_config()
    c.model.name = 'resnet50'
    c.model.stride_in_1x1 = False
    c.model.shortcut = 'B'
    c.model.frozen_bn = True
    c.model.bn_group_size = 0
    if folder:
        c.dataset.name = folder if folder.startswith('folder:') else f'folder:{folder}'
    c.dataset.preprocessing = 'torchvision'
    c.dataset.crop = 'inception'
    c.dataset.lighting_std = 0.0
    c.dataset.image_size = 224
    c.batch_size = 32
    c.reference_batch_size = 32
    c.eval_batch_size = 100
    c.learning_rate = 0.01
    c.num_train_steps = 1_000
    c.lr_boundaries = (600, 850)
    c.log_every_steps = 50
    c.eval_every_steps = 250
    c.checkpoint_every_steps = 250
    return c
