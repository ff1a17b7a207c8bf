"""On this CPU (benchmarks/RESULTS.md): `step`, a config's train step on a synthetic batch, alone
or against `--baseline` (another checkout) in alternating processes, each the median of
`--repeats` after 2; `reconstruct`, one reconstruction iteration, batched against the published
loop. Prediction windows per second: accelerator.py.

    git worktree add /tmp/dwise_base 9eed6f6
    .venv/bin/python benchmarks/model_speed.py --baseline /tmp/dwise_base --rounds 3 --repeats 8
    .venv/bin/python benchmarks/model_speed.py --modes reconstruct --tiny --batch_sizes 4
"""

import resource
import statistics
import sys
import time
from pathlib import Path

import common
import jax
import numpy as np
from absl import flags
from flax import nnx

from dwise_jax import checkpoint, inference, process_env, reconstruct
from dwise_jax.models.dwiseneuro import DwiseNeuro

COLUMNS = ("mode: checkout: batch: step_s:.3f compile_s:.1f loss:.6g models: length: windows: "
           "batched_first_s:.1f batched_s:.2f loop_first_s:.1f loop_s:.2f loop_over_batched:.2f "
           "update_difference:.1e maxrss_gb:.1f")


def step_row(fv: flags.FlagValues, root: str, batch: int) -> dict:
    """`step`: the train step of the checkout at `root` (its own modules), by the API both share."""
    for name in [m for m in sys.modules if m.split(".")[0] == "dwise_jax"]:
        del sys.modules[name]  # imported above
    sys.path.insert(0, root)
    from dwise_jax import config as config_lib
    from dwise_jax import optim, train_step
    from dwise_jax.models.dwiseneuro import DwiseNeuro

    config = config_lib.load_config_file(f"{root}/configs/{Path(fv.config).name}")
    neurons = [300] * 3 if Path(fv.config).stem == "demo" else list(common.NEURONS)
    model = DwiseNeuro(**config_lib.model_kwargs(config, neurons), rngs=nnx.Rngs(0, dropout=1))
    tx = optim.adamw(optim.lr_schedule(1e-3, 1e-5, 100, 1000), config.optim.weight_decay)
    trainer = train_step.Trainer(model, tx, ema_decay=config.optim.ema_decay)
    rng, n, b = np.random.default_rng(0), max(neurons), batch
    video, traces = common.windows(b)
    data = jax.device_put({  # either checkout's batch, float32 and int32 (x64 is off)
        "frames": video, "traces": traces, "partner_frames": video, "partner_traces": traces,
        "box": np.tile(np.int32([10, 40, 10, 40]), (b, 1)), "mouse": np.arange(b) % len(neurons),
        "targets": rng.gamma(1.0, 1.0, (b, 16, n)), "neuron_mask": np.ones((b, n), bool)})
    held, train = {"state": trainer.init_state()}, train_step.jit_steps(trainer)[0]

    def step():
        held["state"], metrics = jax.block_until_ready(train(held["state"], data))
        held["loss"] = float(metrics["loss"])

    first = common.times(step, 0, 1)[0]  # compiles
    return {"step_s": statistics.median(common.times(step, 1, fv.repeats)), "compile_s": first,
            "loss": held["loss"]}


