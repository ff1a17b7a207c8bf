"""Files of the in-silico experiments: videos (array, PNG strip, GIF), masks and reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dwise_jax import atomic
from dwise_jax.report import markdown_table, pyplot, save_figure, write_markdown


def save_array(path: Path, array: np.ndarray) -> None:
    with atomic.atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, np.asarray(array, np.float32))


def strip(path: Path, rows: dict[str, np.ndarray], *, title: str, frames: int = 8) -> None:
    """A PNG of `frames` evenly spaced frames of each (L, 36, 64) video, one row per video."""
    length = len(next(iter(rows.values())))
    picks = np.linspace(0, length - 1, min(frames, length)).round().astype(int)
    fig, axes = pyplot().subplots(len(rows), len(picks), squeeze=False,
                                  figsize=(1.6 * len(picks), 1.1 * len(rows)))
    for r, (label, video) in enumerate(rows.items()):
        for ax, t in zip(axes[r], picks, strict=True):
            ax.imshow(video[t], cmap="gray", vmin=0, vmax=255)
            ax.set(xticks=[], yticks=[])
            if r == 0:
                ax.set_title(f"frame {t}", fontsize=7)
        axes[r, 0].set_ylabel(label, fontsize=7)
    fig.suptitle(title, fontsize=8)
    save_figure(fig, path)


def movie(path: Path, left: np.ndarray, right: np.ndarray, fps: int = 30) -> None:
    """A GIF (Pillow) of two (L, 36, 64) videos side by side."""
    from PIL import Image

    both = np.concatenate([left, np.full((len(left), 36, 2), 255.0), right], axis=2)
    images = [Image.fromarray(np.clip(f, 0, 255).astype(np.uint8)).resize((260, 72))
              for f in both]
    with atomic.atomic_path(path, suffix=".gif") as tmp:
        images[0].save(tmp, save_all=True, append_images=images[1:], duration=1000 // fps,
                       loop=0)


def save_video(directory: Path, trial: int, video: np.ndarray, truth: np.ndarray) -> None:
    """<trial>.npy in the dataset's layout (36, 64, L), <trial>.png and <trial>.gif."""
    save_array(directory / f"{trial}.npy", np.moveaxis(video, 0, -1))
    strip(directory / f"{trial}.png", {"true": truth, "reconstructed": video},
          title=f"trial {trial}")
    movie(directory / f"{trial}.gif", truth, video)


def save_mask(directory: Path, mouse: str, mask: dict) -> None:
    """<mouse>.npz (energy, update, score) and <mouse>.png."""
    with atomic.atomic_path(directory / f"{mouse}.npz", suffix=".npz") as tmp:
        np.savez(tmp, **mask)
    fig, axes = pyplot().subplots(1, 3, figsize=(9, 2.2))
    for ax, key in zip(axes, ("energy", "update", "score"), strict=True):
        ax.imshow(mask[key], cmap="viridis")
        ax.set_title(f"{key} ({int(np.sum(mask[key] > 0))} px)" if key != "energy"
                     else "gradient energy", fontsize=8)
        ax.set(xticks=[], yticks=[])
    save_figure(fig, directory / f"{mouse}.png")


def _write(out: Path, lines: list[str], data: dict) -> Path:
    atomic.write_json(out / "report.json", json.loads(json.dumps(data, default=str)))
    return write_markdown(out / "report.md", lines)


