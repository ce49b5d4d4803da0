"""The same networks in PyTorch, for interop tests and side-by-side benchmarks.

torchvision's module layout (``conv1``, ``bn1``, ``layerN.M.convK``, ``downsample``, ``fc``)
written out with ``torch.nn``, because torchvision's wheel does not always import beside a
given torch build. Needs the optional ``interop`` or ``bench`` extra (torch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_LAYOUT = {'resnet18': ('basic', (2, 2, 2, 2)), 'resnet34': ('basic', (3, 4, 6, 3)),
                   'resnet50': ('bottleneck', (3, 4, 6, 3)),
                   'resnet101': ('bottleneck', (3, 4, 23, 3)),
                   'resnet152': ('bottleneck', (3, 8, 36, 3))}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int, shortcut: str = 'B',
                 residual: bool = True, stride_in_1x1: bool = True):
        super().__init__()
        del stride_in_1x1
        self.residual, self.shortcut, self.stride = residual, shortcut, stride
        self.extra = width - cin
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = None
        if residual and shortcut == 'B' and (stride != 1 or cin != width):
            self.downsample = nn.Sequential(nn.Conv2d(cin, width, 1, stride, bias=False),
                                            nn.BatchNorm2d(width))

    def _shortcut(self, x):
        if self.downsample is not None:
            return self.downsample(x)
        if self.stride != 1:  # option A: subsample and zero-pad the new channels
            x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + self._shortcut(x) if self.residual else y)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, shortcut: str = 'B',
                 residual: bool = True, stride_in_1x1: bool = True):
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.residual = residual
        self.conv1 = nn.Conv2d(cin, width, 1, s1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, s3, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.downsample = None
        if residual and (stride != 1 or cin != width * 4):
            self.downsample = nn.Sequential(nn.Conv2d(cin, width * 4, 1, stride, bias=False),
                                            nn.BatchNorm2d(width * 4))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn3(self.conv3(torch.relu(self.bn2(self.conv2(y)))))
        if not self.residual:
            return torch.relu(y)
        return torch.relu(y + (self.downsample(x) if self.downsample is not None else x))


class ResNet(nn.Module):
    def __init__(self, block, sizes, *, stem: str = 'imagenet', width: int = 64,
                 num_classes: int = 1000, shortcut: str = 'B', residual: bool = True,
                 stride_in_1x1: bool = True):
        super().__init__()
        self.stem = stem
        if stem == 'imagenet':
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        cin = width
        for i, n in enumerate(sizes):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width * 2**i, 2 if i > 0 and j == 0 else 1, shortcut,
                                    residual, stride_in_1x1))
                cin = width * 2**i * block.expansion
            setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
        self.num_stages = len(sizes)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        if self.stem == 'imagenet':
            x = self.maxpool(x)
        for i in range(self.num_stages):
            x = getattr(self, f'layer{i + 1}')(x)
        return self.fc(x.mean((2, 3)))


def imagenet_resnet(name: str, stride_in_1x1: bool = False, num_classes: int = 1000) -> ResNet:
    """torchvision's ``resnetN`` (``stride_in_1x1=False``, v1.5) or the paper's v1."""
    kind, sizes = IMAGENET_LAYOUT[name]
    block = Bottleneck if kind == 'bottleneck' else BasicBlock
    return ResNet(block, sizes, num_classes=num_classes, stride_in_1x1=stride_in_1x1)


def cifar_resnet(depth: int, residual: bool = True) -> ResNet:
    """Sec. 4.2's 6n+2 nets with option A shortcuts."""
    n = (depth - 2) // 6
    return ResNet(BasicBlock, (n, n, n), stem='cifar', width=16, num_classes=10,
                  shortcut='A', residual=residual)
