"""Issue 16.3: a full disk. Training on a real small tmpfs (a user and mount namespace, where
the machine allows one) stops at the first failing write with one error line naming the file,
keeps the last complete checkpoint, and resumes when space is freed (the tmpfs grown) to the
same final state as a run with room. Also in-process: an ENOSPC inside an atomic write names
the final file and leaves the previous file as it was."""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    HANG_TIMEOUT_S,
    REFERENCE_EXTRA,
    assert_bit_identical,
    command_env,
    link_copy,
    train_command,
)

from dwise_jax import atomic, checkpoint, fatal


@pytest.fixture
def run_env(tmp_path) -> dict[str, str]:
    """The command line's environment, the test run's compilation cache inherited."""
    return command_env()


def _namespaces_work(tmp_path: Path) -> bool:
    mnt = tmp_path / "probe"
    mnt.mkdir()
    if shutil.which("unshare") is None:
        return False
    out = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mnt}"],
                         capture_output=True, timeout=HANG_TIMEOUT_S)
    return out.returncode == 0


def test_training_on_a_full_tmpfs_stops_with_one_line_and_resumes(sim_root, run_env, tmp_path,
                                                                  reference_fold):
    if not _namespaces_work(tmp_path):
        pytest.skip("this machine allows no user/mount namespace for a small tmpfs "
                    "(the in-process ENOSPC test below still runs)")
    root = link_copy(sim_root, tmp_path / "root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    command = " ".join(f"'{a}'" for a in train_command(root, mnt / "w", *REFERENCE_EXTRA))
    # 900 KiB: room for the first epoch's checkpoint, not for the second one.
    script = f"""
mount -t tmpfs -o size=900k tmpfs {mnt} || exit 99
{command} > {tmp_path}/a.out 2> {tmp_path}/a.err; echo $? > {tmp_path}/a.rc
cp -a {mnt}/w {tmp_path}/after_fail
mount -o remount,size=64m {mnt}
{command} > {tmp_path}/b.out 2> {tmp_path}/b.err; echo $? > {tmp_path}/b.rc
cp -a {mnt}/w {tmp_path}/after_resume
"""
    subprocess.run(["unshare", "-rm", "sh", "-c", script], env=run_env,
                   timeout=HANG_TIMEOUT_S, check=True)
    err = (tmp_path / "a.err").read_text()
    assert (tmp_path / "a.rc").read_text().strip() == "1", err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "the disk is full" in last, last
    assert err.count("error: ") == 1  # (Orbax logs its own failures above it)
    assert str(mnt / "w" / "demo" / "fold_2") in last  # names the file or folder
    failed = tmp_path / "after_fail" / "demo" / "fold_2"
    step = checkpoint.latest_step(failed)
    assert step is not None and checkpoint.verify(failed, step) is None
    for name in ("config.json", "model.json"):  # complete, readable
        assert (failed / name).read_text().strip().endswith("}")
    assert (tmp_path / "b.rc").read_text().strip() == "0", (tmp_path / "b.err").read_text()[-2000:]
    assert f"resuming from step {step}" in (tmp_path / "b.out").read_text()

    # The resumed run ends where a run with room ends (conftest.reference_fold).
    resumed = tmp_path / "after_resume" / "demo" / "fold_2"
    _, a = checkpoint.restore(resumed, ("state", "ema"))
    _, b = checkpoint.restore(reference_fold, ("state", "ema"))
    assert checkpoint.latest_step(resumed) == checkpoint.latest_step(reference_fold)
    assert_bit_identical(a, b)


def test_enospc_in_an_atomic_write_names_the_file_and_keeps_the_previous_one(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("previous\n")
    with pytest.raises(OSError) as caught, atomic.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert caught.value.filename == str(target)
    assert target.read_text() == "previous\n" and sorted(tmp_path.iterdir()) == [target]
    wrapped = RuntimeError("writer failed")
    wrapped.__cause__ = caught.value
    assert fatal.find(wrapped) is caught.value
    assert fatal.message(caught.value).startswith(f"{target}: the disk is full")
    assert fatal.find(RuntimeError("other")) is None


def test_the_error_line_is_the_last_even_while_other_threads_write_to_stderr(tmp_path):
    """Orbax's threads may still print tracebacks while the command ends: they go nowhere
    after `exit_with_line`, whose line is the last of stderr, and the status is 1."""
    script = f"""
import errno, sys, threading, time
from dwise_jax import fatal

def noisy():
    while True:
        print("Traceback (most recent call last):", file=sys.stderr, flush=True)
        sys.stderr.write("    raise RuntimeError('Event loop is closed')")  # no newline
        sys.stderr.flush()

threading.Thread(target=noisy, daemon=True).start()
time.sleep(0.2)
fatal.exit_with_line(fatal.message(OSError(errno.ENOSPC, "full", {str(tmp_path / 'f')!r})))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=HANG_TIMEOUT_S)
    assert out.returncode == 1
    assert "Event loop is closed" in out.stderr  # the thread did write before the end
    last = out.stderr.strip().splitlines()[-1]
    assert last == "error: " + fatal.message(OSError(errno.ENOSPC, "x", str(tmp_path / "f")))
