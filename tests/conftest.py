"""Shared test set-up: absl flags for Grain, the fixture paths, a tiny simulated dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from absl import flags

# Grain's worker processes read absl flags; tests run without absl.app.run.
flags.FLAGS.mark_as_parsed()

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def _load_fixture(name: str):
    path = FIXTURES / name
    if not path.exists():
        pytest.fail(f"fixture {path} is missing: the repository expects ../shared beside it")
    f = np.load(path, allow_pickle=False)
    return f, json.loads(str(f["meta"]))


@pytest.fixture(scope="session")
def pipeline_fixture():
    """(arrays, meta) of ../shared/fixtures/pipeline.npz."""
    return _load_fixture("pipeline.npz")


@pytest.fixture(scope="session")
def small_model_fixture():
    """(arrays, meta) of ../shared/fixtures/dwiseneuro_small.npz."""
    return _load_fixture("dwiseneuro_small.npz")


@pytest.fixture(scope="session")
def full_core_fixture():
    """(arrays, meta) of ../shared/fixtures/dwiseneuro_full_core.npz."""
    return _load_fixture("dwiseneuro_full_core.npz")


@pytest.fixture(scope="session")
def sim_root(tmp_path_factory) -> Path:
    """A tiny simulated dataset in the real layout, generated once per test run."""
    from dwise_jax.data import synthetic

    root = tmp_path_factory.mktemp("sim") / "sensorium"
    synthetic.generate(root, mice=3, neurons=12, trials=40, frames=90, seed=0)
    return root
