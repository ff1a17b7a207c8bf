"""The first accelerator session in one command: the full true_batch model on the devices JAX sees.

    python benchmarks/accelerator.py --json_out accelerator.json      # at most 8 minutes
    python benchmarks/accelerator.py --roofline_only                   # the estimate on paper
    python benchmarks/accelerator.py --tiny --json_out /tmp/a.json     # CPU smoke, small model

Measures, over a data mesh of all devices (`sharding.make_mesh`, batches placed with
`sharding.put_batch`), with the project's own jitted steps on synthetic batches of the real
shapes (ten readouts with the real neuron counts, CutMix boxes):

- training (`train_step.jit_steps`: forward, loss, backward, AdamW, EMA, state donated), for
  bfloat16 and float32 compute and both depthwise implementations ("lax", "taps"): samples per
  second per device and in total at the largest per-device batch of `--batch_sizes` that fits
  (tried largest first; out of memory is XLA's RESOURCE_EXHAUSTED, or `memory_analysis()`
  asking for more than the device has left); the second implementation of a dtype starts at
  the first one's batch, so that both are compared at one batch, and float32 at bfloat16's;
- model FLOP utilisation: XLA's FLOPs of the compiled step (`cost_analysis()`, counted per
  device, times the devices) per second against the device's peak (`PEAKS`, or
  `--peak_tflops`), and the same with the architecture's conv and matmul FLOPs
  (`model_speed.model_flops`);
- peak device memory (`device.memory_stats()["peak_bytes_in_use"]`, the largest over the
  devices; None on CPU) and XLA's own estimate (`memory_analysis()`);
- the train step's compile time;
- prediction (`predict.forward`, float32, eval mode, one readout) in windows per second at a
  global batch of `--predict_batch` (32), for both implementations.

Every attempt runs in a fresh subprocess, so that each has its own peak memory and an
out-of-memory failure leaves nothing behind; the parent never starts an accelerator backend
(it runs on JAX's CPU backend). The work is ordered by importance (bfloat16 training, then
prediction, then float32 training); an attempt starts only while `--time_limit_s` (480 s)
leaves room for it (the longest attempt so far), and what is left is listed as skipped. Times
are medians of `--steps` calls after `--warmup` calls. One table is printed and everything,
the roofline estimate included, is written to `--json_out`.

Peaks (`PEAKS`): vendor datasheet values, dense (no structured sparsity), per device as JAX
counts devices. float32 uses the TF32 tensor-core rate on NVIDIA Ampere and later and the
bfloat16 rate on TPU, because JAX computes float32 matmuls and convolutions that way there by
default (docs.jax.dev, "Matmul precision"); the model's elementwise work runs in plain float32.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_speed import NEURONS, model_flops  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ORIGINAL_SAMPLES_PER_S = 35  # the original, fp16 autocast, one RTX A6000 (configs/true_batch.py)
# --tiny: a small core, cortex and three small readouts, for a CPU run in a few minutes.
TINY_MODEL = {"model.core_features": (8, 8, 16), "model.spatial_strides": (2, 2, 2),
              "model.expansion_ratio": 2, "model.se_reduce_ratio": 4,
              "model.cortex_features": (32, 64)}
TINY_NEURONS = (37, 41, 29)

# (pattern on device_kind, name, bfloat16 TFLOP/s, float32 TFLOP/s, memory TB/s): vendor
# datasheets, dense. First match wins. V100 has no bfloat16 tensor cores (its float32 rate).
PEAKS = [
    (r"h200", "H200", 989.4, 494.7, 4.8),
    (r"h100.*(pcie|nvl)", "H100 PCIe", 756.0, 378.0, 2.0),
    (r"h100", "H100 SXM", 989.4, 494.7, 3.35),
    (r"a100.*80", "A100 80GB", 312.0, 156.0, 2.0),
    (r"a100", "A100 40GB", 312.0, 156.0, 1.555),
    (r"l40s", "L40S", 362.1, 183.0, 0.864),
    (r"\bl4\b", "L4", 121.0, 60.0, 0.3),
    (r"a6000", "RTX A6000", 154.8, 77.4, 0.768),
    (r"v100", "V100", 15.7, 15.7, 0.9),
    (r"tpu v6", "TPU v6e", 918.0, 918.0, 1.64),
    (r"tpu v5 ?(lite|e)", "TPU v5e", 197.0, 197.0, 0.819),
    (r"tpu v5", "TPU v5p", 459.0, 459.0, 2.765),
    (r"tpu v4", "TPU v4", 275.0, 275.0, 1.2),
]
H100 = ("H100 SXM", 989.4, 494.7, 3.35)
A6000 = ("RTX A6000", 154.8, 77.4, 0.768)


def peak_of(device_kind: str) -> tuple[str, float, float, float] | None:
    """(name, bf16 TFLOP/s, f32 TFLOP/s, TB/s) of a JAX device_kind, or None if unknown."""
    for pattern, name, bf16, f32, bw in PEAKS:
        if re.search(pattern, device_kind.lower()):
            return name, bf16, f32, bw
    return None


# --------------------------------------------------------------------------------- on paper

# Passes over each materialised activation per training step, an estimate: forward 3 (written,
# read for the train-mode BatchNorm statistics, read by the next op), backward 4 (the saved
# activation, the incoming gradient, BatchNorm's gradient reductions, the outgoing gradient).
TRAIN_PASSES = 7
# 4-byte passes over every parameter per step: forward and backward reads, gradient write,
# AdamW (read parameter, gradient and two moments, write parameter and moments: 7), EMA (3).
PARAM_PASSES = 13


def part_costs(arch: dict, frames: int = 16, size: int = 64) -> dict[str, dict[str, int]]:
    """Forward conv and matmul FLOPs and materialised activation elements per sample of the
    core, the cortex and one readout (a training sample runs its own readout only)."""
    t, h = frames, size
    feats, strides = arch["core_features"], arch["spatial_strides"]
    k2, kt, e = arch["spatial_kernel"] ** 2, arch["temporal_kernel"], arch["expansion_ratio"]
    core = {"flops": 2 * t * h * h * arch["in_channels"] * feats[0],
            "elements": t * h * h * (arch["in_channels"] + feats[0])}
    for i, c_in in enumerate(feats):
        c_out, mid = feats[i + 1] if i + 1 < len(feats) else c_in, c_in * e
        before = t * h * h
        h = -(-h // strides[i])
        after = t * h * h
        core["flops"] += 2 * before * c_in * mid + 2 * after * mid * (k2 + kt + c_out)
        # input + position, expansion, spatial, temporal, SE-scaled, projection, block output
        core["elements"] += before * (c_in + mid) + after * (3 * mid + 2 * c_out)
    widths, g = (feats[-1], *arch["cortex_features"]), arch["groups"]
    cortex = {"flops": sum(2 * t * a * b // g for a, b in pairwise(widths)),
              "elements": t * widths[0] + sum(2 * t * b for b in widths[1:])}
    n = arch["readout_outputs"][0]
    readout = {"flops": 2 * t * widths[-1] * math.ceil(n / g),
               "elements": 2 * t * math.ceil(n / g) * g}
    return {"core": core, "cortex": cortex, "readout": readout}


def roofline(arch: dict, parameters: int, batch: int = 32) -> dict:
    """Upper bounds of training samples/s on an H100 SXM and an RTX A6000 (the original's GPU)
    from FLOPs and bytes per sample, at a per-device batch of `batch`."""
    parts = part_costs(arch)
    elements = sum(p["elements"] for p in parts.values())
    train_flops = model_flops(arch["readout_outputs"], **_flop_arch(arch), readouts=0,
                              backward=True)
    out = {"per_sample": {k: {"forward_gflop": v["flops"] / 1e9,
                              "activations_m": v["elements"] / 1e6} for k, v in parts.items()},
           "train_gflop_per_sample": train_flops / 1e9, "parameters": parameters,
           "param_gb_per_step": PARAM_PASSES * 4 * parameters / 1e9, "batch": batch,
           "devices": {}}
    for name, bf16, f32, bw in (H100, A6000):
        for dtype, peak, width in (("bfloat16", bf16, 2), ("float32", f32, 4)):
            act_bytes = TRAIN_PASSES * width * elements
            step_bytes = batch * act_bytes + PARAM_PASSES * 4 * parameters
            compute = peak * 1e12 / train_flops
            memory = bw * 1e12 * batch / step_bytes
            out["devices"][f"{name} {dtype}"] = {
                "peak_tflops": peak, "tb_per_s": bw, "gb_per_sample": act_bytes / 1e9,
                "flop_per_byte": train_flops * batch / step_bytes,
                "compute_bound": compute, "memory_bound": memory,
                "upper_bound": min(compute, memory)}
    return out


def _flop_arch(arch: dict) -> dict:
    keys = ("in_channels", "core_features", "spatial_strides", "spatial_kernel",
            "temporal_kernel", "expansion_ratio", "se_reduce_ratio", "cortex_features", "groups")
    return {k: arch[k] for k in keys}


def print_roofline(r: dict) -> None:
    print(f"On paper, per training sample (own readout), per-device batch {r['batch']}:")
    for part, v in r["per_sample"].items():
        print(f"  {part:8s} forward {v['forward_gflop']:7.2f} GFLOP, "
              f"{v['activations_m']:7.1f} M activations materialised")
    print(f"  training {r['train_gflop_per_sample']:.1f} GFLOP/sample (conv and matmul, fwd + "
          f"bwd); {TRAIN_PASSES} passes over each activation; parameters "
          f"{r['parameters'] / 1e6:.1f} M, {r['param_gb_per_step']:.1f} GB per step")
    for name, d in r["devices"].items():
        print(f"  {name:20s} {d['gb_per_sample']:5.2f} GB/sample, {d['flop_per_byte']:5.1f} "
              f"FLOP/byte: compute-bound {d['compute_bound']:7.0f}, memory-bound "
              f"{d['memory_bound']:6.0f}, so at most {d['upper_bound']:6.0f} samples/s")
    print(f"  (the original: about {ORIGINAL_SAMPLES_PER_S} samples/s on one RTX A6000)")


# ---------------------------------------------------------------------------------- workers


def _config(args, dtype: str, impl: str, global_batch: int):
    from dwise_jax import config as config_lib

    overrides = {"model.compute_dtype": dtype, "model.depthwise_impl": impl,
                 "data.batch_size": global_batch, "data.val_batch_size": global_batch}
    if args.tiny:
        overrides.update(TINY_MODEL)
    return config_lib.load_config_file(str(args.config), overrides)


def _neurons(args) -> tuple[int, ...]:
    return TINY_NEURONS if args.tiny else NEURONS


def synthetic_batch(batch: int, neurons, seed: int = 0) -> dict:
    """A training batch of the stream's format (dwise_jax.data.pipeline), mice balanced."""
    import numpy as np

    rng = np.random.default_rng(seed)
    mouse = rng.permutation(np.arange(batch) % len(neurons)).astype(np.int32)
    mask = np.arange(max(neurons))[None, :] < np.asarray(neurons)[mouse][:, None]
    targets = rng.gamma(0.5, 1.0, size=(batch, 16, max(neurons))).astype(np.float32)
    frames = lambda: rng.uniform(0, 255, size=(batch, 16, 36, 64)).astype(np.float32)
    traces = lambda: rng.normal(size=(batch, 16, 4)).astype(np.float32)
    return {"frames": frames(), "traces": traces(), "partner_frames": frames(),
            "partner_traces": traces(),
            "box": np.tile(np.array([[10, 12, 40, 50]], np.int32), (batch, 1)),
            "mouse": mouse, "targets": np.where(mask[:, None, :], targets, 0.0),
            "neuron_mask": mask}


def _devices() -> dict:
    import jax

    devices = jax.devices()
    return {"backend": jax.default_backend(), "count": len(devices),
            "kind": devices[0].device_kind, "kinds": sorted({d.device_kind for d in devices}),
            "memory_limit_gb": _memory(devices, "bytes_limit")}


def _memory(devices, key: str) -> float | None:
    """The largest `memory_stats()[key]` over the devices, in GB; None where there are none."""
    values = [(d.memory_stats() or {}).get(key) for d in devices]
    values = [v for v in values if v is not None]
    return max(values) / 1e9 if values else None


def _is_oom(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _times(fn, warmup: int, steps: int) -> list[float]:
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def train_worker(args) -> dict:
    """One (dtype, depthwise implementation, per-device batch) of the real train step."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dwise_jax import config as config_lib
    from dwise_jax import optim, sharding, train_step
    from dwise_jax.models.depthwise import resolve_impl
    from dwise_jax.models.dwiseneuro import DwiseNeuro

    mesh = sharding.make_mesh()
    n, b = mesh.size, args.batch
    out = {"what": "train", "dtype": args.dtype, "impl": resolve_impl(args.impl),
           "per_device_batch": b, "global_batch": b * n, "devices": n}
    if args.fake_oom_above is not None and b > args.fake_oom_above:
        return {**out, "status": "oom", "reason": "--fake_oom_above"}
    config = _config(args, args.dtype, args.impl, b * n)
    config_lib.validate(config, num_devices=n)
    neurons = _neurons(args)
    kwargs = config_lib.model_kwargs(config, neurons)
    model = DwiseNeuro(**kwargs, dtype=jnp.dtype(args.dtype), rngs=nnx.Rngs(params=0, dropout=1))
    o, d = config.optim, config.data
    per_epoch = d.train_epoch_size // d.batch_size
    schedule = optim.lr_schedule(optim.scaled_lr(o.base_lr, d.batch_size),
                                 optim.scaled_lr(o.min_lr, d.batch_size),
                                 o.warmup_epochs * per_epoch, o.cosine_epochs * per_epoch)
    trainer = train_step.Trainer(model, optim.adamw(schedule, o.weight_decay),
                                 ema_decay=o.ema_decay, iter_size=o.iter_size, seed=0)
    del model
    replicated = sharding.replicated(mesh)
    train, _ = train_step.jit_steps(trainer, replicated, sharding.batch_sharding(mesh))
    state = jax.device_put(trainer.init_state(), replicated)
    batch = sharding.put_batch(synthetic_batch(b * n, neurons), mesh)
    try:
        start = time.perf_counter()
        compiled = train.lower(state, batch).compile()
        out["compile_s"] = time.perf_counter() - start
        m = compiled.memory_analysis()
        out["xla_memory_gb"] = (m.argument_size_in_bytes + m.output_size_in_bytes
                                + m.temp_size_in_bytes - m.alias_size_in_bytes) / 1e9
        free = [(s["bytes_limit"] - s["bytes_in_use"]) for s in
                (dev.memory_stats() for dev in mesh.devices.flat) if s and "bytes_limit" in s]
        new = m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        if free and new > min(free):
            return {**out, "status": "oom",
                    "reason": f"memory_analysis: {new / 1e9:.1f} GB more, {min(free) / 1e9:.1f} "
                              "GB free"}
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        holder = {"state": state}

        def step():
            holder["state"], metrics = compiled(holder["state"], batch)
            holder["loss"] = jax.block_until_ready((holder["state"], metrics))[1]["loss"]

        times = _times(step, args.warmup, args.steps)
    except jax.errors.JaxRuntimeError as e:
        if not _is_oom(e):
            raise
        return {**out, "status": "oom", "reason": str(e).splitlines()[0][:300]}
    median = float(np.median(times))
    flops = float(cost.get("flops", float("nan")))  # per device: XLA analyses one partition
    model_step = model_flops(neurons, **_flop_arch(kwargs), readouts=0, backward=True) * b * n
    return {**out, "status": "ok", "times_s": [round(t, 4) for t in times], "step_s": median,
            "samples_per_s": b * n / median, "samples_per_s_per_device": b / median,
            "xla_tflop_per_step_per_device": flops / 1e12,
            "model_tflop_per_step": model_step / 1e12,
            "peak_memory_gb": _memory(mesh.devices.flat, "peak_bytes_in_use"),
            "loss": float(holder["loss"])}


def predict_worker(args) -> dict:
    """Prediction windows per second: `predict.forward`, float32, one readout."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dwise_jax import config as config_lib
    from dwise_jax import predict, sharding
    from dwise_jax.models.depthwise import resolve_impl
    from dwise_jax.models.dwiseneuro import DwiseNeuro

    mesh = sharding.make_mesh()
    out = {"what": "predict", "dtype": "float32", "impl": resolve_impl(args.impl),
           "per_device_batch": args.batch / mesh.size, "global_batch": args.batch,
           "devices": mesh.size}
    config = _config(args, "float32", args.impl, args.batch)
    model = DwiseNeuro(**config_lib.model_kwargs(config, _neurons(args)), dtype=jnp.float32,
                       rngs=nnx.Rngs(0))
    model.eval()
    fold = predict.FoldModel.of(model, mesh)
    del model
    rng = np.random.default_rng(0)
    placed = sharding.put_batch(
        {"frames": rng.uniform(0, 255, (args.batch, 16, 36, 64)).astype(np.float32),
         "traces": rng.normal(size=(args.batch, 16, 4)).astype(np.float32)}, mesh)
    run = lambda: jax.block_until_ready(predict.forward(fold, placed["frames"], placed["traces"],
                                                        0))
    try:
        start = time.perf_counter()
        run()
        out["compile_s"] = time.perf_counter() - start  # the first call: compile and run
        times = _times(run, max(args.warmup - 1, 0), args.steps)
    except jax.errors.JaxRuntimeError as e:
        if not _is_oom(e):
            raise
        return {**out, "status": "oom", "reason": str(e).splitlines()[0][:300]}
    median = float(np.median(times))
    return {**out, "status": "ok", "times_s": [round(t, 4) for t in times], "step_s": median,
            "samples_per_s": args.batch / median,
            "samples_per_s_per_device": args.batch / median / mesh.size,
            "peak_memory_gb": _memory(mesh.devices.flat, "peak_bytes_in_use")}


# ----------------------------------------------------------------------------------- parent


class Runner:
    """Starts the worker subprocesses within the time limit and keeps every attempt."""

    def __init__(self, args, env: dict[str, str]):
        self.args, self.env = args, env
        self.start = time.monotonic()
        self.longest = 0.0
        self.attempts: list[dict] = []

    def left(self) -> float:
        return self.args.time_limit_s - (time.monotonic() - self.start)

    def run(self, what: str, **fields) -> dict:
        row = {"what": what, **{k: v for k, v in fields.items() if k != "batch"}}
        if what == "train":
            row["per_device_batch"] = fields["batch"]
        elif "batch" in fields:
            row["global_batch"] = fields["batch"]
        if self.left() < max(self.longest, 1.0):
            row.update(status="skipped", reason="time limit")
            self.attempts.append(row)
            print(f"  skipped ({self.left():.0f} s left): {row}", flush=True)
            return row
        a = self.args
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", what,
               "--config", str(a.config), "--warmup", str(a.warmup), "--steps", str(a.steps)]
        cmd += ["--tiny"] * a.tiny
        if a.fake_oom_above is not None:
            cmd += ["--fake_oom_above", str(a.fake_oom_above)]
        for key, value in fields.items():
            cmd += [f"--{key}", str(value)]
        started = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env,
                                  timeout=max(self.left(), 1.0), check=False)
        except subprocess.TimeoutExpired:
            row.update(status="timeout", reason="time limit reached while running")
        else:
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if lines:
                row = json.loads(lines[-1][len("RESULT "):])
            else:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
                row.update(status="error", reason=" | ".join(tail)[-1500:])
        row["wall_s"] = time.monotonic() - started
        self.longest = max(self.longest, row["wall_s"])
        self.attempts.append(row)
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                 if k != "times_s"}
        print(f"  {shown}", flush=True)
        return row


