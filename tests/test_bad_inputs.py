"""Bad inputs (issue 9): each case builds one bad dataset, config, command line or checkpoint
and checks the exact one-line error it gets; command lines also exit non-zero and write nothing.
The README's bad-input table lists these cases next to the ones tested elsewhere.

Dataset cases damage a hard-linked copy of the tiny simulated root (tests/conftest.py) and run
`python -m dwise_jax.data.sensorium ROOT --check` in process.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    DEMO,
    REPO,
    call_command,
    command_env,
    link_copy,
    model_kwargs,
    mouse_folder,
    q,
    run_module,
    stream_config,
)

from dwise_jax import atomic, checkpoint
from dwise_jax import config as config_lib
from dwise_jax.data import sensorium, value_check
from dwise_jax.data.sensorium import TIERS, DatasetError

TRUE_BATCH = str(REPO / "configs" / "true_batch.py")


def rewrite(path: Path, change) -> None:
    """Replaces a (possibly hard-linked) .npy file by `change(its array)`."""
    array = np.load(path)
    path.unlink()
    np.save(path, change(array), allow_pickle=True)


def cut(path: Path, size: int | None = None) -> None:
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[: len(data) // 2 if size is None else size])


def tiers(m: Path) -> np.ndarray:
    return np.load(m / "meta" / "trials" / "tiers.npy")


def first_labeled(m: Path) -> int:
    return int(np.flatnonzero(np.isin(tiers(m), ["train", "oracle"]))[0])


def length(m: Path, trial: int) -> int:
    return sensorium.first_nan(np.load(m / "data" / "responses" / f"{trial}.npy")[0])


def with_value(index, value):
    def change(array):
        array = array.copy()
        array[index] = value
        return array
    return change


# Each case damages mouse folder `m` and returns the expected message (a regular expression).
def truncated_array(m):
    path = m / "data" / "videos" / "0.npy"
    cut(path)
    return rf"{q(path)}: is not a readable \.npy file \(mmap length is greater than file size\)"


def truncated_header(m):
    path = m / "data" / "behavior" / "3.npy"
    cut(path, 20)
    return (rf"{q(path)}: is not a readable \.npy file \(EOF: reading array header, expected "
            rf"\d+ bytes got \d+\)")


def empty_file(m):
    path = m / "data" / "pupil_center" / "2.npy"
    cut(path, 0)
    return rf"{q(path)}: is not a readable \.npy file \(No data left in file\)"


def extra_trial_file(m):
    path = m / "data" / "videos" / "40.npy"
    shutil.copyfile(m / "data" / "videos" / "0.npy", path)
    return rf"{q(path)}: trial file has no row in tiers\.npy, which lists 40 trials"


def pickled_object_array(m):
    path = m / "data" / "behavior" / "1.npy"
    rewrite(path, lambda a: np.array([a, "x"], dtype=object))
    return rf"{q(path)}: holds a pickled object array"


def integer_responses(m):
    path = m / "data" / "responses" / f"{first_labeled(m)}.npy"
    rewrite(path, lambda a: np.nan_to_num(a).astype(np.int32))
    return rf"{q(path)}: has dtype int32, expected floats \(NaN pads the tail\)"


def float_unit_ids(m):
    path = m / "meta" / "neurons" / "unit_ids.npy"
    rewrite(path, lambda a: a.astype(np.float64))
    return rf"{q(path)}: has dtype float64, expected integers"


def duplicate_unit_ids(m):
    path = m / "meta" / "neurons" / "unit_ids.npy"
    rewrite(path, lambda a: np.concatenate([a[:1], a[:-1]]))
    return rf"{q(path)}: lists unit id {np.load(path)[0]} 2 times; unit ids must be unique"


def fewer_unit_ids_than_responses(m):
    rewrite(m / "meta" / "neurons" / "unit_ids.npy", lambda a: a[:11])
    rewrite(m / "meta" / "neurons" / "cell_motor_coordinates.npy", lambda a: a[:11])
    path = m / "data" / "responses" / f"{first_labeled(m)}.npy"
    return rf"{q(path)}: has 12 neurons, but unit_ids\.npy lists 11"


def coordinates_of_wrong_shape(m):
    path = m / "meta" / "neurons" / "cell_motor_coordinates.npy"
    rewrite(path, lambda a: a[:, :2])
    return rf"{q(path)}: has shape \(12, 2\), expected \(12, 3\) for the neurons of unit_ids\.npy"


def integer_tiers(m):
    path = m / "meta" / "trials" / "tiers.npy"
    rewrite(path, lambda a: np.arange(len(a)))
    return rf"{q(path)}: has dtype int64, expected unicode tier strings"


def empty_tier_string(m):
    path = m / "meta" / "trials" / "tiers.npy"
    rewrite(path, with_value(5, ""))
    return rf"{q(path)}: holds unknown tier strings \[''\]; tiers are {re.escape(str(TIERS))}"


def unknown_tier_string(m):
    path = m / "meta" / "trials" / "tiers.npy"
    rewrite(path, with_value(7, "fold_3"))
    return rf"{q(path)}: holds unknown tier strings \['fold_3'\]; tiers are {re.escape(str(TIERS))}"


def no_trials_in_tiers(m):
    rewrite(m / "meta" / "trials" / "tiers.npy", lambda a: a[:0])
    return rf"{q(m / 'data' / 'videos' / '0.npy')}: trial file has no row in tiers\.npy, which " \
           r"lists 0 trials"


def narrow_video(m):
    path = m / "data" / "videos" / "0.npy"
    rewrite(path, lambda a: a[:, :32])
    return rf"{q(path)}: has frames of \(36, 32\), expected \(36, 64\)"


def nan_inside_a_trial(m):
    trial = first_labeled(m)
    path = m / "data" / "responses" / f"{trial}.npy"
    rewrite(path, with_value((3, 10), np.nan))  # neuron 3: the length rule reads neuron 0 only
    return (rf"{q(path)}: holds NaN inside the trial at frame 10 \(valid length "
            rf"{length(m, trial)}\)")


def inf_inside_a_video(m):
    trial = first_labeled(m)
    path = m / "data" / "videos" / f"{trial}.npy"
    rewrite(path, with_value((5, 7, 12), np.inf))
    return (rf"{q(path)}: holds inf inside the trial at frame 12 \(valid length "
            rf"{length(m, trial)}\)")


def missing_std(m):
    path = m / "meta" / "statistics" / "responses" / "all" / "std.npy"
    path.unlink()
    return rf"{q(path)}: file is missing"


DATASET_CASES = [truncated_array, truncated_header, empty_file, extra_trial_file,
                 pickled_object_array, integer_responses, float_unit_ids, duplicate_unit_ids,
                 fewer_unit_ids_than_responses, coordinates_of_wrong_shape, integer_tiers,
                 empty_tier_string, unknown_tier_string, no_trials_in_tiers, narrow_video,
                 nan_inside_a_trial, inf_inside_a_video, missing_std]


@pytest.fixture
def root(sim_root, tmp_path) -> Path:
    return link_copy(sim_root, tmp_path / "root")


@pytest.mark.parametrize("damage", DATASET_CASES, ids=lambda f: f.__name__)
def test_bad_dataset(root, damage, capsys):
    expected = damage(mouse_folder(root))
    assert value_check.main([str(root), "--check"]) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(f"error: {expected}\n", err), err


def test_a_mouse_without_training_trials(root):
    from dwise_jax.data import pipeline

    m = mouse_folder(root)
    rewrite(m / "meta" / "trials" / "tiers.npy",
            lambda a: np.where(np.isin(a, ["train", "oracle"]), "none", a))
    dataset = sensorium.SensoriumDataset.open(root)  # a valid root, but nothing to train on
    with pytest.raises(DatasetError) as err:
        pipeline.TrainStream(dataset, stream_config(batch_size=4, train_epoch_size=12),
                             fold=0)
    assert str(err.value) == f"{m}: has no training trial outside fold 0"


# ----------------------------------------------------------------------------- configs
def config_file(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / "experiment.py"
    body = "\n".join(f"    {line}" for line in lines)
    path.write_text("from dwise_jax.config import get_base_config\n\n\ndef get_config():\n"
                    f"    config = get_base_config()\n{body}\n    return config\n")
    return str(path)


CONFIG_CASES = [
    ("unknown_override_key", {"optim.base_rl": 1e-3}, None, 1,
     "unknown config key 'optim.base_rl' (did you mean 'optim.base_lr'?)"),
    ("override_of_another_type", {"data.batch_size": "32"}, None, 1,
     "config key 'data.batch_size': Could not override field 'batch_size' (reference). 32 is of "
     "original type <class 'str'> and cannot be casted to type <class 'int'>"),
    ("misspelt_key_in_a_config_file", {}, ["config.optim.base_rl = 1e-3"], 1,
     "unknown config key 'optim.base_rl' (did you mean 'optim.base_lr'?); every setting has its "
     "default in dwise_jax/config.py"),
    ("value_of_another_type_in_a_config_file", {}, ['config.data.batch_size = "32"'], 1,
     "{file}: Could not override field 'batch_size' (reference). 32 is of original type "
     "<class 'str'> and cannot be casted to type <class 'int'>"),
    ("batch_not_dividing_over_the_devices", {"data.batch_size": 6}, None, 4,
     "data.batch_size=6 must divide over 4 device(s) x optim.iter_size=1"),
    ("validation_batch_not_dividing_over_the_devices", {"data.val_batch_size": 6}, None, 4,
     "data.val_batch_size=6 must be positive and divide over 4 device(s)"),
    ("zero_gradient_accumulation", {"optim.iter_size": 0}, None, 1,
     "optim.iter_size must be >= 1, got 0"),
    ("zero_logging_interval", {"log.every_steps": 0}, None, 1, "log.every_steps must be >= 1"),
    ("experiment_name_leaving_the_workdir", {"experiment": "../elsewhere"}, None, 1,
     "experiment and distill.teacher_experiment must be plain folder names (letters, digits, _ . "
     "-), got '../elsewhere' and 'true_batch_001'"),
    ("zero_channels", {"model.core_features": (64, 0, 64, 64, 128, 128, 128, 256, 256)}, None, 1,
     "model.core_features, model.spatial_strides and model.cortex_features must hold positive "
     "integers"),
    ("dropout_of_one", {"model.drop_rate": 1.0}, None, 1,
     "model.drop_rate and model.drop_path_rate must be in [0, 1)"),
    ("no_folds", {"folds": ()}, None, 1, "folds must be in 0..6, got ()"),
]


@pytest.mark.parametrize("overrides, lines, devices, message",
                         [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config(tmp_path, overrides, lines, devices, message):
    path = config_file(tmp_path, *lines) if lines else TRUE_BATCH
    with pytest.raises(config_lib.ConfigError) as err:
        config = config_lib.load_config_file(path, overrides)
        config_lib.validate(config, num_devices=devices)
    assert str(err.value) == message.replace("{file}", path)


# ----------------------------------------------------------------------------- command lines


def truncated_root(root: Path) -> tuple[list[str], str]:
    path = mouse_folder(root) / "data" / "behavior" / "0.npy"
    cut(path)
    return ([f"--data_root={root}"],
            f"{path}: is not a readable .npy file (mmap length is greater than file size)")


def workdir_under_a_file(tmp: Path) -> tuple[list[str], str]:
    # A folder that cannot be written (tests run as root here, so file modes would not stop it).
    (tmp / "file").write_text("x")
    return ([f"--workdir={tmp / 'file' / 'work'}"],
            f"workdir {tmp / 'file' / 'work'}: cannot be made, {tmp / 'file'} is a file")


CLI_CASES = [
    ("unknown_config_key", lambda root, tmp: (
        ["--config.optim.base_rl=1e-3"],
        "--config.optim.base_rl: unknown config key 'optim.base_rl' (did you mean "
        "'optim.base_lr'?)")),
    ("missing_config_file", lambda root, tmp: (
        ["--config=configs/nope.py"], "--config configs/nope.py: no such config file")),
    ("folds_not_numbers", lambda root, tmp: (
        ["--folds=0,three"],
        "--folds takes comma-separated fold numbers, e.g. 0,3; got '0,three'")),
    ("workdir_under_a_file", lambda root, tmp: workdir_under_a_file(tmp)),
    ("missing_data_root", lambda root, tmp: (
        [f"--data_root={tmp / 'nope'}"], f"{tmp / 'nope'}: dataset root folder is missing")),
    ("damaged_dataset", lambda root, tmp: truncated_root(root)),
    ("fold_out_of_range", lambda root, tmp: (["--folds=7"], "folds must be in 0..6, got (7,)")),
]


@pytest.mark.parametrize("make", [c[1] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_bad_train_command_line(root, tmp_path, make, capsys, monkeypatch):
    """In process (the one subprocess run of the train command line is tests/test_train.py's)."""
    args, message = make(root, tmp_path)
    workdir = tmp_path / "work"
    status = call_command("train", ["--config", DEMO, f"--data_root={root}",
                                    f"--workdir={workdir}", *args], monkeypatch)
    assert (status, capsys.readouterr().err) == (1, f"error: {message}\n")
    assert not workdir.exists()


def test_batch_that_does_not_divide_over_the_devices_on_the_command_line(root, tmp_path):
    env = command_env("--xla_force_host_platform_device_count=4")
    out = run_module("dwise_jax.train", [
        "--config", DEMO, f"--data_root={root}", f"--workdir={tmp_path / 'work'}",
        "--config.data.batch_size=6"], env)
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1] == \
        "error: data.batch_size=6 must divide over 4 device(s) x optim.iter_size=1"
    assert not (tmp_path / "work").exists()


