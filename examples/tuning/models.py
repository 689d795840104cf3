"""The two families of the tuning example, both with 1 + 3 * hidden trainable parameters.

``features`` trains only the read-out of fixed, gently sloped tanh features: a convex problem,
fast at a small learning rate, but its smooth features cannot follow the sine closely.
``mlp`` trains its hidden layer too: it can fit the sine, but needs a larger learning rate.
At one fixed small learning rate the first wins; each at its own best learning rate, the second
does (docs/tuning.md).
"""

import torch
from torch import nn


def clamped(out: torch.Tensor) -> torch.Tensor:
    """Outputs kept within [-3, 3]: a learning rate too large for a family gives it a large
    loss rather than an infinite one, so a search's bad trials finish with a value."""
    return out.clamp(-3.0, 3.0)


class features(nn.Module):
    """A read-out of 3 * hidden fixed tanh features (the features are not trained)."""

    def __init__(self, input_size: int, output_size: int, hidden: int) -> None:
        super().__init__()
        width = 3 * hidden
        # Fixed features: buffers, not parameters (the optimizer never sees them).
        self.register_buffer("w", torch.linspace(1.0, 3.0, width).repeat(input_size, 1))
        self.register_buffer("b", torch.linspace(-1.0, 1.0, width))
        self.readout = nn.Linear(width, output_size)

    def forward(self, data: torch.Tensor, run_info: dict, module_info: dict) -> torch.Tensor:
        return clamped(self.readout(torch.tanh(data @ self.w + self.b)))

    def info(self) -> dict:
        return {}


class mlp(nn.Module):
    """One hidden layer of `hidden` tanh units, all trained."""

    def __init__(self, input_size: int, output_size: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(input_size, hidden), nn.Tanh(), nn.Linear(hidden, output_size)
        )

    def forward(self, data: torch.Tensor, run_info: dict, module_info: dict) -> torch.Tensor:
        # A small output scale: each weight moves less per step, so it needs a larger lr.
        return clamped(0.3 * self.net(data))

    def info(self) -> dict:
        return {}
