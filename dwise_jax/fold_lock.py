"""One training process per fold folder: `<fold>/train.lock`, a JSON file naming its holder.
A live holder is refused, a dead one on this host taken over with a warning, one on another
host refused with the `rm` that clears it (docs/design.md#one-training-process-per-fold)."""

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


class FoldLockedError(RuntimeError):
    """The fold folder is held by another training process (the message names it)."""


def _read(path: str | os.PathLike) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _boot_id() -> str | None:
    return _read("/proc/sys/kernel/random/boot_id").strip() or None


def _stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces), or []."""
    stat = _read(f"/proc/{pid}/stat")
    return stat[stat.rfind(")") + 2:].split()


def _process_start(pid: int) -> int | None:
    """Start time of process `pid` in clock ticks after boot (Linux /proc), else None."""
    fields = _stat(pid)
    return int(fields[19]) if len(fields) > 19 else None


def describe(holder: dict) -> str:
    """'pid 123 on host h, started 2025-01-01T10:00:00+00:00'."""
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
            f"{holder.get('started', '?')}")


def holder_is_alive(holder: dict) -> bool | None:
    """Whether the holder process still runs: True/False on this host, None on another host."""
    if holder.get("host") != platform.node():
        return None
    pid, boot, start = holder.get("pid"), _boot_id(), holder.get("process_start")
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False  # no pid, or ours: an earlier life of it (a restarted container)
    if holder.get("boot_id") and boot and holder["boot_id"] != boot:
        return False  # written before a reboot
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    fields = _stat(pid)
    if fields and fields[0] in ("Z", "X"):
        return False  # a zombie: it has exited, its parent has not reaped it yet
    # A later start: the pid now belongs to another process.
    return start is None or _process_start(pid) in (None, start)


def read_holder(path: Path) -> dict | None:
    """The lock's JSON, or None when it is unreadable or not a JSON object."""
    try:
        holder = json.loads(_read(path))
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _write(fd: int, content: str) -> None:
    with os.fdopen(fd, "w") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())


def _create(path: Path, content: str) -> bool:
    """Creates `path` holding `content`, atomically and only if it does not exist."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        _write(fd, content)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive create, then write
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            _write(fd, content)
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


def acquire(directory: str | os.PathLike) -> dict:
    """Takes `<directory>/train.lock` (creating the folder if needed) and returns the holder
    written there, or raises FoldLockedError naming the holder that keeps it."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    path, rm = directory / LOCK_NAME, f"rm {shlex.quote(str(directory / LOCK_NAME))}"
    holder = {
        "host": platform.node(), "pid": os.getpid(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "boot_id": _boot_id(), "process_start": _process_start(os.getpid()),
        "token": uuid.uuid4().hex,
    }
    for _ in range(3):  # a stale lock taken over by another process between our looks
        if _create(path, json.dumps(holder, indent=2) + "\n"):
            return holder
        other = read_holder(path)
        if other is None:
            if not path.exists():
                continue  # released just now
            raise FoldLockedError(f"{directory}: is locked for training by {path}, which cannot "
                                  f"be read; if no training of this fold runs, clear the lock "
                                  f"with: {rm}")
        alive = holder_is_alive(other)
        if alive:
            raise FoldLockedError(
                f"{directory}: another training process holds this fold ({describe(other)}); "
                f"wait for it to end or stop it (lock file {path})")
        if alive is None:
            raise FoldLockedError(
                f"{directory}: held by a training process on another host ({describe(other)}); "
                f"if it no longer runs there, clear the lock with: {rm}")
        # Dead on this host: remove it if it is still the lock judged stale, then create ours.
        if read_holder(path) == other:
            print(f"warning: {path}: taking over the lock of {describe(other)}, which no longer "
                  "runs", file=sys.stderr)
            path.unlink(missing_ok=True)
    raise FoldLockedError(f"{directory}: could not take {path}: other processes keep taking it")


@contextlib.contextmanager
def hold(directory: str | os.PathLike, enabled: bool = True) -> Iterator[dict | None]:
    """`acquire(directory)` for the block, yielding the holder. On leaving, however, the lock
    goes if it is still ours, and so do the folders it made if nothing filled them (training
    stopped before writing). `enabled=False` (processes other than 0) holds nothing."""
    if not enabled:
        yield None
        return
    directory = Path(directory).absolute()
    created = [p for p in (directory, *directory.parents) if not p.exists()]
    holder = acquire(directory)
    try:
        yield holder
    finally:
        path = directory / LOCK_NAME
        if (read_holder(path) or {}).get("token") == holder["token"]:
            path.unlink(missing_ok=True)
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break


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
