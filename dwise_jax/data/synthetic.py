"""`python -m dwise_jax.data.synthetic OUT_DIR`: a simulated Sensorium 2023 dataset in the real
on-disk layout, from `dwise_jax.data.simulated_v1`; `OUT_DIR/simulation/` keeps what the real
data keeps secret. A seed gives byte-identical files on one machine. Layout: docs/data.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
from absl import flags

from dwise_jax import cli
from dwise_jax.data import simulated_v1 as v1
from dwise_jax.data.sensorium import MODALITIES, NPY_LOCK, TEST_TIERS, TIERS
from dwise_jax.metrics import pearson_per_neuron

DEFAULTS = {"mice": 5, "neurons": 100, "trials": 100, "frames": 300}
SIMULATION_DIR = "simulation"
ERRORS = (OSError,)  # the command's users' to fix (a full OUT_DIR): one `error:` line, exit 1
_NAME_HASH = hashlib.md5(b"dwise_jax simulated V1").hexdigest()
_CEILING_DEFINITION = (
    "per neuron Pearson r between the noiseless rate and the simulated response over all valid "
    "frames of the test trials of a mouse, concatenated; per mouse the mean over its neurons, "
    "overall the mean over all neurons")


def mouse_names(count: int) -> list[str]:
    """Folder names in the real pattern, never one of the real ten (those are dynamic29xxx)."""
    return [f"dynamic{90001 + m}-{m % 9 + 1}-{m % 7 + 2}-Video-{_NAME_HASH}" for m in range(count)]


def tier_plan(seed: int, mouse: int, trials: int) -> list[tuple[str, tuple[str, int, int]]]:
    """(tier, clip key) per trial id: mostly train, repeated oracle clips, tests, a few none."""
    n_test, n_none = max(1, round(0.05 * trials)), max(1, round(0.03 * trials))
    repeats = int(np.clip(trials // 20, 2, 10))
    n_oracle = max(2, round(0.1 * trials / repeats))
    n_train = trials - 4 * n_test - n_none - n_oracle * repeats
    if n_train < 4:
        raise ValueError(f"{trials} trials per mouse are too few for every tier; use >= 20")
    n_shared = round(v1.PARAMETERS["shared_train_fraction"] * n_train)
    own = mouse + 1  # pool index 0 is the clips every mouse sees
    slots = [("train", ("shared_train", 0, j)) for j in range(n_shared)]
    slots += [("train", ("own", own, j)) for j in range(n_train - n_shared)]
    slots += [("oracle", ("oracle", 0, j)) for j in range(n_oracle) for _ in range(repeats)]
    slots += [(tier, (tier, 0, j)) for tier in TEST_TIERS for j in range(n_test)]
    slots += [("none", ("own", own, n_train - n_shared + j)) for j in range(n_none)]
    # Trial ids are in random order with respect to tiers, as in the real data.
    return [slots[i] for i in v1.random_stream(seed, "plan", mouse).permutation(len(slots))]


def _pad(array: np.ndarray, length: int) -> np.ndarray:
    out = np.full(array.shape[:-1] + (length,), np.nan, np.float32)
    out[..., : array.shape[-1]] = array
    return out


class _Stats:
    """Running mean, std, min and max per array position over the valid frames of trials."""

    def __init__(self, shape: tuple[int, ...]):
        self.n, self.s, self.s2 = np.zeros(shape[-1]), np.zeros(shape), np.zeros(shape)
        self.lo, self.hi = np.full(shape, np.inf), np.full(shape, -np.inf)

    def add(self, x: np.ndarray) -> None:
        length = x.shape[-1]  # unpadded: frames beyond it are the NaN tail
        self.n[:length] += 1
        self.s[..., :length] += x
        self.s2[..., :length] += np.square(x, dtype=np.float64)
        np.minimum(self.lo[..., :length], x, out=self.lo[..., :length])
        np.maximum(self.hi[..., :length], x, out=self.hi[..., :length])

    def write(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.s / self.n
            std = np.sqrt(np.maximum(self.s2 / self.n - mean**2, 0.0))
        seen = self.n > 0
        for name, value in (("mean", mean), ("std", std), ("min", self.lo), ("max", self.hi)):
            np.save(folder / f"{name}.npy", np.where(seen, value, np.nan).astype(np.float32))


def _write_mouse(root: Path, seed: int, m: int, name: str, n: int, trials: int, frames: int,
                 ) -> dict:
    """Writes one mouse folder and its kept-aside files; returns its simulation.json info."""
    folder, sim = root / name, root / SIMULATION_DIR
    neurons = v1.make_neurons(seed, m, n, frames)
    plan = tier_plan(seed, m, trials)
    array_length = int(1.1 * frames) + 2 * (m % 3)  # the longest clip plus a few frames
    for d in [*(folder / "data" / x for x in MODALITIES), sim / "truth" / name,
              sim / "rate" / name]:
        d.mkdir(parents=True, exist_ok=True)
    shapes = {"videos": (v1.H, v1.W), "responses": (n,), "behavior": (2,), "pupil_center": (2,)}
    stats = {k: _Stats(s + (array_length,)) for k, s in shapes.items()}
    test: dict[str, list] = {"main": [], "bonus": []}
    lengths = []
    for trial_id, (tier, key) in enumerate(plan):
        video = v1.make_video(seed, key, frames)
        rng = v1.random_stream(seed, "trial", m, trial_id)
        behavior, pupil_center = v1.make_behavior(rng, video, neurons["run_bias"])
        rate, noisy = v1.respond(neurons, video, behavior, rng)
        arrays = {"videos": video.transpose(1, 2, 0), "responses": noisy,
                  "behavior": behavior, "pupil_center": pupil_center}
        if tier in TEST_TIERS:
            np.save(sim / "truth" / name / f"{trial_id}.npy", _pad(noisy, array_length))
            arrays["responses"] = np.zeros_like(noisy)  # the real new mice's dummy labels
            test[tier.rsplit("_", 1)[1]].append((rate, noisy))
        np.save(sim / "rate" / name / f"{trial_id}.npy", _pad(rate, array_length))
        for modality, array in arrays.items():
            np.save(folder / "data" / modality / f"{trial_id}.npy", _pad(array, array_length))
            if tier in ("train", "oracle"):
                stats[modality].add(array)
        lengths.append(len(video))
    for rel, value in (("trials/tiers", np.array([t for t, _ in plan], "<U16")),
                       ("neurons/unit_ids", neurons["unit_ids"].astype(np.int64)),
                       ("neurons/cell_motor_coordinates", neurons["coords"])):
        (folder / "meta" / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(folder / "meta" / f"{rel}.npy", value)
    for modality, stat in stats.items():
        stat.write(folder / "meta" / "statistics" / modality / "all")
    # Per neuron r(rate, response) over the concatenated test trials (each tier has some).
    ceiling = {}
    for part, pairs in (("all", test["main"] + test["bonus"]), *test.items()):
        rates, responses = (np.concatenate(x, 1) for x in zip(*pairs, strict=True))
        ceiling[part] = pearson_per_neuron(rates, responses, axis=1)
    rf = {k: np.round(neurons[k], 4).tolist()
          for k in ("center_x", "center_y", "sigma", "theta", "period", "phase", "tau",
                    "a_run", "a_pupil", "threshold", "events")}
    return {
        "name": name, "index": m, "neurons": n, "array_length": array_length,
        "tiers": {t: sum(1 for p, _ in plan if p == t) for t in TIERS},
        "cell_type": ["energy" if e else "linear" for e in neurons["energy"]],
        "receptive_fields": rf, "clip_lengths": lengths,
        "video_keys": ["/".join(map(str, key)) for _, key in plan],
        "_ceiling": ceiling,
    }


def check_size(*, mice: int, neurons: int, trials: int, frames: int) -> None:
    """Raises ValueError for a size `generate` cannot fill (too few trials for every tier...)."""
    if frames < 40 or mice < 1 or neurons < 2:
        raise ValueError("need frames >= 40 (every clip >= 32 frames), mice >= 1, neurons >= 2")
    tier_plan(0, 0, trials)  # raises when there are too few trials for every tier


def generate(out_dir: str | os.PathLike, *, mice: int = DEFAULTS["mice"],
             neurons: int = DEFAULTS["neurons"], trials: int = DEFAULTS["trials"],
             frames: int = DEFAULTS["frames"], seed: int = 0) -> Path:
    """Writes a simulated dataset (mouse folders + `simulation/`) into `out_dir` (created, and
    empty if it exists) and returns its path. `trials` per mouse (>= 20) include every tier;
    clips run 0.8x to 1.1x of `frames` (>= 40); the same `seed` gives identical files."""
    root = Path(out_dir)
    check_size(mice=mice, neurons=neurons, trials=trials, frames=frames)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root}: is not empty; generate writes into a fresh folder")
    infos = [_write_mouse(root, seed, m, name, neurons, trials, frames)
             for m, name in enumerate(mouse_names(mice))]
    per_neuron = [info.pop("_ceiling") for info in infos]  # {"all", "main", "bonus": r}
    mean = lambda r: round(float(np.mean(r)), 4)
    ceiling = {"definition": _CEILING_DEFINITION,
               "per_mouse": {info["name"]: {part: mean(r) for part, r in rs.items()}
                             for info, rs in zip(infos, per_neuron, strict=True)},
               "overall": {part: mean(np.concatenate([rs[part] for rs in per_neuron]))
                           for part in per_neuron[0]}}
    meta = {"generator": "dwise_jax.data.synthetic", "format": 1, "seed": seed, "mice": mice,
            "neurons": neurons, "trials": trials, "frames": frames, "fps": v1.FPS,
            "parameters": v1.PARAMETERS, "noise_ceiling": ceiling, "mouse_info": infos}
    (root / SIMULATION_DIR / "simulation.json").write_text(json.dumps(meta, indent=1))
    return root


def load_info(root: str | os.PathLike) -> dict:
    """The simulation's parameters, per-mouse info and noise ceiling (simulation.json)."""
    return json.loads((Path(root) / SIMULATION_DIR / "simulation.json").read_text())


