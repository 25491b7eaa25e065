"""The torch networks behind the model plugins; imported only when a model is built for torch."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """Flatten - Linear(in, hidden) - ReLU - Dropout - Linear(hidden, classes)."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def _conv_block(in_channels: int, channels: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, channels, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout(dropout),
    )


class CifarCNN(nn.Module):
    """conv32-conv32-pool-dropout, conv64-conv64-pool-dropout, dense512-dropout, dense classes."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, dropout1: float, dropout2: float,
                 dropout3: float) -> None:
        super().__init__()
        channels, height, width = (int(d) for d in input_shape)
        self.features = nn.Sequential(
            _conv_block(channels, 32, dropout1),
            _conv_block(32, 64, dropout2),
        )
        flat = 64 * (height // 4) * (width // 4)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, 512),
            nn.ReLU(),
            nn.Dropout(dropout3),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def mlp(meta: dict, hidden: int, dropout: float) -> MLP:
    return MLP(math.prod(int(d) for d in meta["input_shape"]), hidden, int(meta["num_classes"]), dropout)


def cifar_cnn(meta: dict, dropout1: float, dropout2: float, dropout3: float) -> CifarCNN:
    return CifarCNN(meta["input_shape"], int(meta["num_classes"]), dropout1, dropout2, dropout3)
