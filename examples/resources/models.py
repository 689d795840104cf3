"""Model modules of the resources example: a perceptron and a small CNN of the same images.

For a like number of parameters the CNN does many more operations (each filter slides over
every place of the image); docs/resources.md counts them by hand.
"""

import torch
from torch import nn


class mlp(nn.Module):
    """64 pixels -> `hidden` -> 4 classes: 69*hidden + 4 parameters, 136*hidden FLOPs."""

    def __init__(self, side: int, classes: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor, run_info: dict, module_info: dict) -> torch.Tensor:
        return self.net(x)

    def info(self) -> dict:
        return {}


class cnn(nn.Module):
    """Two 3x3 convolutions of `channels` filters, each followed by a 2x2 max-pool, then a
    linear layer: 9*c^2 + 27*c + 4 parameters, 288*c^2 + 1184*c FLOPs on an 8x8 image."""

    def __init__(self, side: int, classes: int, channels: int) -> None:
        super().__init__()
        c = channels
        self.net = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c, c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c * (side // 4) ** 2, classes),
        )

    def forward(self, x: torch.Tensor, run_info: dict, module_info: dict) -> torch.Tensor:
        return self.net(x)

    def info(self) -> dict:
        return {}
