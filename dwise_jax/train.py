"""`python -m dwise_jax.train --config CONFIG [--folds 0,3] [--workdir DIR]`: train the folds.

Each fold k trains on the other six and validates on k with the original's recipe
(docs/original.md#training), writing under `<workdir>/<experiment>/fold_<k>/`. A run resumes
from its latest checkpoint by itself; a stop request (SIGTERM, Ctrl-C) ends it at once before
the first step, later after saving. Fold folders, stopping, `--profile_steps`, `--dump_hlo`:
docs/training.md.
"""

from __future__ import annotations

import os
from pathlib import Path

from absl import flags, logging
from ml_collections import config_flags

from dwise_jax import cli, fatal, fold_run, process_env, sharding, stop
from dwise_jax import config as config_lib

ERRORS = fold_run.USER_ERRORS  # the user's to fix: one `error:` line, exit 1


def define_flags(fv: flags.FlagValues) -> None:
    config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. "
                                    "configs/true_batch.py.", flag_values=fv, lock_config=True)
    for name, help_text in (("workdir", "Work folder (overrides config.workdir)."),
                            ("data_root", "Dataset root (overrides config.data_root)."),
                            ("folds", "Comma-separated folds (overrides config.folds)."),
                            ("profile_steps", "START:END steps to trace.")):
        flags.DEFINE_string(name, None, help_text, flag_values=fv)
    flags.DEFINE_bool("dump_hlo", False, "Write the optimised HLO of the train step.",
                      flag_values=fv)
    flags.DEFINE_integer("max_steps", None, "Stop each fold after this many steps (smoke runs; "
                         "the schedule is kept).", flag_values=fv)


def train_and_evaluate(config, workdir: str | Path, *, folds: list[int] | None = None,
                       **options) -> dict[int, float]:
    """Trains the given folds (default: config.folds) one after the other; returns {fold:
    val_corr of its last epoch's EMA weights}."""
    return {fold: fold_run.train_fold(config, Path(workdir), fold, **options)
            for fold in (folds if folds is not None else config.folds)}


def _parse_profile(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        start, end = (int(v) for v in text.split(":"))
    except ValueError:
        raise cli.UsageError(f"--profile_steps must be START:END, got {text!r}") from None
    if not 0 <= start < end:
        raise cli.UsageError(f"--profile_steps needs 0 <= START < END, got {text!r}")
    return start, end


def _parse_folds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(k) for k in text.split(","))
    except ValueError:
        raise config_lib.ConfigError(
            f"--folds takes comma-separated fold numbers, e.g. 0,3; got {text!r}") from None


def check_workdir(workdir: str | Path) -> None:
    """Raises ConfigError unless `workdir` is, or can be made as, a writable folder; checked
    before anything is read or written, so a bad --workdir costs nothing."""
    path = Path(workdir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise config_lib.ConfigError(f"workdir {path}: cannot be made, {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise config_lib.ConfigError(f"workdir {path}: {existing} is not writable")


def check_args(args: list[str]) -> None:
    """A missing --config file and a `--config.KEY=...` override of a key that names no setting
    are one-line errors (ml_collections raises them as tracebacks)."""
    args = args[:args.index("--")] if "--" in args else args
    for arg, following in zip(args, [*args[1:], ""], strict=True):
        name, _, value = arg.lstrip("-").partition("=")
        if not arg.startswith("-"):
            continue
        if name == "config":
            value = value or following  # config_flags allows FILE:ARGUMENT
            if value and not Path(value.split(":")[0]).is_file():
                raise config_lib.ConfigError(f"--config {value}: no such config file")
        elif name.startswith("config."):
            try:
                config_lib.check_keys([name[len("config."):]])
            except config_lib.ConfigError as e:
                raise config_lib.ConfigError(f"--{name}: {e}") from None


def run(fv: flags.FlagValues, args: list[str]) -> int:
    if args:
        raise cli.UsageError(f"unexpected arguments: {args}")
    config = fv.config
    if config is None:
        raise cli.UsageError("--config is required, e.g. --config configs/true_batch.py")
    sharding.initialize_distributed()  # before any other JAX call (several processes)
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    stop.install()  # SIGTERM, Ctrl-C: see dwise_jax/stop.py
    try:
        overrides = {"workdir": fv.workdir, "data_root": fv.data_root,
                     "folds": fv.folds and _parse_folds(fv.folds)}
        config.update({key: value for key, value in overrides.items() if value})
        config_lib.validate(config)
        check_workdir(config.workdir)
        if sharding.is_main_process():
            print(f"{config.experiment}: training fold(s) {list(config.folds)} one after the "
                  f"other into {Path(config.workdir) / config.experiment}", flush=True)
        results = train_and_evaluate(
            config, config.workdir, profile_steps=_parse_profile(fv.profile_steps),
            dump_hlo=fv.dump_hlo, max_steps=fv.max_steps)
    except Exception as e:  # disk full, a dead peer process: one line, exit 1
        fatal.exit_if_fatal(e, str(config.workdir))
        raise
    if not sharding.is_main_process():
        return 0
    for fold, score in results.items():
        print(f"fold {fold}: val_corr {score:.4f} (EMA weights of the last epoch)")
    _compare_with_references(config.data_root, results)
    return 0


def _compare_with_references(root: str, results: dict[int, float]) -> None:
    """On a simulated root, the ridge baseline and the noise ceiling on the same windows."""
    from dwise_jax import baseline
    from dwise_jax.data.sensorium import SensoriumDataset

    dataset = SensoriumDataset.open(root)
    if not baseline.is_simulated(dataset):
        return
    print("\nfold  model   ridge baseline  noise ceiling   (val_corr on the same windows)")
    for fold, score in results.items():
        ridge = baseline.ridge_val_corr(dataset, fold)
        ceiling = baseline.ceiling_val_corr(dataset, fold)
        print(f"{fold:<5} {score:.4f}  {ridge:.4f}          {ceiling:.4f}")


if __name__ == "__main__":
    process_env.reexec_with_cpu_settings("dwise_jax.train")
    cli.main(__doc__, define_flags, run, errors=ERRORS, check=check_args)
