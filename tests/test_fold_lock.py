"""One writer per fold (issue 16): `<fold>/train.lock` refuses a second training process of the
same fold, takes over the lock of a dead one with a warning, reports one of another host with
the command that clears it, and goes when training ends. The end-to-end test runs two real
training command lines on one fold folder: the second is refused and changes nothing, a
prediction reads the fold meanwhile, and the first ends exactly as a run alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    DEMO,
    FOLD,
    HANG_TIMEOUT_S,
    REFERENCE_EXTRA,
    Child,
    assert_bit_identical,
    best_step,
    call_command,
    command_env,
    link_copy,
    records,
    train_args,
    train_command,
)

from dwise_jax import checkpoint, fold_lock, fold_run
from dwise_jax.fold_lock import FoldLockedError


@pytest.fixture
def sleeper():
    """A live process on this host that is not the test (a lock holder)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    yield proc
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid names no process (until the system reuses it)
    return proc.pid


def write_lock(directory: Path, **holder) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / fold_lock.LOCK_NAME
    path.write_text(json.dumps({"host": socket.gethostname(), "token": "theirs",
                                "started": "2025-01-02T03:04:05+00:00", **holder}))
    return path


# ----------------------------------------------------------------------------- unit
def test_the_lock_names_its_holder_and_goes_when_the_block_ends(tmp_path):
    directory = tmp_path / "work" / "demo" / "fold_0"
    with fold_lock.hold(directory) as lock:
        holder = json.loads((directory / "train.lock").read_text())
        assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", holder["started"])
        assert lock == holder
        (directory / "config.json").write_text("{}")  # training wrote something
    assert not (directory / "train.lock").exists()
    assert (directory / "config.json").exists()


def test_released_on_an_error_and_empty_folders_it_made_are_removed(tmp_path):
    # Training that stops before writing (a damaged dataset) leaves the workdir as it was.
    directory = tmp_path / "work" / "demo" / "fold_0"
    with pytest.raises(ValueError), fold_lock.hold(directory):
        raise ValueError("the dataset is damaged")
    assert not (tmp_path / "work").exists()
    assert list(tmp_path.iterdir()) == []


def test_a_live_holder_refuses_with_one_line_and_nothing_changes(tmp_path, sleeper):
    directory = tmp_path / "fold_0"
    path = write_lock(directory, pid=sleeper.pid)
    before = path.read_bytes(), path.stat().st_mtime_ns
    with pytest.raises(FoldLockedError) as err:
        fold_lock.acquire(directory)
    assert str(err.value) == (
        f"{directory}: another training process holds this fold (pid {sleeper.pid} on host "
        f"{socket.gethostname()}, started 2025-01-02T03:04:05+00:00); wait for it to end or "
        f"stop it (lock file {path})")
    assert "\n" not in str(err.value)
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert sorted(p.name for p in directory.iterdir()) == ["train.lock"]  # no temporary left
    assert FoldLockedError in fold_run.USER_ERRORS  # train prints it as one `error:` line


def test_the_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, capsys):
    directory = tmp_path / "fold_0"
    pid = dead_pid()
    path = write_lock(directory, pid=pid)
    with fold_lock.hold(directory):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert err == (f"warning: {path}: taking over the lock of pid {pid} on host "
                   f"{socket.gethostname()}, started 2025-01-02T03:04:05+00:00, which no longer "
                   "runs\n")
    assert not path.exists()


def test_a_reused_pid_or_a_reboot_is_a_dead_holder(tmp_path, sleeper):
    # The pid runs, but a process started later than the holder's (its pid was reused), or the
    # lock was written before the last boot.
    start = fold_lock._process_start(sleeper.pid)
    if start is None:
        pytest.skip("no /proc on this system")
    holder = {"host": socket.gethostname(), "pid": sleeper.pid, "process_start": start}
    assert fold_lock.holder_is_alive(holder) is True
    assert fold_lock.holder_is_alive({**holder, "process_start": start + 1}) is False
    assert fold_lock.holder_is_alive({**holder, "boot_id": "another-boot"}) is False
    # This process's own pid in a lock it did not take: a previous life of the pid (a restarted
    # container numbers its processes from 1 again).
    assert fold_lock.holder_is_alive({"host": socket.gethostname(), "pid": os.getpid()}) is False


def test_a_holder_on_another_host_is_reported_with_the_command_that_clears_it(tmp_path):
    directory = tmp_path / "fold 0"
    path = write_lock(directory, host="gpu-node-7", pid=4242)
    with pytest.raises(FoldLockedError) as err:
        fold_lock.acquire(directory)
    assert str(err.value) == (
        f"{directory}: held by a training process on another host (pid 4242 on host gpu-node-7, "
        "started 2025-01-02T03:04:05+00:00); if it no longer runs there, clear the lock with: "
        f"rm '{path}'")
    assert json.loads(path.read_text())["host"] == "gpu-node-7"


def test_an_unreadable_lock_is_refused(tmp_path):
    directory = tmp_path / "fold_0"
    directory.mkdir()
    (directory / "train.lock").write_text("{not json")
    with pytest.raises(FoldLockedError, match=r"cannot be read; if no training of this fold "
                                              r"runs, clear the lock with: rm "):
        fold_lock.acquire(directory)


