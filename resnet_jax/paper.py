"""The paper's reported % errors on ImageNet val (top-1, top-5; ``None``: not given) or the
CIFAR-10 test set, which the configs cite and ``experiments/reproduce.py`` compares with."""

# Tables 2 and 3: 10-crop testing. Keys are the names of configs/imagenet.py's variants.
TEN_CROP = {
    'plain18': (27.94, None),
    'plain34': (28.54, 10.02),
    'resnet18': (27.88, None),
    'resnet34a': (25.03, 7.76),
    'resnet34b': (24.52, 7.46),
    'resnet34c': (24.19, 7.40),
    'resnet50': (22.85, 6.71),
    'resnet101': (21.75, 6.05),
    'resnet152': (21.43, 5.71),
}

# Table 4: single models, multi-scale fully-convolutional testing.
MULTISCALE = {
    'resnet34b': (21.84, 5.71),
    'resnet34c': (21.53, 5.60),
    'resnet50': (20.74, 5.25),
    'resnet101': (19.87, 4.60),
    'resnet152': (19.38, 4.49),
}

# Table 6: CIFAR-10 test error by depth (ResNet-110: the best of 5 runs, mean 6.61 +- 0.16).
CIFAR10 = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}

# Not He et al.: configs/imagenet.py's large-batch recipes, % top-1 error of one centre crop.
LARGE_BATCH = {'resnet50_goyal8k': (23.74, None), 'resnet50_lars32k': (24.6, None)}
LARGE_BATCH_SOURCES = {
    'resnet50_goyal8k': 'Goyal et al. 2017, Table 1 (batch 8k; 23.60 at 256)',
    'resnet50_lars32k': 'You et al. 2018, 75.4% top-1 accuracy at batch 32k, 90 epochs',
}