def test_prediction_of_a_missing_experiment(tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    out = run_module("dwise_jax.predict", ["--experiment=nope", "--split=live_test_main",
                                           f"--workdir={workdir}"])
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.splitlines()[-1] == (
        f"error: {workdir / 'nope'}: no fold folders (fold_0 .. fold_6); train them with "
        "`python -m dwise_jax.train --config ...` or convert the original's weights with "
        "`python -m dwise_jax.convert`")
    assert list(workdir.iterdir()) == []


def test_dataset_command_line_on_a_missing_root(tmp_path, capsys):
    assert value_check.main([str(tmp_path / "nope")]) == 1
    expected = f"error: {tmp_path / 'nope'}: dataset root folder is missing\n"
    assert capsys.readouterr().err == expected


def _full_folder(tmp: Path) -> Path:
    (tmp / "out").mkdir()
    (tmp / "out" / "mine.txt").write_text("keep")
    return tmp / "out"


# (name, command module, args of tmp_path, exit status, the one error line of tmp_path)
DATA_CLI_CASES = [
    ("synthetic_into_a_full_folder", "synthetic", lambda tmp: [str(_full_folder(tmp))], 1,
     lambda tmp: f"{tmp / 'out'}: is not empty; generate writes into a fresh folder"),
    ("synthetic_with_too_few_trials", "synthetic", lambda tmp: [str(tmp / "out"), "--trials=5"],
     2, lambda tmp: "5 trials per mouse are too few for every tier; use >= 20 (see --help)"),
    ("synthetic_without_a_folder", "synthetic", lambda tmp: ["--mice=1"], 2,
     lambda tmp: "expected one argument, the output folder OUT_DIR (got 0) (see --help)"),
    ("download_without_root", "download", lambda tmp: ["--base_url=http://127.0.0.1:9"], 2,
     lambda tmp: "flag --root=None: Flag --root must have a value other than None. "
                 "(see --help)"),
    ("download_of_a_missing_manifest", "download",
     lambda tmp: [f"--root={tmp / 'out'}", f"--manifest={tmp / 'm.json'}"], 1,
     lambda tmp: f"{tmp / 'm.json'}: cannot read the manifest ([Errno 2] No such file or "
                 f"directory: '{tmp / 'm.json'}')"),
    ("download_of_an_unknown_mouse", "download",
     lambda tmp: [f"--root={tmp / 'out'}", "--mice=dynamic1-1-1-Video-" + "0" * 32], 1,
     lambda tmp: "no archive for ['dynamic1-1-1-Video-" + "0" * 32 + "']"),
    ("dataset_without_a_root", "value_check", lambda tmp: ["--check"], 2,
     lambda tmp: "expected one argument, the dataset ROOT (got 0) (see --help)"),
]


@pytest.mark.parametrize("module, args, status, message", [c[1:] for c in DATA_CLI_CASES],
                         ids=[c[0] for c in DATA_CLI_CASES])
def test_bad_data_command_line(tmp_path, capsys, monkeypatch, module, args, status,
                               message):
    """The data commands (synthetic, download, sensorium) in process, as `python -m` runs them."""
    argv = args(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    assert call_command(f"data.{module}", argv, monkeypatch) == status
    captured = capsys.readouterr()
    assert captured.err == f"error: {message(tmp_path)}\n" and captured.out == ""
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


# ----------------------------------------------------------------------------- checkpoints
def test_weights_of_another_architecture(tmp_path):
    import jax.numpy as jnp
    from flax import nnx

    from dwise_jax.models.dwiseneuro import DwiseNeuro

    small = {"core_features": [8], "spatial_strides": [2], "expansion_ratio": 2,
             "se_reduce_ratio": 4, "cortex_features": [16, 16]}
    trained = DwiseNeuro(**model_kwargs([5, 7], **small), rngs=nnx.Rngs(0))
    ema = {"params": nnx.to_pure_dict(nnx.state(trained, nnx.Param)),
           "batch_stats": nnx.to_pure_dict(nnx.state(trained, nnx.BatchStat))}
    checkpoint.save(tmp_path, 3, {"ema": ema})
    # model.json says another architecture: a wider readout for the second mouse.
    checkpoint.write_model_spec(tmp_path, checkpoint.ModelSpec(
        constructor={"readout_outputs": [5, 9], **small}, mice=["a", "b"], source="trained"))
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load_ema_model(tmp_path, jnp.float32)
    assert str(err.value) == (
        f"{tmp_path / 'checkpoints' / '3'}: its EMA weights do not fit the architecture in "
        "model.json (/params/readouts/1/bias has shape (8,), the architecture needs (10,))")


# ----------------------------------------------------------------------------- atomic outputs
def test_a_prediction_that_fails_midway_leaves_nothing(tmp_path, monkeypatch):
    from dwise_jax import experiment

    def half_then_fail(file, array):
        Path(file).write_bytes(b"\x93NUMPY partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(experiment.np, "save", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        experiment.write_trial(tmp_path, "mouse", 3, np.zeros((2, 5), np.float32))
    assert list((tmp_path / "mouse").iterdir()) == []


def test_a_submission_that_fails_midway_leaves_the_previous_file(tmp_path):
    from dwise_jax import submission

    path = tmp_path / "predictions_live_main.parquet"
    table = submission.mouse_table("m", np.array([7, 8]), np.ones((2, 9), np.float32),
                                   {0: np.ones((2, 9), np.float32)})
    submission.write_tables(path, [table])
    before = path.read_bytes()

    def tables():
        yield table
        raise DatasetError("mouse 2: responses/4.npy: file is missing")

    with pytest.raises(DatasetError):
        submission.write_tables(path, tables())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_atomic_path_removes_its_temporary_file_on_any_exception(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic.atomic_path(tmp_path / "x.npy") as tmp:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
