"""A run's per-epoch figures as it trains (saved in its checkpoints and history file)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class History:
    train_loss: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    train_acc: list[float | None] = field(default_factory=list)
    test_acc: list[float | None] = field(default_factory=list)
    duration: list[float] = field(default_factory=list)
    # On the validation loader, when the data stage gives one (docs/tuning.md); a checkpoint
    # written before these existed has none.
    val_loss: list[float | None] = field(default_factory=list)
    val_acc: list[float | None] = field(default_factory=list)
    # Each epoch's training pass measured (resources.PassMeter.figures); kept with the history
    # so a resumed run keeps its first epochs' figures (absent from older checkpoints).
    usage: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[Any]]:
        return {
            "train_loss": self.train_loss,
            "test_loss": self.test_loss,
            "train_acc": self.train_acc,
            "test_acc": self.test_acc,
            "duration": self.duration,
            "val_loss": self.val_loss,
            "val_acc": self.val_acc,
            "usage": self.usage,
        }

    def append(
        self,
        train_loss: float,
        test_loss: float,
        train_acc: float | None,
        test_acc: float | None,
        duration: float,
        val_loss: float | None = None,
        val_acc: float | None = None,
    ) -> None:
        self.train_loss.append(train_loss)
        self.test_loss.append(test_loss)
        self.train_acc.append(train_acc)
        self.test_acc.append(test_acc)
        self.duration.append(duration)
        # Padded, so that index i is epoch i + 1 even after an older checkpoint's epochs.
        while len(self.val_loss) < len(self.train_loss) - 1:
            self.val_loss.append(None)
            self.val_acc.append(None)
        self.val_loss.append(val_loss)
        self.val_acc.append(val_acc)

    def truncate(self, epochs: int) -> None:
        """Keep the first `epochs` epochs (a checkpoint's history may run past its epoch)."""
        for values in self.as_dict().values():
            del values[epochs:]

    def figure(self, name: str, index: int) -> float | None:
        """One epoch's figure (0-based), None when the history has none."""
        values = self.as_dict()[name]
        return values[index] if index < len(values) else None

    def event(self, run_id: int, index: int, checkpointed: bool) -> dict[str, Any]:
        """The epoch message for the epoch at `index` (0-based) sent to the daemon."""
        event = {
            "run_id": run_id,
            "epoch": index + 1,
            "train_loss": self.train_loss[index],
            "test_loss": self.test_loss[index],
            "train_acc": self.train_acc[index],
            "test_acc": self.test_acc[index],
            "duration": self.duration[index],
            "checkpointed": checkpointed,
        }
        for name in ("val_loss", "val_acc"):
            value = self.figure(name, index)
            if value is not None:
                event[name] = value
        return event
