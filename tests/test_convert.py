"""The original's .pth -> a dwise_jax fold folder, end to end: a checkpoint written with torch in
the original's exact format (from the small parity fixture) converts, and the converted model
reproduces the fixture's eval outputs."""

from __future__ import annotations

import collections
import subprocess
import sys

import numpy as np
import pytest
from conftest import HANG_TIMEOUT_S, call_command
from flax import nnx

from dwise_jax import checkpoint, convert
from dwise_jax import config as config_lib

torch = pytest.importorskip("torch", reason="torch (CPU) is installed by requirements-dev.txt")


def _err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def write_original_pth(path, arrays, meta, *, drop=(), extra_key=None, frame_stack=None):
    """A .pth laid out as the original's checkpoints (docs/original.md#original-checkpoints)."""
    kwargs = dict(meta["constructor_kwargs"])
    kwargs["readout_outputs"] = list(kwargs["readout_outputs"])  # a list in the original files
    for key in ("core_features", "spatial_strides", "cortex_features"):
        kwargs[key] = tuple(kwargs[key])
    state = collections.OrderedDict()
    for key in arrays.files:
        if key.startswith(("param/", "buffer/")):
            name = key.split("/", 1)[1]
            if name in drop:
                continue
            value = torch.from_numpy(np.array(arrays[key]))
            state[name] = value.long() if name.endswith("num_batches_tracked") else value
    if extra_key:
        state[extra_key] = torch.zeros(3)
    params = {
        "nn_module": ("dwiseneuro", kwargs),
        "loss": ("mice_poisson", {"log_input": False, "full": False, "eps": 1e-8}),
        "optimizer": ("AdamW", {"lr": 2.4e-3, "weight_decay": 0.05}),
        "device": "cuda:0",
        "frame_stack": frame_stack or {"size": 16, "step": 2, "position": "last"},
        "inputs_processor": ("stack_inputs", {"size": (64, 64), "pad_fill_value": 0.0}),
        "responses_processor": ("identity", {}),
        "amp": True,
        "iter_size": 1,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_name": "MouseModel", "params": params, "nn_state_dict": state}, path)
    return path


def test_convert_end_to_end_reproduces_fixture(tmp_path, small_model_fixture, monkeypatch):
    arrays, meta = small_model_fixture
    pth = write_original_pth(
        tmp_path / "orig" / "exp_001" / "fold_3" / "model-017-0.293169.pth", arrays, meta)
    workdir = tmp_path / "work"
    assert call_command("convert", [str(pth), str(workdir), "--mice", "mouse_a,mouse_b"],
                        monkeypatch) == 0
    fold = checkpoint.fold_dir(workdir, "exp_001", 3)
    spec = checkpoint.read_model_spec(fold)
    assert spec.mice == ["mouse_a", "mouse_b"]
    # Every setting of config.model that the model takes is written out, the file's values over
    # the config's.
    assert spec.constructor == {**meta["constructor_kwargs"], "depthwise_impl": "auto",
                                "canvas_rows": 64}  # ours, at the original's values
    assert spec.extra["original"] == {"epoch": 17, "val_corr": 0.293169}

    model, _, step = checkpoint.load_ema_model(fold)
    assert step == 0
    x = np.moveaxis(arrays["input/x"], 1, -1)  # (B, C, T, H, W) -> channels-last
    outputs = nnx.jit(lambda m, x: m(x))(model, x)
    for i, out in enumerate(outputs):
        expected = arrays[f"output/eval/{i}"]  # (batch, neurons, time)
        assert _err(np.moveaxis(np.asarray(out), -1, 1), expected) < 1e-4


def test_convert_refuses_to_overwrite(tmp_path, small_model_fixture):
    arrays, meta = small_model_fixture
    pth = write_original_pth(tmp_path / "model-000-0.1.pth", arrays, meta)
    kwargs = dict(experiment="e", fold=0, mice=["a", "b"])
    convert.convert(pth, tmp_path / "w", **kwargs)
    with pytest.raises(convert.ConversionError, match="already holds a checkpoint"):
        convert.convert(pth, tmp_path / "w", **kwargs)
    convert.convert(pth, tmp_path / "w", overwrite=True, **kwargs)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(drop=("readouts.1.layer.1.bias",)), "missing"),
        (dict(extra_key="cortex.layers.9.conv.weight"), "unexpected"),
        (dict(frame_stack={"size": 8, "step": 2, "position": "last"}), "frame_stack"),
    ],
)
def test_convert_rejects_mismatched_files(tmp_path, small_model_fixture, change, message):
    arrays, meta = small_model_fixture
    pth = write_original_pth(tmp_path / "model-000-0.1.pth", arrays, meta, **change)
    with pytest.raises(convert.ConversionError, match=message):
        convert.convert(pth, tmp_path / "w", experiment="e", fold=0, mice=["a", "b"])
    assert checkpoint.latest_step(checkpoint.fold_dir(tmp_path / "w", "e", 0)) is None


