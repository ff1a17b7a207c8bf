"""Training-stream samples/s with 0, 1 and 2 Grain workers (benchmarks/RESULTS.md, "Loader").

    python benchmarks/loader_speed.py --repeats 5      # generates /tmp/dwise_loader_bench once
    python benchmarks/loader_speed.py --root DIR --workers 0,2 --repeats 5 --device_put
"""

import statistics
from pathlib import Path

import common
import jax
from absl import flags

from dwise_jax import config as config_lib
from dwise_jax.data import pipeline, synthetic
from dwise_jax.data.sensorium import SensoriumDataset


def _seconds(stream: pipeline.TrainStream, count: int, device_put: bool) -> float:
    put = jax.device_put if device_put else lambda batch: batch
    return sum(common.times(lambda: jax.block_until_ready(put(next(stream))), 0, count))


def define_flags(fv: flags.FlagValues) -> None:
    f = {"flag_values": fv}
    flags.DEFINE_string("root", "/tmp/dwise_loader_bench", "dataset; simulated if missing", **f)
    flags.DEFINE_integer("batch_size", 32, "batch size", **f)
    flags.DEFINE_list("workers", ["0", "1", "2"], "worker counts to measure", **f)
    flags.DEFINE_integer("read_threads", 2, "Grain read threads per process", **f)
    flags.DEFINE_integer("warmup", 10, "batches before timing", **f)
    flags.DEFINE_integer("batches", 100, "timed batches per run", **f)
    flags.DEFINE_integer("repeats", 3, "timed runs per worker count", **f)
    flags.DEFINE_bool("device_put", False, "also move each batch to the default device", **f)


def run(fv: flags.FlagValues) -> int:
    if not Path(fv.root).exists():
        print(f"generating {fv.root} ...", flush=True)
        synthetic.generate(fv.root, mice=2, neurons=8000, trials=30, frames=300, seed=0)
    dataset = SensoriumDataset.open(fv.root)
    config = config_lib.get_base_config()
    config.data.update(batch_size=fv.batch_size, num_workers=0)
    size = sum(v.nbytes for v in next(pipeline.TrainStream(dataset, config, fold=0)).values())
    print(f"{len(dataset.mice)} mice x {dataset.mice[0].num_neurons} neurons, batch "
          f"{fv.batch_size} ({size / 2**20:.1f} MiB on the host), read_threads "
          f"{fv.read_threads}, device_put {fv.device_put} ({jax.devices()[0].platform})")
    print("| workers | samples/s (median) | min - max | runs |\n| --- | --- | --- | --- |")
    for workers in map(int, fv.workers):
        config.data.num_workers = workers
        with pipeline.TrainStream(dataset, config, fold=0, read_threads=fv.read_threads) as stream:
            _seconds(stream, fv.warmup, fv.device_put)
            rates = [fv.batches * fv.batch_size / _seconds(stream, fv.batches, fv.device_put)
                     for _ in range(fv.repeats)]
        print(f"| {workers} | {statistics.median(rates):.0f} | {min(rates):.0f} - "
              f"{max(rates):.0f} | {len(rates)} x {fv.batches} batches |", flush=True)
    return 0


if __name__ == "__main__":
    common.main(__doc__, define_flags, run)