def test_release_leaves_a_lock_that_is_no_longer_its_own(tmp_path, sleeper):
    directory = tmp_path / "fold_0"
    with fold_lock.hold(directory):
        os.unlink(directory / fold_lock.LOCK_NAME)  # cleared by hand, another run took the fold
        path = write_lock(directory, pid=sleeper.pid)
    assert json.loads(path.read_text())["pid"] == sleeper.pid


def test_only_process_0_of_a_multi_process_run_takes_the_lock(tmp_path):
    with fold_lock.hold(tmp_path / "fold_0", enabled=False) as lock:
        assert lock is None
    assert not (tmp_path / "fold_0").exists()


def test_train_fold_takes_the_lock_before_anything_else(tmp_path, sleeper):

    from dwise_jax import config as config_lib

    # A data root that does not exist: the lock is refused first, so that error is never seen.
    config = config_lib.load_config_file(DEMO, {"data_root": str(tmp_path / "nope")})
    path = write_lock(checkpoint.fold_dir(tmp_path, "demo", 3), pid=sleeper.pid)
    with pytest.raises(FoldLockedError, match="another training process holds this fold"):
        fold_run.train_fold(config, tmp_path, 3)
    assert sorted(p.name for p in path.parent.iterdir()) == ["train.lock"]


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def plain_root(sim_root, tmp_path_factory) -> Path:
    return link_copy(sim_root, tmp_path_factory.mktemp("lock_plain") / "root")


@pytest.fixture(scope="module")
def train_env(tmp_path_factory) -> dict[str, str]:
    return command_env()  # the run's compilation cache inherited


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every file and folder under `folder`: size, modification time and SHA-256."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.stat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
        out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns, digest)
    return out


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]


def freeze_when(child: Child, ready) -> None:
    """Stops the child's process group (SIGSTOP) at a moment when `ready()` holds: stop, look,
    let it go on until it does. No verdict depends on the machine's speed."""
    deadline = time.monotonic() + HANG_TIMEOUT_S
    while True:
        assert child.alive(), "the first run ended before it could be caught holding the fold"
        os.killpg(child.proc.pid, signal.SIGSTOP)
        if ready():
            return
        os.killpg(child.proc.pid, signal.SIGCONT)
        assert time.monotonic() < deadline, "the first run made no progress"
        time.sleep(0.005)


def test_a_second_training_of_the_same_fold_is_refused_and_changes_nothing(
        plain_root, train_env, reference_fold, tmp_path, capsys, monkeypatch):
    from dwise_jax import predict

    # The refused second run in process (conftest.call_command); the first, caught holding the
    # fold, is a command line.
    args = lambda workdir: train_args(plain_root, workdir, *REFERENCE_EXTRA)
    alone_fold = reference_fold  # the run alone (conftest)

    workdir = tmp_path / "shared"
    fold = checkpoint.fold_dir(workdir, "demo", FOLD)
    lock = fold / fold_lock.LOCK_NAME
    first = Child(train_command(plain_root, workdir, *REFERENCE_EXTRA), train_env,
                  tmp_path / "first.txt")
    try:
        # Caught while it trains: it holds the fold and has a complete checkpoint.
        freeze_when(first, lambda: lock.exists() and checkpoint.latest_step(fold) is not None)
        holder = json.loads(lock.read_text())
        assert (holder["pid"], holder["host"]) == (first.proc.pid, socket.gethostname())
        before = snapshot(fold)

        capsys.readouterr()
        status, err = call_command("train", args(workdir), monkeypatch), capsys.readouterr().err
        assert status == 1, err[-3000:]
        assert "Traceback" not in err
        assert err.splitlines()[-1] == (
            f"error: {fold}: another training process holds this fold (pid {first.proc.pid} "
            f"on host {socket.gethostname()}, started {holder['started']}); wait for it to end "
            f"or stop it (lock file {lock})"), err[-3000:]
        assert snapshot(fold) == before  # not a file of the first run touched

        # Prediction takes no lock: it reads the fold's last complete checkpoint meanwhile.
        step = checkpoint.latest_step(fold)
        result = predict.predict_split(workdir, "demo", "live_test_main", fold_ids=[FOLD],
                                       anchor_stride=8, batch_size=16)
        assert [f["step"] for f in result["manifest"]["folds"]] == [step]
        assert snapshot(fold) == before
    finally:
        if first.alive():
            os.killpg(first.proc.pid, signal.SIGCONT)
    first.finish()
    assert first.proc.returncode == 0, (tmp_path / "first.txt").read_text()[-3000:]
    assert not lock.exists()

    # The first run ends exactly as the run alone: checkpoints, metrics and logs.
    items = ("state", "ema", "loader")
    a_step, a = checkpoint.restore(alone_fold, items)
    b_step, b = checkpoint.restore(fold, items)
    assert a_step == b_step
    assert_bit_identical(a, b)
    assert sorted(os.listdir(fold / "checkpoints")) == sorted(
        os.listdir(alone_fold / "checkpoints"))
    assert best_step(fold) == best_step(alone_fold)
    assert without_timing(records(fold / "metrics.jsonl")) == without_timing(
        records(alone_fold / "metrics.jsonl"))
    events = sorted((fold / "tensorboard").iterdir())
    alone_events = sorted((alone_fold / "tensorboard").iterdir())
    assert len(events) == len(alone_events) == 1  # one writer, as many events of the same size
    assert events[0].stat().st_size == alone_events[0].stat().st_size
    assert sorted(p.name for p in fold.iterdir()) == sorted(p.name for p in alone_fold.iterdir())
