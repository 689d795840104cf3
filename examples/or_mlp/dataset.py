"""Data modules of the OR/AND tutorial: noisy two-input boolean functions.

Each class is one `dataset` alternative of ``config.ini``. Mosaic builds it with the values of
its section (``data_size``, ``train_prop``, ``batch_size``), calls ``prepare`` once per run and
passes ``info()`` down the pipeline, where ``input_size`` and ``output_size`` fill the MLP's
constructor.
"""

import torch
from torch.utils.data import DataLoader, TensorDataset

# Enough noise that the classes are not trivially separable by a single weight, little enough
# that the boolean function stays learnable in a few epochs.
NOISE_STD = 0.1


class _BooleanDataset:
    """Shared logic: random bits, a boolean target, Gaussian noise on the inputs."""

    def __init__(self, data_size: int, train_prop: float, batch_size: int) -> None:
        if data_size < 2:
            raise ValueError(f"data_size must be at least 2, got {data_size}")
        if not 0.0 < train_prop < 1.0:
            raise ValueError(f"train_prop must be between 0 and 1 (exclusive), got {train_prop}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.data_size = int(data_size)
        self.train_prop = float(train_prop)
        self.batch_size = int(batch_size)

    def target(self, bits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prepare(
        self, data: object, run_info: dict, module_info: dict
    ) -> tuple[DataLoader, DataLoader]:
        # Drawn from torch's global generator, which Mosaic seeds per run, so a run is
        # reproducible from its seed alone.
        bits = torch.randint(0, 2, (self.data_size, 2)).float()
        x = bits + NOISE_STD * torch.randn(self.data_size, 2)
        y = self.target(bits).reshape(-1, 1)
        # Keep at least one sample on each side: an empty test set has no loss to report.
        n_train = min(max(round(self.data_size * self.train_prop), 1), self.data_size - 1)
        train = TensorDataset(x[:n_train], y[:n_train])
        test = TensorDataset(x[n_train:], y[n_train:])
        return (
            DataLoader(train, batch_size=self.batch_size, shuffle=True),
            DataLoader(test, batch_size=self.batch_size, shuffle=False),
        )

    def info(self) -> dict:
        return {"batch_size": self.batch_size, "input_size": 2, "output_size": 1}


class dataset_OR(_BooleanDataset):
    """Target is 1 when either input bit is 1."""

    def target(self, bits: torch.Tensor) -> torch.Tensor:
        return torch.logical_or(bits[:, 0] > 0.5, bits[:, 1] > 0.5).float()


class dataset_AND(_BooleanDataset):
    """Target is 1 when both input bits are 1."""

    def target(self, bits: torch.Tensor) -> torch.Tensor:
        return torch.logical_and(bits[:, 0] > 0.5, bits[:, 1] > 0.5).float()
