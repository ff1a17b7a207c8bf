"""A trained ensemble as one object: fold models stacked on a model axis, whole-trial prediction
and differentiable functions of the video, and what the in-silico commands share
(docs/insilico.md). Arrays in the dataset's layout: video (36, 64, T), behavior and
pupil_center (2, T); the NaN tail is ignored."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from dwise_jax import checkpoint, cli, experiment, forward
from dwise_jax.data import windows
from dwise_jax.data.sensorium import Mouse, SensoriumDataset, first_nan

DEFAULT_CHUNK = 32  # windows per model evaluated at once inside the jitted scan


@dataclass(frozen=True)
class WindowPlan:
    """A trial's windows, padded to whole chunks: frame indexes (K, C, 16), valid (K, C) and
    how many valid windows cover each frame, (L,). Hashable by its settings (a static jit
    argument)."""

    length: int
    anchor_stride: int
    chunk: int
    index: np.ndarray = field(compare=False)
    valid: np.ndarray = field(compare=False)
    counts: np.ndarray = field(compare=False)

    @classmethod
    def of(cls, length: int, anchor_stride: int = 1, chunk: int = DEFAULT_CHUNK) -> WindowPlan:
        anchors = windows.prediction_anchors(length, anchor_stride)
        pad = -len(anchors) % chunk
        idx = windows.window_indexes(np.concatenate([anchors, np.full(pad, anchors[-1])]))
        valid = np.arange(len(idx)) < len(anchors)
        return cls(int(length), int(anchor_stride), int(chunk),
                   idx.reshape(-1, chunk, windows.WINDOW_FRAMES), valid.reshape(-1, chunk),
                   windows.window_counts(length, anchors))


def over_models(fn, states, model_axis: str = "map"):
    """fn over the stacked models: `vmap` (one batched program) or `lax.map` (one model after
    another in the same program; on CPU the faster, see benchmarks/RESULTS.md)."""
    if model_axis == "vmap":
        return jax.vmap(fn)(states)
    if model_axis == "map":
        return jax.lax.map(fn, states)
    raise ValueError(f"model_axis must be 'map' or 'vmap', got {model_axis!r}")


def models_apply(graphdef, states, frames, traces, readout_index: int, model_axis: str = "map"):
    """Every stacked model on the same windows (C, 16, 36, 64), (C, 16, 4): (M, C, 16, N)."""
    return over_models(lambda s: forward.apply(graphdef, (s,), frames, traces, readout_index),
                       states, model_axis)


def trial_outputs(graphdef, states, video, traces, plan: WindowPlan, readout_index: int):
    """Each model's blended prediction of a trial, differentiable in the video: video
    (L, 36, 64) float32 and traces (L, 4) -> (M, L, N), each frame's mean over its windows."""
    def body(sums, chunk):
        idx, valid = chunk
        out = models_apply(graphdef, states, video[idx], traces[idx], readout_index)
        out = out * valid[None, :, None, None]
        return sums.at[:, idx].add(out), None

    num_models = jax.tree.leaves(states)[0].shape[0]
    neurons = jax.eval_shape(lambda: models_apply(
        graphdef, states, video[plan.index[0]], traces[plan.index[0]], readout_index)).shape[-1]
    sums = jnp.zeros((num_models, plan.length, neurons), jnp.float32)
    sums, _ = jax.lax.scan(body, sums, (jnp.asarray(plan.index), jnp.asarray(plan.valid)))
    return sums / jnp.maximum(jnp.asarray(plan.counts), 1)[None, :, None]


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _predict_jit(graphdef, states, video, traces, plan: WindowPlan, readout_index: int):
    return jnp.mean(trial_outputs(graphdef, states, video, traces, plan, readout_index), 0)


def trial_arrays(video, behavior, pupil_center):
    """Dataset-layout arrays -> (L, 36, 64) video and (L, 4) traces, float32, the frames before
    the video's first NaN."""
    video = np.asarray(video, np.float32)
    if video.ndim != 3 or video.shape[:2] != (windows.VIDEO_HEIGHT, windows.VIDEO_WIDTH):
        raise ValueError(f"video must be (36, 64, T), got {video.shape}")
    length = first_nan(video[0, 0])
    frames = np.moveaxis(video[:, :, :length], -1, 0)
    traces = windows.traces_of(np.asarray(behavior)[:, :length],
                               np.asarray(pupil_center)[:, :length])
    if not (np.isfinite(frames).all() and np.isfinite(traces).all()):
        raise ValueError(f"the first {length} frames of the trial hold NaN or inf")
    return frames, traces


