"""Training-stream speed: samples per second with 0, 1 and 2 Grain workers.

Measures `TrainStream` batches (CutMix p = 0.5, so about half the samples also read a partner)
on a simulated dataset with real-size windows: 300-frame trials and 8000 neurons per mouse, so
that reading and padding the targets costs what it costs on the real data. The files are read
from the page cache after the warm-up (the real 148 GB may not be; see RESULTS.md).

    python benchmarks/loader_speed.py                   # generates /tmp/dwise_loader_bench once
    python benchmarks/loader_speed.py --root DIR --workers 0,2 --repeats 5 --device_put

Each row is the median of `--repeats` timed runs of `--batches` batches after `--warmup`
batches (worker start-up excluded); the spread is the min-max over the runs.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import jax
from absl import app, flags

from dwise_jax.data import pipeline, synthetic
from dwise_jax.data.sensorium import SensoriumDataset

FLAGS = flags.FLAGS
flags.DEFINE_string("root", "/tmp/dwise_loader_bench", "dataset root; generated when missing")
flags.DEFINE_integer("mice", 2, "simulated mice (when generating)")
flags.DEFINE_integer("trials", 30, "simulated trials per mouse (when generating)")
flags.DEFINE_integer("neurons", 8000, "simulated neurons per mouse (when generating)")
flags.DEFINE_integer("frames", 300, "simulated trial length (when generating)")
flags.DEFINE_integer("batch_size", 32, "batch size")
flags.DEFINE_list("workers", ["0", "1", "2"], "worker counts to measure")
flags.DEFINE_integer("read_threads", 2, "Grain read threads per process")
flags.DEFINE_integer("warmup", 10, "batches before timing")
flags.DEFINE_integer("batches", 100, "timed batches per run")
flags.DEFINE_integer("repeats", 3, "timed runs per worker count")
flags.DEFINE_bool("device_put", False, "also move each batch to the default device")


def _dataset() -> SensoriumDataset:
    root = Path(FLAGS.root)
    if not root.exists():
        print(f"generating {root} ...", flush=True)
        synthetic.generate(root, mice=FLAGS.mice, neurons=FLAGS.neurons, trials=FLAGS.trials,
                           frames=FLAGS.frames, seed=0)
    return SensoriumDataset.open(root)


def _run(stream: pipeline.TrainStream, count: int) -> float:
    """Seconds for `count` batches."""
    start = time.perf_counter()
    for _ in range(count):
        batch = next(stream)
        if FLAGS.device_put:
            jax.block_until_ready(jax.device_put(batch))
    return time.perf_counter() - start


def measure(dataset: SensoriumDataset, workers: int) -> list[float]:
    """Samples per second of each timed run."""
    config = pipeline.TrainStreamConfig(fold=0, batch_size=FLAGS.batch_size, num_workers=workers,
                                        read_threads=FLAGS.read_threads)
    rates = []
    with pipeline.TrainStream(dataset, config) as stream:
        _run(stream, FLAGS.warmup)
        for _ in range(FLAGS.repeats):
            rates.append(FLAGS.batches * FLAGS.batch_size / _run(stream, FLAGS.batches))
    return rates


def main(argv: list[str]) -> None:
    del argv
    dataset = _dataset()
    bytes_per_batch = sum(v.nbytes for v in next(pipeline.TrainStream(
        dataset, pipeline.TrainStreamConfig(fold=0, batch_size=FLAGS.batch_size))).values())
    print(f"{len(dataset.mice)} mice x {dataset.mice[0].num_neurons} neurons, batch "
          f"{FLAGS.batch_size} ({bytes_per_batch / 2**20:.1f} MiB on the host), "
          f"read_threads {FLAGS.read_threads}, device_put {FLAGS.device_put} "
          f"({jax.devices()[0].platform})")
    print("| workers | samples/s (median) | min - max | runs |")
    print("| --- | --- | --- | --- |")
    for workers in (int(w) for w in FLAGS.workers):
        rates = measure(dataset, workers)
        print(f"| {workers} | {statistics.median(rates):.0f} | {min(rates):.0f} - "
              f"{max(rates):.0f} | {len(rates)} x {FLAGS.batches} batches |", flush=True)


if __name__ == "__main__":
    app.run(main)
