"""SIGTERM and Ctrl-C in the CLI: raised as KeyboardInterrupt, but never inside a queue or
lock wait, where CPython can leave the lock broken and a worker thread waiting forever.

A signal is simulated where it can land for real: `signal.raise_signal` inside the queue
operation runs the handler there, as a signal arriving while the main thread waits would.
"""

from __future__ import annotations

import queue
import signal
import threading

import pytest

from backupd import interrupts
from backupd.stream import ThreadedSink, prefetched


@pytest.fixture(autouse=True)
def cli_handlers():
    """The CLI's handlers, for one test; the test process's own come back afterwards."""
    saved = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    interrupts.install()
    yield
    signal.signal(signal.SIGTERM, saved[0])
    signal.signal(signal.SIGINT, saved[1])
    interrupts._state.depth, interrupts._state.pending = 0, False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_outside_a_held_section_interrupts_at_once(signum):
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signum)


def test_a_signal_inside_a_held_section_is_raised_when_the_outermost_one_ends():
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.held():
            with interrupts.held():
                signal.raise_signal(signal.SIGTERM)
                reached.append("inner")
            reached.append("outer")  # the inner section's end is not the place either
    assert reached == ["inner", "outer"]
    with interrupts.held():  # raised once: the next section starts clean
        pass


def test_after_the_command_a_signal_no_longer_cuts_closing_short():
    interrupts.hold_from_now()
    signal.raise_signal(signal.SIGTERM)  # would raise here, or at any later held() end
    with interrupts.held():
        pass


class _Slow:
    """A downstream that takes its time, so the queue is full when the writer puts."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.release = threading.Event()

    def write(self, data: bytes) -> None:
        self.release.wait(5)
        self.written.append(data)

    def close(self) -> None:
        pass


def test_a_signal_during_a_sinks_put_is_raised_after_the_put_so_stop_still_returns(monkeypatch):
    downstream = _Slow()
    sink = ThreadedSink(downstream, depth=1)
    real_put = queue.Queue.put

    def put_signalled(self, item, *args, **kwargs):
        signal.raise_signal(signal.SIGTERM)  # lands inside the wait for room
        real_put(self, item, *args, **kwargs)

    monkeypatch.setattr(queue.Queue, "put", put_signalled)
    with pytest.raises(KeyboardInterrupt):
        sink.write(b"one")
    assert sink._queue.qsize() + len(downstream.written) >= 1, "the put was cut short"
    monkeypatch.setattr(queue.Queue, "put", real_put)
    downstream.release.set()
    sink.stop(discard=True)
    assert not sink._thread.is_alive()


def test_a_signal_while_stop_waits_for_the_thread_is_raised_once_it_has_finished(monkeypatch):
    downstream = _Slow()
    sink = ThreadedSink(downstream, depth=2)
    sink.write(b"one")
    real_join = threading.Thread.join

    def join_signalled(self, *args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        downstream.release.set()
        real_join(self, *args, **kwargs)

    monkeypatch.setattr(threading.Thread, "join", join_signalled)
    with pytest.raises(KeyboardInterrupt):
        sink.stop()
    assert not sink._thread.is_alive() and downstream.written == [b"one"]


def test_an_abandoned_sink_drops_what_is_still_queued():
    downstream = _Slow()
    sink = ThreadedSink(downstream, depth=2)
    for chunk in (b"a", b"b", b"c"):  # "a" is being written, "b" and "c" wait in the queue
        sink.write(chunk)
    stopper = threading.Thread(target=sink.stop, kwargs={"discard": True})
    stopper.start()
    while not sink._discard:
        pass
    downstream.release.set()
    stopper.join(5)
    assert not stopper.is_alive() and downstream.written == [b"a"]


def test_a_signal_during_a_prefetch_get_is_raised_after_the_get(monkeypatch):
    real_get = queue.Queue.get
    got: list[object] = []

    def get_signalled(self, *args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        got.append(item := real_get(self, *args, **kwargs))
        return item

    reader = prefetched(iter([b"a", b"b"]), depth=1)
    monkeypatch.setattr(queue.Queue, "get", get_signalled)
    with pytest.raises(KeyboardInterrupt):
        next(reader)
    assert got == [b"a"], "the get was cut short"
