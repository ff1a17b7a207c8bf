"""Issue 14: two processes on this machine (a coordinator on a free local port, gloo collectives
between CPU processes, one CPU device each) train and predict exactly as one process with two
devices; every file is written once; when a process dies the other stops with one error line.

The runs are the real command lines at the tiny size of tests/test_train.py, sharing the test
run's JAX compilation cache (conftest.py).
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import CLI_TINY, DEMO, HANG_TIMEOUT_S, REPO, command_env, link_copy, train_command

from dwise_jax import checkpoint, submission

FOLD = 2
SPLIT = "final_test_main"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, process: int | None = None, port: int = 0) -> dict:
    env = command_env(f"--xla_force_host_platform_device_count={devices}")
    if process is not None:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(process), DWISE_JAX_HEARTBEAT_S="10")
    return env


def _two_processes(command: list[str], logs: Path) -> list[subprocess.Popen]:
    port = _free_port()
    return [subprocess.Popen(command, cwd=REPO, env=_env(1, i, port),
                             stdout=(logs / f"p{i}.out").open("w"),
                             stderr=(logs / f"p{i}.err").open("w")) for i in (0, 1)]


def _wait(procs, logs: Path) -> None:
    for i, p in enumerate(procs):
        assert p.wait(timeout=HANG_TIMEOUT_S) == 0, (logs / f"p{i}.err").read_text()[-3000:]


def _files(fold_dir: Path) -> list[str]:
    """The fold folder's files, Orbax's content-addressed names and TensorBoard's timestamped
    one folded into patterns."""
    out = set()
    for path in fold_dir.rglob("*"):
        if path.is_file():
            rel = path.relative_to(fold_dir).as_posix()
            if "/d/" in rel:
                rel = rel.rsplit("/d/", 1)[0] + "/d/*"
            elif rel.startswith("tensorboard/"):  # its name holds the start time
                rel = "tensorboard/events.out.tfevents.*"
            out.add(rel)
    return sorted(out)


def _predict(split: str, workdir: Path) -> list[str]:
    return [sys.executable, "-m", "dwise_jax.predict", f"--split={split}",
            f"--workdir={workdir}", "--batch_size=8", "--stride_sweep="]


def test_two_processes_train_and_predict_as_one_process_with_two_devices(sim_root, tmp_path):
    root = link_copy(sim_root, tmp_path / "root")
    logs = tmp_path / "logs"
    logs.mkdir()
    short = "--config.optim.cosine_epochs=1"  # 2 epochs: 6 steps, 2 validations
    one = subprocess.run(train_command(root, tmp_path / "one", short), cwd=REPO, env=_env(2),
                         capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert one.returncode == 0, one.stderr[-3000:]
    _wait(_two_processes(train_command(root, tmp_path / "two", short), logs), logs)
    a = checkpoint.fold_dir(tmp_path / "one", "demo", FOLD)
    b = checkpoint.fold_dir(tmp_path / "two", "demo", FOLD)

    # Every record: the same losses (training: each step's) and validation correlations.
    ra = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["kind"]) for r in ra] == [(r["step"], r["kind"]) for r in rb]
    assert any(r["kind"] == "val" for r in ra) and any(r["kind"] == "train" for r in ra)
    # (A correlation is a difference of float64 sums summed in another order per process:
    # the untrained model's huge predictions make that cancel to ~1e-7, hence abs=1e-5.)
    for x, y in zip(ra, rb, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6), (x, y)
        if "corr" in x:
            assert y["corr"] == pytest.approx(x["corr"], abs=1e-5), (x, y)
    # The final parameters, BatchNorm statistics, optimizer state and EMA.
    _, sa = checkpoint.restore(a, ("state", "ema"))
    _, sb = checkpoint.restore(b, ("state", "ema"))
    for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb), strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-6, atol=1e-7)
    # One set of files, written once: the same files as one process writes, Orbax's arrays
    # by process 0 only, no lock left.
    assert _files(b) == _files(a)
    assert not list(b.rglob("ocdbt.process_1")) and not (b / "train.lock").exists()
    err0, err1 = ((logs / f"p{i}.err").read_text() for i in (0, 1))
    out0, out1 = ((logs / f"p{i}.out").read_text() for i in (0, 1))
    assert "val_corr" in out0 and "val_corr" not in out1 and "step/s" not in err1

    # Prediction: two processes write the arrays and the parquet that one process writes.
    one = subprocess.run(_predict(SPLIT, tmp_path / "one"), cwd=REPO, env=_env(2),
                         capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert one.returncode == 0, one.stderr[-3000:]
    _wait(_two_processes(_predict(SPLIT, tmp_path / "two"), logs), logs)
    pa = tmp_path / "one" / "predictions" / "demo" / SPLIT
    pb = tmp_path / "two" / "predictions" / "demo" / SPLIT
    arrays = sorted(p.relative_to(pa) for p in pa.rglob("*.npy"))
    assert arrays and arrays == sorted(p.relative_to(pb) for p in pb.rglob("*.npy"))
    for rel in arrays:
        np.testing.assert_allclose(np.load(pb / rel), np.load(pa / rel), rtol=1e-6, atol=1e-7)
    parquet = submission.split_file(pa, SPLIT)
    assert pq.read_table(submission.split_file(pb, SPLIT)).equals(pq.read_table(parquet))
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (pa, pb))
    assert ma["trials"] == mb["trials"]


def test_when_one_process_dies_the_other_stops_with_one_line(sim_root, tmp_path):
    root = link_copy(sim_root, tmp_path / "root")
    logs = tmp_path / "logs"
    logs.mkdir()
    command = [sys.executable, "-m", "dwise_jax.train", "--config", DEMO,
               f"--data_root={root}", f"--workdir={tmp_path / 'w'}", f"--folds={FOLD}",
               *CLI_TINY, "--config.optim.cosine_epochs=60"]  # long enough to die in
    procs = _two_processes(command, logs)
    deadline = time.monotonic() + HANG_TIMEOUT_S
    while not re.search(r"first step \d", (logs / "p0.out").read_text()):  # the steps run
        assert procs[0].poll() is None and time.monotonic() < deadline, \
            (logs / "p0.err").read_text()[-3000:]
        time.sleep(0.2)
    procs[1].kill()
    killed = time.monotonic()
    assert procs[0].wait(timeout=HANG_TIMEOUT_S) == 1
    # Within seconds (the next collective fails); 120 s is a wide margin on any machine.
    assert time.monotonic() - killed < 120
    last = (logs / "p0.err").read_text().strip().splitlines()[-1]
    assert last.startswith("error: process 0 of 2: another process of this run stopped"), last
    fold_dir = checkpoint.fold_dir(tmp_path / "w", "demo", FOLD)
    step = checkpoint.latest_step(fold_dir)
    assert step is None or checkpoint.verify(fold_dir, step) is None
    assert not (fold_dir / "train.lock").exists()  # released on the way out


def test_a_stop_sent_to_one_process_stops_both_at_the_same_step(sim_root, tmp_path):
    """SIGTERM to process 1 only: the processes agree on the stop at the next logging step
    (every 2 steps here), save that step together and both exit 0; a restart resumes there."""
    root = link_copy(sim_root, tmp_path / "root")
    logs = tmp_path / "logs"
    logs.mkdir()
    command = [*train_command(root, tmp_path / "w"), "--config.optim.cosine_epochs=60"]
    procs = _two_processes(command, logs)
    deadline = time.monotonic() + HANG_TIMEOUT_S
    # "first step <time>": timed after the first steps, so stops are graceful in every process
    while not re.search(r"first step \d", (logs / "p0.out").read_text()):
        assert procs[0].poll() is None and time.monotonic() < deadline, \
            (logs / "p0.err").read_text()[-3000:]
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    _wait(procs, logs)
    out0, out1 = ((logs / f"p{i}.out").read_text() for i in (0, 1))
    stopped = [int(m) for m in re.findall(r"stopped by request at step (\d+)", out0 + out1)]
    assert len(stopped) == 2 and stopped[0] == stopped[1] and stopped[0] % 2 == 0, (out0, out1)
    fold_dir = checkpoint.fold_dir(tmp_path / "w", "demo", FOLD)
    assert checkpoint.latest_step(fold_dir) == stopped[0]
    assert checkpoint.verify(fold_dir, stopped[0]) is None
    assert not (fold_dir / "train.lock").exists()
