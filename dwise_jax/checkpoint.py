"""Checkpoints of one fold of one experiment, on disk under `<workdir>/<experiment>/fold_<k>/`.

Layout of a fold folder:

    model.json           what prediction needs to rebuild the network: the DwiseNeuro
                         constructor arguments, the mice (readout order) with their neuron
                         counts, and where the weights came from (trained here, or converted
                         from one of the original's .pth files)
    checkpoints/<step>/  an Orbax composite checkpoint. Item `ema` is the EMA model state
                         (parameters and BatchNorm statistics, as a nested dict of arrays), the
                         weights that validation and prediction use, as in the original.
                         Training adds its own items (optimizer state, step, loader state).

Orbax writes each step under a temporary name and renames it when complete, so a crash during a
write leaves the previous step readable. Each complete step then gets `manifest.json` (the size
and SHA-256 of every file in it, written atomically): a step whose files were truncated or
changed afterwards is detected when it is restored, reported, and the newest step before it
that verifies is used instead. `checkpoints/` keeps the last two steps for that reason.
"""

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
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from dwise_jax import atomic

MODEL_SPEC_FILE = "model.json"
CHECKPOINTS_DIR = "checkpoints"
MANIFEST_FILE = "manifest.json"
# checkpoints/ keeps the latest step and the one before it (the fallback if the latest is bad).
KEEP_LATEST = 2
MODEL_SPEC_FORMAT = "dwise_jax.model_spec/1"


class CheckpointError(RuntimeError):
    """A fold folder or checkpoint is missing, unreadable, or does not fit what was asked."""


def fold_dir(workdir: str | os.PathLike, experiment: str, fold: int) -> Path:
    """The folder of fold `fold` of `experiment`: `<workdir>/<experiment>/fold_<fold>`."""
    return Path(workdir) / experiment / f"fold_{fold}"


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild a fold's network.

    Attributes:
      constructor: keyword arguments of `DwiseNeuro` (as JSON: tuples become lists), without
        `rngs` and `dtype`. `readout_outputs` holds the neuron count of each readout.
      mice: mouse folder names in readout order (same length as `readout_outputs`).
      source: where the weights came from, e.g. "trained" or "converted from model-017-....pth".
      extra: free-form provenance (original epoch and val_corr of a converted file, ...).
    """

    constructor: dict[str, Any]
    mice: list[str]
    source: str
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        outputs = self.constructor.get("readout_outputs")
        if outputs is None or len(outputs) != len(self.mice):
            raise CheckpointError(
                f"model spec has {len(self.mice)} mice but readout_outputs={outputs!r}"
            )

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
        return ModelSpec(
            constructor=raw["constructor"],
            mice=list(raw["mice"]),
            source=raw["source"],
            extra=raw.get("extra", {}),
        )
    except KeyError as e:
        raise CheckpointError(f"{path}: missing field {e}") from None


def _manager(directory: Path, max_to_keep: int | None, create: bool,
             subdir: str = CHECKPOINTS_DIR) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
    # Orbax refuses relative paths ("Checkpoint path should be absolute"), and the default
    # workdir of every command is the relative "workdir".
    return ocp.CheckpointManager((Path(directory) / subdir).absolute(), options=options)


def save(directory: str | os.PathLike, step: int, items: dict[str, Any],
         max_to_keep: int | None = KEEP_LATEST, subdir: str = CHECKPOINTS_DIR) -> None:
    """Saves named pytrees (e.g. {"ema": ...}) as step `step` of a fold folder, synchronously,
    then writes the step's manifest.

    `subdir` selects the series: `checkpoints` (the latest, for resume and prediction) or
    another, e.g. `best` (the best validation correlation).
    """
    step_dir = Path(directory) / subdir / str(step)
    try:
        mngr = _manager(Path(directory), max_to_keep, create=True, subdir=subdir)
        args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
        mngr.save(step, args=ocp.args.Composite(**args), force=True)
        mngr.wait_until_finished()
        mngr.close()
    except Exception as e:
        # Orbax/TensorStore report a full disk as a ValueError naming errno 28 in its text.
        if "No space left on device" in str(e) or "os_error_code='28'" in str(e):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(step_dir)) from e
        raise
    if jax.process_index() == 0:  # Orbax saved collectively; one process writes the manifest
        atomic.write_json(step_dir / MANIFEST_FILE, _file_digests(step_dir))
    _barrier(f"manifest_{subdir}_{step}")


def _barrier(name: str) -> None:
    """Waits for every process (no-op on one): nobody reads a step before its manifest."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


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


def verify(directory: str | os.PathLike, step: int, subdir: str = CHECKPOINTS_DIR) -> str | None:
    """Checks a step against its manifest: None if it matches (or has no manifest, as steps
    written before manifests existed), else what is wrong, naming the file."""
    step_dir = Path(directory) / subdir / str(step)
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