def reconstruction_report(out: Path, rows: list[dict], masks: dict, meta: dict) -> Path:
    """report.md, report.json and curves.png: pixel correlation and RMSE per trial, overall,
    against iterations and against the number of models."""
    sizes = sorted({s for r in rows for s in r["by_size"]})
    overall = {s: {k: float(np.mean([r["by_size"][s]["final"][k] for r in rows
                                     if s in r["by_size"]])) for k in ("corr", "rmse")}
               for s in sizes}
    fig, (a, b) = pyplot().subplots(1, 2, figsize=(9, 3.4))
    if linear := [r["linear"] for r in rows if "linear" in r]:
        overall["linear"] = {k: float(np.mean([x[k] for x in linear])) for k in ("corr", "rmse")}
        a.axhline(overall["linear"]["corr"], color="grey", ls="--", label="linear decoder")
    for s in sizes:
        curves = [r["by_size"][s]["curve"] for r in rows if s in r["by_size"]]
        a.plot([c["iteration"] for c in curves[0]],
               np.mean([[c["corr"] for c in cv] for cv in curves], 0), "o-", label=f"{s} model(s)")
    b.plot(sizes, [overall[s]["corr"] for s in sizes], "o-")
    a.set(xlabel="iteration", ylabel="pixel correlation (mean over trials)")
    b.set(xlabel="models in the ensemble", ylabel="pixel correlation")
    a.legend(fontsize=8)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    save_figure(fig, out / "curves.png")
    members = ", ".join(f"{m['experiment']} fold {m['fold']}" for m in meta["members"])
    table = [["models", "pixel correlation (mean over trials)", "RMSE"]]
    table += [[s, f"{overall[s]['corr']:.4f}", f"{overall[s]['rmse']:.2f}"] for s in sizes]
    if linear:
        table.append(["linear decoder (ridge from lagged responses, fitted on the training "
                      "trials)", f"{overall['linear']['corr']:.4f}",
                      f"{overall['linear']['rmse']:.2f}"])
    per_trial = [["mouse", "trial", "folds", "correlation", "RMSE", "linear decoder correlation"]]
    for r in rows:
        f = r["by_size"][max(r["by_size"])]["final"]
        per_trial.append([r["mouse"], r["trial"], r["folds"], f"{f['corr']:.4f}",
                          f"{f['rmse']:.2f}",
                          f"{r['linear']['corr']:.4f}" if "linear" in r else "-"])
    lines = [f"# Reconstruction: {','.join(meta['experiments'])}, {meta['split']}", "",
             f"- data: `{meta['data_root']}`",
             f"- models: {len(meta['members'])} ({members})",
             f"- settings: {meta['config']}",
             "- score: Pearson r and RMSE (0..255) of the pixels inside each mouse's scoring "
             "mask, frames 32 onwards", "", *markdown_table(table), "",
             "![correlation against iterations and models](curves.png)", "",
             f"## Per trial ({max(sizes)} models or all a trial has)", "",
             *markdown_table(per_trial), "", "## Population masks", "",
             "Squared gradient of the predicted population activity on each pixel; updates "
             "inside the `update` mask, scores inside the `score` mask.", ""]
    lines += [f"![{m}](masks/{m}.png)" for m in masks]
    lines += ["", "## Reconstructions", ""]
    lines += [f"![{r['mouse']} {r['trial']}]({r['mouse']}/{r['trial']}.png)" for r in rows]
    return _write(out, lines, {**meta, "overall": overall, "trials": rows})


def mei_report(out: Path, rows: list[dict], meta: dict) -> Path:
    """report.md and report.json of a mouse's MEIs (and distances.png on simulated data)."""
    held = bool(rows) and "held_out_corr" in rows[0]
    table = [["neuron (held-out r)" if held else "neuron", "MEI response",
              "best training window", "ratio", "energy centre (row, col)", "true RF centre",
              "distance (px)"]]
    ratio = [r["response"] / r["best_train_window"] if r["best_train_window"] > 0 else np.nan
             for r in rows]
    for r, q in zip(rows, ratio, strict=True):
        true = r.get("true_centre")
        table.append([f"{r['neuron']} ({r['held_out_corr']:.2f})" if held else r["neuron"],
                      f"{r['response']:.4f}", f"{r['best_train_window']:.4f}", f"{q:.2f}",
                      f"({r['energy_centre'][0]:.1f}, {r['energy_centre'][1]:.1f})",
                      f"({true[0]:.1f}, {true[1]:.1f})" if true else "-",
                      f"{r['distance_px']:.1f}" if true else "-"])
    lines = [f"# Most exciting inputs: {','.join(meta['experiments'])}, {meta['mouse']}", "",
             f"- data: `{meta['data_root']}`; models: {len(meta['members'])}",
             f"- contrast budget ||MEI - {meta['level']:.1f}||_2 <= {meta['norm']:.1f}; "
             f"behaviour and pupil held at {[round(v, 3) for v in meta['behavior']]}",
             f"- neurons: {meta.get('selection', 'chosen by --neurons')}",
             f"- settings: {meta['config']}", "", *markdown_table(table)]
    summary = {"median_ratio": float(np.nanmedian(ratio)) if rows else None}
    if rows and "distance_px" in rows[0]:
        d = np.array([r["distance_px"] for r in rows])
        summary["distance_px"] = {"median": float(np.median(d)), "p90": float(np.quantile(d, 0.9)),
                                  "within_3px": float(np.mean(d <= 3))}
        fig, ax = pyplot().subplots(figsize=(4.5, 3.2))
        ax.hist(d, bins=min(20, max(len(d), 2)))
        ax.set(xlabel="MEI energy centre to true RF centre (px)", ylabel="neurons")
        save_figure(fig, out / "distances.png")
        lines += ["", f"Distance to the true receptive-field centre: median "
                      f"{summary['distance_px']['median']:.1f} px, 90th percentile "
                      f"{summary['distance_px']['p90']:.1f} px.", "",
                  "![distances](distances.png)"]
    lines += ["", "## MEIs", ""] + [f"![{r['neuron']}]({r['neuron']}.png)" for r in rows]
    return _write(out, lines, {**meta, "summary": summary, "neurons": rows})
