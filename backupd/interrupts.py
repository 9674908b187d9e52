"""SIGTERM and Ctrl-C in the CLI: a KeyboardInterrupt, raised where unwinding is safe.

A command unwinds like Ctrl-C, so every `finally` (helper removal, upload abort, container
restart, catalog record) runs before the process exits. But CPython raises a signal
handler's exception wherever the main thread is, and inside a `queue.Queue` or
`threading.Condition` wait that can leave the condition's lock released by the wrong
thread: the worker thread then misses its wake-up, and a backup interrupted at that
instant waited forever for it (about 1 in 20 SIGTERMs on a loaded machine).

Code that waits on such primitives runs under `held()`; an interrupt arriving there is
raised when it leaves. Only the main thread is concerned: signal handlers run nowhere else.
The daemon (`backupd run`) installs handlers of its own that only set flags.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator


@dataclass
class _State:
    depth: int = 0  # held() sections the main thread is in
    pending: bool = False  # an interrupt arrived in one of them


_state = _State()


def _on_signal(signum: int, frame: Any) -> None:
    if _state.depth:
        _state.pending = True
        return
    _state.pending = False  # this one is raised now, not again at the end of a held() section
    raise KeyboardInterrupt


def install() -> None:
    """SIGTERM and SIGINT raise KeyboardInterrupt in the main thread, outside held() sections.
    Starts afresh: a command run before in this process (tests) held interrupts from its end."""
    if _in_main():
        _state.depth, _state.pending = 0, False
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)


def _in_main() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def held() -> Iterator[None]:
    """Run a wait on a lock, queue or condition whole; an interrupt that arrives meanwhile
    is raised at the end. Keep such sections short: they delay Ctrl-C."""
    if not _in_main():
        yield
        return
    _state.depth += 1
    try:
        yield
    finally:
        _state.depth -= 1
        if not _state.depth and _state.pending:
            _state.pending = False
            raise KeyboardInterrupt


def hold_from_now() -> None:
    """The command is over: closing (leases released, catalog disposed) is not cut short, and
    the exit code stays the command's."""
    if _in_main():
        _state.depth += 1
