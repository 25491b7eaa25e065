"""The torch ResNet-18 behind the ``resnet18`` model plugin; imported only when it is built for torch.

Written from the architecture in He, Zhang, Ren and Sun, "Deep Residual Learning for Image
Recognition" (CVPR 2016): a stem, then four stages of two *basic blocks* each (two 3x3
convolutions with batch norm, added to a shortcut), the channel count doubling and the
resolution halving at the start of every stage after the first; global average pooling and one
linear layer make the class scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

    ``conv1`` carries the block's stride. The shortcut is the identity when input and output
    have the same shape, else a 1x1 convolution with that stride followed by batch norm (the
    "projection shortcut", option B of the paper).
    """

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_channels != channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet18(nn.Module):
    """Stem, stages of ``width``, ``2 width``, ``4 width`` and ``8 width`` channels (two basic blocks
    each; stages 2-4 start with stride 2), global average pooling, linear to ``num_classes``.

    The stem is a 3x3 convolution with stride 1 for small images (``small_input``, the usual
    CIFAR variant) or the paper's 7x7 convolution with stride 2 followed by 3x3 max-pooling with
    stride 2 (ImageNet-sized images); either is followed by batch norm and ReLU.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 64, small_input: bool = True) -> None:
        super().__init__()
        if small_input:
            conv = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.stem = nn.Sequential(conv, nn.BatchNorm2d(width), nn.ReLU())
        else:
            conv = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.stem = nn.Sequential(conv, nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        stages = []
        channels = width
        for index in range(4):
            out_channels = width * 2 ** index
            stride = 1 if index == 0 else 2
            stages.append(nn.Sequential(BasicBlock(channels, out_channels, stride),
                                        BasicBlock(out_channels, out_channels, 1)))
            channels = out_channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # He initialisation, scaled by each filter's fan-out as in the paper's reference setup.
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.pool(x)))


def resnet18(input_shape: Sequence[int], num_classes: int, width: int, small_input: bool) -> ResNet18:
    """A :class:`ResNet18` for images of ``input_shape`` (channels, height, width)."""
    return ResNet18(int(input_shape[0]), int(num_classes), width=width, small_input=small_input)
