"""What the benchmark scripts share: readouts, FLOPs on paper, timing, workers, tables, CLI."""

import json
import math
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import jax
import numpy as np
from flax import nnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dwise_jax import cli, predict, sharding  # noqa: E402
from dwise_jax import config as config_lib  # noqa: E402
from dwise_jax.data.sensorium import REAL_MICE  # noqa: E402
from dwise_jax.models.dwiseneuro import DwiseNeuro  # noqa: E402

NEURONS = tuple(n for _, n in REAL_MICE)  # readout order = mouse index
TRUE_BATCH = str(REPO / "configs" / "true_batch.py")
TINY_MODEL = {"model.core_features": (8, 8, 16), "model.spatial_strides": (2, 2, 2),  # --tiny
              "model.expansion_ratio": 2, "model.se_reduce_ratio": 4,
              "model.cortex_features": (32, 64)}


def arch(config: str = TRUE_BATCH, neurons=NEURONS, overrides: dict | None = None) -> dict:
    """DwiseNeuro constructor arguments of a config file, with these readouts."""
    return config_lib.model_kwargs(config_lib.load_config_file(config, overrides), neurons)


def part_costs(arch: dict, frames: int = 16, size: int = 64) -> dict:
    """Per sample: forward conv and matmul FLOPs and activation elements of each part."""
    t, h = frames, size
    feats, e = arch["core_features"], arch["expansion_ratio"]
    core = {"flops": 2 * t * h * h * arch["in_channels"] * feats[0],
            "elements": t * h * h * (arch["in_channels"] + feats[0])}
    for i, c_in in enumerate(feats):
        c_out, mid, before = feats[i + 1] if i + 1 < len(feats) else c_in, c_in * e, t * h * h
        h = -(-h // arch["spatial_strides"][i])
        after = t * h * h
        taps = arch["spatial_kernel"] ** 2 + arch["temporal_kernel"]
        core["flops"] += (2 * before * c_in * mid + 2 * after * mid * (taps + c_out)
                          + 4 * mid * (mid // arch["se_reduce_ratio"]))  # ..., squeeze-excite
        # input + position, expansion, spatial, temporal, SE-scaled, projection, block output
        core["elements"] += before * (c_in + mid) + after * (3 * mid + 2 * c_out)
    widths, g = (feats[-1], *arch["cortex_features"]), arch["groups"]
    cortex = {"flops": sum(2 * t * a * b // g for a, b in pairwise(widths)),
              "elements": t * widths[0] + sum(2 * t * b for b in widths[1:])}
    readouts = [{"flops": 2 * t * widths[-1] * math.ceil(n / g),
                 "elements": 2 * t * math.ceil(n / g) * g} for n in arch["readout_outputs"]]
    return {"core": core, "cortex": cortex, "readouts": readouts}


def model_flops(arch: dict, readout: int | None = None, backward: bool = False) -> int:
    """Conv and matmul FLOPs per sample, all readouts (None) or one; `backward`: + dX (not the
    input's) and dW."""
    p = part_costs(arch)
    heads = p["readouts"] if readout is None else [p["readouts"][readout]]
    total = p["core"]["flops"] + p["cortex"]["flops"] + sum(r["flops"] for r in heads)
    stem = 2 * 16 * 64 * 64 * arch["in_channels"] * arch["core_features"][0]
    return 3 * total - stem if backward else total


def times(fn, warmup: int, steps: int) -> list[float]:
    """Seconds of each of `steps` calls of `fn` (which blocks) after `warmup` untimed ones."""
    out = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        fn()
        if i >= warmup:
            out.append(time.perf_counter() - start)
    return out


def windows(batch: int) -> tuple:
    """Random prediction inputs: frames (batch, 16, 36, 64) and traces (batch, 16, 4)."""
    rng = np.random.default_rng(0)
    return (rng.uniform(0, 255, (batch, 16, 36, 64)).astype(np.float32),
            rng.normal(size=(batch, 16, 4)).astype(np.float32))


def time_forward(arch: dict, batch: int, warmup: int, steps: int) -> dict:
    """Seconds of `predict.forward` (readout 0): the first call, then `steps` after `warmup`."""
    model, mesh = DwiseNeuro(**arch, rngs=nnx.Rngs(0)), sharding.make_mesh()
    model.eval()
    fold = predict.FoldModel.of(model, mesh)
    frames, traces = sharding.put_batch(dict(zip("ft", windows(batch), strict=True)), mesh).values()
    call = lambda: jax.block_until_ready(predict.forward(fold, frames, traces, 0))
    return {"compile_s": times(call, 0, 1)[0], "times_s": times(call, warmup, steps)}


def report(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)  # for run_worker


def run_worker(script: str, fv, *extra: str, **kwargs) -> tuple[list, subprocess.CompletedProcess]:
    """Runs `script` with `fv`'s flags and `extra`: the results it `report`ed, and the process."""
    cmd = [sys.executable, script, *fv.flags_into_string().splitlines(), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)
    return [json.loads(ln[7:]) for ln in proc.stdout.splitlines() if ln[:7] == "RESULT "], proc


def print_table(rows: list[dict], columns: str) -> None:
    """A Markdown table of `columns` ("key:format ...", the key its label) some row has; None: -."""
    keys = [c.split(":") for c in columns.split() if any(c.split(":")[0] in r for r in rows)]
    print("| " + " | ".join(k for k, _ in keys) + " |\n|" + " --- |" * len(keys))
    for r in rows:
        cells = ("-" if r.get(k) is None else format(r[k], f) for k, f in keys)
        print("| " + " | ".join(cells) + " |", flush=True)


def main(doc: str | None, define, run) -> None:
    """`cli.main` for flags only: a stray word is an error (list flags are comma-separated)."""
    def flags_only(fv, args: list[str]) -> int:
        if args:
            raise cli.UsageError(f"unexpected arguments {args} (lists are comma-separated)")
        return run(fv)

    cli.main(doc, define, flags_only)
