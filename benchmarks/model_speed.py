"""Speed of the full true_batch DwiseNeuro on CPU: forward, forward + backward, FLOPs, memory.

    .venv/bin/python benchmarks/model_speed.py                   # everything, batch 1 and 4
    .venv/bin/python benchmarks/model_speed.py --batch-sizes 4 --modes train --repeats 5
    .venv/bin/python benchmarks/model_speed.py --only-depthwise
    .venv/bin/python benchmarks/model_speed.py --demo --baseline /work/wt_base --rounds 8

`--demo` times the demo's real train step (configs/demo.py, `Trainer.train_step` with AdamW and
EMA, batch 8, three mice of 300 neurons, CutMix on half the batch) of this checkout and, with
`--baseline`, of another checkout's (e.g. `git worktree add ../wt_base <commit>`): one worker
process per checkout, both compiled first, then run in lockstep rounds (A, B, A, B, ...) so that
the shared machine's load falls on both alike; medians and the median of per-round ratios.

Each (mode, batch) runs in its own subprocess so that its peak memory (maxrss) is its own; each
subprocess also measures the float32 matmul rate (2048^3 jnp.dot), so the achieved share of it
is taken in the same run. Times are medians over `--repeats` calls after compilation (the first
call, which also faults in fresh memory, is not counted). FLOPs count convolutions and matmuls
only (2 per multiply-add); the backward pass counts 2x the forward for every layer except the
stem's input gradient. XLA's own count (all ops) is printed beside it.

The process re-executes itself with two settings read only at process start (see
benchmarks/RESULTS.md): GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (unless --no-hugepages), because
XLA:CPU allocates its large buffers afresh on every call and 4 KiB page faults cost as much as the
arithmetic of a pointwise convolution here; and XLA_FLAGS with
--xla_cpu_enable_concurrency_optimized_scheduler=false (unless --concurrency-scheduler), which
halves the training step's peak memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The real mice (docs/original.md#data-layout), readout order = mouse index.
NEURONS = (7863, 7908, 8202, 7939, 8122, 7440, 7928, 8285, 7671, 7495)
TRUE_BATCH = dict(readout_outputs=NEURONS, expansion_ratio=7)
INPUT = (16, 64, 64, 5)  # time, height, width, channels


def model_flops(
    readout_outputs=NEURONS,
    *,
    in_channels=5,
    core_features=(64, 64, 64, 64, 128, 128, 128, 256, 256),
    spatial_strides=(2, 1, 1, 1, 2, 1, 1, 2, 1),
    spatial_kernel=3,
    temporal_kernel=5,
    expansion_ratio=6,
    se_reduce_ratio=32,
    cortex_features=(1024, 2048, 4096),
    groups=2,
    readouts: str | int = "all",
    backward: bool = False,
    frames=16,
    height=64,
    width=64,
) -> int:
    """Convolution and matmul FLOPs (2 per multiply-add) of one sample."""
    t, h, w = frames, height, width
    stem = 2 * t * h * w * in_channels * core_features[0]
    total = stem
    n = len(core_features)
    for i in range(n):
        c_in = core_features[i]
        c_out = core_features[i + 1] if i + 1 < n else c_in
        mid = c_in * expansion_ratio
        total += 2 * t * h * w * c_in * mid  # expansion
        h, w = -(-h // spatial_strides[i]), -(-w // spatial_strides[i])
        total += 2 * t * h * w * mid * (spatial_kernel**2 + temporal_kernel)  # depthwise
        total += 2 * 2 * mid * (mid // se_reduce_ratio)  # squeeze-excite
        total += 2 * t * h * w * mid * c_out  # projection
    widths = (core_features[-1], *cortex_features)
    total += sum(2 * t * widths[j] * widths[j + 1] // groups for j in range(len(cortex_features)))
    chosen = readout_outputs if readouts == "all" else [readout_outputs[int(readouts)]]
    total += sum(2 * t * cortex_features[-1] * math.ceil(m / groups) for m in chosen)
    if backward:
        total = 3 * total - stem  # dX and dW for every layer, no dX for the input
    return total


def matmul_rate(repeats: int = 5) -> float:
    """float32 GFLOP/s of a jitted 2048^3 jnp.dot (median)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
    f = jax.jit(jnp.dot)
    f(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f(a, a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / sorted(times)[len(times) // 2] / 1e9


def poisson_loss(outputs, targets, mice_weights):
    """The original's loss (dwise_jax.losses.mice_poisson_loss), float32."""
    from dwise_jax.losses import mice_poisson_loss

    return mice_poisson_loss(outputs, targets, mice_weights)


def run_worker(mode: str, batch: int, repeats: int, dtype: str) -> dict:
    """One configuration: build, compile, time. Returns a dict of results."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dwise_jax.models.dwiseneuro import DwiseNeuro

    rate = matmul_rate()
    model = DwiseNeuro(NEURONS, expansion_ratio=7, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, *INPUT)).astype(np.float32))
    if mode == "train":
        model.train()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        targets = [jnp.asarray(rng.random((batch, INPUT[0], n), np.float32)) for n in NEURONS]
        weights = jnp.asarray(np.eye(len(NEURONS), dtype=np.float32)[np.arange(batch) % 10])

        def step(params, rest, x, targets, weights):
            m = nnx.merge(graphdef, params, rest)
            loss_fn = lambda m: poisson_loss(m(x), targets, weights)
            loss, grads = nnx.value_and_grad(loss_fn)(m)
            return loss, grads, nnx.state(m, nnx.Not(nnx.Param))

        args = (params, rest, x, targets, weights)
    else:
        model.eval()
        graphdef, state = nnx.split(model)
        index = 0 if mode == "eval1" else None

        def step(state, x):
            return nnx.merge(graphdef, state)(x, index)

        args = (state, x)
    start = time.perf_counter()
    compiled = jax.jit(step).lower(*args).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        if i:
            times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    readouts = 0 if mode == "eval1" else "all"
    flops = model_flops(NEURONS, expansion_ratio=7, readouts=readouts, backward=mode == "train")
    return {
        "mode": mode,
        "batch": batch,
        "dtype": dtype,
        "times_s": [round(t, 3) for t in times],
        "median_s": median,
        "per_sample_s": median / batch,
        "gflop_per_sample": flops / 1e9,
        "xla_gflop_per_sample": cost.get("flops", float("nan")) / batch / 1e9,
        "gflops": flops * batch / median / 1e9,
        "matmul_gflops": rate,
        "share": flops * batch / median / 1e9 / rate,
        "compile_s": compile_s,
        "xla_temp_gb": memory.temp_size_in_bytes / 1e9,
        "maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }


def run_depthwise(repeats: int, lax_repeats: int) -> list[dict]:
    """Tap sum versus XLA's grouped convolution: batch 8, 448 channels, 16 x 32 x 32,
    spatial (1, 3, 3) stride 1 padding 1, forward and forward + backward."""
    import jax
    import jax.numpy as jnp

    from dwise_jax.models.depthwise import depthwise_conv3d

    x = jax.random.normal(jax.random.key(0), (8, 16, 32, 32, 448), jnp.float32)
    k = jax.random.normal(jax.random.key(1), (1, 3, 3, 448), jnp.float32)
    rows = []
    for impl in ("taps", "lax"):
        conv = lambda x, k, impl=impl: depthwise_conv3d(
            x, k, (1, 1, 1), ((0, 0), (1, 1), (1, 1)), impl=impl
        )
        grad = jax.grad(lambda x, k, conv=conv: jnp.sum(conv(x, k) ** 2), (0, 1))
        for what, f in (("forward", conv), ("forward+backward", grad)):
            compiled = jax.jit(f).lower(x, k).compile()
            jax.block_until_ready(compiled(x, k))
            times = []
            for _ in range(repeats if impl == "taps" else lax_repeats):
                start = time.perf_counter()
                jax.block_until_ready(compiled(x, k))
                times.append(time.perf_counter() - start)
            rows.append({"impl": impl, "what": what, "median_s": sorted(times)[len(times) // 2]})
            print(f"depthwise {impl:5s} {what:17s} {rows[-1]['median_s']:8.3f} s", flush=True)
    return rows


def demo_worker(root: str) -> None:
    """Builds `root`'s demo Trainer, then answers each stdin line "n" with n step times."""
    sys.path.insert(0, root)
    import importlib.util

    import jax
    import numpy as np
    from flax import nnx

    import dwise_jax
    from dwise_jax import config as config_lib
    from dwise_jax import optim, sharding, train_step
    from dwise_jax.models.dwiseneuro import DwiseNeuro

    assert dwise_jax.__file__.startswith(root), dwise_jax.__file__
    spec = importlib.util.spec_from_file_location("demo_config", Path(root) / "configs/demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    o, b = config.optim, config.data.batch_size
    model = DwiseNeuro(**config_lib.model_kwargs(config, [300] * 3),
                       rngs=nnx.Rngs(params=0, dropout=1))
    schedule = optim.lr_schedule(optim.scaled_lr(o.base_lr, b), optim.scaled_lr(o.min_lr, b),
                                 350, 2450)
    trainer = train_step.Trainer(model, optim.adamw(schedule, o.weight_decay),
                                 ema_decay=o.ema_decay)
    mesh = sharding.make_mesh()  # all devices, as train_fold does
    state = jax.device_put(trainer.init_state(), sharding.replicated(mesh))
    train, _ = train_step.jit_steps(trainer, sharding.replicated(mesh),
                                    sharding.batch_sharding(mesh))
    rng = np.random.default_rng(0)
    box = np.zeros((b, 4), np.int32)
    box[::2] = (10, 10, 40, 40)
    frames = lambda: rng.random((b, 16, 36, 64), np.float32) * 255
    batch = sharding.put_batch({
        "frames": frames(), "partner_frames": frames(), "box": box,
        "traces": rng.random((b, 16, 4), np.float32),
        "partner_traces": rng.random((b, 16, 4), np.float32),
        "mouse": (np.arange(b) % 3).astype(np.int32),
        "targets": rng.random((b, 16, 300), np.float32),
        "neuron_mask": np.ones((b, 300), bool)}, mesh)
    for _ in range(3):  # compile, then fault in the buffers
        state, metrics = train(state, batch)
    jax.block_until_ready(metrics)
    print("READY", flush=True)
    for line in sys.stdin:
        times = []
        for _ in range(int(line)):
            start = time.perf_counter()
            state, metrics = train(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        print("TIMES " + json.dumps(times), flush=True)


def run_demo(roots: list[str], rounds: int, steps: int) -> None:
    """Lockstep rounds of `steps` demo train steps per checkout; prints medians and ratios."""
    workers = [subprocess.Popen([sys.executable, __file__, "--demo-worker", root],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for root in roots]
    for w in workers:  # compile one after the other
        while (line := w.stdout.readline()) and not line.startswith("READY"):
            pass
    times = [[] for _ in roots]
    for _ in range(rounds):
        for w, t in zip(workers, times, strict=True):
            w.stdin.write(f"{steps}\n")
            w.stdin.flush()
            while not (line := w.stdout.readline()).startswith("TIMES "):
                if not line:
                    raise SystemExit("a demo worker died")
            t.append(sorted(json.loads(line[6:]))[steps // 2])
    for w in workers:
        w.stdin.close()
        w.wait()
    med = lambda v: sorted(v)[len(v) // 2]
    for root, t in zip(roots, times, strict=True):
        print(f"{root}: median {med(t):.3f} s/step ({8 / med(t):.1f} samples/s), "
              f"rounds {[round(x, 3) for x in t]}")
    if len(roots) == 2:
        ratios = sorted(b / a for a, b in zip(*times, strict=True))
        print(f"speed-up {med(times[1]) / med(times[0]):.2f}x (median of per-round ratios "
              f"{med(ratios):.2f}x, range {ratios[0]:.2f}-{ratios[-1]:.2f})")


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'mode':7s} {'batch':>5s} {'s/step':>8s} {'s/sample':>9s} {'GFLOP/sample':>13s} "
        f"{'XLA GFLOP':>10s} {'GFLOP/s':>8s} {'matmul':>7s} {'share':>6s} {'maxrss GB':>10s} "
        f"{'XLA temp GB':>12s}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['mode']:7s} {r['batch']:5d} {r['median_s']:8.2f} {r['per_sample_s']:9.2f} "
            f"{r['gflop_per_sample']:13.1f} {r['xla_gflop_per_sample']:10.1f} {r['gflops']:8.1f} "
            f"{r['matmul_gflops']:7.1f} {r['share']:6.2f} {r['maxrss_gb']:10.1f} "
            f"{r['xla_temp_gb']:12.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--modes", nargs="+", default=["eval1", "eval10", "train"],
                        choices=["eval1", "eval10", "train"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--concurrency-scheduler", action="store_true",
                        help="keep XLA:CPU's concurrency-optimised scheduler (about 2x the memory)")
    parser.add_argument("--no-hugepages", action="store_true")
    parser.add_argument("--only-depthwise", action="store_true")
    parser.add_argument("--skip-depthwise", action="store_true")
    parser.add_argument("--lax-repeats", type=int, default=1,
                        help="repeats of the (slow) grouped-convolution depthwise variant")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--demo", action="store_true", help="the demo's train step only")
    parser.add_argument("--baseline", help="with --demo: another checkout to compare against")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--demo-worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.demo_worker:  # the parent set the environment; imports the checkout's own package
        demo_worker(args.demo_worker)
        return

    from dwise_jax.models.dwiseneuro import CPU_XLA_FLAGS

    env = dict(os.environ)
    tunable = "glibc.malloc.hugetlb=1"
    if not args.no_hugepages and tunable not in env.get("GLIBC_TUNABLES", ""):
        env["GLIBC_TUNABLES"] = tunable
    if not args.concurrency_scheduler and CPU_XLA_FLAGS not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {CPU_XLA_FLAGS}".strip()
    if env != os.environ:  # both are read once at process start
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    if args.demo:
        root = str(Path(__file__).resolve().parents[1])
        run_demo([root] + ([args.baseline] if args.baseline else []), args.rounds, args.repeats)
        return
    if args.worker:
        mode, batch = args.worker[0], int(args.worker[1])
        result = run_worker(mode, batch, args.repeats, args.dtype)
        print("RESULT " + json.dumps(result), flush=True)
        return

    results: dict = {"argv": sys.argv, "model": [], "depthwise": []}
    if not args.only_depthwise:
        for batch in args.batch_sizes:
            for mode in args.modes:
                cmd = [sys.executable, __file__, "--worker", mode, str(batch),
                       "--repeats", str(args.repeats), "--dtype", args.dtype]
                cmd += ["--concurrency-scheduler"] * args.concurrency_scheduler
                cmd += ["--no-hugepages"] * args.no_hugepages
                out = subprocess.run(cmd, capture_output=True, text=True, check=False)
                lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
                if not lines:
                    print(f"{mode} batch {batch} failed:\n{out.stderr[-3000:]}", flush=True)
                    continue
                results["model"].append(json.loads(lines[-1][len("RESULT "):]))
                print_table(results["model"][-1:])
        print()
        print_table(results["model"])
    if not args.skip_depthwise:
        results["depthwise"] = run_depthwise(args.repeats, args.lax_repeats)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
