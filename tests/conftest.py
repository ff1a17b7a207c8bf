"""Shared test set-up: absl flags for Grain, the fixtures of the original (tests/fixtures), a tiny
simulated dataset, the one measure for comparing gradients, and the helpers several test modules
use (tiny training command lines, fold folders of random models, processes to kill)."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx

from dwise_jax import atomic, checkpoint, cli, process_env, stop
from dwise_jax import config as config_lib
from dwise_jax.data import sensorium, windows
from dwise_jax.models.dwiseneuro import DwiseNeuro

# Grain's worker processes read absl flags; tests run without absl.app.run.
flags.FLAGS.mark_as_parsed()

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# Temporary folders of this run, inherited by the command lines the tests start (they get the
# environment) and removed when the run ends; a folder the caller names stays. The folds cache
# (not the user's ~/.cache), and one persistent XLA compilation cache: the many tiny trainings
# of the same model, in every test module, compile each program once, not once per process.
# Every process stores every program it compiles, the test processes too: a command line
# started after an in-process training of the same model loads its small programs as well.
_RUN_FOLDERS = []
for _variable, _prefix in (("DWISE_JAX_CACHE", "dwise_jax_test_cache-"),
                           ("JAX_COMPILATION_CACHE_DIR", "dwise_jax_test_xla_cache-")):
    if _variable not in os.environ:
        os.environ[_variable] = tempfile.mkdtemp(prefix=_prefix)
        _RUN_FOLDERS.append(os.environ[_variable])
# The entry points' XLA:CPU setting (process_env) in this process too, before JAX makes a
# backend: the tests then compile under the flags of the command lines they start (whose
# programs they can load from the run's cache: its key includes XLA_FLAGS, and the commands
# skip their re-exec), and run as the commands do.
os.environ.update(process_env.cpu_environment(os.environ))
# The suite runs in several worker processes (pytest-xdist): on a GPU, none may take 75% of
# its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# The command lines read these from the environment; jax, imported above, needs them set.
for _name, _value in (("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"]),
                      ("jax_persistent_cache_min_compile_time_secs", 0.0),
                      ("jax_persistent_cache_min_entry_size_bytes", 0)):
    os.environ.setdefault(_name.upper(), str(_value))
    jax.config.update(_name, _value)


def pytest_sessionfinish(session, exitstatus):
    for folder in _RUN_FOLDERS:
        shutil.rmtree(folder, ignore_errors=True)

# How long a child process (a command line under test) may run before the test calls it hung.
# Only a safety net against hangs, never a verdict on speed: the slowest of these runs takes
# about 2 minutes on the slower 2-core machines of the project's kind, and machines of that
# kind differ by 2-3x, so 30 minutes leaves a margin of 10x or more.
HANG_TIMEOUT_S = 1800


class _Arrays(dict):
    """An npz file's arrays, all read at once: no zip handle shared by tests and threads."""

    @property
    def files(self) -> list[str]:
        return list(self)


def _load_fixture(name: str):
    path = FIXTURES / name
    if not path.exists():
        pytest.fail(f"fixture {path} is missing: it ships with the repository (tests/fixtures)")
    with sensorium.NPY_LOCK, np.load(path, allow_pickle=False) as f:
        arrays = _Arrays((key, f[key]) for key in f.files)
    return arrays, json.loads(str(arrays["meta"]))


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


# --------------------------------------------------------------------------- shared helpers


REPO = Path(__file__).resolve().parents[1]


DEMO = str(REPO / "configs" / "demo.py")


TINY = {
    "model.core_features": (8, 8, 16), "model.spatial_strides": (2, 2, 2),
    "model.expansion_ratio": 2, "model.se_reduce_ratio": 4, "model.cortex_features": (32, 64),
    "data.batch_size": 4, "data.val_batch_size": 16, "data.train_epoch_size": 12,
    "optim.warmup_epochs": 1, "optim.cosine_epochs": 2, "log.every_steps": 2,
}


CLI_TINY = [f"--config.{k}={v if not isinstance(v, tuple) else ','.join(map(str, v))}"
            for k, v in TINY.items()]


