"""The full true_batch model on every device JAX sees, in one command (see benchmarks/RESULTS.md).

    python benchmarks/accelerator.py --json_out accelerator.json      # at most 8 minutes
    python benchmarks/accelerator.py --roofline_only                   # the estimate on paper
    python benchmarks/accelerator.py --tiny --json_out /tmp/a.json     # CPU smoke, small model
"""

import json
import re
import statistics
import subprocess
import sys
import time

import common
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from dwise_jax import config as config_lib
from dwise_jax import optim, process_env, sharding, train_step
from dwise_jax.models.depthwise import resolve_impl
from dwise_jax.models.dwiseneuro import DwiseNeuro, count_parameters

ORIGINAL_SAMPLES_PER_S = 35  # the original, fp16 autocast, one RTX A6000 (configs/true_batch.py)
TINY_NEURONS = (37, 41, 29)  # --tiny: common.TINY_MODEL with three small readouts
# (device_kind pattern, name, bf16 TFLOP/s, f32 (TF32) TFLOP/s, TB/s), dense; first match wins.
PEAKS = [(r"h200", "H200", 989.4, 494.7, 4.8), (r"h100.*(pcie|nvl)", "H100 PCIe", 756, 378, 2.0),
         (r"h100", "H100 SXM", 989.4, 494.7, 3.35), (r"a100.*80", "A100 80GB", 312, 156, 2.0),
         (r"a100", "A100 40GB", 312, 156, 1.555), (r"l40s", "L40S", 362.1, 183, 0.864),
         (r"\bl4\b", "L4", 121, 60, 0.3), (r"a6000", "RTX A6000", 154.8, 77.4, 0.768),
         (r"v100", "V100", 15.7, 15.7, 0.9), (r"tpu v6", "TPU v6e", 918, 918, 1.64),
         (r"tpu v5 ?(lite|e)", "TPU v5e", 197, 197, 0.819), (r"tpu v5", "TPU v5p", 459, 459, 2.765),
         (r"tpu v4", "TPU v4", 275, 275, 1.2)]
TRAIN_PASSES, PARAM_PASSES = 7, 13  # estimated passes per step over each activation / parameter
COLUMNS = ("what: dtype: impl: per_device_batch:.0f devices: step_s:.3f samples_per_s:.1f "
           "samples_per_s_per_device:.1f xla_tflops_per_device:.2f mfu:.3f model_mfu:.3f "
           "peak_memory_gb:.1f xla_memory_gb:.1f compile_s:.1f status: reason:")
TINY_DEFAULTS = {"batch_sizes": (["32", "16", "8"], ["4", "2"]), "predict_batch": (32, 4),
                 "warmup": (3, 1), "steps": (5, 2)}  # flag: (default, with --tiny)


def peak_of(device_kind: str, override: list[str] | None = None) -> tuple | None:
    """(name, bf16 TFLOP/s, f32 TFLOP/s, TB/s) of a device_kind or `--peak_tflops`; else None."""
    peak = next((p[1:] for p in PEAKS if re.search(p[0], device_kind.lower())), None)
    if override:
        return ("--peak_tflops", *[float(v) for v in override * 2][:2], peak and peak[3])
    return peak


