"""The full true_batch DwiseNeuro on CPU, float32 (step time, FLOPs, memory, prediction) and a
movie-reconstruction iteration batched against the published loop; see benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/model_speed.py --batch_sizes 1,4 --repeats 3
    .venv/bin/python benchmarks/model_speed.py --modes predict --batch_sizes 1,4,16 --repeats 5
    .venv/bin/python benchmarks/model_speed.py --modes reconstruct --tiny --batch_sizes 4
"""

import resource
import statistics
import time

import common
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from dwise_jax import checkpoint, inference, process_env, reconstruct
from dwise_jax.data import windows
from dwise_jax.losses import mice_poisson_loss
from dwise_jax.models.dwiseneuro import DwiseNeuro

STRIDES = (1, 4, 8, 16, 30)
COLUMNS = ("mode: batch: step_s:.2f per_sample_s:.2f gflop_per_sample:.1f "
           "xla_gflop_per_sample:.1f gflops:.1f matmul_gflops:.1f share:.2f maxrss_gb:.1f "
           "xla_temp_gb:.2f " + " ".join(f"s_per_trial_stride_{s}:.0f" for s in STRIDES) +
           " models: length: windows: batched_first_s:.1f batched_s:.2f loop_first_s:.1f "
           "loop_s:.2f loop_over_batched:.2f update_difference:.1e")  # rows show what they have


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


def worker(fv: flags.FlagValues, mode: str, batch: int) -> dict:
    """One (mode, batch) in this process: build, compile, time."""
    rate, arch, out = common.matmul_rate(), common.arch(), {"mode": mode, "batch": batch}
    maxrss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    if mode == "reconstruct":
        return {**out, **reconstruct_row(fv, batch), "matmul_gflops": rate, "maxrss_gb": maxrss()}
    if mode == "predict":
        timed = common.time_forward(arch, batch, 0, fv.repeats)
        out["compile_s"], t = timed["compile_s"], statistics.median(timed["times_s"])
        out.update({f"s_per_trial_stride_{s}": len(windows.prediction_anchors(300, s)) * t / batch
                    for s in STRIDES})
    else:
        model, rng = DwiseNeuro(**arch, rngs=nnx.Rngs(0)), np.random.default_rng(0)
        (model.train if mode == "train" else model.eval)()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        args = (params, rest, jnp.asarray(rng.normal(size=(batch, 16, 64, 64, 5)), jnp.float32),
                [jnp.asarray(rng.random((batch, 16, n)), jnp.float32) for n in common.NEURONS],
                jnp.eye(10)[jnp.arange(batch) % 10])

        def step(params, rest, x, targets, weights):
            m = nnx.merge(graphdef, params, rest)
            if mode != "train":
                return m(x, 0 if mode == "eval1" else None)
            loss_fn = lambda m: mice_poisson_loss(m(x), targets, weights)
            return *nnx.value_and_grad(loss_fn)(m), nnx.state(m, nnx.Not(nnx.Param))

        start = time.perf_counter()
        compiled = jax.jit(step).lower(*args).compile()
        cost = compiled.cost_analysis()
        out.update(compile_s=time.perf_counter() - start,
                   xla_temp_gb=compiled.memory_analysis().temp_size_in_bytes / 1e9,
                   xla_gflop_per_sample=(cost[0] if isinstance(cost, list) else cost).get(
                       "flops", float("nan")) / batch / 1e9)
        t = statistics.median(common.times(lambda: jax.block_until_ready(compiled(*args)), 1,
                                           fv.repeats))
    flops = common.model_flops(arch, None if mode in ("eval10", "train") else 0, mode == "train")
    return {**out, "step_s": t, "per_sample_s": t / batch, "gflop_per_sample": flops / 1e9,
            "gflops": flops * batch / t / 1e9, "matmul_gflops": rate,
            "share": flops * batch / t / 1e9 / rate, "maxrss_gb": maxrss()}


def define_flags(fv: flags.FlagValues) -> None:
    f = {"flag_values": fv}
    flags.DEFINE_list("batch_sizes", ["1", "4"], "batch sizes", **f)
    flags.DEFINE_list("modes", ["eval1", "eval10", "train"], "or predict, reconstruct", **f)
    flags.DEFINE_integer("repeats", 3, "timed calls", **f)
    flags.DEFINE_string("config", str(common.REPO / "configs/demo.py"), "reconstruct's", **f)
    for name, default in (("models", 7), ("length", 300), ("neurons", 100)):
        flags.DEFINE_integer(name, default, f"reconstruct's {name}", **f)
    flags.DEFINE_enum("model_axis", "map", ["map", "vmap"], "ReconConfig.model_axis", **f)
    flags.DEFINE_bool("tiny", False, "reconstruct: 2 small models, 40 frames, 10 neurons", **f)
    flags.DEFINE_string("worker", None, "(internal) one mode", **f)


def run(fv: flags.FlagValues) -> int:
    process_env.reexec_with_cpu_settings()
    if fv.worker:
        common.report(worker(fv, fv.worker, int(fv.batch_sizes[0])))
        return 0
    rows = []
    for batch in fv.batch_sizes:
        for mode in fv.modes:
            results, proc = common.run_worker(__file__, fv, f"--worker={mode}",
                                              f"--batch_sizes={batch}")
            if not results:
                print(f"{mode} batch {batch} failed:\n{proc.stderr[-3000:]}", flush=True)
            rows += results
            common.print_table(rows[-1:], COLUMNS)  # as it goes
    common.print_table(rows, COLUMNS)
    return int(any(not r.get("update_difference", 0) <= 0.01 for r in rows))


if __name__ == "__main__":
    common.main(__doc__, define_flags, run)
