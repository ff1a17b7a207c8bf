"""Shared test set-up: absl flags for Grain, the fixtures of the original (tests/fixtures), a tiny
simulated dataset, and the one measure for comparing gradients."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from absl import flags

# Grain's worker processes read absl flags; tests run without absl.app.run.
flags.FLAGS.mark_as_parsed()

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# The folds cache of every test and of the command lines they start (which inherit the
# environment) goes to one folder of this run, not the user's ~/.cache.
os.environ.setdefault("DWISE_JAX_CACHE", tempfile.mkdtemp(prefix="dwise_jax_test_cache-"))

# How long a child process (a command line under test) may run before the test calls it hung.
# Only a safety net against hangs, never a verdict on speed: the slowest of these runs takes
# about 2 minutes on the slower 2-core machines of the project's kind, and machines of that
# kind differ by 2-3x, so 30 minutes leaves a margin of 10x or more.
HANG_TIMEOUT_S = 1800


def _load_fixture(name: str):
    path = FIXTURES / name
    if not path.exists():
        pytest.fail(f"fixture {path} is missing: it ships with the repository (tests/fixtures)")
    f = np.load(path, allow_pickle=False)
    return f, json.loads(str(f["meta"]))


@pytest.fixture(scope="session")
def pipeline_fixture():
    """(arrays, meta) of tests/fixtures/pipeline.npz."""
    return _load_fixture("pipeline.npz")


@pytest.fixture(scope="session")
def small_model_fixture():
    """(arrays, meta) of tests/fixtures/dwiseneuro_small.npz."""
    return _load_fixture("dwiseneuro_small.npz")


@pytest.fixture(scope="session")
def full_core_fixture():
    """(arrays, meta) of tests/fixtures/dwiseneuro_full_core_lean.npz: the true_batch core at
    full size, with a smaller cortex and readouts."""
    return _load_fixture("dwiseneuro_full_core_lean.npz")


@pytest.fixture(scope="session")
def sim_root(tmp_path_factory) -> Path:
    """A tiny simulated dataset in the real layout, generated once per test run."""
    from dwise_jax.data import synthetic

    root = tmp_path_factory.mktemp("sim") / "sensorium"
    synthetic.generate(root, mice=3, neurons=12, trials=40, frames=90, seed=0)
    return root


def gradient_errors(got, want) -> dict[str, float]:
    """Per-leaf error of gradient tree `got` against `want`, in the measure that stays meaningful
    for gradients that are zero in exact arithmetic:

        err = max|got - want| / max(max|want|, 1e-2 * G),  G = the largest |want| of any leaf.

    A BatchNorm bias that feeds another train-mode BatchNorm has a zero gradient in exact
    arithmetic (the next BatchNorm removes any per-channel shift); both trees then hold float
    round-off there, which differs with the machine's instruction set, and an error relative to
    the leaf's own size would compare noise with noise. Against 1e-2 G, an error below 1e-3
    bounds such leaves absolutely (1e-5 G), and any other leaf relatively.
    """
    import jax

    flat_got = dict(jax.tree_util.tree_leaves_with_path(got))
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
    assert flat_got.keys() == flat_want.keys()
    peak = {k: float(np.max(np.abs(np.asarray(v, np.float64)), initial=0.0))
            for k, v in flat_want.items()}
    scale = max(peak.values())
    assert scale > 0, "every gradient is zero: nothing to compare"
    errors = {}
    for key, value in flat_want.items():
        diff = np.abs(np.asarray(flat_got[key], np.float64) - np.asarray(value, np.float64))
        errors[jax.tree_util.keystr(key)] = float(np.max(diff, initial=0.0)) / max(
            peak[key], 1e-2 * scale)
    return errors
