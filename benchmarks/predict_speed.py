"""Prediction speed of the full true_batch DwiseNeuro on CPU: windows per second, and seconds per
300-frame trial at each anchor stride.

    .venv/bin/python benchmarks/predict_speed.py --batch-sizes 1 8 16 --repeats 3 --end-to-end

Forward: `dwise_jax.predict.forward` (core and cortex, then the mouse's readout; float32, eval
mode, the true_batch_001 architecture with the ten real readouts, 170.7 M parameters) on
batches of windows, timed as medians of `--repeats` calls after compilation, next to the matmul
rate (2048^3 jnp.dot, `model_speed.matmul_rate`) measured just before each, as the machine is
shared and noisy; FLOPs per window are `model_speed.model_flops` with one readout. A 300-frame trial
takes `len(prediction_anchors(300, stride))` windows: 270 at stride 1 (the original), 136 at 4,
70 at 8, 36 at 16 and 20 at 30, so seconds per trial = windows / (windows per second).

`--end-to-end` also predicts one 300-frame trial of a simulated mouse with 8,000 neurons through
`predict.blend_trials` (loading the windows, the padded last batch, blending): what a fold costs
per trial on this machine. It writes the simulated mouse once to `--data` (about 40 s).

Like `model_speed.py`, the process re-executes itself with GLIBC_TUNABLES=glibc.malloc.hugetlb=1
and XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false (see RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# The real mice (docs/original.md#data-layout), readout order = mouse index.
NEURONS = (7863, 7908, 8202, 7939, 8122, 7440, 7928, 8285, 7671, 7495)
STRIDES = (1, 4, 8, 16, 30)
ORIGINAL_S_PER_WINDOW = 1.3  # the original, batch 1, this kind of CPU (issue 6)


def _reexec_with_cpu_settings() -> None:
    from dwise_jax import process_env

    process_env.reexec_with_cpu_settings()


def build(readout_outputs, mice):
    import jax.numpy as jnp
    from flax import nnx

    from dwise_jax import checkpoint, predict, sharding
    from dwise_jax.models.dwiseneuro import DwiseNeuro

    model = DwiseNeuro(readout_outputs, expansion_ratio=7, dtype=jnp.float32, rngs=nnx.Rngs(0))
    model.eval()
    spec = checkpoint.ModelSpec(constructor={"readout_outputs": list(readout_outputs)},
                                mice=list(mice), source="benchmark")
    mesh = sharding.make_mesh()
    return predict.FoldModel.of(model, mesh, spec=spec), mesh


def time_forward(model, batch: int, repeats: int) -> dict:
    import jax
    import model_speed
    import numpy as np

    from dwise_jax import predict

    rate = model_speed.matmul_rate()
    rng = np.random.default_rng(0)
    frames = rng.uniform(0, 255, (batch, 16, 36, 64)).astype(np.float32)
    traces = rng.normal(size=(batch, 16, 4)).astype(np.float32)
    start = time.perf_counter()
    jax.block_until_ready(predict.forward(model, frames, traces, 0))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(predict.forward(model, frames, traces, 0))
        times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    gflop = model_speed.model_flops(NEURONS, expansion_ratio=7, readouts=0) / 1e9
    return {"batch": batch, "matmul_gflops": rate, "gflops": gflop * batch / median,
            "times_s": [round(t, 3) for t in times], "median_s": median,
            "windows_per_s": batch / median, "first_call_s": first,
            "maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def end_to_end(data: Path, batch: int) -> dict:
    from dwise_jax import predict
    from dwise_jax.data import synthetic, windows
    from dwise_jax.data.sensorium import SensoriumDataset

    if not data.exists():
        start = time.perf_counter()
        synthetic.generate(data, mice=1, neurons=8000, trials=20, frames=300, seed=0)
        print(f"wrote {data} in {time.perf_counter() - start:.0f} s", flush=True)
    mouse = SensoriumDataset.open(data).mice[0]
    trial = int(next(t for t in range(mouse.num_trials) if mouse.lengths[t] == 300))
    model, mesh = build((mouse.num_neurons, *NEURONS[1:]), [mouse.name, *map(str, range(9))])
    predict.blend_trials(model, mouse, [trial], (30,), batch, mesh)  # compile, warm the cache
    start = time.perf_counter()
    blenders = predict.blend_trials(model, mouse, [trial], (1,), batch, mesh)
    seconds = time.perf_counter() - start
    assert blenders[1].counts[trial].min() >= 1
    return {"batch": batch, "neurons": mouse.num_neurons, "windows": len(
        windows.prediction_anchors(300)), "s_per_trial": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--end-to-end", action="store_true")
    parser.add_argument("--end-to-end-batch", type=int, default=16)
    parser.add_argument("--data", type=Path, default=Path("/tmp/dwise_predict_bench"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    _reexec_with_cpu_settings()

    from dwise_jax.data import windows

    per_trial = {s: len(windows.prediction_anchors(300, s)) for s in STRIDES}
    model, _ = build(NEURONS, [str(i) for i in range(10)])
    results = {"argv": sys.argv, "forward": [], "windows_per_300_frames": per_trial}
    print("batch  s/batch  windows/s  s/trial at stride " + "  ".join(f"{s:>5d}" for s in STRIDES))
    for batch in args.batch_sizes:
        r = time_forward(model, batch, args.repeats)
        results["forward"].append(r)
        trial = "  ".join(f"{per_trial[s] / r['windows_per_s']:5.0f}" for s in STRIDES)
        print(f"{batch:5d}  {r['median_s']:7.2f}  {r['windows_per_s']:9.2f}  {'':18s}{trial}"
              f"   ({r['gflops']:.0f} GFLOP/s, matmul {r['matmul_gflops']:.0f}; maxrss "
              f"{r['maxrss_gb']:.1f} GB)", flush=True)
    original = "  ".join(f"{per_trial[1] * ORIGINAL_S_PER_WINDOW:5.0f}" if s == 1 else "    -"
                         for s in STRIDES)
    print(f"original, batch 1: {1 / ORIGINAL_S_PER_WINDOW:.2f} windows/s  {'':11s}{original}")
    if args.end_to_end:
        del model
        r = end_to_end(args.data, args.end_to_end_batch)
        results["end_to_end"] = r
        print(f"end to end, batch {r['batch']}, {r['neurons']} neurons: {r['s_per_trial']:.1f} s "
              f"per 300-frame trial at stride 1 ({r['windows'] / r['s_per_trial']:.2f} windows/s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