def _params(**changes):
    kwargs = {"readout_outputs": [7, 11], "expansion_ratio": 3, **changes}
    return {"nn_module": ("dwiseneuro", {k: v for k, v in kwargs.items() if v is not None})}


@pytest.mark.parametrize("changes, message", [
    (dict(width_multiplier=2), r"unknown DwiseNeuro arguments \['width_multiplier'\]"),
    (dict(in_channels=5.0), "nn_module argument in_channels: .*cannot be casted"),
    (dict(core_features=(64, 64), spatial_strides=(2,)),
     "model.core_features and model.spatial_strides must have the same length"),
    (dict(readout_outputs=None), "readout_outputs must list each readout's neuron count"),
])
def test_constructor_arguments_are_checked_as_config_model(changes, message):
    with pytest.raises(convert.ConversionError, match=f"^x.pth: .*{message}"):
        convert.constructor_kwargs(_params(**changes), "x.pth")


def test_constructor_arguments_fill_config_model():
    config = config_lib.get_base_config()
    config.model.expansion_ratio = 3
    assert convert.constructor_kwargs(_params()) == config_lib.model_kwargs(config, [7, 11])


def test_convert_needs_mice_for_unknown_readouts(tmp_path, small_model_fixture):
    arrays, meta = small_model_fixture
    pth = write_original_pth(tmp_path / "model-000-0.1.pth", arrays, meta)
    with pytest.raises(convert.ConversionError, match="--mice"):
        convert.convert(pth, tmp_path / "w", experiment="e", fold=0)


def test_convert_rejects_non_checkpoints(tmp_path):
    bad = tmp_path / "model.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(convert.ConversionError, match="not a readable torch checkpoint"):
        convert.load_original(bad)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(convert.ConversionError, match="expected a dict with model_name"):
        convert.load_original(tmp_path / "other.pth")


def test_bad_command_lines_give_one_error_line(tmp_path, capsys, monkeypatch, small_model_fixture):
    arrays, meta = small_model_fixture
    bad = tmp_path / "fold_0" / "model-000-0.1.pth"
    bad.parent.mkdir()
    bad.write_bytes(b"not a torch file")
    good = write_original_pth(tmp_path / "model-000-0.1.pth", arrays, meta)
    work = tmp_path / "w"
    cases = [
        ([str(bad), str(work)], 1, f"error: {bad}: not a readable torch checkpoint ("),
        ([str(good), str(work), "--mice", "a,b"], 2,
         f"error: {good}: cannot tell the fold from its folder; pass --fold K (see --help)"),
        ([str(good)], 2, "error: expected ORIGINAL.pth OUT_DIR, got ["),
        ([str(good), str(work), "--fold", "x"], 2, "error: flag --fold=x: invalid literal"),
    ]
    for args, status, message in cases:
        assert call_command("convert", args, monkeypatch) == status
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), (args, lines)
    assert not work.exists()


def test_the_module_runs_as_a_command(tmp_path, small_model_fixture):
    arrays, meta = small_model_fixture
    pth = write_original_pth(tmp_path / "model-000-0.1.pth", arrays, meta)
    done = subprocess.run(
        [sys.executable, "-m", "dwise_jax.convert", str(pth), str(tmp_path / "w"),
         "--experiment", "e", "--fold", "2", "--mice=a,b", "--overwrite"],
        capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"converted {pth} -> {tmp_path / 'w' / 'e' / 'fold_2'}")


def test_convert_never_unpickles_arbitrary_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"model_name": "MouseModel", "params": Evil(), "nn_state_dict": {}},
               tmp_path / "evil.pth")
    # torch's reason, in one line and without its advice to load with weights_only=False.
    with pytest.raises(convert.ConversionError,
                       match=r"not a readable torch checkpoint \([^\n]*GLOBAL print[^\n]*\)$"):
        convert.load_original(tmp_path / "evil.pth")


def test_default_mice_are_the_real_ten_in_order():
    from dwise_jax.data.sensorium import REAL_MICE

    counts = [n for _, n in REAL_MICE]
    assert convert.default_mice(counts) == [name for name, _ in REAL_MICE]
    assert convert.default_mice(counts[::-1]) is None
    assert convert.parse_file_name("x/model-017-0.293169.pth") == {"epoch": 17,
                                                                  "val_corr": 0.293169}
