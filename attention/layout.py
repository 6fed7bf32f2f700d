"""Ring layouts: which tokens each sequence shard holds, and exact moves into and out of them.

With ``N`` shards on the ``sequence`` axis, a ``[b, L, ...]`` array sharded along axis 1 gives
shard r the r-th contiguous slice of length ``L/N``. A layout permutes the tokens first:

- ``contiguous``: identity; shard r holds tokens ``[r·L/N, (r+1)·L/N)``. Causal rings are
  unbalanced: the last shard sees N blocks of keys, the first only one.
- ``zigzag``: cut into ``2N`` chunks; shard r holds chunks ``r`` and ``2N−1−r``, so every shard
  owns one early and one late chunk and does the same causal work.
- ``striped``: token t goes to shard ``t mod N`` (round robin); also balanced.

Attention correctness never depends on the layout: masks come from positions, so permute
tokens, positions and segment ids together (`to_layout` on each, or `to_layout_tree`), run the
model, and bring outputs back with `from_layout`. Permutations are pure reshapes/transposes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attention.kernels import AttentionError

LAYOUTS = ("contiguous", "zigzag", "striped")


class LayoutError(AttentionError):
    """A sequence length or layout name that a ring layout cannot take; the message says the fix."""


def check_layout(length: int, num_shards: int, layout: str) -> None:
    """Raise `LayoutError` (before any compilation) if ``length`` does not fit ``layout`` on ``num_shards``."""
    if layout not in LAYOUTS:
        raise LayoutError(f"unknown ring layout {layout!r}: use one of {', '.join(LAYOUTS)}.")
    if num_shards < 1:
        raise LayoutError(f"the number of sequence shards must be positive, got {num_shards}.")
    multiple = 2 * num_shards if layout == "zigzag" else num_shards
    if length % multiple:
        what = f"2 × {num_shards} shards" if layout == "zigzag" else f"{num_shards} shards"
        raise LayoutError(
            f"sequence length {length} does not fit the {layout} layout on {num_shards} sequence shards: "
            f"it must be a multiple of {multiple} ({what}); pad or trim the sequence to "
            f"{(length // multiple + 1) * multiple} or {length // multiple * multiple} tokens."
        )


def layout_permutation(length: int, num_shards: int, layout: str) -> np.ndarray:
    """Int array ``perm`` with ``to_layout(x)[:, i] == x[:, perm[i]]`` (original index of slot i)."""
    check_layout(length, num_shards, layout)
    return np.asarray(to_layout(np.arange(length)[None], num_shards, layout)[0])


def to_layout(x: Any, num_shards: int, layout: str, axis: int = 1) -> jax.Array:
    """Reorder ``x`` (``[b, L, ...]`` by default; sequence on ``axis``) from natural token order into ``layout``."""
    return _move(x, num_shards, layout, axis, inverse=False)


def from_layout(x: Any, num_shards: int, layout: str, axis: int = 1) -> jax.Array:
    """Inverse of `to_layout`: back to natural token order."""
    return _move(x, num_shards, layout, axis, inverse=True)


def to_layout_tree(tree: Any, num_shards: int, layout: str, axis: int = 1) -> Any:
    """`to_layout` on every leaf (tokens, positions, segment ids, targets ...); None leaves stay None."""
    return jax.tree.map(lambda x: to_layout(x, num_shards, layout, axis), tree)


def from_layout_tree(tree: Any, num_shards: int, layout: str, axis: int = 1) -> Any:
    """`from_layout` on every leaf."""
    return jax.tree.map(lambda x: from_layout(x, num_shards, layout, axis), tree)


def layout_positions(batch: int, length: int, num_shards: int, layout: str) -> jax.Array:
    """int32 ``[batch, length]``: the position of each slot once tokens are in ``layout``."""
    check_layout(length, num_shards, layout)
    return jnp.broadcast_to(jnp.asarray(layout_permutation(length, num_shards, layout), jnp.int32), (batch, length))


def _move(x: Any, num_shards: int, layout: str, axis: int, inverse: bool):
    xp = np if isinstance(x, np.ndarray) else jnp
    x = x if xp is np else jnp.asarray(x)
    axis = axis % x.ndim
    length = x.shape[axis]
    check_layout(length, num_shards, layout)
    if layout == "contiguous" or num_shards == 1:
        return x
    pre, post = x.shape[:axis], x.shape[axis + 1 :]
    a = len(pre)  # index of the split sequence axes after the reshape
    if layout == "striped":
        # Natural token t = j·N + r  →  slot r·(L/N) + j: a transpose of the (L/N, N) grid.
        grid = (length // num_shards, num_shards)
        y = x.reshape(*pre, *(grid[::-1] if inverse else grid), *post)
        return xp.swapaxes(y, a, a + 1).reshape(x.shape)
    # zigzag: natural chunks [0..N-1 | N..2N-1]; shard r gets chunk r then chunk 2N-1-r.
    c = length // (2 * num_shards)
    if not inverse:
        halves = x.reshape(*pre, 2, num_shards, c, *post)  # [.., half, chunk, c, ..]
        lo = xp.take(halves, 0, axis=a)
        hi = xp.flip(xp.take(halves, 1, axis=a), axis=a)  # chunk 2N-1-r at index r
        return xp.stack([lo, hi], axis=a + 1).reshape(x.shape)  # [.., shard, half, c, ..]
    shards = x.reshape(*pre, num_shards, 2, c, *post)
    lo = xp.take(shards, 0, axis=a + 1)
    hi = xp.flip(xp.take(shards, 1, axis=a + 1), axis=a)
    return xp.concatenate([lo, hi], axis=a).reshape(x.shape)