def all_steps(directory: str | os.PathLike, subdir: str = CHECKPOINTS_DIR) -> list[int]:
    """The complete steps of a fold folder's series, newest first."""
    path = Path(directory) / subdir
    if not path.is_dir():
        return []
    mngr = _manager(Path(directory), None, create=False, subdir=subdir)
    steps = sorted(mngr.all_steps(), reverse=True)
    mngr.close()
    return steps


def latest_step(directory: str | os.PathLike, subdir: str = CHECKPOINTS_DIR) -> int | None:
    """The newest complete step of a fold folder's series, or None if it has none."""
    steps = all_steps(directory, subdir)
    return steps[0] if steps else None


def restore(directory: str | os.PathLike, names: tuple[str, ...] = ("ema",),
            step: int | None = None, targets: dict[str, Any] | None = None,
            subdir: str = CHECKPOINTS_DIR) -> tuple[int, dict[str, Any]]:
    """Restores named items of a fold folder's checkpoint.

    Args:
      directory: the fold folder.
      names: which items to read.
      step: which step. When None, the newest step that verifies and restores: a corrupted
        newer step is reported on stderr and skipped.
      targets: optional abstract trees (jax.ShapeDtypeStruct leaves, with shardings where
        wanted) per item name; without one an item comes back as NumPy arrays.

    Returns:
      (step, {name: tree}).
    """
    directory = Path(directory)
    steps = all_steps(directory, subdir) if step is None else [step]
    if not steps:
        raise CheckpointError(f"{directory / subdir}: no checkpoint found")
    problems = []
    for candidate in steps:
        try:
            items = _restore_step(directory, candidate, names, targets or {}, subdir)
        except CheckpointError as e:
            if step is not None:
                raise
            problems.append(str(e))
            print(f"warning: skipping a bad checkpoint: {e}", file=sys.stderr)
            continue
        if problems:
            print(f"warning: using step {candidate} of {directory / subdir} instead",
                  file=sys.stderr)
        return candidate, items
    raise CheckpointError(f"{directory / subdir}: no readable checkpoint ({'; '.join(problems)})")


def _restore_step(directory: Path, step: int, names: tuple[str, ...], targets: dict[str, Any],
                  subdir: str) -> dict[str, Any]:
    problem = verify(directory, step, subdir)
    if problem is not None:
        raise CheckpointError(problem)
    mngr = _manager(directory, None, create=False, subdir=subdir)
    args = {name: ocp.args.StandardRestore(targets.get(name)) for name in names}
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(**args))
    except (FileNotFoundError, KeyError, ValueError, OSError) as e:
        raise CheckpointError(
            f"{directory / subdir / str(step)}: cannot restore {list(names)} ({e})"
        ) from None
    finally:
        mngr.close()
    return {name: restored[name] for name in names}


def _fit(expected: dict, stored: dict, where: str = "") -> dict:
    """`stored` in the structure of `expected` (Orbax gives keys back as strings, e.g. readout
    indexes), or ValueError naming the first entry that is missing, extra or of another shape."""
    if not isinstance(stored, dict):
        raise ValueError(f"{where} is an array, the architecture has parameters under it")
    names = {str(k): k for k in stored}
    missing = sorted(str(k) for k in expected if str(k) not in names)
    extra = sorted(set(names) - {str(k) for k in expected})
    if missing or extra:
        raise ValueError(f"{where or '/'}: missing {missing}, unexpected {extra}")
    out = {}
    for key, value in expected.items():
        found, name = stored[names[str(key)]], f"{where}/{key}"
        if isinstance(value, dict):
            out[key] = _fit(value, found, name)
        elif isinstance(found, dict) or tuple(found.shape) != tuple(value.shape):
            shape = "a subtree" if isinstance(found, dict) else f"shape {tuple(found.shape)}"
            raise ValueError(f"{name} has {shape}, the architecture needs {tuple(value.shape)}")
        else:
            out[key] = found
    return out


def load_ema_model(directory: str | os.PathLike, dtype: Any = None, step: int | None = None):
    """The EMA model of a fold folder, ready for prediction (eval mode).

    Args:
      directory: the fold folder (holding model.json and checkpoints/).
      dtype: compute dtype (float32 by default); parameters are float32 whatever it is.
      step: which checkpoint step; the newest when None.

    Returns:
      (model, spec, step).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dwise_jax.models.dwiseneuro import DwiseNeuro

    spec = read_model_spec(directory)
    model = DwiseNeuro(**spec.constructor, dtype=dtype or jnp.float32, rngs=nnx.Rngs(0))
    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    # Read as stored, then fitted here: restoring into the model's shapes would make a
    # mismatch look like a damaged step (and send restore() to an older one).
    step, items = restore(directory, ("ema",), step=step)
    expected = nnx.to_pure_dict(state)
    try:
        weights = _fit(expected, items["ema"])
    except ValueError as e:
        raise CheckpointError(
            f"{Path(directory) / CHECKPOINTS_DIR / str(step)}: its EMA weights do not fit the "
            f"architecture in {MODEL_SPEC_FILE} ({e})") from None
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda w, e: jnp.asarray(w, e.dtype),
                                                 weights, expected))
    nnx.update(model, state)
    model.eval()
    return model, spec, step
