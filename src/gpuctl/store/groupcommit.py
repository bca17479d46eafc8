"""Group commit: the store's writes from many threads share transactions and commits.

A writer queues its work and takes the commit lock; whoever holds the lock runs everything
queued by then (its own work and that of the writers waiting behind it) in one transaction,
each piece in a savepoint of its own, and commits once. One commit (one fsync on SQLite, one
round trip and WAL flush on PostgreSQL) acknowledges a whole batch, and on SQLite no thread
of this process ever waits in SQLite's busy handler, whose sleeps grow to 100 ms.

Each piece sees the pieces before it in its batch, as if the writes had run one after another
(they did), and one piece failing rolls back its savepoint only. Nothing returns to a caller
before its batch committed: a write acknowledged is durable as before.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")
S = TypeVar("S")

# Big enough that a burst of submits shares commits; small enough that the first writer of a
# batch does not wait long for the last one's work.
MAX_BATCH = 128


class Write(Generic[S]):
    """One caller's piece of work: `fn(session)`, and what came of it."""

    __slots__ = ("done", "error", "fenced", "fn", "result")

    def __init__(self, fn: Callable[[S], Any], fenced: bool) -> None:
        self.fn = fn
        self.fenced = fenced
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None


class GroupCommit(Generic[S]):
    """Runs writes in batches through `commit(batch)`, which must set each write's `result`
    or `error`."""

    def __init__(
        self, commit: Callable[[Sequence[Write[S]]], None], *, max_batch: int = MAX_BATCH
    ) -> None:
        self._commit = commit
        self._max = max_batch
        # Called before a writer waits for its batch: the API's handlers leave their gate
        # (api.lanes), so that the calls behind them can queue their writes into this batch.
        self.before_waiting: Callable[[], None] = lambda: None
        self._queue: deque[Write[S]] = deque()
        self._lock = threading.Lock()
        self.batches = 0  # transactions run, and writes in them: writes / batches is the
        self.writes = 0  # mean batch

    def __call__(self, fn: Callable[[S], T], *, fenced: bool = True) -> T:
        write: Write[S] = Write(fn, fenced)
        self._queue.append(write)  # deque appends and pops are atomic
        self.before_waiting()
        while not write.done:
            with self._lock:
                if write.done:  # the holder before us ran it
                    break
                batch: list[Write[S]] = []
                while self._queue and len(batch) < self._max:
                    batch.append(self._queue.popleft())
                self.batches += 1
                self.writes += len(batch)
                try:
                    self._commit(batch)
                except BaseException as e:  # nothing may be left waiting forever
                    for w in batch:
                        if w.error is None:
                            w.error, w.result = e, None
                for w in batch:
                    w.done = True
        if write.error is not None:
            raise write.error
        return write.result
