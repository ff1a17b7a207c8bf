"""How a command ends on a failure of its environment (a full disk, a dead peer process): one
`error:` line, the last on stderr, exit 1. Writes are atomic, so the same command resumes once
space is freed (docs/reliability.md)."""

from __future__ import annotations

import errno
import os
import sys
from typing import NoReturn

from dwise_jax import sharding


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


def exit_with(error: OSError, where: str = "") -> NoReturn:
    """Print `error: <file>: the disk is full ...` as the last line of stderr and exit 1."""
    exit_with_line(message(error, where))


def exit_with_line(text: str) -> NoReturn:
    """Print `error: <text>` as the last line of stderr and exit 1, at once.

    Orbax's writer threads or JAX's distributed runtime may still print tracebacks of the same
    failure, so stderr goes to /dev/null before our line leaves through a saved descriptor
    (on a fresh line), and `os._exit` skips the interpreter's shutdown (our `finally`s ran).
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    saved = os.dup(2)
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 2)
    os.write(saved, f"\nerror: {text}\n".encode())
    os._exit(1)


def exit_if_fatal(error: BaseException, where: str) -> None:
    """Ends the process with one line if `error` is a full disk or a dead peer process (the
    collective failed); returns otherwise, for the caller to re-raise. `where`: the workdir."""
    if (full := find(error)) is not None:
        exit_with(full, where)
    if sharding.peer_failure(error):
        exit_with_line(sharding.peer_failure_line(error, where))