def load_truth(root: str | os.PathLike, mouse_name: str, trial_id: int, *,
               noiseless: bool = False) -> np.ndarray:
    """True responses of a trial, (neurons, T) float32 with the NaN tail: the kept-aside file for
    test trials (their public one holds dummy zeros), else the public one; `noiseless`: the rate."""
    root, name = Path(root), f"{int(trial_id)}.npy"
    path = root / SIMULATION_DIR / ("rate" if noiseless else "truth") / mouse_name / name
    if not noiseless and not path.exists():
        path = root / mouse_name / "data" / "responses" / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: no simulated truth for this trial")
    with NPY_LOCK:
        return np.load(path, allow_pickle=False)


def define_flags(fv: flags.FlagValues) -> None:
    for name, text in (("mice", "Mouse folders."), ("neurons", "Neurons per mouse."),
                       ("trials", "Trials per mouse (>= 20), every tier included."),
                       ("frames", "Nominal clip length (>= 40); clips run 0.8x to 1.1x of it.")):
        flags.DEFINE_integer(name, DEFAULTS[name], text, flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Every random draw derives from it.", flag_values=fv)


def run(fv: flags.FlagValues, args: list[str]) -> int:
    if len(args) != 1:
        raise cli.UsageError(f"expected one argument, the output folder OUT_DIR (got {len(args)})")
    sizes = {name: fv[name].value for name in DEFAULTS}
    try:
        check_size(**sizes)
    except ValueError as err:
        raise cli.UsageError(str(err)) from None
    start = time.perf_counter()
    root = generate(args[0], seed=fv.seed, **sizes)
    size_mib = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2**20
    ceiling = load_info(root)["noise_ceiling"]["overall"]
    print(f"wrote {root} in {time.perf_counter() - start:.1f} s, {size_mib:.0f} MiB; "
          f"noise ceiling r = {ceiling['all']} (main {ceiling['main']}, bonus {ceiling['bonus']})")
    return 0


if __name__ == "__main__":
    cli.main(__doc__, define_flags, run, errors=ERRORS)
