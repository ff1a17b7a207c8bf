"""Scoring a split's predictions and its report (report.md, scores.json, PNG plots): the
competition's single-trial correlation of the raw predictions against the labeled responses
(`folds`) or a simulated root's kept-aside test responses, the noise ceiling, the starter kit's
Poisson loss and, for repeated videos, the correlation to average and FEVE (docs/prediction.md).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from dwise_jax import atomic, baseline, metrics
from dwise_jax.data import folds, synthetic, windows
from dwise_jax.data.sensorium import TEST_TIERS, Mouse, SensoriumDataset
from dwise_jax.metrics import SKIP_FRAMES, CorrelationScores, StreamingCorrelation

CEILING = "ceiling"
METRIC = ("competition single-trial correlation: frames 50..L-1 of each trial, trials of a mouse "
          "concatenated, Pearson r per neuron (NaN as 0); overall = mean over all neurons")


def is_scored(dataset: SensoriumDataset, split: str) -> bool:
    """`folds` always; the test splits on a simulated root (its true responses are kept)."""
    return split == "folds" or (split in TEST_TIERS and baseline.is_simulated(dataset))


def load_target(dataset: SensoriumDataset, split: str, mouse: Mouse, trial: int) -> np.ndarray:
    """(neurons, L) float32 responses the split's predictions are scored against."""
    responses = (synthetic.load_truth(dataset.root, mouse.name, trial) if split in TEST_TIERS
                 else mouse.load("responses", trial))
    return np.asarray(responses[:, :int(mouse.lengths[trial])], np.float32)


@dataclasses.dataclass
class SplitScores:
    """Scores of a split: the main predictions, other anchor strides, the noise ceiling."""

    split: str
    main: int  # the anchor stride of the written predictions
    strides: dict[int, CorrelationScores]
    ceiling: CorrelationScores | None
    trials: dict[str, int]
    poisson: dict[str, float] = dataclasses.field(default_factory=dict)  # per frame and neuron
    repeats: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    @property
    def scores(self) -> CorrelationScores:
        return self.strides[self.main]

    def to_json(self) -> dict[str, Any]:
        ceiling = self.ceiling.mouse_means if self.ceiling else {}
        out = {
            "split": self.split, "metric": METRIC, "anchor_stride": self.main,
            "correlation": self.scores.neuron_mean,
            "correlation_mouse_mean": self.scores.mouse_mean,
            "noise_ceiling": self.ceiling.neuron_mean if self.ceiling else None,
            "mice": [{"mouse": m, "neurons": int(r.size), "trials": self.trials[m],
                      "correlation": float(np.mean(r)), "noise_ceiling": ceiling.get(m),
                      "poisson_loss": self.poisson.get(m), "repeated_videos": self.repeats.get(m)}
                     for m, r in self.scores.per_mouse.items()],
        }
        if len(self.strides) > 1:
            out["strides"] = [
                {"stride": s, "windows_per_300_frames": len(windows.prediction_anchors(300, s)),
                 "correlation": sc.neuron_mean, "correlation_mouse_mean": sc.mouse_mean}
                for s, sc in sorted(self.strides.items())]
        return out


def repeat_scores(preds: list[np.ndarray], responses: list[np.ndarray]) -> dict:
    """Means over neurons of the correlation to the average over repeats and of FEVE (over the
    `feve_neurons` that `metrics.feve` keeps; None if none), of per-video (repeats, neurons,
    time) arrays."""
    explained = metrics.feve(preds, responses)
    keep = ~np.isnan(explained)
    return {"correlation_to_average": float(np.mean(metrics.correlation_to_average(
                preds, responses))),
            "feve": float(np.mean(explained[keep])) if keep.any() else None,
            "feve_neurons": int(keep.sum())}


