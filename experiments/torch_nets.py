"""resnet_jax's networks in PyTorch, for ``benchmark_vs_pytorch.py`` and the interop tests.

torchvision has the ImageNet nets as v1.5 with option B; the CIFAR nets of sec. 4.2, the
paper's v1 bottlenecks, plain nets and options A and C are not in torchvision, so
``torch_net(model)`` builds any ``resnet_jax.models.ResNet`` in ``torch.nn`` from the
model's own fields (stage sizes, block kind, widths, shortcut option, stride placement),
with the projections where ``layers.projects`` puts them. Its modules are named like the
flax model's (``conv1``, ``bn1``, ``conv2_1.conv1``, ``conv3_1.shortcut.proj_conv``,
``fc``), so ``load_flax_variables`` copies a flax model's variables into it by name.
Needs torch (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from resnet_jax import models
from resnet_jax.models import layers


class Shortcut(nn.Module):
    def __init__(self, cin: int, features: int, strides: int, option: str):
        super().__init__()
        self.strides, self.extra = strides, features - cin
        self.projects = layers.projects(option, strides, cin, features)
        if self.projects:
            self.proj_conv = nn.Conv2d(cin, features, 1, strides, bias=False)
            self.proj_bn = nn.BatchNorm2d(features)

    def forward(self, x):
        if self.projects:
            return self.proj_bn(self.proj_conv(x))
        if self.strides != 1:  # option A: subsample and zero-pad the new channels
            x = x[:, :, :: self.strides, :: self.strides]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra > 0 else x


class Block(nn.Module):
    """Fig. 5: two 3x3 convs (basic) or 1x1-3x3-1x1 (bottleneck, x4), then eq. (1)/(2)."""

    def __init__(self, model: models.ResNet, cin: int, filters: int, strides: int):
        super().__init__()
        self.residual = model.residual
        if model.block_cls is models.BottleneckBlock:
            s1, s3 = (strides, 1) if model.stride_in_1x1 else (1, strides)
            shapes = [
                (cin, filters, 1, s1),
                (filters, filters, 3, s3),
                (filters, 4 * filters, 1, 1),
            ]
        else:
            shapes = [(cin, filters, 3, strides), (filters, filters, 3, 1)]
        self.convs = len(shapes)
        for k, (i, o, size, s) in enumerate(shapes, 1):
            setattr(self, f'conv{k}', nn.Conv2d(i, o, size, s, (size - 1) // 2, bias=False))
            setattr(self, f'bn{k}', nn.BatchNorm2d(o))
        self.out_features = shapes[-1][1]
        if self.residual:
            self.shortcut = Shortcut(cin, self.out_features, strides, model.shortcut)

    def forward(self, x):
        y = x
        for k in range(1, self.convs + 1):
            y = getattr(self, f'bn{k}')(getattr(self, f'conv{k}')(y))
            if k < self.convs:
                y = torch.relu(y)
        return torch.relu(y + self.shortcut(x) if self.residual else y)


class TorchResNet(nn.Module):
    def __init__(self, model: models.ResNet):
        super().__init__()
        self.stem = model.stem
        kernel = 7 if model.stem == 'imagenet' else 3
        self.conv1 = nn.Conv2d(
            3, model.width, kernel, 2 if kernel == 7 else 1, (kernel - 1) // 2, bias=False
        )
        self.bn1 = nn.BatchNorm2d(model.width)
        self.blocks = nn.ModuleDict()
        cin = model.width
        for i, n in enumerate(model.stage_sizes):
            for j, name in enumerate(models.block_names(i, n)):
                strides = models.stage_strides(i) if j == 0 else 1
                block = Block(model, cin, model.width * 2**i, strides)
                self.blocks[name] = block
                cin = block.out_features
        self.fc = nn.Linear(cin, model.num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        if self.stem == 'imagenet':
            x = F.max_pool2d(x, 3, 2, 1)
        for block in self.blocks.values():
            x = block(x)
        return self.fc(x.mean((2, 3)))


def torch_net(model: models.ResNet) -> TorchResNet:
    """``model`` (any stem, block, depth, shortcut option, stride placement) in torch."""
    return TorchResNet(model)


def load_flax_variables(net: TorchResNet, variables) -> None:
    """Copies a flax model's ``{'params', 'batch_stats'}`` into ``net`` (same names)."""

    def visit(tree, path):
        for key, value in tree.items():
            if isinstance(value, dict) or hasattr(value, 'items'):
                yield from visit(value, path + (key,))
            else:
                yield path, key, np.asarray(value)

    modules = dict(net.named_modules())
    for collection in ('params', 'batch_stats'):
        for path, key, value in visit(variables.get(collection, {}), ()):
            module = modules[
                '.'.join(
                    ('blocks',) + path if path[0].startswith('conv') and '_' in path[0] else path
                )
            ]
            if isinstance(module, nn.Conv2d):
                target, value = module.weight, value.transpose(3, 2, 0, 1)
            elif isinstance(module, nn.Linear):
                target, value = (
                    (module.weight, value.T) if key == 'kernel' else (module.bias, value)
                )
            else:
                target = {
                    'scale': module.weight,
                    'bias': module.bias,
                    'mean': module.running_mean,
                    'var': module.running_var,
                }[key]
            with torch.no_grad():
                target.copy_(torch.from_numpy(np.array(value)))
