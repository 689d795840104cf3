"""Model modules of the OR/AND tutorial: two shapes of multi-layer perceptron.

``input_size`` and ``output_size`` come from the dataset's ``info()``; ``length``, ``width``
and ``activation`` come from the model's own config section.
"""

import itertools

import torch
from torch import nn

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
}


def _build(sizes: list[int], output_size: int, activation: str) -> nn.Sequential:
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"unknown activation '{activation}'; expected one of {', '.join(_ACTIVATIONS)}"
        )
    layers: list[nn.Module] = []
    for before, after in itertools.pairwise(sizes):
        layers += [nn.Linear(before, after), _ACTIVATIONS[activation]()]
    # A sigmoid output gives probabilities, which is what BCELoss and binary accuracy expect.
    layers += [nn.Linear(sizes[-1], output_size), nn.Sigmoid()]
    return nn.Sequential(*layers)


class _MLP(nn.Module):
    net: nn.Sequential

    def forward(self, data: torch.Tensor, run_info: dict, module_info: dict) -> torch.Tensor:
        return self.net(data)

    def info(self) -> dict:
        return {}

    def save_model(self, path: str) -> None:
        torch.save(self.state_dict(), path + ".pt")

    def load_model(self, path: str) -> None:
        # map_location lets a checkpoint written on a GPU worker be resumed on a CPU one;
        # load_state_dict then copies into this module's tensors wherever they live.
        self.load_state_dict(torch.load(path + ".pt", map_location="cpu", weights_only=True))


class mlp_funnel(_MLP):
    """`length` hidden layers narrowing linearly from `width` towards `output_size`."""

    def __init__(
        self, input_size: int, output_size: int, length: int, width: int, activation: str = "relu"
    ) -> None:
        super().__init__()
        if length < 1 or width < 1:
            raise ValueError(f"length and width must be at least 1, got {length} and {width}")
        step = (width - output_size) / length
        hidden = [max(1, round(width - i * step)) for i in range(length)]
        self.net = _build([input_size, *hidden], output_size, activation)


class mlp_brick(_MLP):
    """`length` hidden layers, all `width` wide."""

    def __init__(
        self, input_size: int, output_size: int, length: int, width: int, activation: str = "relu"
    ) -> None:
        super().__init__()
        if length < 1 or width < 1:
            raise ValueError(f"length and width must be at least 1, got {length} and {width}")
        self.net = _build([input_size] + [width] * length, output_size, activation)
