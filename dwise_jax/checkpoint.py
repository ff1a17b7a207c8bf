"""Checkpoints of one fold of one experiment, under `<workdir>/<experiment>/fold_<k>/`:
`model.json` (how to rebuild the network) and Orbax steps `checkpoints/<step>/` (item `ema`;
training adds `state` and `loader`), each with a SHA-256 `manifest.json`. Layout and retention
policy: docs/design.md#one-way-to-do-each-thing."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as cm

from dwise_jax import atomic
from dwise_jax import config as config_lib
from dwise_jax.models.dwiseneuro import DwiseNeuro

MODEL_SPEC_FILE = "model.json"
CHECKPOINTS_DIR = "checkpoints"
MANIFEST_FILE = "manifest.json"
KEEP_LATEST = 2  # the latest step and the one before it (the fallback if the latest is bad)
MODEL_SPEC_FORMAT = "dwise_jax.model_spec/1"


class CheckpointError(RuntimeError):
    """A fold folder or checkpoint is missing, unreadable, or does not fit what was asked."""


def fold_dir(workdir: str | os.PathLike, experiment: str, fold: int) -> Path:
    """The folder of fold `fold` of `experiment`: `<workdir>/<experiment>/fold_<fold>`."""
    return Path(workdir) / experiment / f"fold_{fold}"


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild a fold's network: `DwiseNeuro`'s keyword arguments as JSON
    (no `rngs`, `dtype`; `readout_outputs` holds each readout's neuron count), the mice in readout
    order, where the weights came from ("trained", "converted from ...") and free provenance."""

    constructor: dict[str, Any]
    mice: list[str]
    source: str
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        outputs = self.constructor.get("readout_outputs")
        if outputs is None or len(outputs) != len(self.mice):
            raise CheckpointError(
                f"model spec has {len(self.mice)} mice but readout_outputs={outputs!r}")

    @property
    def num_neurons(self) -> list[int]:
        return [int(n) for n in self.constructor["readout_outputs"]]


def write_model_spec(directory: str | os.PathLike, spec: ModelSpec) -> Path:
    """Writes `model.json` into a fold folder atomically and returns its path."""
    path = Path(directory) / MODEL_SPEC_FILE
    atomic.write_json(path, {"format": MODEL_SPEC_FORMAT, **asdict(spec)})
    return path


def read_model_spec(directory: str | os.PathLike) -> ModelSpec:
    """Reads a fold folder's `model.json`, with a clear error when missing or malformed."""
    path = Path(directory) / MODEL_SPEC_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; is {directory} a dwise_jax fold folder?")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if raw.get("format") != MODEL_SPEC_FORMAT:
        raise CheckpointError(f"{path}: unknown format {raw.get('format')!r}")
    try:
        return ModelSpec(raw["constructor"], list(raw["mice"]), raw["source"],
                         raw.get("extra", {}))
    except KeyError as e:
        raise CheckpointError(f"{path}: missing field {e}") from None


def _val_corr(metrics: dict) -> float:
    return float(metrics["val_corr"])


class FoldCheckpoints:
    """The Orbax CheckpointManager of a fold's `checkpoints/`: keeps the latest two steps and the
    best validated one; a context manager."""

    def __init__(self, directory: str | os.PathLike, create: bool = True):
        # Orbax refuses relative paths, and every command's default workdir is "workdir".
        self.path = (Path(directory) / CHECKPOINTS_DIR).absolute()
        policy = cm.AnyPreservationPolicy([
            cm.LatestN(n=KEEP_LATEST),
            cm.BestN(get_metric_fn=_val_corr, n=1, keep_checkpoints_without_metrics=False)])
        self.manager = ocp.CheckpointManager(self.path, options=ocp.CheckpointManagerOptions(
            create=create, preservation_policy=policy, best_fn=_val_corr, best_mode="max",
            enable_async_checkpointing=False))

    def save(self, step: int, items: dict[str, Any], val_corr: float | None = None) -> None:
        """Saves named pytrees as step `step`, then its manifest; `val_corr` (None/NaN: not
        validated) ranks the step as best."""
        step_dir = self.path / str(step)
        metrics = None if val_corr is None or val_corr != val_corr else {"val_corr": val_corr}
        try:
            args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
            self.manager.save(step, args=ocp.args.Composite(**args), metrics=metrics,
                              force=True)
            self.manager.wait_until_finished()
        except Exception as e:
            # Orbax/TensorStore report a full disk as a ValueError naming errno 28 in its text.
            if "No space left on device" in str(e) or "os_error_code='28'" in str(e):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(step_dir)) from e
            raise
        if jax.process_index() == 0:  # Orbax saved collectively; one process writes this
            atomic.write_json(step_dir / MANIFEST_FILE, _file_digests(step_dir))
        if jax.process_count() > 1:  # nobody reads a step before its manifest
            multihost_utils.sync_global_devices(f"manifest_{step}")

    def close(self) -> None:
        self.manager.close()

    def __enter__(self) -> FoldCheckpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save(directory: str | os.PathLike, step: int, items: dict[str, Any],
         val_corr: float | None = None) -> None:
    """One step saved into a fold folder (see FoldCheckpoints.save)."""
    with FoldCheckpoints(directory) as checkpoints:
        checkpoints.save(step, items, val_corr)