class SplitScorer:
    """Scores trials as they are predicted; keeps one example trial per mouse for the plots, and
    the trials of repeated videos until their mouse's trials end (the next mouse, or `summary`):
    memory holds one mouse's repeats."""

    def __init__(self, dataset: SensoriumDataset, split: str):
        self.dataset, self.split = dataset, split
        self.simulated = baseline.is_simulated(dataset)
        self.streams: dict[Any, StreamingCorrelation] = {}
        self.examples: dict[str, tuple[int, np.ndarray, np.ndarray]] = {}
        self.main = 1
        self.poisson: dict[str, list[float]] = {}  # mouse: [loss sum, neuron-frames]
        self.repeats: dict[str, dict[str, float]] = {}
        self.shown: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}  # hash: [(pred, target)]
        self.mouse: str | None = None

    def add(self, mouse: Mouse, trial: int, predictions: dict[int, np.ndarray],
            main: int) -> None:
        """Adds one trial's predictions, {anchor stride: (neurons, L)}; `main` is the written."""
        self.main = main
        target = load_target(self.dataset, self.split, mouse, trial)
        if self.simulated:
            rate = synthetic.load_truth(self.dataset.root, mouse.name, trial, noiseless=True)
            predictions = {**predictions, CEILING: rate[:, : target.shape[1]]}
        for key, pred in predictions.items():
            self.streams.setdefault(key, StreamingCorrelation()).add(mouse.name, pred, target)
        if mouse.name not in self.examples:
            self.examples[mouse.name] = (trial, predictions[main], target)
        loss = metrics.poisson_loss(predictions[main], target)
        total = self.poisson.setdefault(mouse.name, [0.0, 0])
        total[0] += float(loss.sum())
        total[1] += loss.size * max(target.shape[1] - SKIP_FRAMES, 0)
        if mouse.name != self.mouse:
            self._score_repeats()
            self.mouse = mouse.name
        hashes = folds.mouse_folds(mouse).hashes if self.split == "folds" else None
        if hashes is not None and hashes[trial] and np.sum(hashes == hashes[trial]) > 1:
            cut = (predictions[main][:, SKIP_FRAMES:], target[:, SKIP_FRAMES:])
            self.shown.setdefault(int(hashes[trial]), []).append(cut)

    def _score_repeats(self) -> None:
        """Correlation to the average over repeats and FEVE of the current mouse's videos
        scored at least twice, each video's trials cut to their shortest; in float64, as FEVE
        subtracts variances that may nearly cancel."""
        shown = [trials for trials in self.shown.values() if len(trials) > 1]
        self.shown = {}
        if not shown:
            return
        preds, responses = [], []
        for trials in shown:
            n = min(p.shape[1] for p, _ in trials)
            preds.append(np.stack([p[:, :n] for p, _ in trials]).astype(np.float64))
            responses.append(np.stack([t[:, :n] for _, t in trials]).astype(np.float64))
        self.repeats[self.mouse] = {"videos": len(shown), "trials": sum(len(t) for t in shown),
                                    **repeat_scores(preds, responses)}

    def summary(self) -> SplitScores:
        self._score_repeats()
        ceiling = self.streams.get(CEILING)
        return SplitScores(
            split=self.split, main=self.main,
            strides={k: s.scores() for k, s in self.streams.items() if k != CEILING},
            ceiling=ceiling.scores() if ceiling else None,
            trials=dict(self.streams[self.main].trials),
            poisson={m: s / n for m, (s, n) in self.poisson.items() if n},
            repeats=dict(self.repeats))


def _table(scores: SplitScores) -> list[list[str]]:
    """The scores table, header first; a noise-ceiling column where there is a ceiling."""
    got, ceiling, names = scores.scores, scores.ceiling, list(scores.scores.per_mouse)
    rows = [["mouse", "neurons", "trials", "correlation", "noise ceiling"]]
    for mouse, short in zip(names, _short(names), strict=True):
        r = got.per_mouse[mouse]
        rows.append([short, str(r.size), str(scores.trials[mouse]), f"{np.mean(r):.4f}",
                     f"{ceiling.mouse_means[mouse]:.4f}" if ceiling else ""])
    for label, value, ceil in (("all neurons", got.neuron_mean, ceiling and ceiling.neuron_mean),
                               ("mean over mice", got.mouse_mean, ceiling and ceiling.mouse_mean)):
        rows.append([f"**{label}**", str(got.per_neuron.size), str(sum(scores.trials.values())),
                     f"**{value:.4f}**", f"{ceil:.4f}" if ceiling else ""])
    return rows if ceiling else [r[:-1] for r in rows]