def roofline(arch: dict, parameters: int, batch: int = 32) -> dict:
    """Prints and returns bounds on paper of training samples/s (H100 SXM, RTX A6000) at `batch`."""
    c = common.part_costs(arch)
    parts = {"core": c["core"], "cortex": c["cortex"], "readout": c["readouts"][0]}
    elements = sum(p["elements"] for p in parts.values())
    flops, param_bytes = common.model_flops(arch, 0, backward=True), PARAM_PASSES * 4 * parameters
    out = {"per_sample": {k: {"forward_gflop": v["flops"] / 1e9, "activations_m": v["elements"]
                              / 1e6} for k, v in parts.items()}, "devices": {}, "batch": batch,
           "train_gflop_per_sample": flops / 1e9, "param_gb_per_step": param_bytes / 1e9,
           "parameters": parameters}
    for name, bf16, f32, tb in (p[1:] for p in PEAKS if p[1] in ("H100 SXM", "RTX A6000")):
        for dtype, peak, width in (("bfloat16", bf16, 2), ("float32", f32, 4)):
            step_bytes = batch * TRAIN_PASSES * width * elements + param_bytes
            compute, memory = peak * 1e12 / flops, tb * 1e12 * batch / step_bytes
            out["devices"][f"{name} {dtype}"] = {
                "gb_per_sample": TRAIN_PASSES * width * elements / 1e9, "compute_bound": compute,
                "flop_per_byte": flops * batch / step_bytes, "memory_bound": memory,
                "upper_bound": min(compute, memory)}
    print(f"On paper, per training sample (own readout): {flops / 1e9:.1f} GFLOP forward and "
          "backward (conv and matmul); forward:")
    common.print_table([{"part": k, **v} for k, v in out["per_sample"].items()],
                       "part: forward_gflop:.2f activations_m:.1f")
    print(f"Samples/s at most, per-device batch {batch} (the original: about "
          f"{ORIGINAL_SAMPLES_PER_S} on one RTX A6000):")
    rows = [{"device": k, **v} for k, v in out["devices"].items()]
    common.print_table(rows, "device: gb_per_sample:.2f flop_per_byte:.1f compute_bound:.0f "
                             "memory_bound:.0f upper_bound:.0f")
    return out


def synthetic_batch(batch: int, neurons) -> dict:
    """A training batch of the stream's format (dwise_jax.data.pipeline), mice balanced."""
    rng = np.random.default_rng(0)
    mouse = rng.permutation(np.arange(batch) % len(neurons)).astype(np.int32)
    mask = np.arange(max(neurons))[None, :] < np.asarray(neurons)[mouse][:, None]
    targets = rng.gamma(0.5, 1.0, size=(batch, 16, max(neurons)))
    frames, traces = common.windows(batch)
    return {"frames": frames, "traces": traces, "partner_traces": traces[::-1], "mouse": mouse,
            "neuron_mask": mask, "box": np.tile(np.int32([[10, 12, 40, 50]]), (batch, 1)),
            "targets": np.where(mask[:, None, :], targets, 0.0).astype(np.float32)}


def _memory(devices, key: str) -> float | None:
    """The largest `memory_stats()[key]` over the devices, in GB; None where there are none."""
    values = [s[key] for s in (d.memory_stats() for d in devices) if s and key in s]
    return max(values) / 1e9 if values else None


def _train(config, arch: dict, mesh, warmup: int, steps: int) -> dict:
    """The real train step of `config` on a synthetic batch: compile, then time."""
    o, b = config.optim, config.data.batch_size
    model = DwiseNeuro(**arch, dtype=jnp.dtype(config.model.compute_dtype),
                       rngs=nnx.Rngs(params=0, dropout=1))
    tx = optim.adamw(lambda step: optim.scaled_lr(o.base_lr, b), o.weight_decay)
    trainer = train_step.Trainer(model, tx, ema_decay=o.ema_decay, iter_size=o.iter_size)
    replicated = sharding.replicated(mesh)
    train, _ = train_step.jit_steps(trainer, replicated, sharding.batch_sharding(mesh))
    held = {"state": jax.device_put(trainer.init_state(), replicated)}
    batch = sharding.put_batch(synthetic_batch(b, arch["readout_outputs"]), mesh)
    start = time.perf_counter()
    compiled = train.lower(held["state"], batch).compile()
    m, cost = compiled.memory_analysis(), compiled.cost_analysis()
    out = {"compile_s": time.perf_counter() - start,  # XLA's: arguments, outputs, temporaries
           "xla_memory_gb": (m.argument_size_in_bytes + m.output_size_in_bytes
                             + m.temp_size_in_bytes - m.alias_size_in_bytes) / 1e9}
    flops = (cost[0] if isinstance(cost, list) else cost).get("flops", float("nan"))

    def step():
        held["state"], metrics = compiled(held["state"], batch)
        held["loss"] = jax.block_until_ready((held["state"], metrics))[1]["loss"]

    out["times_s"] = common.times(step, warmup, steps)
    return {**out, "xla_tflop_per_step_per_device": flops / 1e12, "loss": float(held["loss"]),
            "model_tflop_per_step": common.model_flops(arch, 0, backward=True) * b / 1e12}