def load_windows(mouse: Mouse, rows: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """The (trial, anchor) windows of a mouse: frames (K, 16, 36, 64) and traces (K, 16, 4)."""
    load = functools.lru_cache(maxsize=1)(mouse.load_trial)  # a trial's windows come together
    pairs = []
    for trial, anchor in rows:
        data = load(trial)
        pairs.append(windows.compact_window(data.video, data.behavior, data.pupil_center, anchor))
    return np.stack([f for f, _ in pairs]), np.stack([t for _, t in pairs])


@dataclass
class Ensemble:
    """Fold models of one architecture, their EMA states stacked on a leading model axis."""

    graphdef: Any
    states: Any
    spec: checkpoint.ModelSpec
    members: list[dict] = field(default_factory=list)  # experiment, fold, step, directory

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def folds(self) -> list[int]:
        return [m["fold"] for m in self.members]

    def subset(self, indexes) -> Ensemble:
        """The ensemble of the members at `indexes` (in that order)."""
        idx = np.asarray(list(indexes), np.int64)
        return Ensemble(self.graphdef, jax.tree.map(lambda a: a[idx], self.states), self.spec,
                        [self.members[i] for i in idx])

    def readout_index(self, mouse: Mouse | str) -> int:
        """The readout of a mouse (a name, or a Mouse whose neuron count is checked)."""
        where = self.members[0]["directory"] if self.members else "ensemble"
        return experiment.readout_index(self.spec, mouse, where)

    def predict(self, video, behavior, pupil_center, mouse: Mouse | str, *,
                anchor_stride: int = 1, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
        """(N, L) float32: the ensemble mean of the sliding-window blend of one trial."""
        frames, traces = trial_arrays(video, behavior, pupil_center)
        out = _predict_jit(self.graphdef, self.states, jnp.asarray(frames), jnp.asarray(traces),
                           WindowPlan.of(len(frames), anchor_stride, chunk),
                           self.readout_index(mouse))
        return np.asarray(out, np.float32).T

    def video_function(self, behavior, pupil_center, mouse: Mouse | str, length: int, *,
                       anchor_stride: int = 1, chunk: int = DEFAULT_CHUNK):
        """A jittable, differentiable f(video (L, 36, 64)) -> (M, L, N): each model's blended
        prediction with the behaviour and pupil held as given."""
        traces = jnp.asarray(windows.traces_of(np.asarray(behavior)[:, :length],
                                               np.asarray(pupil_center)[:, :length]))
        plan, index = WindowPlan.of(length, anchor_stride, chunk), self.readout_index(mouse)
        return lambda video: trial_outputs(self.graphdef, self.states, video, traces, plan,
                                           index)


def stack(models: list[tuple[nnx.Module, checkpoint.ModelSpec, dict]]) -> Ensemble:
    """An Ensemble of eval-mode models of one architecture; each with its spec and a member
    record (experiment, fold, step, directory)."""
    if not models:
        raise experiment.PredictionError("an ensemble needs at least one model")
    first = models[0][1]
    for _, spec, member in models[1:]:
        if spec.constructor != first.constructor or spec.mice != first.mice:
            raise experiment.PredictionError(
                f"{member['directory']}: its architecture or mice differ from "
                f"{models[0][2]['directory']}; an ensemble stacks models of one architecture")
    graphdef, _ = nnx.split(models[0][0])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.split(m)[1] for m, _, _ in models])
    return Ensemble(graphdef, stacked, first, [m for _, _, m in models])


def load_ensemble(workdir: str | Path, experiments: str | list[str],
                  fold_ids: list[int] | None = None) -> Ensemble:
    """The EMA models of every fold found (or `fold_ids`) of one or more experiments."""
    experiments = [experiments] if isinstance(experiments, str) else list(experiments)
    models = []
    for name in experiments:
        for k, directory in experiment.fold_folders(workdir, name, fold_ids).items():
            model, spec, step = checkpoint.load_ema_model(directory)
            models.append((model, spec, {"experiment": name, "fold": k, "step": step,
                                         "directory": str(directory)}))
    return stack(models)


def data_root(ensemble: Ensemble, given: str | None = None) -> str:
    """--data_root, else the folds' config.json (as predict)."""
    folders = {i: Path(m["directory"]) for i, m in enumerate(ensemble.members)}
    return experiment.resolve_data_root(folders, given)


def find_mice(dataset: SensoriumDataset, keys: list[str]) -> list[Mouse]:
    """The mice named on a command line (`SensoriumDataset.find`); one user error if any is not."""
    try:
        return [dataset.find(key) for key in keys]
    except KeyError as err:
        raise experiment.PredictionError(err.args[0]) from None


def define_flags(fv: flags.FlagValues, out: str, settings: type, lists: dict) -> None:
    """The flags of an in-silico command: the ensemble's, --out (default `out`), each field of
    the `settings` dataclass, and `lists` {name: (default, help)}."""
    for name, default, text in (
            ("experiment", None, "Experiment name(s), comma-separated."),
            ("workdir", "workdir", "Work folder holding <experiment>/fold_<k>."),
            ("data_root", None, "Dataset root (default: the folds' config.json)."),
            ("out", None, f"Output folder (default {out}).")):
        flags.DEFINE_string(name, default, text, flag_values=fv)
    lists = {"folds": (None, "Fold models to use (default: every fold found)."), **lists}
    for name, (default, text) in lists.items():
        flags.DEFINE_list(name, default, text, flag_values=fv)
    for f in fields(settings):
        define = {"int": flags.DEFINE_integer, "str": flags.DEFINE_string}.get(
            f.type, flags.DEFINE_float)
        define(f.name, f.default, f"{settings.__name__}.{f.name}", flag_values=fv)


def parse_flags(fv: flags.FlagValues, args: list[str], settings: type, ints: tuple[str, ...]):
    """(the `settings` dataclass from its flags, {name: list of int or None} of `ints`)."""
    if args:
        raise cli.UsageError(f"unexpected arguments: {args}")
    try:
        return (settings(**{f.name: fv[f.name].value for f in fields(settings)}),
                {k: [int(v) for v in fv[k].value] if fv[k].value else None for k in ints})
    except ValueError as e:
        raise cli.UsageError(f"--{', --'.join(ints)} take integers ({e})") from None