def reconstruct_row(fv: flags.FlagValues, chunk: int) -> dict:
    """`reconstruct`: both ways timed (first call and median), their updates compared."""
    m, length, n = (2, 40, 10) if fv.tiny else (fv.models, fv.length, fv.neurons)
    arch = common.arch(fv.config, [n], common.TINY_MODEL if fv.tiny else None)
    spec = checkpoint.ModelSpec(constructor=arch, mice=["m"], source="benchmark")
    models = [DwiseNeuro(**arch, rngs=nnx.Rngs(k)) for k in range(m)]
    for model in models:
        model.eval()
    ens = inference.stack([(x, spec, {"fold": k, "directory": "-"}) for k, x in enumerate(models)])
    rng, step, mask = np.random.default_rng(0), 20, np.ones((36, 64))  # step: past the warm-up
    video, traces = inference.trial_arrays(rng.uniform(0, 255, (36, 64, length)),
                                           *rng.normal(size=(2, 2, length)))
    targets, moment = rng.gamma(1.0, 1.0, (length, n)).astype(np.float32), np.zeros_like(video)
    cfg = reconstruct.ReconConfig(chunk=chunk, model_axis=fv.model_axis)
    plan = inference.WindowPlan.of(length, 1, chunk)
    grads = jax.jit(reconstruct.window_grads, static_argnums=(0, 5))
    states, inputs = [ens.subset([k]).states for k in range(m)], (video, traces, targets)

    def loop():  # per model and window one gradient call; the means over both in NumPy
        total = np.zeros(video.shape)
        for state in states:
            sums = np.zeros(video.shape)
            for i in plan.index[plan.valid]:
                g = grads(ens.graphdef, state, *(a[i][None] for a in inputs), 0)[0]
                sums[i] += np.asarray(g[0, 0], np.float64)
            total += sums / plan.counts[:, None, None]
        return np.asarray(reconstruct.adam_step(video, moment, total / m, mask, step, cfg)[0])

    batched = lambda: np.asarray(reconstruct.iteration(
        ens.graphdef, ens.states, video, moment, traces, targets, plan, 0, cfg, mask, step)[0])
    out, update = {"models": m, "length": length, "windows": int(plan.valid.sum())}, {}
    for way, fn in (("batched", batched), ("loop", loop)):
        start = time.perf_counter()
        update[way] = fn()
        out[f"{way}_first_s"] = time.perf_counter() - start
        out[f"{way}_s"] = statistics.median(common.times(fn, 0, fv.repeats))
    return {**out, "loop_over_batched": out["loop_s"] / out["batched_s"],
            "update_difference": float(np.abs(update["loop"] - update["batched"]).max())}


def define_flags(fv: flags.FlagValues) -> None:
    f = {"flag_values": fv}
    flags.DEFINE_list("modes", ["step"], "step and/or reconstruct", **f)
    flags.DEFINE_list("batch_sizes", None, "default: the config's (step), 4 (reconstruct)", **f)
    flags.DEFINE_integer("repeats", 3, "timed calls", **f)
    flags.DEFINE_string("config", str(common.REPO / "configs/demo.py"), "step: by name", **f)
    flags.DEFINE_string("baseline", None, "step: another checkout to compare with", **f)
    flags.DEFINE_integer("rounds", 1, "step: processes per checkout, alternating", **f)
    for name, default in (("models", 7), ("length", 300), ("neurons", 100)):
        flags.DEFINE_integer(name, default, f"reconstruct's {name}", **f)
    flags.DEFINE_enum("model_axis", "map", ["map", "vmap"], "ReconConfig.model_axis", **f)
    flags.DEFINE_bool("tiny", False, "reconstruct: 2 small models, 40 frames, 10 neurons", **f)
    flags.DEFINE_string("worker", None, "(internal) one mode in this process", **f)
    flags.DEFINE_string("checkout", str(common.REPO), "(internal) step's checkout", **f)


def run(fv: flags.FlagValues) -> int:
    process_env.reexec_with_cpu_settings()
    if fv.worker:  # one mode and batch (reconstruct: chunk of windows) in this process
        b, step = int(fv.batch_sizes[0]), fv.worker == "step"
        row = step_row(fv, fv.checkout, b) if step else reconstruct_row(fv, b)
        common.report({"mode": fv.worker, "batch": b, **row,
                       "maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6})
        return 0
    rows, config_batch = [], str(common.config_lib.load_config_file(fv.config).data.batch_size)
    checkouts = {"baseline": fv.baseline, "this": str(common.REPO)}
    for mode in fv.modes:
        step = mode == "step"
        pairs = [(k, root) for k, root in checkouts.items() if root and (step or k == "this")]
        for batch in fv.batch_sizes or [config_batch if step else "4"]:
            for _ in range(fv.rounds if step else 1):
                for name, root in pairs:
                    results, proc = common.run_worker(
                        __file__, fv, f"--worker={mode}", f"--batch_sizes={batch}",
                        f"--checkout={Path(root).resolve()}")
                    if not results:
                        print(f"{mode} {name} batch {batch} failed:\n{proc.stderr[-3000:]}")
                    rows += [{**r, "checkout": name} for r in results]
                    common.print_table(rows[-1:], COLUMNS)  # as it goes
    common.print_table(rows, COLUMNS)
    median = {name: statistics.median(t) for name in checkouts
              if (t := [r["step_s"] for r in rows if r["checkout"] == name and "step_s" in r])}
    if len(median) == 2:
        print(f"step medians: baseline {median['baseline']:.3f} s, this checkout "
              f"{median['this']:.3f} s: {median['baseline'] / median['this']:.2f}x")
    return int(any(not r.get("update_difference", 0) <= 0.01 for r in rows))


if __name__ == "__main__":
    common.main(__doc__, define_flags, run)
