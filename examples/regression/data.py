"""Data modules of the regression example: a noisy 1-D curve, then a train/test split.

Two data stages chained in ``data_scheme = source, split``: ``noisy_sine.prepare`` gets ``None``
and returns raw tensors; ``train_test_split.prepare`` gets those tensors and returns the
``(train, test)`` loaders the training loop needs. ``info()`` of each stage is passed down the
pipeline: ``input_size``/``output_size`` from the source reach the models' constructors.
"""

import math

import torch
from torch.utils.data import DataLoader, TensorDataset


class noisy_sine:
    """y = sin(2*pi*x) + Gaussian noise, for x uniform in [-1, 1]."""

    def __init__(self, n_samples: int, noise: float) -> None:
        if n_samples < 4:
            raise ValueError(f"n_samples must be at least 4, got {n_samples}")
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.n_samples = int(n_samples)
        self.noise = float(noise)

    def prepare(self, data: object, run_info: dict, module_info: dict) -> tuple:
        # torch's global generator is seeded per run by Mosaic: the same seed, the same data.
        x = torch.rand(self.n_samples, 1) * 2 - 1
        y = torch.sin(2 * math.pi * x) + self.noise * torch.randn(self.n_samples, 1)
        return x, y

    def info(self) -> dict:
        # batch_size belongs to the split stage; the source only describes the tensors.
        return {"input_size": 1, "output_size": 1, "batch_size": self.n_samples}


class train_test_split:
    """Split the previous stage's (x, y) tensors into shuffled train and ordered test loaders."""

    def __init__(self, train_prop: float, batch_size: int) -> None:
        if not 0.0 < train_prop < 1.0:
            raise ValueError(f"train_prop must be between 0 and 1 (exclusive), got {train_prop}")
        self.train_prop = float(train_prop)
        self.batch_size = int(batch_size)

    def prepare(self, data: tuple, run_info: dict, module_info: dict) -> tuple:
        x, y = data
        n_train = min(max(round(len(x) * self.train_prop), 1), len(x) - 1)
        train = TensorDataset(x[:n_train], y[:n_train])
        test = TensorDataset(x[n_train:], y[n_train:])
        return (
            DataLoader(train, batch_size=self.batch_size, shuffle=True),
            DataLoader(test, batch_size=self.batch_size),
        )

    def info(self) -> dict:
        return {"batch_size": self.batch_size}
