"""Issue 19: the preview before the first step, and stop requests.

A stop (Ctrl-C here) after the first step finishes the step, saves and exits 0; a stop
(SIGTERM) while the first step of a resumed run compiles ends the process at once with status
143 and one line, leaving the last checkpoint as it was. The resumed run compiles without a
persistent cache, so its first step takes the compilation (seconds to tens of seconds here) and
the stop sent when the preview is printed lands inside it; the first run shares the test run's
cache.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from conftest import HANG_TIMEOUT_S, Child, command_env, link_copy, train_command

from dwise_jax import checkpoint, preview


@pytest.fixture
def plain_root(sim_root, tmp_path):
    return link_copy(sim_root, tmp_path / "root")


def _uncached_env() -> dict[str, str]:
    env = command_env()
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return env


def _wait_for(child: Child, text: str) -> None:
    deadline = time.time() + HANG_TIMEOUT_S
    while not any(text in line for line in child.lines):
        assert child.alive(), f"ended before printing {text!r}: {child.lines[-5:]}"
        assert time.time() < deadline, f"never printed {text!r}"
        time.sleep(0.05)


def test_stop_after_the_first_step_saves_and_during_the_compile_exits_at_once(
        plain_root, tmp_path):
    workdir = tmp_path / "work"
    fold = workdir / "demo" / "fold_2"
    command = train_command(plain_root, workdir, "--config.data.train_epoch_size=400")

    # 1. The preview, then Ctrl-C once the first steps are timed: graceful, exit 0.
    child = Child(command, command_env(), tmp_path / "a.err")
    _wait_for(child, "per step: about")
    os.killpg(child.proc.pid, signal.SIGINT)
    child.finish()
    out = "".join(child.lines)
    assert child.proc.returncode == 0, (tmp_path / "a.err").read_text()[-2000:]
    assert "1 cpu device(s)" in out and "300 steps per fold (3 epochs)" in out
    assert "stopped by request at step" in out
    step = checkpoint.latest_step(fold)
    assert step is not None and 0 < step < 100  # saved mid-epoch
    _, items = checkpoint.restore(fold, ("state",))
    count = preview.num_params(items["state"]["params"])
    assert f"model {count:,} parameters" in out
    assert count < preview.CPU_HINT_PARAMS and "configs/demo.py" not in out
    files = {p: p.stat().st_mtime_ns for p in (fold / "checkpoints").rglob("*")}
    lines = (fold / "metrics.jsonl").read_text().splitlines()

    # 2. The resumed run: SIGTERM as soon as the preview is printed (the first step compiles).
    child = Child(command, _uncached_env(), tmp_path / "b.err")
    _wait_for(child, "steps per fold")
    os.killpg(child.proc.pid, signal.SIGTERM)
    child.finish()
    err = (tmp_path / "b.err").read_text()
    assert child.proc.returncode == 143, err[-2000:]
    assert "compilation included" not in "".join(child.lines)  # no step finished
    assert ("stopped by request before the first step finished: nothing new was saved; the "
            f"last checkpoint in {fold} (if any) is intact") in err
    assert checkpoint.latest_step(fold) == step and checkpoint.verify(fold, step) is None
    assert {p: p.stat().st_mtime_ns for p in (fold / "checkpoints").rglob("*")} == files
    new = (fold / "metrics.jsonl").read_text().splitlines()
    assert new[:len(lines)] == lines
    assert all(json.loads(r)["kind"] != "train" for r in new[len(lines):] if r.endswith("}"))
    assert not (fold / "train.lock").exists()  # released before the exit


def test_the_cpu_hint_names_the_demo_for_a_large_model():
    big = preview.train_lines(fold=0, params=170_000_000, steps=47250, done=0, epochs=13,
                              backend="cpu")
    small = preview.train_lines(fold=0, params=600_000, steps=2800, done=0, epochs=8,
                                backend="cpu")
    gpu = preview.train_lines(fold=0, params=170_000_000, steps=47250, done=0, epochs=13,
                              backend="gpu")
    assert len(big) == len(small) + 1 == len(gpu) + 1 and "configs/demo.py" in big[-1]
    assert "170,000,000 parameters" in big[0] and "47250 steps per fold" in big[1]
    assert [preview.duration(s) for s in (42, 210, 7560, 4 * 86400)] == [
        "42.0 s", "3.5 min", "2.1 h", "4.0 days"]


def test_the_prediction_bar_estimates_from_its_first_batches(monkeypatch, capsys):
    clock = iter([0.0, 10.0, 11.0, 12.0, 13.0])
    monkeypatch.setattr(preview.time, "perf_counter", lambda: next(clock))
    bar = preview.EstimatingBar(total=1000, desc="x", label="demo live_test_main", disable=True)
    for _ in range(4):
        bar.update(32)
    bar.close()
    # First batch at 10 s; then 64 windows in 2 s = 32/s; (1000 - 96) / 32 = 28.25 s left.
    out = capsys.readouterr().out
    assert out.count("demo live_test_main:") == 1
    assert ("demo live_test_main: first batch 10.0 s (compilation included), then 32.0 "
            "windows/s: about 28.2 s left") in out
