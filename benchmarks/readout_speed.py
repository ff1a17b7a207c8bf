"""Train step with every readout on every sample (masked) against each sample's own readout only.

    .venv/bin/python benchmarks/readout_speed.py                         # small core, batch 32
    .venv/bin/python benchmarks/readout_speed.py --core true_batch --batch 4 --repeats 3

The readouts at the real neuron counts (ten mice, 7,440 to 8,285 neurons: 161.6 M of the
model's 170 M parameters) on the real 4096-wide cortex; `--core small` (default) puts a small
core (8-8-16 channels, expansion 2) in front so that a batch-32 step fits a 2-core CPU in
seconds, `--core true_batch` the real one. Input `(batch, 16, 64, 64, 5)`, the batch's mice
balanced and shuffled as the training stream gives them. Two measurements per way:

- step: `Trainer.train_step` complete (forward, loss, backward, AdamW, EMA, state donated),
  `readouts="all"` against `readouts="needed"`;
- readouts: the readouts alone, loss and gradients (readout weights and features) from given
  cortex features `(batch, 16, 4096)`, the same loss functions.

Each way runs in its own subprocess so that its peak memory (maxrss, the step's) is its own;
XLA's temporary buffers of each compiled function and the float32 matmul rate of the same
process are printed beside it (shared machines). Times are medians over `--repeats` calls after
the first. Re-executes itself with the settings of model_speed.py (GLIBC hugepages, XLA:CPU's
concurrency scheduler off).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_speed import NEURONS, matmul_rate, model_flops  # noqa: E402

# A small core: its cost, at full 64 x 64 resolution, is mostly memory traffic, not FLOPs.
CORES = {
    "small": dict(core_features=(8, 8, 16), spatial_strides=(2, 2, 2), expansion_ratio=2,
                  se_reduce_ratio=4),
    "true_batch": dict(expansion_ratio=7),  # the real core (docs/original.md#model)
}
CORTEX_WIDTH = 4096


def _batch(batch: int, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    width = max(NEURONS)
    mouse = rng.permutation(np.arange(batch) % len(NEURONS)).astype(np.int32)
    counts = np.asarray(NEURONS)[mouse]
    neuron_mask = np.arange(width)[None, :] < counts[:, None]
    targets = rng.gamma(0.5, 1.0, size=(batch, 16, width)).astype(np.float32)
    return {
        "frames": rng.uniform(0, 255, size=(batch, 16, 36, 64)).astype(np.float32),
        "traces": rng.normal(size=(batch, 16, 4)).astype(np.float32),
        "partner_frames": rng.uniform(0, 255, size=(batch, 16, 36, 64)).astype(np.float32),
        "partner_traces": rng.normal(size=(batch, 16, 4)).astype(np.float32),
        "box": np.tile(np.array([[10, 12, 40, 50]], np.int32), (batch, 1)),
        "mouse": mouse,
        "targets": np.where(neuron_mask[:, None, :], targets, 0.0).astype(np.float32),
        "neuron_mask": neuron_mask,
    }


def _stats(times: list[float]) -> dict:
    return {"times_s": [round(t, 3) for t in times], "median_s": sorted(times)[len(times) // 2],
            "min_s": min(times)}


def _memory_gb(compiled) -> dict:
    m = compiled.memory_analysis()
    return {"temp_gb": m.temp_size_in_bytes / 1e9,
            # arguments + outputs + temporaries, less what outputs reuse of donated arguments
            "peak_gb": (m.argument_size_in_bytes + m.output_size_in_bytes
                        + m.temp_size_in_bytes - m.alias_size_in_bytes) / 1e9}


def run_worker(ways: list[str], batch_size: int, repeats: int, core_name: str) -> list[dict]:
    """Compiles both measurements of every way, then times them in turn (interleaved, so that
    the shared machine's load falls on every way alike)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dwise_jax import losses, optim, train_step
    from dwise_jax.models.dwiseneuro import DwiseNeuro

    rate = matmul_rate()
    core = CORES[core_name]
    model = DwiseNeuro(NEURONS, **core, rngs=nnx.Rngs(params=0, dropout=1))
    tx = optim.adamw(lambda step: 1e-4, 0.05)
    trainers = {way: train_step.Trainer(model, tx, ema_decay=0.999, readouts=way)
                for way in ways}
    del model
    batch = {k: jnp.asarray(v) for k, v in _batch(batch_size).items()}
    features = jax.random.normal(jax.random.key(0), (batch_size, 16, CORTEX_WIDTH), jnp.float32)
    state = trainers[ways[0]].init_state()  # the same tree for every way

    def readout_grads(trainer, params, batch_stats, features, batch):
        """The readouts alone: loss and gradients from given cortex features."""
        model = nnx.merge(trainer.train_def, params, batch_stats, trainer.rng_state)

        def loss_fn(model, features):
            if trainer.readouts == "all":
                preds = [readout(features) for readout in model.readouts]
                return losses.own_mouse_loss(preds, batch["targets"], batch["mouse"])
            preds = model.own_readouts(features, batch["mouse"])
            return losses.own_readout_loss(preds, batch["targets"], batch["neuron_mask"])

        return nnx.value_and_grad(loss_fn, argnums=(0, 1))(model, features)

    results, steps, readout_fns = {}, {}, {}
    for way, trainer in trainers.items():
        start = time.perf_counter()
        steps[way] = jax.jit(trainer.train_step, donate_argnums=0).lower(state, batch).compile()
        readout_fns[way] = jax.jit(partial(readout_grads, trainer)).lower(
            state["params"], state["batch_stats"], features, batch).compile()
        chosen = "all" if way == "all" else 0
        results[way] = {
            "readouts": way, "batch": batch_size, "core": core_name,
            "compile_s": time.perf_counter() - start, "matmul_gflops": rate,
            "gflop_per_sample": model_flops(NEURONS, **core, readouts=chosen,
                                            backward=True) / 1e9,
            "step_memory": _memory_gb(steps[way]), "readout_memory": _memory_gb(readout_fns[way]),
        }
    step_times = {way: [] for way in ways}
    readout_times = {way: [] for way in ways}
    for i in range(repeats + 1):  # the first round is not counted
        for way in ways:
            start = time.perf_counter()
            state, metrics = jax.block_until_ready(steps[way](state, batch))
            if i:
                step_times[way].append(time.perf_counter() - start)
            start = time.perf_counter()
            jax.block_until_ready(readout_fns[way](state["params"], state["batch_stats"],
                                                   features, batch))
            if i:
                readout_times[way].append(time.perf_counter() - start)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    for way in ways:
        results[way].update(step=_stats(step_times[way]), readout=_stats(readout_times[way]),
                            maxrss_gb=maxrss if len(ways) == 1 else None)
    return list(results.values())


def print_table(rows: list[dict]) -> None:
    print(f"{'readouts':8s} {'core':10s} {'batch':>5s} | {'step s':>6s} {'min':>6s} "
          f"{'XLA peak GB':>11s} {'temp GB':>7s} | {'readouts s':>10s} {'min':>6s} "
          f"{'XLA peak GB':>11s} {'temp GB':>7s} | {'maxrss GB':>9s} {'GFLOP/sample':>12s} "
          f"{'matmul GFLOP/s':>14s} {'compile s':>9s}")
    for r in rows:
        maxrss = "-" if r["maxrss_gb"] is None else f"{r['maxrss_gb']:.2f}"
        s, sm, ro, rm = r["step"], r["step_memory"], r["readout"], r["readout_memory"]
        print(f"{r['readouts']:8s} {r['core']:10s} {r['batch']:5d} | {s['median_s']:6.2f} "
              f"{s['min_s']:6.2f} {sm['peak_gb']:11.2f} {sm['temp_gb']:7.2f} | "
              f"{ro['median_s']:10.2f} {ro['min_s']:6.2f} {rm['peak_gb']:11.2f} "
              f"{rm['temp_gb']:7.2f} | {maxrss:>9s} {r['gflop_per_sample']:12.1f} "
              f"{r['matmul_gflops']:14.1f} {r['compile_s']:9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ways", nargs="+", default=["all", "needed"],
                        choices=["all", "needed"])
    parser.add_argument("--core", default="small", choices=sorted(CORES))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--separate", action="store_true",
                        help="one process per way (its own maxrss) instead of interleaving")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from dwise_jax import process_env

    process_env.reexec_with_cpu_settings()

    if args.worker:
        for row in run_worker(args.worker, args.batch, args.repeats, args.core):
            print("RESULT " + json.dumps(row), flush=True)
        return

    rows = []
    for ways in [[w] for w in args.ways] if args.separate else [args.ways]:
        cmd = [sys.executable, __file__, "--worker", *ways, "--batch", str(args.batch),
               "--repeats", str(args.repeats), "--core", args.core]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if not lines:
            print(f"{ways} failed:\n{out.stderr[-3000:]}", flush=True)
            continue
        rows += [json.loads(line[len("RESULT "):]) for line in lines]
    print_table(rows)
    for r in rows:
        print(f"{r['readouts']}: step times {r['step']['times_s']}, readout times "
              f"{r['readout']['times_s']}")
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
