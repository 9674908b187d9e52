"""The event-stream thread (backupd.events): debounce, reconnect, clean stop. The real engine's
stream is crossed in tests/integration/test_labels.py."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Iterator

from backupd.events import FILTERS, EventWatcher


class Stream:
    """Like the SDK's CancellableStream: iterates until closed or told to end or break."""

    def __init__(self) -> None:
        self.items: queue.Queue = queue.Queue()
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[dict]:
        while not self.closed.is_set():
            try:
                item = self.items.get(timeout=0.01)
            except queue.Empty:
                continue
            if item == "end":
                return
            if isinstance(item, Exception):
                raise item
            yield item

    def close(self) -> None:
        self.closed.set()


class Engine:
    def __init__(self, refuse: int = 0) -> None:
        self.refuse = refuse
        self.streams: list[Stream] = []
        self.filters: list[Any] = []

    def events(self, decode: bool, filters: Any) -> Stream:
        assert decode is True
        self.filters.append(filters)
        if self.refuse:
            self.refuse -= 1
            raise ConnectionError("engine away")
        self.streams.append(Stream())
        return self.streams[-1]


def wait_for(check: Any, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_of_events_is_due_once_after_it_has_been_quiet_for_the_debounce() -> None:
    engine, clock, woken = Engine(), Clock(), threading.Event()
    watcher = EventWatcher(lambda: engine, woken.set, debounce=2.0, clock=clock)
    watcher.start()
    try:
        wait_for(lambda: engine.streams)
        assert engine.filters[0] == FILTERS and FILTERS["label"] == ["backupd.enable"]
        for _ in range(5):
            engine.streams[0].items.put({"Action": "start", "Actor": {"Attributes": {"name": "x"}}})
        wait_for(lambda: watcher.events == 5)
        assert woken.is_set() and not watcher.due()
        assert 0 < watcher.wait_hint(5) <= 2.0
        clock.now += 1.9
        assert not watcher.due()
        clock.now += 0.2
        assert watcher.due() and not watcher.due()  # once per burst
        assert watcher.wait_hint(5) == 5
    finally:
        assert watcher.stop()


def test_a_broken_or_ended_stream_is_reopened_with_backoff_and_counts_as_a_change() -> None:
    engine, clock = Engine(refuse=2), Clock()
    watcher = EventWatcher(lambda: engine, debounce=0, retry_first=0.01, retry_max=0.02, clock=clock)
    watcher.start()
    try:
        wait_for(lambda: engine.streams)  # after two refused connections
        assert watcher.connections == 1 and not watcher.due()
        engine.streams[0].items.put(OSError("connection reset"))
        wait_for(lambda: len(engine.streams) == 2)
        wait_for(watcher.due)  # events may have been missed while it was away
        engine.streams[1].items.put("end")
        wait_for(lambda: len(engine.streams) == 3)
        assert watcher.connections == 3 and engine.streams[0].closed.is_set()
    finally:
        assert watcher.stop()


def test_stop_closes_the_stream_and_ends_the_thread_promptly() -> None:
    engine = Engine()
    watcher = EventWatcher(lambda: engine)
    watcher.start()
    wait_for(lambda: engine.streams)
    started = time.monotonic()
    assert watcher.stop(timeout=2)
    assert time.monotonic() - started < 1 and engine.streams[0].closed.is_set()


def test_stop_while_the_engine_is_away_does_not_wait_out_the_backoff() -> None:
    engine = Engine(refuse=1000)
    watcher = EventWatcher(lambda: engine, retry_first=30, retry_max=30)
    watcher.start()
    wait_for(lambda: engine.refuse < 1000)
    started = time.monotonic()
    assert watcher.stop(timeout=2) and time.monotonic() - started < 1
