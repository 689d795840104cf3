"""`mosaic compare` through a real daemon on a small image classification study (issue 28): a
convolutional family that wins every pair at matched size by a large effect is decided with 6
seeds, and a null twin family (the same MLP, another draw of initial weights) is not; every
number of the decided line is recomputed with scipy from the values read back in SQL.

The task stands in for 8 x 8 digit images (no dataset download on the test machines): is the
3-pixel bar on a noisy 8 x 8 image horizontal or vertical? A convolution with a max pool finds
it wherever it is; an MLP of the same number of parameters (67) cannot.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ini
import numpy as np
import pytest
from conftest import Daemon, query
from scipy import stats

CLASSES = '''"""Bars on 8 x 8 images: is the 3-pixel bar horizontal or vertical? A convolution
with a max pool sees it wherever it is; a tiny MLP of the same size cannot."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class dataset_bars:
    def __init__(self, data_size: int, train_prop: float, batch_size: int) -> None:
        self.data_size, self.train_prop, self.batch_size = data_size, train_prop, batch_size

    def prepare(self, data: object, run_info: dict, module_info: dict) -> tuple:
        n = self.data_size
        y = torch.randint(0, 2, (n,))
        images = 0.3 * torch.randn(n, 8, 8)
        rows, cols = torch.randint(0, 6, (n,)), torch.randint(0, 6, (n,))
        for i in range(n):
            r, c = int(rows[i]), int(cols[i])
            if y[i]:
                images[i, r, c : c + 3] += 1.0
            else:
                images[i, r : r + 3, c] += 1.0
        x, target = images.reshape(n, 64), y.float().reshape(-1, 1)
        cut = int(n * self.train_prop)
        train = TensorDataset(x[:cut], target[:cut])
        test = TensorDataset(x[cut:], target[cut:])
        return (
            DataLoader(train, batch_size=self.batch_size, shuffle=True),
            DataLoader(test, batch_size=self.batch_size),
        )

    def info(self) -> dict:
        return {"batch_size": self.batch_size, "input_size": 64, "output_size": 1}


class _Net(nn.Module):
    def info(self) -> dict:
        return {}

    def save_model(self, path: str) -> None:
        torch.save(self.state_dict(), path + ".pt")

    def load_model(self, path: str) -> None:
        self.load_state_dict(torch.load(path + ".pt", map_location="cpu", weights_only=True))


class cnn(_Net):
    """width 3x3 filters, a global max pool, a linear read-out: 11 width + 1 parameters."""

    def __init__(self, input_size: int, output_size: int, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3)
        self.out = nn.Linear(width, output_size)

    def forward(self, data: torch.Tensor, run_info: dict, module_info: dict) -> torch.Tensor:
        h = torch.relu(self.conv(data.reshape(-1, 1, 8, 8))).amax(dim=(2, 3))
        return torch.sigmoid(self.out(h))


class mlp(_Net):
    """One hidden layer of `width` units: 66 width + 1 parameters."""

    def __init__(self, input_size: int, output_size: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(input_size, width), nn.ReLU(), nn.Linear(width, output_size), nn.Sigmoid()
        )

    def forward(self, data: torch.Tensor, run_info: dict, module_info: dict) -> torch.Tensor:
        return self.net(data)


class mlp_twin(mlp):
    """The same network, its initial weights drawn again from a generator of its own (the
    global one, which draws the data, is left as mlp leaves it): a null twin of mlp."""

    def __init__(self, input_size: int, output_size: int, width: int) -> None:
        super().__init__(input_size, output_size, width)
        generator = torch.Generator().manual_seed(torch.initial_seed() + 7919)
        with torch.no_grad():
            for layer in self.net:
                if isinstance(layer, nn.Linear):  # nn.Linear's own initial distribution
                    bound = 1 / layer.in_features**0.5
                    layer.weight.uniform_(-bound, bound, generator=generator)
                    layer.bias.uniform_(-bound, bound, generator=generator)
