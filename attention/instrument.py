"""Runtime work counters: how many chunk pairs and ring hops each device really computed.

``cost_analysis()`` cannot show skipped work (XLA counts a conditional's most expensive
branch and a loop body once), and it describes one SPMD program, not each device. So the
kernels can report every executed block computation through ``jax.debug.callback``:

    with count_work() as counts:
        f = jax.jit(...)            # trace *inside* the context: the flag is read at trace time
        jax.block_until_ready(f(...))
        jax.effects_barrier()
    counts[("chunk_fwd", 3)]       # forward chunk pairs computed by ring position 3

Outside the context nothing is emitted, so normal programs carry no callbacks. Functions
traced before entering the context (and cached by ``jax.jit``) are not instrumented.
"""

from __future__ import annotations

import collections
import contextlib
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp

_ENABLED = [False]
_COUNTS: collections.Counter = collections.Counter()


@contextlib.contextmanager
def count_work() -> Iterator[collections.Counter]:
    """Enable counting for functions traced inside the block; yields the (cleared) counter.

    Keys are ``(kind, index)``: kind is ``chunk_fwd``/``chunk_bwd`` (one q-chunk × kv-chunk
    block), ``chunk_fwd_masked`` (the forward blocks among them that needed a mask: partly
    visible ones, or every block when skipping is off) or ``hop_fwd``/``hop_bwd`` (one ring
    hop), index the ring position (0 off a ring).
    """
    _COUNTS.clear()
    previous = _ENABLED[0]
    _ENABLED[0] = True
    try:
        yield _COUNTS
    finally:
        _ENABLED[0] = previous


def _bump(kind: str, index) -> None:
    _COUNTS[(kind, int(index))] += 1


def record(kind: str, index: jax.Array | int | None, when: jax.Array | None = None) -> None:
    """Count one unit of ``kind`` work at run time, only if the traced bool ``when`` holds (if given).

    A no-op unless traced inside `count_work`.
    """
    if not _ENABLED[0]:
        return
    index = jnp.asarray(0 if index is None else index, jnp.int32)
    bump = functools.partial(_bump, kind)
    if when is None:
        jax.debug.callback(bump, index)
    else:
        jax.lax.cond(when, lambda i: jax.debug.callback(bump, i), lambda i: None, index)