def checkpoint_leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from checkpoint_leaves(v, f"{prefix}/{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from checkpoint_leaves(v, f"{prefix}/{i}")
    else:
        yield prefix, np.asarray(tree)


def best_step(directory) -> int | None:
    """The kept step with the best validation correlation, or None if none was validated."""
    with checkpoint.FoldCheckpoints(directory, create=False) as reader:
        return reader.manager.best_step()


FOLD = 2


def link_copy(src: Path, dst: Path) -> Path:
    """A copy of a dataset root made of hard links (fast); without `simulation/`, so training
    skips its baseline comparison. Rewrite a file only after `detach`ing it."""
    shutil.copytree(src, dst, copy_function=os.link,
                    ignore=shutil.ignore_patterns("simulation"))
    return dst


def detach(path: Path) -> Path:
    """Gives a hard-linked file its own inode, so changing it leaves the original alone."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)
    return path


def train_args(root: Path, workdir: Path, *extra: str) -> list[str]:
    """Arguments of the tiny demo training of fold FOLD (for `call_command("train", ...)`)."""
    return ["--config", DEMO, f"--data_root={root}", f"--workdir={workdir}", f"--folds={FOLD}",
            *CLI_TINY, *extra]


def train_command(root: Path, workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dwise_jax.train", *train_args(root, workdir, *extra)]


def command_env(*xla_flags: str) -> dict[str, str]:
    """The environment of a command line a test starts: this process's (the entry points' CPU
    settings, so no re-exec, and the run's caches), unbuffered output, extra XLA flags."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = " ".join([env["XLA_FLAGS"], *xla_flags])
    return env


class Child:
    """A process in its own session (SIGKILL reaches it and anything it started), its stdout
    collected line by line."""

    def __init__(self, command: list[str], env: dict[str, str], stderr: Path):
        self._stderr = stderr.open("w")
        self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.finish()

    def stop_inside_write(self, steps: Path) -> None:
        """Freezes the process (SIGSTOP) at a moment when a checkpoint write is unfinished:
        stop, look, and let it go on until a temporary step folder is there while it is frozen.
        Whether a random kill lands inside a write depends on the machine's speed; this does
        not."""
        while True:
            os.killpg(self.proc.pid, signal.SIGSTOP)
            if any(not p.name.isdigit() for p in steps.iterdir()):
                return
            os.killpg(self.proc.pid, signal.SIGCONT)
            time.sleep(0.001)

    def finish(self) -> None:
        self.proc.wait()
        self._reader.join()
        self._stderr.close()


def assert_bit_identical(a: dict, b: dict) -> None:
    flat_a, flat_b = dict(checkpoint_leaves(a)), dict(checkpoint_leaves(b))
    assert flat_a.keys() == flat_b.keys()
    for key, value in flat_a.items():
        other = flat_b[key]
        assert value.dtype == other.dtype and value.shape == other.shape, key
        assert value.tobytes() == other.tobytes(), f"{key} differs"


TEST_MODEL = dict(core_features=(4, 8), spatial_strides=(4, 2), expansion_ratio=1,
                  se_reduce_ratio=2, cortex_features=(16, 32), drop_rate=0.0, drop_path_rate=0.0)


def model_kwargs(readout_outputs, **overrides) -> dict:
    """DwiseNeuro's keyword arguments for these readouts: the base config's architecture
    (config.model_kwargs) with `overrides`, which must name DwiseNeuro arguments."""
    kwargs = config_lib.model_kwargs(config_lib.get_base_config(), readout_outputs)
    unknown = sorted(set(overrides) - set(kwargs))
    if unknown:
        raise TypeError(f"not DwiseNeuro arguments: {unknown}")
    return {**kwargs, **overrides}


def normwise(a, b) -> float:
    """pipeline.npz's measure: max|a - b| / max|b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def save_fold(workdir: Path, experiment: str, fold: int, kwargs: dict, mice: list[str],
              state, data_root: Path | None, step: int = 9) -> Path:
    """A fold folder as training or conversion leaves it (config.json only when trained)."""
    directory = checkpoint.fold_dir(workdir, experiment, fold)
    checkpoint.write_model_spec(directory, checkpoint.ModelSpec(  # trained: 3 epochs of 3 steps
        constructor=kwargs, mice=mice, source="test",
        extra={} if data_root is None else {"total_steps": 9}))
    checkpoint.save(directory, step, {"ema": jax.tree.map(np.asarray, nnx.to_pure_dict(state))})
    if data_root is not None:  # 3 epochs of 3 steps: step 9 is a finished run
        config = config_lib.load_config_file(str(REPO / "configs" / "demo.py"), {
            "data_root": str(data_root), "data.train_epoch_size": 12, "data.batch_size": 4,
            "optim.warmup_epochs": 1, "optim.cosine_epochs": 2})
        atomic.write_json(directory / "config.json", config.to_dict())
    return directory


def random_fold(workdir, experiment, fold, dataset, seed, neurons=None, mice=None):
    kwargs = model_kwargs(neurons or dataset.num_neurons, **TEST_MODEL)
    model = DwiseNeuro(**kwargs, rngs=nnx.Rngs(seed))
    return save_fold(workdir, experiment, fold, kwargs, mice or dataset.names,
                     nnx.state(model, (nnx.Param, nnx.BatchStat)), dataset.root)


# The model on a batch of windows, one readout: one program (eager, each op compiles alone).
_apply = nnx.jit(lambda model, x, index: model(x, readout_index=index), static_argnums=2)


def direct_blend(fold_dirs, mouse, trial, stride=1) -> np.ndarray:
    """Each fold model on every window of the trial (no batching code of ours), blended and
    averaged with plain NumPy: the original's predict_trial written out."""
    data = mouse.load_trial(trial)
    length = data.length
    anchors = windows.prediction_anchors(length, stride)
    x = np.stack([windows.expand_inputs(*windows.compact_window(
        data.video, data.behavior, data.pupil_center, a), xp=np) for a in anchors])
    blends = []
    for directory in fold_dirs:
        model, spec, _ = checkpoint.load_ema_model(directory)
        out = np.asarray(_apply(model, jnp.asarray(x), spec.mice.index(mouse.name)))
        sums, counts = np.zeros((mouse.num_neurons, length)), np.zeros(length)
        for anchor, window in zip(anchors, out, strict=True):
            frames = anchor - 30 + 2 * np.arange(16)
            sums[:, frames] += window.T
            counts[frames] += 1
        assert counts.min() >= 1
        blends.append(sums / counts)
    return np.mean(blends, axis=0)


def rel_err(a, b, scale: float = 0.0) -> float:
    """The fixture README's err: max|a - b| / max(max|b|, 1e-2 * scale)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-2 * scale))


def fixture_state_dict(arrays) -> dict[str, np.ndarray]:
    sd = {k[len("param/"):]: arrays[k] for k in arrays.files if k.startswith("param/")}
    sd.update({k[len("buffer/"):]: arrays[k] for k in arrays.files if k.startswith("buffer/")})
    return sd


def fixture_model(arrays, meta, **overrides) -> DwiseNeuro:
    """The model fixture's DwiseNeuro (its constructor arguments with `overrides`), the fixture's
    weights mapped by the converter (convert.state_from_torch) onto an abstract model: no random
    initialisation first. The fixtures' drop rates are 0, so there is no RNG state to make."""
    from dwise_jax.convert import state_from_torch

    graphdef, weights, rest = nnx.split(nnx.eval_shape(lambda: DwiseNeuro(
        **model_kwargs(**{**meta["constructor_kwargs"], **overrides}), rngs=nnx.Rngs(0))),
        (nnx.Param, nnx.BatchStat), ...)
    assert not jax.tree.leaves(rest)
    return nnx.merge(graphdef, state_from_torch(fixture_state_dict(arrays), weights), rest)


def fixture_loss(outputs, targets, mice_weights):
    """The fixture's loss in float32 (outputs and targets (batch, time, neurons))."""
    w = mice_weights / jnp.sum(mice_weights)
    loss = jnp.zeros((), jnp.float32)
    for i, (pred, target) in enumerate(zip(outputs, targets, strict=True)):
        per_sample = jnp.sum(pred - target * jnp.log(pred + 1e-8), axis=(1, 2))
        loss = loss + jnp.sum(jnp.where(w[:, i] != 0, w[:, i] * per_sample, 0.0))
    return loss


def q(path: Path) -> str:
    return re.escape(str(path))


def mouse_folder(root: Path) -> Path:
    return sorted(p for p in root.iterdir() if p.name.startswith("dynamic"))[0]


def call_command(module: str, args: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """`python -m dwise_jax.<module> ARGS` run in this process (`cli.call` with the module's
    errors and argument check), as the entry point runs it but for the stop handlers, which
    stay the test run's; returns the exit status (the output goes to capsys)."""
    command = importlib.import_module(f"dwise_jax.{module}")
    monkeypatch.setattr(stop, "install", lambda: None)
    return cli.call(command.define_flags, command.run, args, f"dwise_jax.{module}",
                    command.__doc__, command.ERRORS, getattr(command, "check_args", None))


# The tiny training's settings in the reference run and in the runs compared with it: every step
# logged, so metrics.jsonl holds each step's loss.
REFERENCE_EXTRA = ("--config.log.every_steps=1",)


@pytest.fixture(scope="session")
def reference_fold(sim_root, tmp_path_factory, worker_id) -> Path:
    """The fold folder of the tiny training of fold FOLD (`train_args(root, workdir,
    *REFERENCE_EXTRA)`), never interrupted, run in process: what the killed, refused and
    disk-full runs must end equal to. Made once per test run where it can be: the pytest-xdist
    workers share it through a file lock (their simulated datasets come from the same seed, so
    are equal); a worker that finds another one making it makes its own rather than wait."""
    import filelock

    def train(workdir: Path) -> Path:
        root = link_copy(sim_root, tmp_path_factory.mktemp("reference") / "root")
        with pytest.MonkeyPatch.context() as monkeypatch:
            assert call_command("train", train_args(root, workdir, *REFERENCE_EXTRA),
                                monkeypatch) == 0
        return checkpoint.fold_dir(workdir, "demo", FOLD)

    base = tmp_path_factory.getbasetemp()
    shared = base if worker_id == "master" else base.parent  # the run's folder, not the user's
    lock = filelock.FileLock(shared / "reference_run.lock")
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        return train(base / "own_reference_run")
    try:
        if not (shared / "reference_run.done").exists():
            shutil.rmtree(shared / "reference_run", ignore_errors=True)
            train(shared / "reference_run")
            (shared / "reference_run.done").touch()
    finally:
        lock.release()
    return checkpoint.fold_dir(shared / "reference_run", "demo", FOLD)


def run_module(module: str, args: list[str], env: dict[str, str] | None = None,
               cwd: Path = REPO):
    env = {**command_env(), **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=HANG_TIMEOUT_S)


def records(path: Path, skip: int = 0) -> list[dict]:
    """metrics.jsonl after its first `skip` lines (a line being written is ignored)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines()[skip:]:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def stream_config(seed: int = 0, **data):
    """An experiment config for a training stream: the base config with `seed` and these
    config.data fields (num_workers 0 unless given: load in the test's process)."""
    config = config_lib.get_base_config()
    config.seed = seed
    config.data.num_workers = 0
    config.data.update(data)
    return config


def competition_reference(preds: dict, targets: dict, cut: str = "baseline",
                          skip: int = 50) -> dict[str, np.ndarray]:
    """The single-trial correlation by its definition, all trials in memory (an independent
    reference for metrics.StreamingCorrelation): each trial (neurons, L) cut ("baseline": frames
    [skip:]; "submission": [:300][50:][:-1]), a mouse's trials concatenated along time, then per
    neuron r = mean(dx dy) / ((std x + 1e-8) (std y + 1e-8)), population std, in float64."""
    def keep(x):
        x = np.asarray(x, np.float64)
        return x[:, skip:] if cut == "baseline" else x[:, :300][:, 50:][:, :-1]

    out = {}
    for mouse in preds:
        p = np.concatenate([keep(x) for x in preds[mouse]], axis=1)
        t = np.concatenate([keep(x) for x in targets[mouse]], axis=1)
        dp, dt = p - p.mean(1, keepdims=True), t - t.mean(1, keepdims=True)
        out[mouse] = (dp * dt).mean(1) / ((p.std(1) + 1e-8) * (t.std(1) + 1e-8))
    return out
