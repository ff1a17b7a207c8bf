"""`python -m dwise_jax.reconstruct --experiment NAME --split SPLIT`: movies from responses.

The published method (Bauer, Margrie & Clopath, eLife 2026) on the project's ensemble, one
jitted function per iteration, each trial only by models that never trained on it. Method,
outputs, report: docs/insilico.md#movie-reconstruction.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from dwise_jax import cli, decoder, experiment, forward, inference, insilico_report, losses, report
from dwise_jax.data import folds, windows
from dwise_jax.data.sensorium import TEST_TIERS, Mouse, SensoriumDataset

SKIP_FRAMES = 32  # frames not scored at the start of a trial (the published rule)


@dataclass(frozen=True)
class ReconConfig:
    """Every setting of a reconstruction; defaults follow the published method."""

    iterations: int = 1000
    lr: float = 1000.0
    warmup: int = 10
    beta1: float = 0.9
    grad_clip: float = 1.0
    init: float = 127.5  # mid-grey
    anchor_stride: int = 1
    chunk: int = inference.DEFAULT_CHUNK
    eval_every: int = 50
    update_fraction: float = 0.95  # mask: the pixels holding this share of the gradient energy
    score_fraction: float = 0.8
    mask_windows: int = 64
    model_axis: str = "map"  # "map": models one after another (lax.map); "vmap": batched
    smooth_sigma: float = 0.0  # > 0: a Gaussian blur (pixels) of the update and the mask energy
    decoder_lags: int = 8  # the linear decoder baseline (dwise_jax/decoder.py); 0: none
    decoder_trials: int = 128  # at most this many fitting trials per mouse and fold group


def window_grads(graphdef, states, frames, traces, targets, readout_index: int,
                 model_axis: str = "map"):
    """Per model and window, the gradient of the window's Poisson NLL on its frames, unit L2
    norm: frames (C, 16, 36, 64), traces (C, 16, 4), targets (C, 16, N) -> (M, C, 16, 36, 64)
    and the (M, C) losses."""
    def loss(state, f):
        pred = forward.apply(graphdef, (state,), f, traces, readout_index)
        per_window = jnp.sum(losses.poisson_nll(pred, targets), axis=(1, 2))
        return jnp.sum(per_window), per_window

    grads, values = inference.over_models(
        lambda s: jax.grad(loss, argnums=1, has_aux=True)(s, frames), states, model_axis)
    norm = jnp.sqrt(jnp.sum(jnp.square(grads), axis=(2, 3, 4), keepdims=True))
    return grads / jnp.maximum(norm, 1e-20), values


def direction(graphdef, states, video, traces, targets, plan: inference.WindowPlan,
              readout_index: int, model_axis: str = "map"):
    """(L, 36, 64): the normalised window gradients averaged over the windows covering each
    frame and over the models; and the mean loss of the valid windows."""
    def body(carry, chunk):
        sums, total = carry
        idx, valid = chunk
        g, values = window_grads(graphdef, states, video[idx], traces[idx], targets[idx],
                                 readout_index, model_axis)
        g = g * valid[None, :, None, None, None]
        return (sums.at[:, idx].add(g), total + jnp.sum(values * valid)), None

    num_models = jax.tree.leaves(states)[0].shape[0]
    init = (jnp.zeros((num_models, *video.shape), jnp.float32), jnp.float32(0))
    (sums, total), _ = jax.lax.scan(body, init, (jnp.asarray(plan.index),
                                                 jnp.asarray(plan.valid)))
    counts = jnp.maximum(jnp.asarray(plan.counts), 1)[None, :, None, None]
    return jnp.mean(sums / counts, axis=0), total / (num_models * plan.valid.sum())


def blur(x, sigma: float):
    """A Gaussian blur of `sigma` pixels over the last two axes (height, width); none at 0."""
    if sigma <= 0:
        return x

    def gaussian(size: int) -> np.ndarray:  # row i: around i, cut at the edges, renormalised
        d = np.arange(size)[:, None] - np.arange(size)[None, :]
        m = np.exp(-0.5 * (d / sigma) ** 2)
        return (m / m.sum(axis=1, keepdims=True)).astype(np.float32)

    return jnp.einsum("ij,...jk,lk->...il", gaussian(x.shape[-2]), x, gaussian(x.shape[-1]))


def adam_step(video, moment, grad, mask, step, cfg: ReconConfig):
    """One update: masked, clipped gradient; Adam's bias-corrected first moment; 0..255."""
    g = jnp.clip(grad * mask, -cfg.grad_clip, cfg.grad_clip)
    moment = cfg.beta1 * moment + (1 - cfg.beta1) * g
    t = step + 1
    lr = cfg.lr * jnp.minimum(1.0, t / max(cfg.warmup, 1))
    video = video - lr * moment / (1 - cfg.beta1 ** t)
    return jnp.clip(video, 0.0, 255.0), moment


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8))
def iteration(graphdef, states, video, moment, traces, targets, plan: inference.WindowPlan,
              readout_index: int, cfg: ReconConfig, mask, step):
    """One whole reconstruction iteration of a trial: (video, moment, loss)."""
    grad, loss = direction(graphdef, states, video, traces, targets, plan, readout_index,
                           cfg.model_axis)
    video, moment = adam_step(video, moment, blur(grad, cfg.smooth_sigma), mask, step, cfg)
    return video, moment, loss


