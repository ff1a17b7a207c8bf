"""`python -m dwise_jax.mei --experiment NAME --mouse M --neurons 3,17`: most exciting inputs.

For each chosen neuron, the 16-frame window that maximises its ensemble-mean predicted response
within a contrast budget (by default that of a typical training window), behaviour and pupil
held at the mouse's median. Outputs under `<workdir>/insilico/<experiment>/mei/<mouse>/`;
method and report: docs/insilico.md#most-exciting-inputs.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags, logging

from dwise_jax import baseline, cli, experiment, inference, insilico_report
from dwise_jax.data import folds, synthetic, windows
from dwise_jax.data.sensorium import Mouse, SensoriumDataset
from dwise_jax.metrics import PearsonSums


@dataclass(frozen=True)
class MeiConfig:
    steps: int = 200
    lr: float = 4.0
    norm: float = 0.0  # 0: the median contrast norm of the training windows
    level: float = -1.0  # < 0: the mean pixel of the training windows
    batch: int = 16  # neurons per optimisation batch
    train_windows: int = 256  # training windows sampled for the statistics and the comparison
    seed: int = 0


def _objective(graphdef, states, frames, traces, readout_index, neurons):
    """(K,) ensemble-mean response of neuron k to window k, mean over the 16 output frames."""
    out = inference.models_apply(graphdef, states, frames, traces, readout_index)  # M,K,16,N
    picked = jnp.take_along_axis(out, neurons[None, :, None, None], axis=-1)[..., 0]
    return jnp.mean(picked, axis=(0, 2))


@functools.partial(jax.jit, static_argnums=(0, 4, 6))
def _optimise(graphdef, states, delta, traces, readout_index, neurons, cfg: MeiConfig,
              norm, level):
    opt = optax.adam(cfg.lr)

    def project(d):
        scale = jnp.minimum(1.0, norm / jnp.maximum(
            jnp.sqrt(jnp.sum(d ** 2, axis=(1, 2, 3), keepdims=True)), 1e-12))
        return jnp.clip(level + d * scale, 0.0, 255.0) - level

    def step(carry, _):
        d, state = carry
        grad = jax.grad(lambda x: -jnp.sum(_objective(graphdef, states, level + x, traces,
                                                      readout_index, neurons)))(d)
        updates, state = opt.update(grad, state, d)
        return (project(optax.apply_updates(d, updates)), state), None

    delta = project(delta)
    (delta, _), _ = jax.lax.scan(step, (delta, opt.init(delta)), None, length=cfg.steps)
    return level + delta, _objective(graphdef, states, level + delta, traces, readout_index,
                                     neurons)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _responses(graphdef, states, frames, traces, readout_index):
    """(K, N) ensemble-mean responses of K windows, mean over their 16 output frames."""
    out = inference.models_apply(graphdef, states, frames, traces, readout_index)
    return jnp.mean(out, axis=(0, 2))


def training_windows(mouse: Mouse, count: int, seed: int):
    """Sampled training windows (K, 16, 36, 64), their traces, and the median traces (4,)."""
    trials = mouse.trial_ids("train").tolist() or [
        t for t in range(mouse.num_trials) if mouse.is_labeled(t)]
    rows = [(t, int(a)) for t in trials for a in windows.validation_anchors(int(mouse.lengths[t]))]
    pick = np.random.default_rng(seed).choice(len(rows), min(count, len(rows)), replace=False)
    frames, traces = inference.load_windows(mouse, [rows[i] for i in sorted(pick)])
    return frames, traces, np.median(traces.reshape(-1, 4), axis=0)


def energy_centre(mei: np.ndarray, level: float) -> tuple[float, float]:
    """(row, col) centre of mass of the squared contrast summed over frames, (16, 36, 64)."""
    energy = np.sum((np.asarray(mei, np.float64) - level) ** 2, axis=0)
    rows, cols = np.mgrid[: energy.shape[0], : energy.shape[1]]
    total = max(energy.sum(), 1e-30)
    return float((energy * rows).sum() / total), float((energy * cols).sum() / total)


def best_neurons(ens: inference.Ensemble, mouse: Mouse, count: int,
                 max_trials: int = 16) -> tuple[list[int], np.ndarray]:
    """The `count` neurons best predicted on held-out trials (each fold's, at most `max_trials`,
    by that fold's models only), and every neuron's correlation over those frames."""
    sums = PearsonSums.zeros(mouse.num_neurons)
    for k in sorted(set(ens.folds)):
        sub = ens.subset([i for i, f in enumerate(ens.folds) if f == k])
        for t in folds.labeled_trials(mouse, {k})[:max_trials]:
            data = mouse.load_trial(t)
            pred = sub.predict(data.video, data.behavior, data.pupil_center, mouse,
                               anchor_stride=8)
            sums = sums + PearsonSums.of(pred.T, mouse.load("responses", t)[:, :pred.shape[1]].T)
    if sums.n == 0:
        raise experiment.PredictionError(f"{mouse.path}: no labeled trials in folds "
                                      f"{sorted(set(ens.folds))} to rank the neurons by")
    corr = sums.correlation()
    return [int(n) for n in np.argsort(-corr, kind="stable")[:count]], corr


def find_meis(ens: inference.Ensemble, mouse: Mouse, neurons: list[int],
              cfg: MeiConfig = MeiConfig()) -> dict:
    """MEIs of `neurons`; returns {"meis" (K, 16, 36, 64), "response" (K,), "best_train" (K,),
    "norm", "level", "traces" (4,)}."""
    index = ens.readout_index(mouse)
    if bad := [n for n in neurons if not 0 <= n < mouse.num_neurons]:
        raise experiment.PredictionError(f"{mouse.path}: has neurons 0..{mouse.num_neurons - 1}, "
                                         f"not {bad}")
    frames, _, median = training_windows(mouse, cfg.train_windows, cfg.seed)
    level = float(frames.mean()) if cfg.level < 0 else cfg.level
    centred = frames - frames.mean(axis=(1, 2, 3), keepdims=True)
    norm = cfg.norm or float(np.median(np.sqrt(np.sum(centred ** 2, axis=(1, 2, 3)))))

    def held(k: int):  # k windows' traces, behaviour and pupil at the median
        return jnp.asarray(np.broadcast_to(median.astype(np.float32),
                                           (k, windows.WINDOW_FRAMES, 4)))

    batches = [frames[i:i + cfg.batch] for i in range(0, len(frames), cfg.batch)]
    train = np.concatenate([np.asarray(_responses(ens.graphdef, ens.states, jnp.asarray(f),
                                                  held(len(f)), index)) for f in batches])
    rng = np.random.default_rng(cfg.seed)
    meis, reached = [], []
    for start in range(0, len(neurons), cfg.batch):
        chosen = np.asarray(neurons[start:start + cfg.batch], np.int32)
        delta = rng.normal(0, 1, (len(chosen), windows.WINDOW_FRAMES, windows.VIDEO_HEIGHT,
                                  windows.VIDEO_WIDTH)).astype(np.float32)
        delta *= 0.1 * norm / np.sqrt(np.sum(delta[0] ** 2))
        mei, response = _optimise(ens.graphdef, ens.states, jnp.asarray(delta), held(len(chosen)),
                                  index, jnp.asarray(chosen), cfg, jnp.float32(norm),
                                  jnp.float32(level))
        meis.append(np.asarray(mei))
        reached.append(np.asarray(response))
    return {"meis": np.concatenate(meis), "response": np.concatenate(reached),
            "best_train": train[:, neurons].max(axis=0), "norm": norm, "level": level,
            "traces": median}


def mei_command(workdir: str | Path, experiments: list[str], mouse_name: str,
                neurons: list[int] | None, *, best: int = 0, cfg: MeiConfig = MeiConfig(),
                fold_ids: list[int] | None = None, data_root: str | None = None,
                out: str | Path | None = None) -> dict:
    """Finds and writes the MEIs of a mouse's neurons (or of its `best` best predicted on
    held-out trials) and the report; returns the rows."""
    ens = inference.load_ensemble(workdir, experiments, fold_ids)
    dataset = SensoriumDataset.open(inference.data_root(ens, data_root))
    (mouse,) = inference.find_mice(dataset, [mouse_name])
    mouse_name = mouse.name
    name = ",".join(sorted(experiments))
    out = Path(out) if out else Path(workdir) / "insilico" / name / "mei" / mouse_name
    (out / "report.json").unlink(missing_ok=True)
    neurons, held_out = best_neurons(ens, mouse, best) if best > 0 else (neurons, None)
    found = find_meis(ens, mouse, neurons, cfg)
    truth = None
    if baseline.is_simulated(dataset):  # the true receptive fields
        info = {m["name"]: m for m in synthetic.load_info(dataset.root)["mouse_info"]}
        truth = info[mouse_name]["receptive_fields"]
    rows = []
    for n, mei, resp, top in zip(neurons, found["meis"], found["response"],
                                 found["best_train"], strict=True):
        centre = energy_centre(mei, found["level"])
        row = {"neuron": n, "response": float(resp), "best_train_window": float(top),
               "energy_centre": centre}
        if held_out is not None:
            row["held_out_corr"] = float(held_out[n])
        if truth is not None:
            true = (truth["center_y"][n], truth["center_x"][n])
            row["true_centre"] = true
            row["distance_px"] = float(np.hypot(centre[0] - true[0], centre[1] - true[1]))
        insilico_report.save_array(out / f"{n}.npy", np.moveaxis(mei, 0, -1))
        insilico_report.strip(out / f"{n}.png", {"MEI": mei}, frames=16,
                              title=f"{mouse_name} neuron {n}: {resp:.3f} (best training "
                                    f"window {top:.3f})")
        rows.append(row)
    meta = {"experiments": sorted(experiments), "mouse": mouse_name,
            "data_root": str(dataset.root), "config": asdict(cfg), "members": ens.members,
            "norm": found["norm"], "level": found["level"],
            "behavior": [float(v) for v in found["traces"]],
            "selection": (f"the {best} neurons best predicted on held-out trials" if best
                          else "chosen by --neurons")}
    path = insilico_report.mei_report(out, rows, meta)
    print(f"report: {path}")
    return {"directory": out, "rows": rows, "report": path}


ERRORS = (*experiment.USER_ERRORS, ValueError)  # the user's to fix: one `error:` line, exit 1


def define_flags(fv: flags.FlagValues) -> None:
    inference.define_flags(fv, "<workdir>/insilico/<experiment>/mei/<mouse>", MeiConfig,
                           {"neurons": (None, "Neuron indexes (0-based, readout order).")})
    flags.DEFINE_string("mouse", None, "Mouse: folder name, readout index or unique name prefix.",
                        flag_values=fv)
    flags.DEFINE_integer("best", 0, "Instead of --neurons: the N neurons best predicted on "
                                    "held-out trials.", flag_values=fv)


def run(f: flags.FlagValues, args: list[str]) -> int:
    cfg, ints = inference.parse_flags(f, args, MeiConfig, ("neurons", "folds"))
    if not f.experiment or not f.mouse or bool(f.neurons) == (f.best > 0):
        raise cli.UsageError("--experiment, --mouse and one of --neurons or --best are required")
    logging.set_verbosity(logging.WARNING)
    mei_command(f.workdir, f.experiment.split(","), f.mouse, ints["neurons"], best=f.best,
                cfg=cfg, fold_ids=ints["folds"], data_root=f.data_root, out=f.out)
    return 0


if __name__ == "__main__":
    cli.main(__doc__, define_flags, run, errors=ERRORS)