def search(runner: Runner, dtype: str, impl: str, sizes: list[int]) -> dict:
    """The largest per-device batch of `sizes` (descending) whose train step fits."""
    row = {}
    for b in sizes or [min(runner.args.batch_sizes)]:
        row = runner.run("train", dtype=dtype, impl=impl, batch=b)
        if row["status"] != "oom":
            return row
    return row


def measure(args, env: dict[str, str]) -> dict:
    runner = Runner(args, env)
    probe = runner.run("probe")
    if probe.get("status") != "ok":
        raise SystemExit(f"could not start JAX on the devices: {probe.get('reason')}")
    backend = probe["backend"]
    impls = sorted(args.impls, key=lambda i: i != _auto_impl(backend))  # auto's choice first
    sizes = sorted(args.batch_sizes, reverse=True)
    train, predict, cap = [], [], None
    dtypes = sorted(args.dtypes, key=lambda d: d != "bfloat16")
    for i, dtype in enumerate(dtypes):
        first = None
        for impl in impls:
            start_at = first if first is not None else cap
            row = search(runner, dtype, impl, [b for b in sizes if start_at is None
                                                or b <= start_at])
            train.append(row)
            if row["status"] == "ok" and first is None:
                first = row["per_device_batch"]
        if first is not None and dtype == "bfloat16":
            cap = first  # float32 needs at least bfloat16's memory
        if i == 0:  # prediction after the first (most important) dtype
            predict = [runner.run("predict", impl=impl, batch=args.predict_batch)
                       for impl in impls]
    return {"probe": probe, "train": train, "predict": predict, "attempts": runner.attempts,
            "elapsed_s": time.monotonic() - runner.start}


