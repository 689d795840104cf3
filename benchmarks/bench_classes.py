"""Classes for the benchmarks: a synthetic regression dataset and a small MLP (user classes)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset


class synthetic_data:
    def __init__(self, n_batches: int = 200, batch_size: int = 64, n_features: int = 32) -> None:
        self.n_batches = n_batches
        self.batch_size = batch_size
        self.n_features = n_features

    def prepare(self, data: Any, run_info: dict[str, Any], module_info: dict[str, Any]) -> Any:
        n = self.n_batches * self.batch_size
        x = torch.randn(n, self.n_features)
        y = (x[:, :4].sum(dim=1, keepdim=True) > 0).float()
        train = DataLoader(TensorDataset(x, y), batch_size=self.batch_size, shuffle=True)
        test = DataLoader(TensorDataset(x[: n // 4], y[: n // 4]), batch_size=self.batch_size)
        return train, test

    def info(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "input_size": self.n_features, "output_size": 1}


class small_mlp(torch.nn.Module):
    def __init__(self, input_size: int, output_size: int, width: int = 64) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(input_size, width),
            torch.nn.ReLU(),
            torch.nn.Linear(width, width),
            torch.nn.ReLU(),
            torch.nn.Linear(width, output_size),
            torch.nn.Sigmoid(),
        )

    def forward(
        self, data: torch.Tensor, run_info: dict[str, Any], module_info: dict[str, Any]
    ) -> torch.Tensor:
        return self.net(data)

    def info(self) -> dict[str, Any]:
        return {}

    def save_model(self, path: str) -> None:
        torch.save(self.state_dict(), path + ".pt")

    def load_model(self, path: str) -> None:
        self.load_state_dict(torch.load(path + ".pt", map_location="cpu"))


class slow_data:
    """A data stage that costs `delay` seconds (standing for reading and decoding a real
    dataset), then a small synthetic set drawn from the run's seeded generator."""

    def __init__(self, delay: float = 1.0, n_samples: int = 256, n_features: int = 8) -> None:
        self.delay = delay
        self.n_samples = n_samples
        self.n_features = n_features

    def prepare(self, data: Any, run_info: dict[str, Any], module_info: dict[str, Any]) -> Any:
        import time

        time.sleep(self.delay)
        x = torch.randn(self.n_samples, self.n_features)
        y = (x[:, :4].sum(dim=1, keepdim=True) > 0).float()
        split = self.n_samples * 3 // 4
        train = DataLoader(TensorDataset(x[:split], y[:split]), batch_size=32, shuffle=True)
        test = DataLoader(TensorDataset(x[split:], y[split:]), batch_size=64)
        return train, test

    def info(self) -> dict[str, Any]:
        return {"input_size": self.n_features, "output_size": 1}


class slow_data_on_disk(slow_data):
    """The same stage, kept in [MONITOR] cache_dir too (shared by the workers)."""

    cache_on_disk = True
