"""Attention for ringllama: one entry point, several exact implementations.

Shapes (letters: b batch, t query position, s key position, n query heads, k kv heads,
h head_dim)::

    attention(q[b,t,n,h], k[b,s,k,h], v[b,s,k,h], causal=..., segment_ids[b,t],
              q_positions[b,t], kv_positions[b,s], impl=...) -> out[b,t,n,h]

Masks come from positions and segment ids, so any token order (ring layouts, packed
documents, KV caches) is handled by the same code.
"""

from attention.api import IMPLS, AttentionError, attention, choose_impl
from attention.masks import EMPTY_POSITION, default_positions, make_mask
from attention.reference import reference_attention

__all__ = [
    "IMPLS",
    "AttentionError",
    "EMPTY_POSITION",
    "attention",
    "choose_impl",
    "default_positions",
    "make_mask",
    "reference_attention",
]
