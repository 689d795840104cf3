"""Study configurations (INI files) for the tests, section by section: `write(root,
process(root, 2), monitor(1), dataset(40), mlp(2, 3))` writes root/config.ini. Each builder
writes the keys in the order a person would, so tests may edit the text (`data_size = 200`)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "or_mlp"


def write_project(root: Path, config: str, files: dict[str, str] | None = None) -> Path:
    """Write a config and class files into root; return the config path."""
    for name, text in (files or {}).items():
        (root / name).write_text(textwrap.dedent(text))
    path = root / "config.ini"
    path.write_text(textwrap.dedent(config))
    return path


def section(name: str, keys: dict[str, Any], extra: str = "") -> str:
    """One INI section: `[name]`, its keys in the order given, then the lines of `extra`."""
    lines = [f"[{name}]", *(f"{key} = {value}" for key, value in keys.items())]
    lines += [line.strip() for line in extra.splitlines() if line.strip()]
    return "\n".join(lines) + "\n"


def process(
    root: Path,
    epochs: int = 3,
    *,
    lr: float = 0.01,
    seed: int | None = 0,
    loss_function: str = "BCELoss",
    pipeline_scheme: str = "mlp",
    extra: str = "",
) -> str:
    """[PROCESS] of a study over `dataset` then `pipeline_scheme`, run files in root/runs;
    `seed=None` leaves the seed out."""
    keys: dict[str, Any] = {
        "lr": lr,
        "epochs": epochs,
        "data_scheme": "dataset",
        "pipeline_scheme": pipeline_scheme,
        "loss_function": loss_function,
        "run_files_path": f"{root}/runs",
    }
    if seed is not None:
        keys["seed"] = seed
    return section("PROCESS", keys, extra)


def monitor(
    nb_processus: int = 2,
    multiplicity: int = 1,
    *,
    need_gpu: str = "false",
    gpu_available: str = "None",
    extra: str = "",
) -> str:
    """[MONITOR]: on CPUs unless told otherwise."""
    keys = {
        "need_gpu": need_gpu,
        "gpu_available": gpu_available,
        "nb_processus": nb_processus,
        "multiplicity": multiplicity,
    }
    return section("MONITOR", keys, extra)


def user_class(
    name: str, kind: str, path: str | Path, key: str, cls: str | None = None, **params: Any
) -> str:
    """A section naming a user class (`cls`, by default the section's name) of type `kind`."""
    keys = {"type": kind, "class": cls or name, "path_to_class": path, **params, "key": key}
    return section(name, keys)


def dataset(
    data_size: int,
    train_prop: float = 0.8,
    batch_size: int = 20,
    key: str = "data_{class}",
    name: str = "dataset_OR",
    classes: Path = EXAMPLE,
) -> str:
    """One of the example's datasets (dataset_OR, dataset_AND) from `classes`/dataset.py."""
    params = {"data_size": data_size, "train_prop": train_prop, "batch_size": batch_size}
    return user_class(name, "dataset", f"{classes}/dataset.py", key, **params)


def mlp(
    length: Any,
    width: Any,
    name: str = "mlp_funnel",
    key: str = "mlp_{class}",
    classes: Path | str = EXAMPLE,
) -> str:
    """One of the example's MLPs (mlp_funnel, mlp_brick) from `classes`/mlp.py."""
    return user_class(name, "mlp", f"{classes}/mlp.py", key, length=length, width=width)


def write(root: Path, *sections: str, files: dict[str, str] | None = None) -> Path:
    """Write a config made of `sections` (and class files) into root; return its path."""
    return write_project(root, "\n".join(sections), files)
