"""Attention masks built from token positions and segment ids, never from array indices.

Because the mask is a function of (position, segment) pairs, any permutation of tokens
(zigzag or striped ring layouts, packed documents, KV-cache slots) stays correct.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Position given to empty KV-cache slots: later than any real query, so causal masking hides them.
EMPTY_POSITION = 2**30


def default_positions(batch: int, length: int) -> jax.Array:
    """``[batch, length]`` int32 positions 0..length-1."""
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


def make_mask(
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
) -> jax.Array:
    """Boolean ``[batch, t, s]``: query t may attend key s.

    Args:
        q_positions: int ``[b, t]``; kv_positions: int ``[b, s]``.
        q_segment_ids / kv_segment_ids: int ``[b, t]`` / ``[b, s]`` or None (one document).
        causal: keys at positions later than the query are hidden.
    """
    mask = jnp.ones((q_positions.shape[0], q_positions.shape[1], kv_positions.shape[1]), bool)
    if causal:
        mask = q_positions[:, :, None] >= kv_positions[:, None, :]
    if q_segment_ids is not None and kv_segment_ids is not None:
        mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return mask
