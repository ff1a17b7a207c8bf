"""What a user watches during training, written by process 0 into each fold folder:
metrics.jsonl (one JSON object per line: {"step", "kind": "train" | "val", ...values}),
tensorboardX events when installed, and `curves.png` redrawn at each validation."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from dwise_jax import atomic


class Logbook:
    """Appends metrics to `<fold>/metrics.jsonl` and mirrors them to TensorBoard."""

    def __init__(self, directory: Path, enabled: bool = True, tensorboard: bool = True,
                 plot: bool = True):
        self.directory, self.enabled = Path(directory), enabled
        self.plot_enabled = plot and enabled
        self.path = self.directory / "metrics.jsonl"
        self.writer = None
        if enabled and tensorboard:
            with contextlib.suppress(ImportError):
                self.writer = _summary_writer()(str(self.directory / "tensorboard"))

    def records(self) -> list[dict[str, Any]]:
        """Everything logged so far (the file survives restarts). A line cut short by a crash
        (power loss, full disk) is skipped with a warning."""
        if not self.path.exists():
            return []
        records = []
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if line.strip():
                    print(f"warning: {self.path}:{number}: skipping an incomplete line",
                          file=sys.stderr)
        return records

    def truncate_after(self, step: int) -> None:
        """Drops records past `step` (a restart replays them from the last checkpoint)."""
        if self.enabled and self.path.exists():
            kept = [r for r in self.records() if r["step"] <= step]
            with atomic.atomic_path(self.path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def log(self, step: int, kind: str, **values: float) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "kind": kind, **{k: float(v) for k, v in values.items()}}
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.path.open("a+b") as f:
            if f.tell():  # append mode starts at the end
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")  # end a line cut short by a crash; records() skips it
            f.write((json.dumps(record) + "\n").encode())
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{kind}/{name}", float(value), int(step))
            self.writer.flush()

    def plot(self) -> Path | None:
        """Redraws `curves.png` from metrics.jsonl; returns its path."""
        if not self.plot_enabled:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.records()
        train = [r for r in records if r["kind"] == "train"]
        val = [r for r in records if r["kind"] == "val"]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        if train:
            steps = [r["step"] for r in train]
            axes[0].plot(steps, [r["loss"] for r in train], lw=1, label="training (logged batch)")
            axes[1].plot(steps, [r["lr"] for r in train], lw=1)
        if val:
            steps = [r["step"] for r in val]
            axes[0].plot(steps, [r["loss"] for r in val], "o-", label="validation (EMA)")
            axes[0].legend()
        if (limits := loss_limits(train, val)) is not None:
            axes[0].set_ylim(*limits)
            axes[2].plot(steps, [r["corr"] for r in val], "o-")
        for ax, title in zip(axes, ("loss", "learning rate", "validation correlation"),
                             strict=True):
            ax.set(title=title, xlabel="step")
            ax.grid(alpha=0.3)
        fig.suptitle(self.directory.name)
        fig.tight_layout()
        path = self.directory / "curves.png"
        with atomic.atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=90)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def loss_limits(train: list[dict], val: list[dict]) -> tuple[float, float] | None:
    """The loss plot's y range, None before anything but step 0 is logged: the validation at
    step 0 (random readouts, thousands of times the trained losses) is left off the scale."""
    values = [r["loss"] for r in train] + [r["loss"] for r in val if r["step"] > 0]
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return None
    low, high = min(values), max(values)
    margin = 0.05 * (high - low) or 0.05 * abs(high) or 1.0
    return low - margin, high + margin


def _summary_writer():
    """tensorboardX's SummaryWriter class, imported without torch: where torch is installed
    (for `convert`), tensorboardX imports it only to accept torch tensors, which cost each
    training process about 1.4 s. We log floats."""
    hide_torch = "tensorboardX" not in sys.modules and "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # `import torch` raises ImportError while this stands
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide_torch:
            del sys.modules["torch"]
    return SummaryWriter
