"""A config's real train step (forward, loss, backward, AdamW, EMA; synthetic batch) of this
checkout against another checkout of the project, timed in alternating processes on the same
machine; see benchmarks/RESULTS.md ("The demo's train step").

    git worktree add /tmp/dwise_base 9eed6f6
    python benchmarks/step_speed.py --baseline /tmp/dwise_base --rounds 4
    python benchmarks/step_speed.py --baseline /tmp/dwise_base --config true_batch --batch 1

Each round starts one process per checkout, in turn (so a shared machine's load falls on both
alike); a process compiles, runs 2 untimed steps, then times `--steps` steps and reports their
median. The ratio is the baseline's median over all rounds against this checkout's.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags  # not common.py: a worker must import only its own checkout

REPO = Path(__file__).resolve().parents[1]


def worker(root: str, config_name: str, batch: int, steps: int) -> dict:
    """Imports the project at `root` and times its train step (the API both checkouts share)."""
    sys.path.insert(0, root)
    import jax
    import numpy as np
    from flax import nnx

    from dwise_jax import config as config_lib
    from dwise_jax import optim, train_step
    from dwise_jax.models.dwiseneuro import DwiseNeuro

    config = config_lib.load_config_file(f"{root}/configs/{config_name}.py")
    neurons = [300, 300, 300] if config_name == "demo" else [8000] * 10
    model = DwiseNeuro(**config_lib.model_kwargs(config, neurons),
                       rngs=nnx.Rngs(params=0, dropout=1))
    tx = optim.adamw(optim.lr_schedule(1e-3, 1e-5, 100, 1000), config.optim.weight_decay)
    trainer = train_step.Trainer(model, tx, ema_decay=config.optim.ema_decay)
    rng, b, n = np.random.default_rng(0), batch, max(neurons)
    frames = lambda: rng.uniform(0, 255, (b, 16, 36, 64)).astype(np.float32)
    traces = lambda: rng.normal(size=(b, 16, 4)).astype(np.float32)
    # The training batch of either layout (a key a checkout does not use is left unread).
    batch_arrays = {
        "frames": frames(), "traces": traces(), "partner_frames": frames(),
        "partner_traces": traces(), "box": np.tile(np.array([10, 40, 10, 40], np.int32), (b, 1)),
        "targets": rng.gamma(1.0, 1.0, (b, 16, n)).astype(np.float32),
        "mouse": (np.arange(b) % len(neurons)).astype(np.int32),
        "neuron_mask": np.ones((b, n), bool)}
    state, data = trainer.init_state(), jax.device_put(batch_arrays)
    train, _ = train_step.jit_steps(trainer)
    times, start = [], time.perf_counter()
    for _ in range(2 + steps):
        state, metrics = train(state, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
    return {"compile_s": times[0], "step_s": statistics.median(times[2:]),
            "loss": float(metrics["loss"])}


FLAGS = flags.FLAGS
flags.DEFINE_string("baseline", None, "another checkout of the project", required=True)
flags.DEFINE_string("config", "demo", "configs/NAME.py (of both checkouts)")
flags.DEFINE_integer("batch", None, "default: the config's batch size")
flags.DEFINE_integer("rounds", 3, "processes per checkout, alternating")
flags.DEFINE_integer("steps", 8, "timed steps per process")
flags.DEFINE_string("worker", None, "(internal) the checkout this process times")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    args = FLAGS
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.config, args.batch, args.steps)))
        return 0
    sys.path.insert(0, str(REPO))
    from dwise_jax import config as config_lib
    from dwise_jax import process_env

    batch = args.batch or config_lib.load_config_file(
        f"{REPO}/configs/{args.config}.py").data.batch_size
    env = process_env.cpu_environment(os.environ)  # the entry points' XLA and glibc settings
    results = {"baseline": [], "this": []}
    for r in range(args.rounds):
        for name, root in (("baseline", args.baseline), ("this", str(REPO))):
            cmd = [sys.executable, __file__, "--baseline", args.baseline, "--worker",
                   str(Path(root).resolve()), "--config",
                   args.config, "--batch", str(batch), "--steps", str(args.steps)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            lines = [ln[7:] for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if not lines:
                print(f"{name} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                return 1
            results[name].append(json.loads(lines[0]))
            row = results[name][-1]
            print(f"round {r} {name:8s} step {row['step_s']:.3f} s  "
                  f"compile {row['compile_s']:.1f} s"
                  f"  loss {row['loss']:.6g}", flush=True)
    base, this = (statistics.median(x["step_s"] for x in results[k])
                  for k in ("baseline", "this"))
    print(f"\n{args.config}, batch {batch}: baseline {base:.3f} s/step, this checkout "
          f"{this:.3f} s/step, {base / this:.2f}x")
    return 0


if __name__ == "__main__":
    app.run(main)
