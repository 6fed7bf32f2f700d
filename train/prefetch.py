"""Background prefetching for a resumable iterator, without breaking exact resume.

`Prefetcher` runs the wrapped iterator in a daemon thread, ``depth`` batches ahead. Each
batch travels with the wrapped iterator's state *after* it was made, so `Prefetcher.state`
is the state after the last batch the caller actually received — batches made ahead but not
yet consumed are not skipped by a resume. Batches are produced by one thread in order, so
the sequence is identical to the unprefetched one.

Tokenization and packing hold the GIL only briefly next to a train step (the main thread
mostly waits on the device, which releases it), so this hides the data time almost fully.
"""

from __future__ import annotations

import queue
import threading


class Prefetcher:
    """``next()`` / ``state()`` / ``restore()`` of ``it``, produced ``depth`` batches ahead in a thread."""

    def __init__(self, it, depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth must be ≥ 1, got {depth}.")
        self._it, self._depth = it, depth
        self._thread: threading.Thread | None = None
        self._state = it.state()

    def __getattr__(self, name):  # tokenizer, seq_len, batch_size, ... of the wrapped iterator
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._it, name)

    def _run(self, q: queue.Queue, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                item = (next(self._it), self._it.state())
            except BaseException as exc:  # delivered to the consumer, raised there
                item = exc
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def _start(self) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=self._depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self._queue, self._stop), daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the producer thread and rewind the wrapped iterator to the last batch consumed."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._it.restore(self._state)

    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._thread.join()
            self._thread = None  # the wrapped iterator failed: no rewind, the error stands
            raise item
        batch, self._state = item
        return batch

    def state(self) -> dict:
        """The wrapped iterator's state after the last batch returned by `__next__`."""
        return self._state

    def restore(self, state: dict) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self._it.restore(state)
        self._state = self._it.state()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
