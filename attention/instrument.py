"""Runtime work counters: how many chunk pairs and ring hops each device really computed.

``cost_analysis()`` cannot show skipped work (XLA counts a conditional's most expensive
branch and a loop body once), and it describes one SPMD program, not each device. So the
kernels can report every executed block computation through ``jax.debug.callback`` into a
`WorkCounter` passed to them as part of their static config (``counter=``):

    with count_work() as counts:
        f = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, counter=counts))
        jax.block_until_ready(f(q, k, v))
        jax.effects_barrier()
    counts[("chunk_fwd", 3)]       # forward chunk pairs computed by ring position 3

The counter is a static argument compared by identity, so a function traced with a counter and
one traced without are different ``jax.jit`` cache entries (also for the module-level jitted
Pallas kernels): nothing global is read at trace time, and programs built without a counter carry
no callbacks. A counter closes when its `count_work` block ends; a function compiled with it still
runs its callbacks afterwards, but they add nothing.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import threading
from collections.abc import Iterator

import jax
import jax.numpy as jnp


class WorkCounter(collections.Counter):
    """Counts of executed work by ``(kind, index)``, filled at run time by the kernels given it.

    Keys are ``(kind, index)``: kind is ``chunk_fwd``/``chunk_bwd`` (one q-chunk × kv-chunk
    block), ``chunk_fwd_masked`` (the forward blocks among them that needed a mask: partly
    visible ones, or every block when skipping is off), ``hop_fwd``/``hop_bwd`` (one ring hop)
    or ``tile_fwd``/``tile_dq``/``tile_dkv`` (one Pallas tile pair), index the ring position
    (0 off a ring). Missing keys read as 0.

    Hashed and compared by identity, since it is a static jit argument that must name this very
    counter: compare contents with ``dict(counter)``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.closed = False
        # Callbacks of different devices may run on different runtime threads.
        self._lock = threading.Lock()

    __hash__ = object.__hash__

    def __eq__(self, other: object) -> bool:
        return self is other

    def __ne__(self, other: object) -> bool:
        return self is not other

    def bump(self, kind: str, index) -> None:
        """Add one unit of ``kind`` work at ring position ``index`` (nothing once closed)."""
        with self._lock:
            if not self.closed:
                self[(kind, int(index))] += 1


@contextlib.contextmanager
def count_work() -> Iterator[WorkCounter]:
    """A fresh `WorkCounter` for the kernels traced in the block (pass it as ``counter=``); closed at the end."""
    counter = WorkCounter()
    try:
        yield counter
    finally:
        counter.closed = True


def record(counter: WorkCounter | None, kind: str, index: jax.Array | int | None, when: jax.Array | None = None):
    """Count one unit of ``kind`` work into ``counter`` at run time, only if the traced bool ``when`` holds.

    Emits nothing when ``counter`` is None (the kernels' default).
    """
    if counter is None:
        return
    index = jnp.asarray(0 if index is None else index, jnp.int32)
    bump = functools.partial(counter.bump, kind)
    if when is None:
        jax.debug.callback(bump, index)
    else:
        jax.lax.cond(when, lambda i: jax.debug.callback(bump, i), lambda i: None, index)