def markdown_table(rows: list[list]) -> list[str]:
    """The lines of a Markdown table, the first row its header."""
    lines = ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return [lines[0], "|" + " --- |" * len(rows[0]), *lines[1:]]


def _feve(r: dict) -> str:
    return "n/a" if r["feve"] is None else f"{r['feve']:.4f} ({r['feve_neurons']} neurons)"


def print_scores(scores: SplitScores) -> None:
    rows = [[c.replace("**", "") for c in r] for r in _table(scores)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"\n{scores.split}: {METRIC}")
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    for mouse, r in scores.repeats.items():
        print(f"{mouse}: {r['videos']} videos shown {r['trials']} times: correlation to average "
              f"{r['correlation_to_average']:.4f}, FEVE {_feve(r)}")
    for s in scores.to_json().get("strides", []):
        print(f"anchor stride {s['stride']:2d}: {s['windows_per_300_frames']:3d} windows per "
              f"300 frames, correlation {s['correlation']:.4f}")


def _short(names: list[str]) -> list[str]:
    short = [n.split("-")[0] for n in names]
    return short if len(set(short)) == len(short) else names


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90)
    pyplot().close(fig)


def write_markdown(path: Path, lines: list[str]) -> Path:
    with atomic.atomic_path(path, suffix=".md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


def _plot_correlations(scores: SplitScores, path: Path) -> None:
    names = list(scores.scores.per_mouse)
    fig, ax = pyplot().subplots(figsize=(1.2 * len(names) + 3, 4))
    data = [scores.scores.per_mouse[m] for m in names]
    ax.violinplot(data, showmedians=True)
    ax.plot(range(1, len(names) + 1), [np.mean(d) for d in data], "ro", label="mean")
    if scores.ceiling:
        ax.plot(range(1, len(names) + 1), [scores.ceiling.mouse_means[m] for m in names], "k_",
                ms=20, label="noise ceiling (mean)")
    ax.legend(loc="best", fontsize=8)
    ax.set_xticks(range(1, len(names) + 1), _short(names), rotation=30, ha="right")
    ax.set_ylabel("per-neuron correlation")
    ax.set_title(f"{scores.split}: per-neuron correlation, mean {scores.scores.neuron_mean:.4f}")
    ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path)


