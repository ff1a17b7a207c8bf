"""What `train` and `predict` are about to do, printed before they start: devices, parameter
count, steps or windows, folds, and the time per step measured on the first steps. It never
refuses a run: on a CPU with a model far larger than the demo's it names `configs/demo.py`."""

from __future__ import annotations

import time

import jax
import numpy as np
from tqdm import tqdm

CPU_HINT_PARAMS = 10_000_000  # "much larger than the demo's" (docs/training.md)


def devices_text() -> str:
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return f"{len(devices)} {jax.default_backend()} device(s) ({', '.join(kinds)})"


def num_params(tree) -> int:
    """The number of scalars in a pytree of arrays (the model's parameters)."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def duration(seconds: float) -> str:
    """A duration for a person: 42 s, 3.5 min, 2.1 h, 4.0 days."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def train_lines(*, fold: int, params: int, steps: int, done: int, epochs: int,
                backend: str | None = None) -> list[str]:
    """The lines printed before a fold's first step (`backend`: default JAX's)."""
    lines = [f"fold {fold}: {devices_text()}; model {params:,} parameters",
             f"fold {fold}: {steps} steps per fold ({epochs} epochs), {steps - done} to go; "
             "the time per step is measured on the first steps"]
    if (backend or jax.default_backend()) == "cpu" and params > CPU_HINT_PARAMS:
        lines.append(
            f"fold {fold}: note: this model is far larger than configs/demo.py's, the run "
            "sized for a CPU; on a CPU each step may take minutes (stop with Ctrl-C or SIGTERM "
            "at any time)")
    return lines


def step_time_line(fold: int, first_s: float, step_s: float | None, steps_left: int) -> str:
    """The line printed once the first steps are timed."""
    if step_s is None:
        return f"fold {fold}: first step {duration(first_s)} (compilation included)"
    return (f"fold {fold}: first step {duration(first_s)} (compilation included), then "
            f"{duration(step_s)} per step: about {duration(step_s * steps_left)} for the "
            f"{steps_left} steps left of this fold (validations not included)")


class EstimatingBar(tqdm):
    """tqdm of windows that writes one line once its first three updates are timed: the first
    (with the compilation), then the rate and the estimated time left."""

    def __init__(self, *args, label: str, **kwargs):
        super().__init__(*args, unit="window", **kwargs)
        self._label, self._started, self._marks = label, time.perf_counter(), []
        self._count, self._total = 0, kwargs.get("total")

    def update(self, n: float = 1) -> bool | None:
        shown = super().update(n)
        self._count += n
        if len(self._marks) < 3:
            self._marks.append((time.perf_counter(), self._count))
            if len(self._marks) == 3:
                (t1, n1), (t3, n3) = self._marks[0], self._marks[2]
                rate = (n3 - n1) / max(t3 - t1, 1e-9)
                left = (self._total - self._count) / rate if self._total and rate else 0.0
                self.write(f"{self._label}: first batch {duration(t1 - self._started)} "
                           f"(compilation included), then {rate:.1f} windows/s: about "
                           f"{duration(left)} left")
        return shown
