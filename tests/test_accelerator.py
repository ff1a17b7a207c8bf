"""benchmarks/accelerator.py works before any accelerator is lent: run on this CPU at --tiny
size, with a pretended out-of-memory at the largest batch, it prints its table and writes every
field; the peak table, the time limit and the estimate on paper are checked directly. Nothing
here depends on speed."""

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
from model_speed import NEURONS, model_flops  # noqa: E402


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_tiny_run_on_cpu(tmp_path):
    out = tmp_path / "accelerator.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "accelerator.py"), "--tiny", "--json_out",
         str(out), "--peak_tflops", "0.2", "--fake_oom_above", "2", "--time_limit_s", "850"],
        capture_output=True, text=True, timeout=900, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "samples/s" in proc.stdout and "compile s" in proc.stdout  # the table
    assert "at most" in proc.stdout  # the estimate on paper
    results = json.loads(out.read_text())
    assert results["probe"]["backend"] == "cpu" and results["probe"]["count"] >= 1
    train = results["train"]
    assert {(r["dtype"], r["impl"]) for r in train} == {
        (d, i) for d in ("bfloat16", "float32") for i in ("taps", "lax")}
    # batch 4 "did not fit", so the search fell back to 2, and the others started there
    fake = [a for a in results["attempts"] if a.get("reason") == "--fake_oom_above"]
    assert [(a["dtype"], a["per_device_batch"]) for a in fake] == [("bfloat16", 4)]
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
    assert {r["impl"] for r in results["predict"]} == {"taps", "lax"}
    for r in results["predict"]:
        assert r["status"] == "ok" and r["global_batch"] == 4
        assert _positive(r["samples_per_s"]) and _positive(r["compile_s"])
    assert results["peak"]["source"] == "--peak_tflops"
    assert results["original_samples_per_s"] == 35
    assert _positive(results["roofline"]["devices"]["H100 SXM bfloat16"]["upper_bound"])


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
    runner = accelerator.Runner(args, env={})
    row = runner.run("train", dtype="float32", impl="lax", batch=8)
    assert row["status"] == "skipped" and row["per_device_batch"] == 8
    assert runner.attempts == [row]


def test_estimate_on_paper_adds_up():
    arch = dict(readout_outputs=NEURONS, in_channels=5,
                core_features=(64, 64, 64, 64, 128, 128, 128, 256, 256),
                spatial_strides=(2, 1, 1, 1, 2, 1, 1, 2, 1), spatial_kernel=3,
                temporal_kernel=5, expansion_ratio=7, se_reduce_ratio=32,
                cortex_features=(1024, 2048, 4096), groups=2)
    parts = accelerator.part_costs(arch)
    flops = sum(p["flops"] for p in parts.values())
    # SE FLOPs are left out of part_costs (2 x 2 x mid x mid/32 per block: 0.003% of the core)
    assert flops == pytest.approx(model_flops(NEURONS, **{k: v for k, v in arch.items()
                                                         if k != "readout_outputs"},
                                              readouts=0), rel=1e-4)
    r = accelerator.roofline(arch, parameters=170_656_070)
    h100 = r["devices"]["H100 SXM bfloat16"]
    assert h100["memory_bound"] < h100["compute_bound"]  # memory-bound on paper
    assert h100["upper_bound"] > accelerator.ORIGINAL_SAMPLES_PER_S
