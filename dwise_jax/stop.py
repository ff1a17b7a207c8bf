"""Stop requests (SIGTERM, Ctrl-C) for training: immediate before a fold's first step is done,
graceful after it. A watcher thread reads the signals from a wake-up pipe, so a stop does not
wait for XLA's compilation of the first step (docs/design.md#stop-requests)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_state = {"requested": False, "step_done": False, "where": "", "on_exit": None}
_installed = False


def requested() -> bool:
    """Whether a graceful stop was asked for."""
    return _state["requested"]


def fold_ended() -> None:
    """The fold is over (saved, or failed): a request ends the process at once again."""
    _state.update(requested=False, step_done=False, where="", on_exit=None)


def fold_started(where: str, on_exit: Callable[[], None] | None = None) -> None:
    """A fold begins: stop requests end the process at once until `step_done()`. `where` names
    the fold folder in the exit line; `on_exit` (e.g. the fold lock's release) runs first."""
    _state.update(step_done=False, where=where, on_exit=on_exit)


def step_done() -> None:
    """The fold's first step of this run has finished: stop requests are graceful from now."""
    _state["step_done"] = True


def request(signum: int) -> None:
    """What a stop signal does (the watcher thread calls it)."""
    if _state["step_done"] and not _state["requested"]:
        _state["requested"] = True
        return
    reason = ("by a second request, without finishing the step" if _state["requested"]
              else "before the first step finished")
    where = f" in {_state['where']}" if _state["where"] else ""
    with contextlib.suppress(Exception):  # the exit must happen whatever the clean-up does
        if _state["on_exit"] is not None:
            _state["on_exit"]()
    # A fresh line: after a progress bar's unfinished one.
    os.write(2, f"\nstopped by request {reason}: nothing new was saved; the last checkpoint"
                f"{where} (if any) is intact\n".encode())
    os._exit(128 + int(signum))


def _watch(read_fd: int) -> None:
    while True:
        for signum in os.read(read_fd, 64):
            if signum in _SIGNALS:
                request(signum)


def install() -> None:
    """Installs the handlers and the watcher (main thread only; once per process)."""
    global _installed
    if _installed:
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    for s in _SIGNALS:
        signal.signal(s, lambda *_: None)  # the watcher acts; Python's handler must not
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(read_fd,), daemon=True, name="stop-watcher").start()
    _installed = True