def _file_digests(step_dir: Path) -> dict[str, list]:
    """{relative path: [size, sha256]} of every file of a step folder but the manifest."""
    digests = {}
    for path in sorted(p for p in step_dir.rglob("*") if p.is_file()):
        relative = path.relative_to(step_dir).as_posix()
        if relative == MANIFEST_FILE or path.name.startswith("."):
            continue
        with open(path, "rb") as f:
            digests[relative] = [path.stat().st_size, hashlib.file_digest(f, "sha256").hexdigest()]
    return digests


def verify(directory: str | os.PathLike, step: int) -> str | None:
    """Checks a step against its manifest: None if it matches (or has no manifest, as steps
    written before manifests existed), else what is wrong, naming the file."""
    step_dir = Path(directory) / CHECKPOINTS_DIR / str(step)
    manifest = step_dir / MANIFEST_FILE
    if not manifest.is_file():
        return None
    try:
        expected = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"{manifest}: unreadable ({e})"
    found = _file_digests(step_dir)
    for name, (size, digest) in expected.items():
        if name not in found:
            return f"{step_dir / name}: missing"
        if found[name][0] != size:
            return f"{step_dir / name}: {found[name][0]} bytes, expected {size} (truncated?)"
        if found[name][1] != digest:
            return f"{step_dir / name}: content changed since it was written (checksum mismatch)"
    return None


def all_steps(directory: str | os.PathLike) -> list[int]:
    """The complete steps of a fold folder, newest first."""
    with FoldCheckpoints(directory, create=False) as reader:
        return sorted(reader.manager.all_steps(), reverse=True)


def latest_step(directory: str | os.PathLike) -> int | None:
    """The newest complete step of a fold folder, or None if it has none."""
    return next(iter(all_steps(directory)), None)


def restore(directory: str | os.PathLike, names: tuple[str, ...] = ("ema",),
            step: int | None = None, targets: dict[str, Any] | None = None,
            ) -> tuple[int, dict[str, Any]]:
    """Named items of a step as (step, {name: tree}); `step=None`: the newest that verifies and
    restores (damaged newer steps reported on stderr). `targets`: abstract trees per name
    (ShapeDtypeStruct leaves, with shardings where wanted); without one, NumPy arrays."""
    series = Path(directory) / CHECKPOINTS_DIR
    steps = all_steps(directory) if step is None else [step]
    if not steps:
        raise CheckpointError(f"{series}: no checkpoint found")
    args = ocp.args.Composite(**{name: ocp.args.StandardRestore((targets or {}).get(name))
                                 for name in names})
    problems = []
    with FoldCheckpoints(directory, create=False) as reader:
        for candidate in steps:
            problem = verify(directory, candidate)
            if problem is None:
                try:
                    restored = reader.manager.restore(candidate, args=args)
                    if problems:
                        print(f"warning: using step {candidate} of {series} instead",
                              file=sys.stderr)
                    return candidate, {name: restored[name] for name in names}
                except (FileNotFoundError, KeyError, ValueError, OSError) as e:
                    problem = (f"{reader.path / str(candidate)}: cannot restore {list(names)} "
                               f"({e})")
            if step is not None:
                raise CheckpointError(problem)
            problems.append(problem)
            print(f"warning: skipping a bad checkpoint: {problem}", file=sys.stderr)
    raise CheckpointError(f"{series}: no readable checkpoint ({'; '.join(problems)})")