'''


def study(root: Path) -> Path:
    """Bars images; a CNN of 6 filters, an MLP of 1 hidden unit and its twin: 67 parameters
    each; 6 repetitions (seeds 0 to 5, the same data for every family at each seed)."""
    (root / "bars.py").write_text(CLASSES)
    return ini.write(
        root,
        ini.process(root, 10, lr=0.05, seed=0),
        ini.monitor(2, 6),
        ini.user_class(
            "dataset_bars",
            "dataset",
            f"{root}/bars.py",
            "data_{class}",
            data_size=400,
            train_prop=0.5,
            batch_size=20,
        ),
        *(
            ini.user_class(name, "mlp", f"{root}/bars.py", "net_{class}", width=width)
            for name, width in (("cnn", 6), ("mlp", 1), ("mlp_twin", 1))
        ),
    )


def values(db: str, family: str, metric: str) -> list[float]:
    """A family's finished values of the metric, in seed order, straight from SQL."""
    rows = query(
        db,
        f"""
        SELECT rr."{metric}" FROM run_results rr
        JOIN runs r ON r.run_id = rr.run_id AND r.status = 'done'
        JOIN run_meta m ON m.run_id = rr.run_id
        JOIN params k ON k.run_id = rr.run_id AND k.param_name = 'mlp_key'
        WHERE k.param_value = ? ORDER BY m.seed""",
        family,
    )
    return [r[0] for r in rows]


def holm_by_hand(p: list[float]) -> list[float]:
    order = np.argsort(p)
    out, running = [0.0] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        out[i] = running
    return out


@pytest.mark.parametrize("metric", ["test_loss", "test_acc"])
def test_a_large_effect_is_decided_at_six_seeds_and_a_null_twin_is_not(
    daemon: Daemon, metric: str
) -> None:
    root = daemon.root
    db = str(root / "s.db")
    daemon.cli("run", str(study(root)), db, "--follow", check=True, timeout=600)
    report = json.loads(daemon.cli("compare", db, "--metric", metric, "--json", check=True).stdout)
    lines = {(ln["a"], ln["b"]): ln for ln in report["lines"]}
    assert set(lines) == {
        ("net_cnn", "net_mlp"),
        ("net_cnn", "net_mlp_twin"),
        ("net_mlp", "net_mlp_twin"),
    }
    p_values: dict[Any, float] = {}
    for (a, b), line in lines.items():
        xa, xb = values(db, a, metric), values(db, b, metric)
        assert line["paired"] and line["n_a"] == line["n_b"] == len(xa) == len(xb) == 6
        ref = stats.ttest_rel(xa, xb)
        assert line["test"] == "paired t"
        assert line["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
        ci = ref.confidence_interval()
        assert line["ci"] == pytest.approx([ci.low, ci.high], rel=1e-9)
        d = np.array(xa) - np.array(xb)
        assert line["effect_size"] == pytest.approx(d.mean() / d.std(ddof=1), rel=1e-9)
        better = d < 0 if metric == "test_loss" else d > 0
        assert line["p_improvement"] == pytest.approx(better.mean() + 0.5 * (d == 0).mean())
        wins = stats.binomtest(int(better.sum()), 6).proportion_ci(method="wilson")
        assert line["p_improvement_ci"] == pytest.approx([wins.low, wins.high], rel=1e-9)
        p_values[(a, b)] = ref.pvalue
    adjusted = dict(zip(p_values, holm_by_hand(list(p_values.values()))))
    for key, line in lines.items():
        assert line["p_holm"] == pytest.approx(adjusted[key], rel=1e-9)
    strong = lines[("net_cnn", "net_mlp")]
    assert abs(strong["effect_size"]) >= 2 and strong["p_improvement"] == 1.0
    assert strong["verdict"] == "A better" and strong["decided_by"] == "mean"
    twin = lines[("net_mlp", "net_mlp_twin")]
    assert twin["verdict"] not in ("A better", "B better")
