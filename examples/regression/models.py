"""Model modules of the regression example: a polynomial and a small MLP.

``polynomial`` is deliberately *not* a ``torch.nn.Module``: it shows the contract for plain
classes (``parameters()``, and placing its own tensor on ``run_info["device"]``, injected into
the constructor as ``device``). ``mlp_regressor`` is an ``nn.Module``: Mosaic moves it to the
device and collects its parameters itself.
"""

import torch
from torch import nn


class polynomial:
    """y = c0 + c1*x + ... + cd*x^d, the coefficients trained by the optimizer."""

    def __init__(self, degree: int, device: str) -> None:
        if degree < 0:
            raise ValueError(f"degree must be >= 0, got {degree}")
        self.degree = int(degree)
        self.coeffs = torch.zeros(self.degree + 1, device=device, requires_grad=True)

    def parameters(self) -> list:
        return [self.coeffs]

    def forward(self, data: torch.Tensor, run_info: dict, module_info: dict) -> torch.Tensor:
        powers = torch.stack([data[:, 0] ** k for k in range(self.degree + 1)], dim=1)
        return (powers @ self.coeffs).unsqueeze(1)

    def info(self) -> dict:
        return {}

    def save_model(self, path: str) -> None:
        torch.save(self.coeffs.detach().cpu(), path + ".pt")

    def load_model(self, path: str) -> None:
        with torch.no_grad():
            self.coeffs.copy_(torch.load(path + ".pt", weights_only=True))


class mlp_regressor(nn.Module):
    """One hidden layer of `hidden` tanh units."""

    def __init__(self, input_size: int, output_size: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(input_size, hidden), nn.Tanh(), nn.Linear(hidden, output_size)
        )

    def forward(self, data: torch.Tensor, run_info: dict, module_info: dict) -> torch.Tensor:
        return self.net(data)

    def info(self) -> dict:
        return {}

    def save_model(self, path: str) -> None:
        torch.save(self.state_dict(), path + ".pt")

    def load_model(self, path: str) -> None:
        self.load_state_dict(torch.load(path + ".pt", map_location="cpu", weights_only=True))
