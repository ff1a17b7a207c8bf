"""`python checkpoint_writer.py FOLD_DIR FIRST_STEP`: saves checkpoints of large arrays at steps
FIRST_STEP, FIRST_STEP + 1, ... through `dwise_jax.checkpoint.save`, back to back, printing
"saved <step>" after each, until it is killed (tests/test_reliability.py kills it mid-write).

The arrays of a step are `expected_tree(step)`: the test knows what every step must hold.
"""

import sys

import numpy as np

from dwise_jax import checkpoint

# About 24 MiB per step: each write takes long enough that a random kill usually lands in it.
SHAPES = {"core": (1024, 2048), "cortex": (2048, 1024), "readout": (512, 2048)}


def expected_tree(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {name: rng.standard_normal(shape, dtype=np.float32) + np.float32(step)
            for name, shape in SHAPES.items()}


def main() -> None:
    directory, step = sys.argv[1], int(sys.argv[2])
    while True:
        checkpoint.save(directory, step, {"ema": expected_tree(step),
                                          "meta": {"step": np.int64(step)}})
        print(f"saved {step}", flush=True)
        step += 1


if __name__ == "__main__":
    main()