def _plot_traces(scores: SplitScores, examples: dict, path: Path) -> None:
    names = [m for m in scores.scores.per_mouse if m in examples]
    fig, axes = pyplot().subplots(len(names), 2, figsize=(12, 2.2 * len(names)), squeeze=False)
    for row, (name, short) in enumerate(zip(names, _short(names), strict=True)):
        r = scores.scores.per_mouse[name]
        order = np.argsort(r)
        trial, pred, target = examples[name]
        for col, (label, neuron) in enumerate((("best", order[-1]),
                                               ("median", order[len(order) // 2]))):
            ax = axes[row, col]
            ax.axvspan(0, SKIP_FRAMES, color="0.92", lw=0)  # not scored
            ax.plot(target[neuron], color="0.3", lw=0.8)
            ax.set_ylabel("recorded", fontsize=8)
            # r ignores scale and offset: the prediction gets its own axis.
            twin = ax.twinx()
            twin.plot(pred[neuron], color="C1", lw=1.2)
            twin.set_ylabel("predicted", color="C1", fontsize=8)
            twin.tick_params(axis="y", colors="C1", labelsize=7)
            ax.tick_params(labelsize=7)
            ax.set_title(f"{short} trial {trial}: {label} neuron {neuron} (r = {r[neuron]:.3f} "
                         "over all trials)", fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("frame (30 Hz)")
    save_figure(fig, path)


def _plot_strides(rows: list[dict], path: Path) -> None:
    fig, ax = pyplot().subplots(figsize=(5.5, 3.8))
    x = [r["windows_per_300_frames"] for r in rows]
    ax.plot(x, [r["correlation"] for r in rows], "o-")
    for r, xi in zip(rows, x, strict=True):
        ax.annotate(f"stride {r['stride']}", (xi, r["correlation"]), fontsize=8,
                    textcoords="offset points", xytext=(4, -10))
    ax.set_xscale("log")
    ax.set_xlabel("forward passes per 300-frame trial")
    ax.set_ylabel("correlation (all neurons)")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def write_report(directory: str | Path, scores: SplitScores, examples: dict,
                 manifest: dict) -> Path:
    """Writes report.md, scores.json and the plots into `directory`; returns report.md."""
    directory = Path(directory)
    summary = scores.to_json()
    lines = [f"# {manifest.get('experiment', '')}: {scores.split}", "",
             f"- data: `{manifest.get('data_root')}`"]
    if manifest.get("folds"):
        lines.append("- folds: " + ", ".join(f"{f['fold']} (step {f['step']}, {f['source']})"
                                             for f in manifest["folds"]))
    if manifest.get("experiments"):
        lines.append(f"- ensemble of: {', '.join(manifest['experiments'])}")
    lines += [f"- anchor stride: {scores.main}",
              f"- score: {METRIC}; raw predictions, no precision normalisation", "",
              *markdown_table(_table(scores))]
    if scores.ceiling:
        lines += ["", "Noise ceiling: the same score of the simulation's noiseless rate against "
                      "the same responses (what a perfect model of the simulated neurons gets)."]
    if scores.repeats:
        lines += ["", "## Repeated videos", "",
                  "Videos scored more than once (frames 50 on): the correlation of the "
                  "prediction with the response, both averaged over the repeats, and the "
                  "fraction of explainable variance explained (FEVE), means over neurons (FEVE "
                  "over those whose explainable variance is at least "
                  f"{metrics.FEV_THRESHOLD} of their total, as the Sensorium evaluation).", ""]
        lines += markdown_table([["mouse", "videos", "trials", "correlation to average", "FEVE"]]
                                + [[short, r["videos"], r["trials"],
                                    f"{r['correlation_to_average']:.4f}", _feve(r)]
                                   for r, short in zip(scores.repeats.values(),
                                                       _short(list(scores.repeats)), strict=True)])
    _plot_correlations(scores, directory / "correlations.png")
    _plot_traces(scores, examples, directory / "traces.png")
    lines += ["", "## Per-neuron correlations", "", "![per-neuron correlations](correlations.png)",
              "", "## Recorded and predicted traces", "",
              "The first scored trial of each mouse; grey: the first 50 frames, not scored.", "",
              "![best and median neurons](traces.png)"]
    if "strides" in summary:
        _plot_strides(summary["strides"], directory / "stride.png")
        full = summary["strides"][0]["windows_per_300_frames"]
        lines += ["", "## Correlation against anchor stride", "",
                  "Blended from the same stride-1 windows, each stride taking its own anchors "
                  "(`--anchor_stride S` runs only those).", ""]
        lines += markdown_table(
            [["anchor stride", "forward passes per 300-frame trial", "share of stride 1",
              "correlation", "mean over mice"]]
            + [[r["stride"], r["windows_per_300_frames"],
                f"{r['windows_per_300_frames'] / full:.2f}", f"{r['correlation']:.4f}",
                f"{r['correlation_mouse_mean']:.4f}"] for r in summary["strides"]])
        lines += ["", "![correlation against stride](stride.png)"]
    atomic.write_json(directory / "scores.json", {**summary, "manifest": manifest})
    return write_markdown(directory / "report.md", lines)
