"""One training process per fold folder: `<fold>/train.lock`, a JSON file naming its holder.

A live holder is refused with an error naming it, a dead one on this host is taken over with a
warning, one on another host is refused with the `rm` that clears it. Prediction never takes
the lock. See docs/design.md#one-training-process-per-fold.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import platform
import shlex
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = "train.lock"
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


class FoldLockedError(RuntimeError):
    """The fold folder is held by another training process (the message names it)."""


def _boot_id() -> str | None:
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """Start time of process `pid` in clock ticks after boot (Linux /proc), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (the command name) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rfind(")") + 2:].split()
    return int(fields[19]) if len(fields) > 19 else None


def _process_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()[0]


def describe(holder: dict) -> str:
    """'pid 123 on host h, started 2025-01-01T10:00:00+00:00'."""
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
            f"{holder.get('started', '?')}")


def holder_is_alive(holder: dict) -> bool | None:
    """Whether the holder process still runs: True/False on this host, None on another host."""
    if holder.get("host") != platform.node():
        return None
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    boot = _boot_id()
    if holder.get("boot_id") and boot and holder["boot_id"] != boot:
        return False  # written before a reboot
    if pid == os.getpid():
        return False  # an earlier life of this pid (a container restarted), not this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    if _process_state(pid) in ("Z", "X"):
        return False  # a zombie: it has exited, its parent has not reaped it yet
    start = holder.get("process_start")
    if start is not None and _process_start(pid) not in (None, start):
        return False  # the pid now belongs to a process started later
    return True


def read_holder(path: Path) -> dict | None:
    """The lock's JSON, or None when it is unreadable or not a JSON object."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _create(path: Path, content: str) -> bool:
    """Creates `path` holding `content`, atomically and only if it does not exist."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive create, then write
            try:
                out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(out, "w") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
            return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


class FoldLock:
    """A held lock; `release()` removes the file if it is still this one's."""

    def __init__(self, path: Path, holder: dict, created: list[Path]):
        self.path, self.holder, self._created = path, holder, created

    def release(self) -> None:
        current = read_holder(self.path)
        if current is not None and current.get("token") == self.holder["token"]:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        # Folders this lock made and nothing else filled (training stopped before writing).
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:
                break


def acquire(directory: str | os.PathLike) -> FoldLock:
    """Takes `<directory>/train.lock` (creating the folder if needed) or raises
    FoldLockedError naming the holder."""
    directory = Path(directory).absolute()
    created = [p for p in (directory, *directory.parents) if not p.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    holder = {
        "host": platform.node(), "pid": os.getpid(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "boot_id": _boot_id(), "process_start": _process_start(os.getpid()),
        "token": uuid.uuid4().hex,
    }
    content = json.dumps(holder, indent=2) + "\n"
    for _ in range(3):  # a stale lock taken over by another process between our looks
        if _create(path, content):
            return FoldLock(path, holder, created)
        other = read_holder(path)
        if other is None:
            if not path.exists():
                continue  # released just now
            raise FoldLockedError(
                f"{directory}: is locked for training by {path}, which cannot be read; if no "
                f"training of this fold runs, clear the lock with: rm {shlex.quote(str(path))}")
        alive = holder_is_alive(other)
        if alive:
            raise FoldLockedError(
                f"{directory}: another training process holds this fold ({describe(other)}); "
                f"wait for it to end or stop it (lock file {path})")
        if alive is None:
            raise FoldLockedError(
                f"{directory}: held by a training process on another host ({describe(other)}); "
                "if it no longer runs there, clear the lock with: "
                f"rm {shlex.quote(str(path))}")
        # Dead on this host: remove it if it is still the lock judged stale, then create ours.
        if read_holder(path) == other:
            print(f"warning: {path}: taking over the lock of {describe(other)}, which no longer "
                  "runs", file=sys.stderr)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    raise FoldLockedError(f"{directory}: could not take {path}: other processes keep taking it")


@contextlib.contextmanager
def hold(directory: str | os.PathLike, enabled: bool = True) -> Iterator[FoldLock | None]:
    """`acquire(directory)` for the block, released on leaving it however it is left.
    `enabled=False` (every process of a multi-process run but process 0) holds nothing."""
    if not enabled:
        yield None
        return
    lock = acquire(directory)
    try:
        yield lock
    finally:
        lock.release()


def guard_training(train_fold):
    """Decorates `train_fold(config, workdir, fold, ...)`: the fold folder is held by this
    process (process 0 of a multi-process run) for the whole call."""

    @functools.wraps(train_fold)
    def guarded(config, workdir, fold, *args, **kwargs):
        import jax

        from dwise_jax import checkpoint

        directory = checkpoint.fold_dir(workdir, config.experiment, fold)
        with hold(directory, enabled=jax.process_index() == 0):
            return train_fold(config, workdir, fold, *args, **kwargs)

    return guarded
