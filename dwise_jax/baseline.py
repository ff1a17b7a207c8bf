"""Reference scores for a validation fold, the original's val_corr on training's validation
windows: a ridge-regression baseline and, on simulated data, the noise ceiling
(docs/training.md#the-demo-on-the-simulated-dataset).

    python -m dwise_jax.baseline --root data/simulated --fold 0
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from absl import flags

from dwise_jax import cli
from dwise_jax.data import eval_windows, folds, synthetic, windows
from dwise_jax.data.sensorium import DatasetError, Mouse, SensoriumDataset
from dwise_jax.metrics import PearsonSums

LAGS = (0, 2, 4, 6, 8)  # frames back; the simulated temporal kernels peak at 80-160 ms
BLOCK = 4
PENALTIES = (1e-1, 1e1, 1e3, 1e5)


def frame_features(video: np.ndarray, behavior: np.ndarray, pupil: np.ndarray,
                   length: int) -> np.ndarray:
    """(length, features) design matrix of a trial: lagged block-averaged frames + traces + 1."""
    h, w, _ = video.shape
    frames = np.asarray(video[:, :, :length], np.float32) / 255.0
    small = frames.reshape(h // BLOCK, BLOCK, w // BLOCK, BLOCK, length).mean(axis=(1, 3))
    small = small.reshape(-1, length).T  # (length, 144)
    lagged = [np.concatenate([np.repeat(small[:1], lag, 0), small[: length - lag]]) for lag in LAGS]
    traces = windows.traces_of(behavior[:, :length], pupil[:, :length])
    traces = (traces - traces.mean(0)) / (traces.std(0) + 1e-6)
    return np.concatenate([*lagged, traces, np.ones((length, 1), np.float32)], axis=1)


def _trial_rows(mouse: Mouse, trial: int) -> tuple[np.ndarray, np.ndarray]:
    """A trial's design matrix and its ReLU'd responses, (length, neurons)."""
    data = mouse.load_trial(trial)
    x = frame_features(data.video, data.behavior, data.pupil_center, data.length)
    return x, np.maximum(np.asarray(data.responses[:, :data.length], np.float32).T, 0.0)


def _ridge(x: np.ndarray, y: np.ndarray, penalty: float) -> np.ndarray:
    gram = x.T @ x
    gram[np.diag_indices_from(gram)] += penalty
    return np.linalg.solve(gram, x.T @ y)


def fit_ridge(mouse: Mouse, train_trials: np.ndarray) -> np.ndarray:
    """Ridge weights (features, neurons) of one mouse, the penalty chosen on 20% held out."""
    rows = [_trial_rows(mouse, int(t)) for t in train_trials]
    split = max(1, len(rows) // 5)
    x_fit, y_fit = (np.concatenate(a) for a in zip(*rows[split:], strict=True))
    x_held, y_held = (np.concatenate(a) for a in zip(*rows[:split], strict=True))
    scores = [np.mean(PearsonSums.of(x_held @ _ridge(x_fit, y_fit, p), y_held).correlation())
              for p in PENALTIES]
    best = PENALTIES[int(np.argmax(scores))]
    return _ridge(np.concatenate([x_fit, x_held]), np.concatenate([y_fit, y_held]), best)


def _val_corr(dataset: SensoriumDataset, fold: int, predict) -> float:
    """val_corr of per-trial predictions `predict(mouse, trial) -> (length, neurons)`."""
    rows = eval_windows.validation_windows(dataset, fold)
    per_mouse = []
    for mouse in dataset.mice:
        sums = PearsonSums.zeros(mouse.num_neurons)
        mine = rows[rows[:, 0] == mouse.index]
        for trial in np.unique(mine[:, 1]):
            pred = predict(mouse, int(trial))
            responses = mouse.load_trial(int(trial)).responses
            for anchor in mine[mine[:, 1] == trial, 2]:
                idx = windows.window_indexes(anchor)
                target = np.maximum(np.asarray(responses[:, idx], np.float32).T, 0.0)
                sums = sums + PearsonSums.of(pred[idx], target)
        if sums.n:
            per_mouse.append(float(np.mean(sums.correlation())))
    return float(np.mean(per_mouse))


def ridge_val_corr(dataset: SensoriumDataset, fold: int) -> float:
    """The ridge baseline's val_corr on fold `fold`, fitted on the other folds."""
    weights = {}
    for mouse in dataset.mice:
        trial_folds = folds.trial_folds(mouse)
        weights[mouse.index] = fit_ridge(
            mouse, np.flatnonzero((trial_folds >= 0) & (trial_folds != fold)))
    return _val_corr(dataset, fold,
                     lambda mouse, trial: _trial_rows(mouse, trial)[0] @ weights[mouse.index])


def is_simulated(dataset: SensoriumDataset) -> bool:
    """Whether the root was written by dwise_jax.data.synthetic (it keeps the truth aside)."""
    return (Path(dataset.root) / synthetic.SIMULATION_DIR / "simulation.json").is_file()


def ceiling_val_corr(dataset: SensoriumDataset, fold: int) -> float | None:
    """The noiseless rate's val_corr on a simulated root, None on real data."""
    if not is_simulated(dataset):
        return None

    def predict(mouse: Mouse, trial: int) -> np.ndarray:
        rate = synthetic.load_truth(dataset.root, mouse.name, trial, noiseless=True)
        return rate[:, : mouse.lengths[trial]].T

    return _val_corr(dataset, fold, predict)


ERRORS = (DatasetError,)  # the user's to fix: one `error:` line, exit 1


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("root", None, "Sensorium 2023 root (the mouse folders), e.g. "
                        "data/simulated.", flag_values=fv)
    flags.DEFINE_integer("fold", 0, "Validation fold; the ridge is fitted on the other six.",
                         lower_bound=0, upper_bound=6, flag_values=fv)


def run(fv: flags.FlagValues, args: list[str]) -> int:
    if args:
        raise cli.UsageError(f"unexpected arguments {args}")
    if not fv.root:
        raise cli.UsageError("--root is required, e.g. --root data/simulated")
    dataset = SensoriumDataset.open(fv.root)
    print(f"fold {fv.fold}: ridge baseline val_corr {ridge_val_corr(dataset, fv.fold):.4f}")
    ceiling = ceiling_val_corr(dataset, fv.fold)
    if ceiling is not None:
        print(f"fold {fv.fold}: noise ceiling val_corr {ceiling:.4f}")
    return 0


if __name__ == "__main__":
    cli.main(__doc__, define_flags, run, errors=ERRORS)