def worker(fv: flags.FlagValues, a: dict) -> dict:
    """One attempt `a` in this fresh process: "probe", or "train" / "predict" at one batch."""
    devices = jax.devices()
    if a["what"] == "probe":
        return {"what": "probe", "status": "ok", "backend": jax.default_backend(),
                "count": len(devices), "kind": devices[0].device_kind,
                "memory_limit_gb": _memory(devices, "bytes_limit")}
    mesh, train, dtype = sharding.make_mesh(), a["what"] == "train", a.get("dtype", "float32")
    n = mesh.size
    glob = a["per_device_batch"] * n if train else a["global_batch"]
    out = {"what": a["what"], "dtype": dtype, "impl": resolve_impl(a["impl"]),
           "per_device_batch": glob / n, "global_batch": glob, "devices": n}
    if train and fv.fake_oom_above is not None and glob / n > fv.fake_oom_above:
        return {**out, "status": "oom", "reason": "--fake_oom_above"}
    config = config_lib.load_config_file(fv.config, {
        "model.compute_dtype": dtype, "model.depthwise_impl": a["impl"], "data.batch_size": glob,
        "data.val_batch_size": glob, **(common.TINY_MODEL if fv.tiny else {})})
    config_lib.validate(config, num_devices=n)
    arch = config_lib.model_kwargs(config, TINY_NEURONS if fv.tiny else common.NEURONS)
    try:
        out.update({"status": "ok", **(_train(config, arch, mesh, fv.warmup, fv.steps) if train
                    else common.time_forward(arch, glob, max(fv.warmup - 1, 0), fv.steps))})
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
            raise
        return {**out, "status": "oom", "reason": str(e).splitlines()[0][:300]}
    out["peak_memory_gb"] = _memory(mesh.devices.flat, "peak_bytes_in_use")
    t = out["step_s"] = statistics.median(out["times_s"])
    out.update(samples_per_s=glob / t, samples_per_s_per_device=glob / t / n)
    if train:
        out["xla_tflops_per_device"] = out["xla_tflop_per_step_per_device"] / t
        out["model_tflops_per_device"] = out["model_tflop_per_step"] / t / n
        if peak := peak_of(devices[0].device_kind, fv.peak_tflops):
            out["peak_tflops"] = peak[1 if dtype == "bfloat16" else 2]
            out["mfu"] = out["xla_tflops_per_device"] / out["peak_tflops"]
            out["model_mfu"] = out["model_tflops_per_device"] / out["peak_tflops"]
    return out


class Runner:
    """Starts the attempts, each in a worker subprocess, while the time limit leaves room."""

    def __init__(self, fv):
        self.fv, self.start = fv, time.monotonic()
        self.longest, self.attempts = 0.0, []

    def run(self, what: str, **fields) -> dict:
        row, left = {"what": what, **fields}, self.fv.time_limit_s - time.monotonic() + self.start
        if left < max(self.longest, 1.0):
            row.update(status="skipped", reason="time limit")
        else:
            started, spec = time.monotonic(), "--worker=" + json.dumps({"what": what, **fields})
            try:
                results, proc = common.run_worker(__file__, self.fv, spec, timeout=left)
                tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-12:])
                row = results[-1] if results else {**row, "status": "error", "reason": tail[-1500:]}
            except subprocess.TimeoutExpired:
                row.update(status="timeout", reason="time limit reached while running")
            row["wall_s"] = time.monotonic() - started
            self.longest = max(self.longest, row["wall_s"])
        self.attempts.append(row)
        print("  " + json.dumps({k: v for k, v in row.items() if k != "times_s"}), flush=True)
        return row


