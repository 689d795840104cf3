"""Data module of the resources example: 8x8 noisy images of a bar, 4 classes by direction.

A bar (horizontal, vertical, diagonal or anti-diagonal) at a random place on an 8x8 grid, with
Gaussian noise: a convolution sees it wherever it is, a perceptron has to learn each place.
"""

import torch
from torch.utils.data import DataLoader, TensorDataset

SIDE = 8


def _bar(kind: int, row: int, col: int) -> torch.Tensor:
    image = torch.zeros(SIDE, SIDE)
    steps = range(4)
    for step in steps:
        if kind == 0:  # horizontal
            image[row, (col + step) % SIDE] = 1.0
        elif kind == 1:  # vertical
            image[(row + step) % SIDE, col] = 1.0
        elif kind == 2:  # diagonal
            image[(row + step) % SIDE, (col + step) % SIDE] = 1.0
        else:  # anti-diagonal
            image[(row + step) % SIDE, (col - step) % SIDE] = 1.0
    return image


class bars:
    """`data_size` images, `noise` the standard deviation of the noise added to each pixel."""

    def __init__(self, data_size: int, noise: float, train_prop: float, batch_size: int) -> None:
        self.data_size = int(data_size)
        self.noise = float(noise)
        self.train_prop = float(train_prop)
        self.batch_size = int(batch_size)

    def prepare(self, data: object, run_info: dict, module_info: dict) -> tuple:
        # From torch's global generator, seeded per run: the data depend on the seed alone.
        kinds = torch.randint(0, 4, (self.data_size,))
        places = torch.randint(0, SIDE, (self.data_size, 2))
        images = torch.stack(
            [_bar(int(k), int(r), int(c)) for k, (r, c) in zip(kinds, places)]
        ).unsqueeze(1)
        images = images + self.noise * torch.randn_like(images)
        n_train = int(self.data_size * self.train_prop)
        train = TensorDataset(images[:n_train], kinds[:n_train])
        test = TensorDataset(images[n_train:], kinds[n_train:])
        return (
            DataLoader(train, batch_size=self.batch_size, shuffle=True),
            DataLoader(test, batch_size=self.batch_size, shuffle=False),
        )

    def info(self) -> dict:
        return {"side": SIDE, "classes": 4}