def _auto_impl(backend: str) -> str:
    from dwise_jax.models.depthwise import resolve_impl

    return resolve_impl("auto", backend)


def add_utilisation(results: dict, peak: tuple[str, float, float, float] | None) -> None:
    for row in results["train"]:
        if row.get("status") != "ok":
            continue
        per_s = 1.0 / row["step_s"]
        row["xla_tflops_per_device"] = row["xla_tflop_per_step_per_device"] * per_s
        row["model_tflops_per_device"] = row["model_tflop_per_step"] * per_s / row["devices"]
        if peak is not None:
            p = peak[1] if row["dtype"] == "bfloat16" else peak[2]
            row["peak_tflops"] = p
            row["mfu"] = row["xla_tflops_per_device"] / p
            row["model_mfu"] = row["model_tflops_per_device"] / p


def print_table(results: dict) -> None:
    head = (f"{'what':7s} {'dtype':8s} {'dw':4s} {'b/dev':>5s} {'dev':>3s} {'step s':>7s} "
            f"{'samples/s':>9s} {'/device':>8s} {'TFLOP/s':>8s} {'MFU':>6s} {'model MFU':>9s} "
            f"{'peak GB':>7s} {'XLA GB':>6s} {'compile s':>9s}  status")
    print(head)
    fmt = lambda v, f: "-" if v is None else format(v, f)
    for r in results["train"] + results["predict"]:
        b = r.get("per_device_batch")
        b = None if b is None else int(b)
        print(f"{r['what']:7s} {r.get('dtype', '-'):8s} {r.get('impl', '-'):4s} "
              f"{fmt(b, '5d'):>5s} {fmt(r.get('devices'), '3d'):>3s} "
              f"{fmt(r.get('step_s'), '7.3f'):>7s} {fmt(r.get('samples_per_s'), '9.1f'):>9s} "
              f"{fmt(r.get('samples_per_s_per_device'), '8.1f'):>8s} "
              f"{fmt(r.get('xla_tflops_per_device'), '8.2f'):>8s} "
              f"{fmt(r.get('mfu'), '6.3f'):>6s} {fmt(r.get('model_mfu'), '9.3f'):>9s} "
              f"{fmt(r.get('peak_memory_gb'), '7.1f'):>7s} "
              f"{fmt(r.get('xla_memory_gb'), '6.1f'):>6s} "
              f"{fmt(r.get('compile_s'), '9.1f'):>9s}  {r['status']} {r.get('reason', '')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "true_batch.py")
    parser.add_argument("--batch_sizes", type=int, nargs="+",
                        help="per-device batches to try, largest first (default 32 16 8; "
                             "--tiny: 4 2)")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"],
                        choices=["bfloat16", "float32"])
    parser.add_argument("--impls", nargs="+", default=["lax", "taps"], choices=["lax", "taps"])
    parser.add_argument("--predict_batch", type=int, help="global (default 32; --tiny: 4)")
    parser.add_argument("--warmup", type=int, help="untimed calls (default 3; --tiny: 1)")
    parser.add_argument("--steps", type=int, help="timed calls (default 5; --tiny: 2)")
    parser.add_argument("--peak_tflops", type=float, nargs="+",
                        help="the device's peak: one value for both dtypes, or bfloat16 then "
                             "float32 (default: PEAKS by device kind)")
    parser.add_argument("--time_limit_s", type=float, default=480.0)
    parser.add_argument("--json_out", type=Path, default=Path("accelerator.json"))
    parser.add_argument("--tiny", action="store_true",
                        help="a small model and batches, to check the script on a CPU")
    parser.add_argument("--roofline_only", action="store_true")
    parser.add_argument("--fake_oom_above", type=int, help=argparse.SUPPRESS)  # tests
    parser.add_argument("--worker", choices=["probe", "train", "predict"], help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--impl", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    small = args.tiny
    args.batch_sizes = args.batch_sizes or ([4, 2] if small else [32, 16, 8])
    args.predict_batch = args.predict_batch or (4 if small else 32)
    args.warmup = (1 if small else 3) if args.warmup is None else args.warmup
    args.steps = args.steps or (2 if small else 5)

    from dwise_jax import process_env

    process_env.reexec_with_cpu_settings()  # CPU-only settings; harmless elsewhere

    if args.worker:
        if args.worker == "probe":
            result = {"what": "probe", "status": "ok", **_devices()}
        else:
            result = (train_worker if args.worker == "train" else predict_worker)(args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    env = dict(os.environ)  # the workers'; this process stays on JAX's CPU backend
    os.environ["JAX_PLATFORMS"] = "cpu"
    from dwise_jax import config as config_lib
    from dwise_jax.models.dwiseneuro import count_parameters

    config = _config(args, "float32", "auto", 32)
    arch = config_lib.model_kwargs(config, NEURONS)
    paper = roofline(arch, count_parameters(**arch))
    print_roofline(paper)
    if args.roofline_only:
        return
    print(f"measuring (at most {args.time_limit_s:.0f} s)...", flush=True)
    results = measure(args, env)
    probe = results["probe"]
    peak = peak_of(probe["kind"])
    if args.peak_tflops:
        bf16, f32 = (args.peak_tflops * 2)[:2]
        peak = ("--peak_tflops", bf16, f32, peak[3] if peak else float("nan"))
    add_utilisation(results, peak)
    peak_text = ("unknown (pass --peak_tflops)" if peak is None
                 else f"{peak[1]:g} / {peak[2]:g} TFLOP/s bfloat16 / float32 ({peak[0]})")
    print()
    print(f"{probe['count']} x {probe['kind']} ({probe['backend']}); peak {peak_text}; the "
          f"original: about {ORIGINAL_SAMPLES_PER_S} samples/s on one RTX A6000")
    print_table(results)
    results.update(argv=sys.argv, tiny=args.tiny, roofline=paper,
                   peak={"source": None if peak is None else peak[0],
                         "bfloat16_tflops": None if peak is None else peak[1],
                         "float32_tflops": None if peak is None else peak[2]},
                   original_samples_per_s=ORIGINAL_SAMPLES_PER_S)
    args.json_out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.json_out} ({results['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    main()
