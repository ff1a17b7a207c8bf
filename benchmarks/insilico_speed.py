"""One movie-reconstruction iteration of a 300-frame trial through a 7-model ensemble: the
jitted, batched iteration of dwise_jax/reconstruct.py against the published way, a loop of
single-window, single-model gradient calls (each jitted) with the normalising, averaging and the
update in NumPy, which computes the same update (checked here).

    .venv/bin/python benchmarks/insilico_speed.py                      # demo model, 7 models
    .venv/bin/python benchmarks/insilico_speed.py --config configs/true_batch.py --neurons 8000 \
        --models 1 --length 62 --repeats 1                             # the full model on CPU

Random weights (speed does not depend on them), float32, eval mode, one readout of `--neurons`.
Times are medians of `--repeats` calls after compilation; compile times are printed apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo.py")
    p.add_argument("--models", type=int, default=7)
    p.add_argument("--length", type=int, default=300)
    p.add_argument("--neurons", type=int, default=100)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-loop", action="store_true")
    p.add_argument("--model-axis", default="map", choices=("map", "vmap"))
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dwise_jax import checkpoint, inference, losses, reconstruct
    from dwise_jax import config as config_lib
    from dwise_jax.data import windows
    from dwise_jax.models.dwiseneuro import DwiseNeuro

    config = config_lib.load_config_file(args.config)
    kwargs = config_lib.model_kwargs(config, [args.neurons])
    spec = checkpoint.ModelSpec(constructor=kwargs, mice=["m"], source="benchmark")
    models = []
    for k in range(args.models):
        model = DwiseNeuro(**kwargs, rngs=nnx.Rngs(k))
        model.eval()
        models.append((model, spec, {"experiment": "bench", "fold": k, "step": 0,
                                     "directory": "-"}))
    ens = inference.stack(models)
    rng = np.random.default_rng(0)
    L = args.length
    video = rng.uniform(0, 255, (L, 36, 64)).astype(np.float32)
    traces = rng.normal(0, 1, (L, 4)).astype(np.float32)
    targets = rng.gamma(1.0, 1.0, (L, args.neurons)).astype(np.float32)
    mask = np.ones((36, 64), np.float32)
    cfg = reconstruct.ReconConfig(chunk=args.chunk, model_axis=args.model_axis)
    key, plan = inference.cached_plan(L, 1, args.chunk)
    n_windows = int(plan.valid.sum())
    moment = np.zeros_like(video)
    step = 20  # past the warm-up

    def batched():
        out = reconstruct.iteration(ens.graphdef, ens.states, jnp.asarray(video),
                                    jnp.asarray(moment), jnp.asarray(traces),
                                    jnp.asarray(targets), key, 0, cfg, jnp.asarray(mask), step)
        return jax.block_until_ready(out)

    result = {"config": args.config, "models": args.models, "length": L,
              "windows": n_windows, "neurons": args.neurons, "chunk": args.chunk,
              "model_axis": args.model_axis,
              "devices": str(jax.devices())}
    start = time.perf_counter()
    new_video, _, _ = batched()
    result["batched_first_call_s"] = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        batched()
        times.append(time.perf_counter() - start)
    result["batched_s"] = float(np.median(times))
    print(json.dumps(result), flush=True)
    if args.skip_loop:
        return

    @jax.jit
    def one_grad(state, f, t, y):
        def loss(f):
            pred = inference._apply(ens.graphdef, state, f[None], t[None], 0)[0]
            return jnp.sum(losses.poisson_nll(pred, y))
        return jax.grad(loss)(f)

    states = [nnx.split(m)[1] for m, _, _ in models]
    anchors = windows.prediction_anchors(L)

    def loop():
        total = np.zeros(video.shape)
        for state in states:
            sums, counts = np.zeros(video.shape), np.zeros(L)
            for a in anchors:
                idx = windows.window_indexes(a)
                g = np.asarray(one_grad(state, video[idx], traces[idx], targets[idx]), np.float64)
                sums[idx] += g / np.sqrt(np.sum(g ** 2))
                counts[idx] += 1
            total += sums / counts[:, None, None]
        g = np.clip(total / len(states) * mask, -cfg.grad_clip, cfg.grad_clip)
        m = cfg.beta1 * moment + (1 - cfg.beta1) * g
        t = step + 1
        lr = cfg.lr * min(1.0, t / cfg.warmup)
        return np.clip(video - lr * m / (1 - cfg.beta1 ** t), 0, 255)

    start = time.perf_counter()
    idx = windows.window_indexes(anchors[0])
    jax.block_until_ready(one_grad(states[0], video[idx], traces[idx], targets[idx]))
    result["loop_compile_s"] = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        looped = loop()
        times.append(time.perf_counter() - start)
    result["loop_s"] = float(np.median(times))
    result["ratio_loop_over_batched"] = result["loop_s"] / result["batched_s"]
    result["max_abs_update_difference"] = float(np.abs(looped - np.asarray(new_video)).max())
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