def measure(runner: Runner) -> dict:
    """Probe, then training and prediction attempts in order of importance."""
    fv, probe = runner.fv, runner.run("probe")
    if probe.get("status") != "ok":
        raise SystemExit(f"could not start JAX on the devices: {probe.get('reason')}")
    impls = sorted(fv.impls, key=lambda i: i != resolve_impl("auto", probe["backend"]))
    sizes = sorted(map(int, fv.batch_sizes), reverse=True)
    train, predicted, cap = [], [], sizes[0]
    for dtype in sorted(fv.dtypes, key=lambda d: d != "bfloat16"):
        first = None
        for impl in impls:  # auto's choice first; the largest batch that fits from first or cap
            for b in [b for b in sizes if b <= (first or cap)] or sizes[-1:]:
                row = runner.run("train", dtype=dtype, impl=impl, per_device_batch=b)
                if row["status"] != "oom":
                    break
            train.append(row)
            first = first or (row["per_device_batch"] if row["status"] == "ok" else None)
        cap = first if dtype == "bfloat16" and first else cap  # float32 needs more memory
        if not predicted:  # after the first (most important) dtype
            predicted = [runner.run("predict", impl=i, global_batch=fv.predict_batch)
                         for i in impls]
    return {"probe": probe, "train": train, "predict": predicted, "attempts": runner.attempts,
            "elapsed_s": time.monotonic() - runner.start}


def define_flags(fv: flags.FlagValues) -> None:
    f = {"flag_values": fv}
    flags.DEFINE_string("config", common.TRUE_BATCH, "the model's config file", **f)
    flags.DEFINE_list("batch_sizes", None, "per-device batches to try (default 32,16,8)", **f)
    flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "compute dtypes", **f)
    flags.DEFINE_list("impls", ["lax", "taps"], "depthwise implementations", **f)
    flags.DEFINE_integer("predict_batch", None, "global (default 32)", **f)
    flags.DEFINE_integer("warmup", None, "untimed calls (default 3)", **f)
    flags.DEFINE_integer("steps", None, "timed calls (default 5)", **f)
    flags.DEFINE_list("peak_tflops", None, "one value, or bfloat16,float32 (default: PEAKS)", **f)
    flags.DEFINE_float("time_limit_s", 480.0, "no attempt starts past this", **f)
    flags.DEFINE_string("json_out", "accelerator.json", "everything, as JSON", **f)
    flags.DEFINE_bool("tiny", False, "a small model; batch 4,2, predict 4, warmup 1, steps 2", **f)
    flags.DEFINE_bool("roofline_only", False, "the estimate on paper only", **f)
    flags.DEFINE_integer("fake_oom_above", None, "(tests) larger batches 'do not fit'", **f)
    flags.DEFINE_string("worker", None, "(internal) one attempt, as JSON", **f)


def run(fv: flags.FlagValues) -> int:
    process_env.reexec_with_cpu_settings()  # CPU-only settings; harmless elsewhere
    for name, values in TINY_DEFAULTS.items():
        fv[name].value = values[fv.tiny] if fv[name].value is None else fv[name].value
    if fv.worker:
        common.report(worker(fv, json.loads(fv.worker)))
        return 0
    jax.config.update("jax_platforms", "cpu")  # this process only (not os.environ: the workers')
    arch = common.arch(fv.config, common.NEURONS, common.TINY_MODEL if fv.tiny else None)
    paper = roofline(arch, count_parameters(**arch))
    if fv.roofline_only:
        return 0
    print(f"measuring (at most {fv.time_limit_s:.0f} s)...", flush=True)
    results = measure(Runner(fv))
    probe = results["probe"]
    peak = results["peak"] = peak_of(probe["kind"], fv.peak_tflops)
    print(f"\n{probe['count']} x {probe['kind']} ({probe['backend']}); peak (name, bfloat16, "
          f"float32 TFLOP/s, TB/s): {peak or 'unknown, pass --peak_tflops'}")
    common.print_table(results["train"] + results["predict"], COLUMNS)
    results.update(argv=sys.argv, tiny=fv.tiny, roofline=paper,
                   original_samples_per_s=ORIGINAL_SAMPLES_PER_S)
    with open(fv.json_out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {fv.json_out} ({results['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    common.main(__doc__, define_flags, run)