def score(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict:
    """Pearson r and RMSE of the pixels inside `mask` over frames SKIP_FRAMES.. (L, 36, 64)."""
    a = np.asarray(recon[SKIP_FRAMES:], np.float64)[:, mask].ravel()
    b = np.asarray(truth[SKIP_FRAMES:], np.float64)[:, mask].ravel()
    return {"corr": decoder.correlation(a, b), "rmse": float(np.sqrt(np.mean((a - b) ** 2)))}


def reconstruct_trial(ens: inference.Ensemble, traces, targets, mask: np.ndarray,
                      cfg: ReconConfig, readout_index: int, truth: np.ndarray | None = None,
                      score_mask: np.ndarray | None = None):
    """Reconstructs one trial; returns (video (L, 36, 64) float32, curve of scores)."""
    plan = inference.WindowPlan.of(len(traces), cfg.anchor_stride, cfg.chunk)
    video = jnp.full((len(traces), windows.VIDEO_HEIGHT, windows.VIDEO_WIDTH), cfg.init,
                     jnp.float32)
    moment = jnp.zeros_like(video)
    traces, targets = jnp.asarray(traces), jnp.asarray(targets)
    mask = jnp.asarray(mask, jnp.float32)
    curve = []
    for done in range(1, cfg.iterations + 1):
        video, moment, loss = iteration(ens.graphdef, ens.states, video, moment, traces,
                                        targets, plan, readout_index, cfg, mask, done - 1)
        if truth is not None and (done % cfg.eval_every == 0 or done == cfg.iterations):
            curve.append({"iteration": done, "loss": float(loss),
                          **score(np.asarray(video), truth, score_mask)})
    return np.asarray(video, np.float32), curve


@functools.partial(jax.jit, static_argnums=(0, 4))
def _energy(graphdef, states, frames, traces, readout_index):
    def total(f):
        return jnp.sum(inference.models_apply(graphdef, states, f, traces, readout_index))
    return jnp.sum(jnp.square(jax.grad(total)(frames)), axis=(0, 1))


def top_share(energy: np.ndarray, share: float) -> np.ndarray:
    """The smallest set of pixels that holds `share` of the energy (bool, like energy)."""
    flat = energy.ravel()
    order = np.argsort(flat)[::-1]
    cum = np.cumsum(flat[order]) / max(flat.sum(), 1e-30)
    keep = np.zeros(flat.size, bool)
    keep[order[: int(np.searchsorted(cum, share)) + 1]] = True
    return keep.reshape(energy.shape)


def population_mask(ens: inference.Ensemble, mouse: Mouse, trials: list[int],
                    cfg: ReconConfig, seed: int = 0) -> dict:
    """The screen area that drives the mouse's predicted population activity, from
    `cfg.mask_windows` windows of `trials`: {"energy" (36, 64), max 1; "update", "score": the
    pixels holding those fractions of the energy}."""
    rng = np.random.default_rng(seed)
    rows = [(t, a) for t in trials for a in windows.prediction_anchors(int(mouse.lengths[t]), 8)]
    pick = rng.choice(len(rows), min(cfg.mask_windows, len(rows)), replace=False)
    index = ens.readout_index(mouse)
    energy = np.zeros((windows.VIDEO_HEIGHT, windows.VIDEO_WIDTH))
    for start in range(0, len(pick), cfg.chunk):
        frames, traces = inference.load_windows(
            mouse, [rows[i] for i in pick[start:start + cfg.chunk]])
        energy += np.asarray(_energy(ens.graphdef, ens.states, jnp.asarray(frames),
                                     jnp.asarray(traces), index), np.float64)
    energy = np.asarray(blur(energy, cfg.smooth_sigma), np.float64)
    energy = energy / max(energy.max(), 1e-30)
    return {"energy": energy.astype(np.float32), "update": top_share(energy, cfg.update_fraction),
            "score": top_share(energy, cfg.score_fraction)}


def fit_decoder(dataset: SensoriumDataset, mouse: Mouse, held_folds: set[int] | None,
                score_mask: np.ndarray, cfg: ReconConfig) -> decoder.RidgeDecoder | None:
    """The linear decoder baseline, fitted on the mouse's labeled trials outside `held_folds`
    (None: every fold's), evenly thinned to `cfg.decoder_trials`; None if `decoder_lags` is 0."""
    if cfg.decoder_lags <= 0:
        return None
    ids = folds.labeled_trials(mouse, set(range(folds.NUM_FOLDS)) - set(held_folds or ()))
    ids = ids[::max(1, -(-len(ids) // max(cfg.decoder_trials, 1)))]
    pairs = []
    for t in ids:
        data = mouse.load_trial(t)
        video, _ = inference.trial_arrays(data.video, data.behavior, data.pupil_center)
        pairs.append((report.load_target(dataset, "train", mouse, t), video))
    return decoder.fit(pairs, score_mask, cfg.decoder_lags)


def trial_groups(ens: inference.Ensemble, dataset: SensoriumDataset, split: str,
                 mice: list[str] | None, trials: list[int] | None):
    """[(mouse, member indexes, trial ids)]: each trial with the models that never saw it."""
    experiment.check_split(split)
    if not report.is_scored(dataset, split):
        raise experiment.PredictionError(f"{dataset.root}: split {split} has no recorded "
                                         "responses to reconstruct from (use --split folds)")
    chosen = inference.find_mice(dataset, mice) if mice else list(dataset.mice)
    groups = []
    for mouse in chosen:
        ens.readout_index(mouse)
        if split == "folds":
            groups += [(mouse, tuple(i for i, f in enumerate(ens.folds) if f == k),
                        folds.labeled_trials(mouse, {k})) for k in sorted(set(ens.folds))]
        else:
            groups.append((mouse, tuple(range(ens.size)), mouse.trial_ids(split).tolist()))
    groups = [(m, g, [t for t in ids if trials is None or t in trials]) for m, g, ids in groups]
    if not (groups := [g for g in groups if g[2]]):
        raise experiment.PredictionError(f"{dataset.root}: no trials of split {split} for mice "
                                         f"{[m.name for m in chosen]}, trials {trials}, folds "
                                         f"{sorted(set(ens.folds))}")
    return groups


def reconstruct_split(workdir: str | Path, experiments: list[str], split: str, *,
                      cfg: ReconConfig = ReconConfig(), mice: list[str] | None = None,
                      trials: list[int] | None = None, fold_ids: list[int] | None = None,
                      sizes: tuple[int, ...] = (1, 2, 4, 0), data_root: str | None = None,
                      out: str | Path | None = None) -> dict:
    """Reconstructs the chosen trials, each with every ensemble size of `sizes` (0: all);
    writes arrays, strips, movies, masks and the report."""
    ens = inference.load_ensemble(workdir, experiments, fold_ids)
    dataset = SensoriumDataset.open(inference.data_root(ens, data_root))
    groups = trial_groups(ens, dataset, split, mice, trials)
    name = ",".join(sorted(experiments))
    out = Path(out) if out else Path(workdir) / "insilico" / name / "reconstruct" / split
    (out / "report.json").unlink(missing_ok=True)
    masks, rows = {}, []
    for mouse, members, ids in groups:
        if mouse.name not in masks:
            train = mouse.trial_ids("train").tolist() or ids
            masks[mouse.name] = population_mask(ens, mouse, train[:16], cfg)
            insilico_report.save_mask(out / "masks", mouse.name, masks[mouse.name])
        mask = masks[mouse.name]
        held = {ens.folds[i] for i in members} if split == "folds" else None
        linear = fit_decoder(dataset, mouse, held, mask["score"], cfg)
        for trial in ids:
            data = mouse.load_trial(trial)
            truth, traces = inference.trial_arrays(data.video, data.behavior, data.pupil_center)
            responses = report.load_target(dataset, split, mouse, trial)
            row = {"mouse": mouse.name, "trial": trial, "folds": [ens.folds[i] for i in members],
                   "by_size": {}}
            for size in sorted({min(s, len(members)) if s > 0 else len(members) for s in sizes}):
                video, curve = reconstruct_trial(
                    ens.subset(members[:size]), traces, np.maximum(responses, 0).T,
                    mask["update"], cfg, ens.readout_index(mouse), truth, mask["score"])
                row["by_size"][size] = {"final": curve[-1], "curve": curve}
            best = row["by_size"][max(row["by_size"])]["final"]
            text = f"{mouse.name} trial {trial}: corr {best['corr']:.4f} rmse {best['rmse']:.2f}"
            if linear is not None:
                row["linear"] = score(linear.decode(responses), truth, mask["score"])
                row["linear"].update(lags=linear.lags, alpha=linear.alpha)
                text += f"; linear decoder corr {row['linear']['corr']:.4f}"
            insilico_report.save_video(out / mouse.name, trial, video, truth)
            rows.append(row)
            print(text)
    meta = {"experiments": sorted(experiments), "split": split, "data_root": str(dataset.root),
            "config": asdict(cfg), "members": ens.members}
    path = insilico_report.reconstruction_report(out, rows, masks, meta)
    print(f"report: {path}")
    return {"directory": out, "rows": rows, "report": path}


ERRORS = (*experiment.USER_ERRORS, ValueError)  # the user's to fix: one `error:` line, exit 1


def define_flags(fv: flags.FlagValues) -> None:
    inference.define_flags(fv, "<workdir>/insilico/<experiment>/reconstruct/<split>", ReconConfig,
                           {"mice": (None, "Mice: folder names, readout indexes or unique name "
                                     "prefixes (default: all)."),
                            "trials": (None, "Trial ids (default: all of the split)."),
                            "ensemble_sizes": (["1", "2", "4", "0"],
                                               "Ensemble sizes scored (0: all).")})
    flags.DEFINE_string("split", None, f"folds or a scored test split ({', '.join(TEST_TIERS)}).",
                        flag_values=fv)


def run(f: flags.FlagValues, args: list[str]) -> int:
    cfg, ints = inference.parse_flags(f, args, ReconConfig, ("trials", "folds", "ensemble_sizes"))
    if not f.experiment or not f.split:
        raise cli.UsageError("--experiment and --split are required")
    logging.set_verbosity(logging.WARNING)
    reconstruct_split(f.workdir, f.experiment.split(","), f.split, cfg=cfg, mice=f.mice,
                      trials=ints["trials"], fold_ids=ints["folds"],
                      sizes=tuple(ints["ensemble_sizes"] or (0,)), data_root=f.data_root,
                      out=f.out)
    return 0


if __name__ == "__main__":
    cli.main(__doc__, define_flags, run, errors=ERRORS)
