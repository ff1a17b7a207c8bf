"""How a command ends on a failure of its environment (a full disk, a dead peer process): one
`error:` line, the last on stderr, exit 1. Writes are atomic, so the same command resumes once
space is freed (docs/reliability.md, docs/design.md#failures-of-the-environment)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import struct
import sys
import termios
import time
from typing import NoReturn

import jax


def find(error: BaseException) -> OSError | None:
    """The ENOSPC OSError behind `error` (itself, its cause or context), else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return error
        error = error.__cause__ or error.__context__
    return None


def message(error: OSError, where: str = "") -> str:
    """The one line (without `error: `) for an ENOSPC error."""
    name = error.filename or (f"a file under {where}" if where else "a file")
    return (f"{name}: the disk is full (no space left on device); free some space and run the "
            "same command again (training resumes from its last complete checkpoint)")


def _wait_for_blocked_writes(fd: int, timeout_s: float = 2.0) -> None:
    """Waits (at most `timeout_s`) until the pipe behind `fd`, if it is one, has room for any
    atomic write twice in a row 20 ms apart without filling up again: a thread's write that was
    blocked on the full pipe before stderr went to /dev/null has then landed, before our line."""
    with contextlib.suppress(Exception):  # not a pipe, or not Linux: nothing can be blocked
        size = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
        queued = lambda: struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
        deadline, before, calm = time.monotonic() + timeout_s, queued(), 0
        while calm < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
            now = queued()
            calm = calm + 1 if size - now >= select.PIPE_BUF and now <= before else 0
            before = now


def exit_with_line(text: str) -> NoReturn:
    """Print `error: <text>` as the last line of stderr and exit 1 at once, with stderr pointed
    at /dev/null first and our line sent through a saved descriptor, after writes blocked on a
    full pipe (docs/design.md#failures-of-the-environment)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    saved = os.dup(2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    _wait_for_blocked_writes(saved)
    os.write(saved, f"\nerror: {text}\n".encode())
    os._exit(1)


def exit_if_fatal(error: BaseException, where: str) -> None:
    """Ends the process with one line if `error` is a full disk or, with several processes, a
    failed collective (another process went away: gloo's closed connection, missed heartbeats);
    returns otherwise, for the caller to re-raise. `where`: the workdir."""
    if (full := find(error)) is not None:
        exit_with_line(message(full, where))
    if jax.process_count() > 1 and isinstance(error, jax.errors.JaxRuntimeError):
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        exit_with_line(
            f"process {jax.process_index()} of {jax.process_count()}: another process of this "
            f"run stopped ({first}); nothing more was saved, the last complete checkpoint under "
            f"{where} stays; start every process again to resume")
