"""benchmarks/accelerator.py works before any accelerator is lent: run on this CPU at --tiny
size, with a pretended out-of-memory at the largest batch, it prints its table and writes every
field; the order of the attempts, the peak table, the time limit and the estimate on paper are
checked directly. Nothing here depends on speed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import accelerator  # noqa: E402
import common  # noqa: E402


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_tiny_run_on_cpu(tmp_path):
    """Every attempt in its own worker process, each field filled (one dtype and impl: the order
    of the attempts is the next test's)."""
    out = tmp_path / "accelerator.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "accelerator.py"), "--tiny", "--json_out",
         str(out), "--peak_tflops", "0.2", "--fake_oom_above", "2", "--time_limit_s", "850",
         "--impls", "taps", "--dtypes", "float32"],
        capture_output=True, text=True, timeout=900, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "samples_per_s" in proc.stdout and "compile_s" in proc.stdout  # the table
    assert "upper_bound" in proc.stdout  # the estimate on paper
    results = json.loads(out.read_text())
    assert results["probe"]["backend"] == "cpu" and results["probe"]["count"] >= 1
    train = results["train"]
    assert [(r["dtype"], r["impl"]) for r in train] == [("float32", "taps")]
    # batch 4 "did not fit", so the search fell back to 2
    fake = [a for a in results["attempts"] if a.get("reason") == "--fake_oom_above"]
    assert [(a["dtype"], a["per_device_batch"]) for a in fake] == [("float32", 4)]
    for r in train:
        assert r["status"] == "ok", r
        assert r["per_device_batch"] == 2 and r["global_batch"] == 2 * r["devices"]
        for key in ("step_s", "samples_per_s", "samples_per_s_per_device", "compile_s",
                    "xla_tflop_per_step_per_device", "xla_tflops_per_device", "mfu",
                    "model_mfu", "xla_memory_gb"):
            assert _positive(r[key]), (key, r[key])
        assert r["samples_per_s"] == pytest.approx(r["samples_per_s_per_device"] * r["devices"])
        assert r["peak_memory_gb"] is None  # no memory_stats() on CPU
        assert math.isfinite(r["loss"])
    assert [r["impl"] for r in results["predict"]] == ["taps"]
    for r in results["predict"]:
        assert r["status"] == "ok" and r["global_batch"] == 4
        assert _positive(r["samples_per_s"]) and _positive(r["compile_s"])
    assert results["peak"][:3] == ["--peak_tflops", 0.2, 0.2]
    assert results["original_samples_per_s"] == 35
    assert _positive(results["roofline"]["devices"]["H100 SXM bfloat16"]["upper_bound"])


class _FakeRunner:
    """Answers attempts without running them: a training batch fits up to `fits[dtype]`."""

    def __init__(self, fits):
        self.fv = SimpleNamespace(impls=["lax", "taps"], batch_sizes=["2", "8", "4"],
                                  dtypes=["float32", "bfloat16"], predict_batch=4)
        self.fits, self.attempts, self.start = fits, [], 0.0

    def run(self, what, **fields):
        row = {"what": what, **fields, "status": "ok", "backend": "cpu"}
        if what == "train" and fields["per_device_batch"] > self.fits[fields["dtype"]]:
            row["status"] = "oom"
        self.attempts.append(row)
        return row


def test_attempts_go_by_importance_and_start_from_what_fitted():
    """bfloat16 first, auto's impl first (taps on CPU); the largest batch that fits, found once
    per dtype and the dtype's other impls starting there; prediction after the first dtype;
    float32 starting from bfloat16's batch."""
    runner = _FakeRunner({"bfloat16": 4, "float32": 2})
    results = accelerator.measure(runner)
    tried = [(a["what"], a.get("dtype"), a.get("impl"), a.get("per_device_batch"), a["status"])
             for a in runner.attempts]
    assert tried == [
        ("probe", None, None, None, "ok"),
        ("train", "bfloat16", "taps", 8, "oom"), ("train", "bfloat16", "taps", 4, "ok"),
        ("train", "bfloat16", "lax", 4, "ok"),
        ("predict", None, "taps", None, "ok"), ("predict", None, "lax", None, "ok"),
        ("train", "float32", "taps", 4, "oom"), ("train", "float32", "taps", 2, "ok"),
        ("train", "float32", "lax", 2, "ok")]
    assert [(r["dtype"], r["impl"], r["per_device_batch"]) for r in results["train"]] == [
        ("bfloat16", "taps", 4), ("bfloat16", "lax", 4), ("float32", "taps", 2),
        ("float32", "lax", 2)]
    assert all(r["global_batch"] == 4 for r in results["predict"])
    # Nothing fits: each impl tries every batch, then the row says oom.
    runner = _FakeRunner({"bfloat16": 1, "float32": 1})
    results = accelerator.measure(runner)
    assert [r["status"] for r in results["train"]] == ["oom"] * 4
    assert sum(a["what"] == "train" for a in runner.attempts) == 4 * 3


def test_peaks_by_device_kind():
    kinds = {"NVIDIA H100 80GB HBM3": "H100 SXM", "NVIDIA H100 PCIe": "H100 PCIe",
             "NVIDIA H200": "H200", "NVIDIA A100-SXM4-80GB": "A100 80GB",
             "NVIDIA A100-SXM4-40GB": "A100 40GB", "NVIDIA L4": "L4", "NVIDIA L40S": "L40S",
             "NVIDIA RTX A6000": "RTX A6000", "Tesla V100-SXM2-16GB": "V100",
             "TPU v4": "TPU v4", "TPU v5 lite": "TPU v5e", "TPU v5p": "TPU v5p",
             "TPU v6 lite": "TPU v6e"}
    for kind, name in kinds.items():
        assert accelerator.peak_of(kind)[0] == name, kind
    assert accelerator.peak_of("cpu") is None


def test_no_attempt_starts_past_the_time_limit():
    args = SimpleNamespace(time_limit_s=0.0)
    runner = accelerator.Runner(args)
    row = runner.run("train", dtype="float32", impl="lax", per_device_batch=8)
    assert row["status"] == "skipped" and row["per_device_batch"] == 8
    assert runner.attempts == [row]


def test_estimate_on_paper_gives_the_recorded_figures():
    """The architecture's FLOPs and activations of the true_batch model and the bounds on paper,
    as benchmarks/RESULTS.md records them."""
    arch = common.arch()
    gflop = lambda **kw: common.model_flops(arch, **kw) / 1e9
    assert gflop() == pytest.approx(33.9, abs=0.05)  # forward, all ten readouts
    assert gflop(readout=0) == pytest.approx(29.2, abs=0.05)
    assert gflop(backward=True) == pytest.approx(101.5, abs=0.05)
    assert gflop(readout=0, backward=True) == pytest.approx(87.6, abs=0.05)
    r = accelerator.roofline(arch, parameters=170_656_070)
    parts = {k: (round(v["forward_gflop"], 2), round(v["activations_m"], 1))
             for k, v in r["per_sample"].items()}
    assert parts == {"core": (28.52, 246.7), "cortex": (0.17, 0.2), "readout": (0.52, 0.3)}
    h100 = r["devices"]["H100 SXM bfloat16"]
    assert h100["memory_bound"] < h100["compute_bound"]  # memory-bound on paper
    assert h100["upper_bound"] == pytest.approx(896, abs=1)
    assert r["devices"]["RTX A6000 bfloat16"]["upper_bound"] == pytest.approx(205, abs=1)
