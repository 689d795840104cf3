"""The data of the tuning example: a noisy sine, split into train, validation and test.

Returning three loaders from ``prepare`` gives Mosaic a validation loader: a search selects
its trials on ``val_loss`` and never looks at the test loader (docs/tuning.md).
"""

import math

import torch
from torch.utils.data import DataLoader, TensorDataset


class sine_splits:
    """y = sin(pi*x) + noise for x uniform in [-1, 1]; 60% train, 20% validation, 20% test."""

    def __init__(self, n_samples: int, noise: float, batch_size: int) -> None:
        self.n_samples = int(n_samples)
        self.noise = float(noise)
        self.batch_size = int(batch_size)

    def prepare(self, data: object, run_info: dict, module_info: dict) -> tuple:
        # Mosaic seeds torch's generator per run: the same seed gives the same data.
        x = torch.rand(self.n_samples, 1) * 2 - 1
        y = torch.sin(math.pi * x) + self.noise * torch.randn(self.n_samples, 1)
        a, b = int(0.6 * self.n_samples), int(0.8 * self.n_samples)
        return (
            DataLoader(TensorDataset(x[:a], y[:a]), batch_size=self.batch_size, shuffle=True),
            DataLoader(TensorDataset(x[a:b], y[a:b]), batch_size=self.batch_size),
            DataLoader(TensorDataset(x[b:], y[b:]), batch_size=self.batch_size),
        )

    def info(self) -> dict:
        return {"input_size": 1, "output_size": 1}