def read_ema(directory: str | os.PathLike, expected: dict[str, Any], step: int | None = None,
             ) -> tuple[int, dict[str, Any]]:
    """(step, {"params", "batch_stats"}) of a step's EMA (None: the newest readable; either
    layout) in the structure, dtypes and shardings of `expected`. Read as stored, then fitted:
    restoring into the model's shapes would make a mismatch look like a damaged step."""
    step, items = restore(directory, ("ema",), step=step)
    stored = items["ema"]
    try:
        if set(stored) == set(expected):
            weights = _fit(expected, stored)
        else:  # the merged tree: each part takes its own leaves
            weights = {name: _fit(part, stored, partial=True) for name, part in expected.items()}
    except ValueError as e:
        raise CheckpointError(
            f"{Path(directory) / CHECKPOINTS_DIR / str(step)}: its EMA weights do not fit the "
            f"architecture in {MODEL_SPEC_FILE} ({e})") from None
    return step, weights


def _fit(expected: dict, stored: dict, where: str = "", partial: bool = False) -> dict:
    """`stored` in the structure of `expected` (Orbax gives keys back as strings, e.g. readout
    indexes), or ValueError naming the first entry that is missing, extra (unless `partial`)
    or of another shape."""
    if not isinstance(stored, dict):
        raise ValueError(f"{where} is an array, the architecture has parameters under it")
    names = {str(k): k for k in stored}
    missing = sorted(str(k) for k in expected if str(k) not in names)
    extra = [] if partial else sorted(set(names) - {str(k) for k in expected})
    if missing or extra:
        raise ValueError(f"{where or '/'}: missing {missing}, unexpected {extra}")
    out = {}
    for key, value in expected.items():
        found, name = stored[names[str(key)]], f"{where}/{key}"
        if isinstance(value, dict):
            out[key] = _fit(value, found, name, partial)
        elif isinstance(found, dict) or tuple(found.shape) != tuple(value.shape):
            shape = "a subtree" if isinstance(found, dict) else f"shape {tuple(found.shape)}"
            raise ValueError(f"{name} has {shape}, the architecture needs {tuple(value.shape)}")
        else:
            out[key] = jax.device_put(np.asarray(found, value.dtype),
                                      getattr(value, "sharding", None))
    return out


def load_ema_model(directory: str | os.PathLike, dtype: Any = None, step: int | None = None):
    """(the EMA model of a fold folder in eval mode, its ModelSpec, its step); `dtype` is the
    compute dtype (float32 by default), parameters are float32 whatever it is."""
    spec = read_model_spec(directory)
    # A setting added since the folder was written (e.g. depthwise_impl) takes the config's
    # default; every stored one stays as stored.
    defaults = config_lib.model_kwargs(config_lib.get_base_config(), spec.num_neurons)
    # Shapes only (no random initialisation, which costs seconds of compilation for nothing):
    # the stored weights fill them; the dropout RNG state, unused in eval mode, is made here.
    graphdef, params, batch_stats, rest = nnx.split(nnx.eval_shape(lambda: DwiseNeuro(
        **{**defaults, **spec.constructor}, dtype=dtype or jnp.float32, rngs=nnx.Rngs(0))),
        nnx.Param, nnx.BatchStat, ...)
    states = {"params": params, "batch_stats": batch_stats}
    step, weights = read_ema(directory, {k: nnx.to_pure_dict(v) for k, v in states.items()},
                             step)
    for name, state in states.items():
        nnx.replace_by_pure_dict(state, weights[name])
    rest = jax.tree.map(lambda a: jax.random.key(0) if jax.dtypes.issubdtype(
        a.dtype, jax.dtypes.prng_key) else jnp.zeros(a.shape, a.dtype), rest)
    model = nnx.merge(graphdef, params, batch_stats, rest)
    model.eval()
    return model, spec, step
